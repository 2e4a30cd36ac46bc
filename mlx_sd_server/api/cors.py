"""What browsers may do across origins: nothing, unless the operator names origins (--cors-origin).

A web page the user happens to open can send requests to this server (it listens on the user's own
machine). The browser lets the page read the answers, or send a DELETE or a JSON POST at all, only when
the server grants its origin (`Access-Control-Allow-Origin`, after a preflight `OPTIONS` for anything
beyond a "simple" request). So:

- Grants go only to the origins the server was started with (`--cors-origin`, repeatable; `*` for any),
  and preflights are answered only for our routes and the methods each route has.
- Browsers send "simple" cross-origin requests (a form or multipart POST) without asking first; those
  carry an `Origin` header, and a POST or DELETE from an origin that is not granted is refused (403)
  before it does anything, so a page cannot start jobs either.
- A page can also rebind its own host name to 127.0.0.1 (DNS rebinding) and become "same-origin" with a
  server on loopback; such requests name the page's host in `Host`, and a loopback server answers only its
  own names (`Settings.allowed_hosts`).

Clients outside a browser (curl, the SDKs) send no `Origin` and are not affected.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from quart import Response, current_app, request

from mlx_sd_server.api.errors import APIError

log = logging.getLogger("mlx_sd_server.api")

ALLOW_HEADERS = "Authorization, Content-Type"
EXPOSE_HEADERS = "Retry-After, X-Task-Id"  # a 429's, and a request's task; not readable by a page unless exposed
MAX_AGE = "600"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # no side effects: answered, but not readable cross-origin
DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_origin(value: str) -> str:
    """`scheme://host[:port]` as browsers send it in `Origin` (lower case, no default port, no path), or
    `*`. Raises ValueError for anything else."""
    value = value.strip()
    if value == "*":
        return value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username
        or parts.password
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ValueError(
            f"{value!r} is not an origin: give scheme://host[:port], e.g. https://app.example or "
            "http://localhost:3000 (or * for any origin)"
        )
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != DEFAULT_PORTS[parts.scheme]:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


class CorsPolicy:
    """The before/after-request hooks for the granted origins (none: CORS off)."""

    def __init__(self, origins: Iterable[str] = ()):
        origins = {normalise_origin(origin) for origin in origins}
        self.any_origin = "*" in origins
        self.origins = frozenset(origins - {"*"})

    def allows(self, origin: str | None) -> bool:
        if not origin:
            return False
        if self.any_origin:
            return True
        try:
            return normalise_origin(origin) in self.origins
        except ValueError:  # "null" (sandboxed frames, file://) and anything malformed
            return False

    async def answer_preflight(self) -> Response | None:
        """A browser's preflight (OPTIONS with Access-Control-Request-Method), answered before the API key
        check (browsers send no credentials with it): a grant for a granted origin asking for a method one
        of our routes has; a 403 for another origin or method; other paths fall through to their 404."""
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        methods = _route_methods()
        if not methods:
            return None  # not one of our routes: the router's 404
        origin = request.headers.get("Origin")
        if not self.allows(origin):
            raise _refused(origin)
        wanted = request.headers["Access-Control-Request-Method"].strip().upper()
        if wanted not in methods:
            raise APIError(
                403,
                f"{request.path} does not take {wanted!r} (it takes {', '.join(sorted(methods))})",
                code="cors_method_not_allowed",
            )
        response = Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = ", ".join(sorted(methods | {"OPTIONS"}))
        response.headers["Access-Control-Allow-Headers"] = _allowed_request_headers()
        response.headers["Access-Control-Max-Age"] = MAX_AGE
        return response

    async def refuse_cross_origin_writes(self) -> None:
        """A POST or DELETE that a browser sent from an origin not granted (a form on some web page)."""
        if request.method in SAFE_METHODS:
            return
        origin = request.headers.get("Origin")
        if origin is not None and not self.allows(origin) and not _same_origin(origin):
            raise _refused(origin)

    async def add_headers(self, response: Response) -> Response:
        if self.any_origin:
            response.headers["Access-Control-Allow-Origin"] = "*"
        elif self.origins:
            response.vary.add("Origin")  # the answer differs by Origin: caches must keep them apart
            origin = request.headers.get("Origin")
            if origin is None or not self.allows(origin):
                return response
            response.headers["Access-Control-Allow-Origin"] = normalise_origin(origin)
        else:
            return response
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        return response


def require_allowed_host(allowed_hosts: Iterable[str]):
    """A before_request hook answering 403 to a Host header not in `allowed_hosts` (names, no port)."""
    allowed = frozenset(host.lower().strip("[]") for host in allowed_hosts)

    async def check() -> None:
        sent = request.headers.get("Host")
        if not sent:
            # No Host at all (HTTP/1.0, which Quart gives an empty one): browsers always send Host, and a
            # DNS-rebinding attack needs a browser, so this is a local client (curl -0, a script): answered.
            return
        name = host_name(sent)
        if name not in allowed:
            raise APIError(
                403,
                f"this server does not answer for host {name!r}: it listens on loopback and answers "
                f"{', '.join(sorted(allowed))} (behind a proxy, give its public url with "
                "--download-url-prefix)",
                code="host_not_allowed",
            )

    return check


# The longest Host value that can name a host: a DNS name is at most 253 characters; the rest is room for a
# port, brackets and a trailing dot.
MAX_HOST = 270
_IPV6_HOST = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::[0-9]*)?")


def host_problem(value: str) -> str | None:
    """What is wrong with a Host header's value as `host[:port]` (None: nothing). Empty is fine (no Host).

    Werkzeug's router raises while Quart builds the request context (before any hook or error handler)
    for a name it cannot IDNA-encode: a label over 63 characters, or an empty one (`a..b`, `.a`, `.`). Such
    a name, and any other that is not a host name, an IPv4 or a bracketed IPv6 address with an optional
    numeric port, is refused here first."""
    value = value.strip()
    if not value:
        return None
    if len(value) > MAX_HOST:
        return f"it is {len(value)} characters long (a host name has at most 253)"
    if value.startswith("["):
        match = _IPV6_HOST.fullmatch(value)
        try:
            ipaddress.IPv6Address(match.group(1) if match else "")
        except ValueError:
            return "it is not [IPv6 address] or [IPv6 address]:port"
        return None
    name, _, port = value.partition(":")
    if port and not port.isdigit():
        return "its port is not a number"
    if not name:
        return None  # `:8080`: no name, nothing to encode
    labels = name.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # `localhost.`: a fully qualified name
    if any(not label for label in labels):
        return "it has an empty label (`..`, or a dot at the start)"
    if any(len(label) > 63 for label in labels):
        return "it has a label over 63 characters"
    try:
        name.lower().encode("idna")  # what the router does with it
    except UnicodeError:
        return "it is not a valid host name"
    return None


class HostHeaderGuard:
    """ASGI middleware in front of Quart: a request whose Host header is no host name is answered 400 in
    OpenAI's error envelope here, before Quart builds its request context (whose router would raise on
    it, before any hook: an empty 500 and a traceback in the log, and a 500 instead of the 401 when an
    API key is required)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            for name, value in scope.get("headers") or ():
                if name.lower() == b"host":
                    problem = host_problem(value.decode("latin-1"))
                    if problem is not None:
                        return await self._refuse(scope, receive, send, problem)
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope, receive, send, problem: str) -> None:
        log.info("refused a request whose Host header is not a host name: %s", problem)
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})  # before accepting: an HTTP 403
            return
        body = json.dumps(
            {
                "error": {
                    "message": f"the Host header is not a host name: {problem}",
                    "type": "invalid_request_error",
                    "param": "Host",
                    "code": "invalid_host_header",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def host_name(host: str) -> str:
    """The name in a Host header, without the port or IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.partition(":")[0].rstrip(".")


def _route_methods() -> set[str]:
    adapter = current_app.create_url_adapter(request)
    if adapter is None:
        return set()
    return set(adapter.allowed_methods()) - {"OPTIONS", "HEAD"}


def _allowed_request_headers() -> str:
    """The headers the page asked to send (SDKs add their own, e.g. X-Stainless-*), for a granted origin."""
    asked = request.headers.get("Access-Control-Request-Headers", "")
    names = [name.strip() for name in asked.split(",") if name.strip()]
    if names and all(name.replace("-", "").replace("_", "").isalnum() for name in names):
        return ", ".join(names)
    return ALLOW_HEADERS


def _same_origin(origin: str) -> bool:
    """Whether `Origin` names this server as the request reached it (its `Host`): browsers send `Origin` with
    a same-origin POST too, e.g. the playground's. The scheme is not compared (a TLS proxy in front speaks
    http to us). A DNS-rebound page also looks same-origin; on loopback the Host check refuses it first."""
    host = request.headers.get("Host")
    if not host:
        return False
    try:
        origin = normalise_origin(origin)
    except ValueError:
        return False
    return origin != "*" and origin.partition("://")[2] == host.strip().lower()


def _refused(origin: str | None) -> APIError:
    return APIError(
        403,
        f"cross-origin requests from {origin} are not allowed: start the server with "
        f"--cors-origin {origin} to allow this origin",
        code="cors_origin_not_allowed",
    )
