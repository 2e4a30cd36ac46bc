"""CORS, as the reference sends it: browser apps on other origins may call the API."""

from __future__ import annotations

from quart import Response, request

ALLOW_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}


async def answer_preflight() -> Response | None:
    """Browsers ask with OPTIONS (and no credentials) before a cross-origin POST: answer before auth."""
    if request.method == "OPTIONS":
        return Response(status=204)
    return None


async def add_cors_headers(response: Response) -> Response:
    response.headers.update(ALLOW_HEADERS)
    return response
