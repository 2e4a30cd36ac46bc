"""The playground: a web page at `/` for trying the server from a browser.

Plain HTML, CSS and JS from `static/`, no build step and nothing fetched from another host (it works
offline). The page is public, as `/health` is: its API calls are same-origin, relative urls carrying the
API key the user typed (kept in the browser's localStorage) as a Bearer token, so `--api-key` guards the
API and not the page. A Content-Security-Policy keeps the page to its own origin.
"""

from __future__ import annotations

from importlib import resources

from quart import Blueprint, Response

blueprint = Blueprint("playground", __name__)

# The files served, by name: nothing else from the folder (and no path from the request) is ever opened.
FILES = {
    "playground.html": "text/html; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def _serve(name: str) -> Response:
    body = (resources.files("mlx_sd_server.api") / "static" / name).read_bytes()  # one name a step: Python 3.10
    response = Response(body, content_type=FILES[name])
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    if name.endswith(".html"):
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["Referrer-Policy"] = "same-origin"
    return response


@blueprint.get("/")
async def page() -> Response:
    return _serve("playground.html")


@blueprint.get("/playground/playground.js")
async def script() -> Response:
    return _serve("playground.js")


@blueprint.get("/playground/playground.css")
async def stylesheet() -> Response:
    return _serve("playground.css")
