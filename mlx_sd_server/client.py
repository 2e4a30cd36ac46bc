"""A small HTTP client of a running server, for the commands that talk to it (`ps`, `stop`, `rm`).

Where the server is: `--url`, else $MLX_SD_URL, else where `serve` listens by default. Its key: `--api-key`, else
$API_KEY (as `serve` reads it). Failures are one line for the user: no server answering, or the server's own
error message.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8080"  # serve's default --host and --port
URL_ENV = "MLX_SD_URL"
API_KEY_ENV = "API_KEY"
TIMEOUT = 10.0  # seconds: listing and unloading an idle model are answered at once


class ServerError(Exception):
    """The server answered with an error (its envelope's message), or not as this server answers."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class NoServerError(ServerError):
    """Nothing answers at the address: no server is running there."""


class ServerTimeoutError(ServerError):
    """The server took the connection but did not answer in time (busy with a long job, or stuck)."""


@dataclass(frozen=True)
class Server:
    url: str  # e.g. http://127.0.0.1:8080, no trailing slash
    api_key: str | None = None

    def get(self, path: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        return self.request("GET", path, None, timeout)

    def post(self, path: str, body: dict[str, Any] | None = None, timeout: float = TIMEOUT) -> dict[str, Any]:
        return self.request("POST", path, body, timeout)

    def request(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        """The JSON answer to one request, or ServerError (NoServerError, ServerTimeoutError) with one line."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with opener(self.url).open(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            raise ServerError(*error_message(error.code, error.read(), error.reason)) from None
        except urllib.error.URLError:  # (urllib's wrapping of what failed while connecting: refused, unreachable)
            raise NoServerError(f"no server answers at {self.url} (start it with mlx-sd-server serve)") from None
        except TimeoutError:  # connected, but no answer in time
            raise ServerTimeoutError(f"the server at {self.url} did not answer within {timeout:g} s") from None
        except (ConnectionError, http.client.HTTPException) as error:  # it hung up, or something else answered
            raise ServerError(f"{self.url} did not answer as mlx-sd-server does ({type(error).__name__})") from None
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):  # (every answer of this server is a JSON object)
            raise ServerError(f"{self.url} did not answer as mlx-sd-server does (not a JSON object)")
        return answer


def error_message(status: int, body: bytes, reason: str) -> tuple[str, int, str | None]:
    """(message, status, code) of an error answer: OpenAI's envelope `{"error": {"message", "code"}}`, else the
    status line (something other than this server answered)."""
    try:
        error = json.loads(body)["error"]
        return str(error["message"]), status, error.get("code")
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status} {reason}", status, None


def opener(url: str) -> urllib.request.OpenerDirector:
    """urllib's opener; for a server on this machine without the environment's proxy (http_proxy without a
    no_proxy for localhost would send our requests to the proxy)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost" or is_loopback(host):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalized_url(text: str) -> str:
    """A server address as given (`http://host:port`, `localhost:8080`: http:// where no scheme is given), without
    a trailing slash; ValueError where it is not an http(s) address with a host."""
    url = text.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url.rstrip("/"))
    try:
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
    except ValueError:
        raise ValueError(f"{text!r} is not a server address (http://HOST:PORT)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not a server address (http://HOST:PORT)")
    return parts.geturl()


def server_from(args: argparse.Namespace) -> Server:
    """The server the command's `--url`/`--api-key` (else $MLX_SD_URL/$API_KEY, else serve's default) name."""
    url = getattr(args, "url", None) or os.environ.get(URL_ENV) or DEFAULT_URL
    api_key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None
    try:
        return Server(normalized_url(url), api_key)
    except ValueError as exc:
        raise ServerError(f"${URL_ENV}: {exc}" if not getattr(args, "url", None) else str(exc)) from None


def model_path(name: str, action: str = "") -> str:
    """/v1/models/NAME[/action], the name quoted as a path segment."""
    return f"/v1/models/{urllib.parse.quote(name, safe='')}" + (f"/{action}" if action else "")
