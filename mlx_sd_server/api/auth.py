"""Bearer-token check for /v1/*. Unlike the reference, a missing header is refused too."""

from __future__ import annotations

import hmac

from quart import request

from mlx_sd_server.api.errors import APIError


def require_api_key(api_key: str):
    """A before_request hook that answers 401 unless `Authorization: Bearer <api_key>` is sent (the scheme
    name in any case, as RFC 9110 says: `bearer` and `BEARER` too)."""
    expected = api_key.encode()

    async def check() -> None:
        if not request.path.startswith("/v1/"):
            return
        sent = request.headers.get("Authorization", "").strip()
        if not sent:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        scheme, _, token = sent.partition(" ")
        # compare_digest on every path, so the time taken says nothing about the key
        matches = hmac.compare_digest(token.strip().encode(), expected)
        if scheme.lower() != "bearer" or not matches:
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    return check
