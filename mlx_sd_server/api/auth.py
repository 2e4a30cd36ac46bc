"""Bearer-token check for /v1/*. Unlike the reference, a missing header is refused too."""

from __future__ import annotations

import hmac

from quart import request

from mlx_sd_server.api.errors import APIError


def require_api_key(api_key: str):
    """A before_request hook that answers 401 unless `Authorization: Bearer <api_key>` is sent."""
    expected = f"Bearer {api_key}".encode()

    async def check() -> None:
        if not request.path.startswith("/v1/"):
            return
        sent = request.headers.get("Authorization", "").strip().encode()
        if not sent:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        if not hmac.compare_digest(sent, expected):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    return check
