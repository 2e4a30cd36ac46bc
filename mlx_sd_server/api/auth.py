"""Bearer-token check for /v1/* and /sdapi/*. Unlike the reference, a missing header is refused too.

A1111's clients (SillyTavern, Open WebUI) send A1111's `--api-auth user:password` as HTTP Basic: on /sdapi/
the key is taken so too, as the password (any user name) or as the whole `user:password` text."""

from __future__ import annotations

import base64
import binascii
import hmac

from quart import request

from mlx_sd_server.api.errors import APIError

PROTECTED = ("/v1/", "/sdapi/")


def require_api_key(api_key: str):
    """A before_request hook that answers 401 unless `Authorization: Bearer <api_key>` is sent (the scheme
    name in any case, as RFC 9110 says: `bearer` and `BEARER` too), or on /sdapi/ `Basic` with the key."""
    expected = api_key.encode()

    async def check() -> None:
        if not request.path.startswith(PROTECTED):
            return
        sent = request.headers.get("Authorization", "").strip()
        scheme, _, token = sent.partition(" ")
        if scheme.lower() == "basic" and request.path.startswith("/sdapi/"):
            if not _basic_matches(token.strip(), expected):
                raise APIError(401, "incorrect API key (as the Basic password)", code="invalid_api_key")
            return
        if not sent:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        # compare_digest on every path, so the time taken says nothing about the key
        matches = hmac.compare_digest(token.strip().encode(), expected)
        if scheme.lower() != "bearer" or not matches:
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    return check


def _basic_matches(token: str, expected: bytes) -> bool:
    """Basic credentials whose password (or whole `user:password` text) is the key."""
    try:
        credentials = base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        credentials = b""
    password = credentials.partition(b":")[2]
    whole = hmac.compare_digest(credentials, expected)
    return hmac.compare_digest(password, expected) or whole
