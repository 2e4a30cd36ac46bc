"""Clients that stop reading: a response write that makes no progress for `timeout` seconds ends the
connection.

A client that opens a stream (`stream: true`) or asks for a large answer and then reads nothing holds its
connection, and the answer's bytes buffered for it, for as long as it likes: Hypercorn waits on a full
socket without a limit. This ASGI middleware bounds that wait. Each `http.response.*` message is handed
to the server as usual; while it is pending the server's write buffer for the connection is watched, and
if it has not shrunk in `timeout` seconds (the client read nothing) the connection is aborted (its buffers
dropped at once, not flushed to a client that will not take them), the app stops sending, and the
request's job, if still running, is cancelled as for any client that goes away.

A slow client that keeps reading makes progress and is not cut off, however long a large answer takes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("mlx_sd_server.api")

# The default for Settings.write_timeout: seconds without a byte read before a client is given up on. Any
# client that reads (a browser, the SDKs, curl) takes each event as it comes, so a pause of this length
# means it stopped reading; 30 s is far beyond a scheduling hiccup or a busy client's GC pause, and short
# enough that a handful of stuck clients cannot hold their buffers (megabytes of base64 images each) for long.
DEFAULT_WRITE_TIMEOUT = 30.0


class ClientStalled(Exception):
    """The client read nothing for the write timeout: its connection was aborted."""


def _transport(send: Any) -> Any:
    """The asyncio transport under an ASGI `send`, where the server is Hypercorn on asyncio (send is bound
    to its HTTP stream, whose `send` is bound to the protocol, whose `send` is bound to the TCP server
    that owns the stream writer); None elsewhere (e.g. Quart's test client)."""
    owner = getattr(send, "__self__", None)
    for _ in range(4):
        if owner is None:
            return None
        writer = getattr(owner, "writer", None)
        transport = getattr(writer, "transport", None)
        if transport is not None and hasattr(transport, "get_write_buffer_size") and hasattr(transport, "abort"):
            return transport
        owner = getattr(getattr(owner, "send", None), "__self__", None)
    return None


class WriteTimeoutGuard:
    """ASGI middleware: see the module's docstring. `timeout`: seconds (None or 0: no limit).

    The app's sends go to the server as they are, in the app's own task (an extra task per send would
    reorder a response's end against the connection's close in the server's bookkeeping); a watchdog task
    beside the app looks at the pending send every `timeout / 4` seconds and aborts the connection once
    the write buffer has not shrunk for `timeout`. The aborted send returns, and this one raises
    ClientStalled into the app, which stops it; the middleware swallows it (no traceback in the log)."""

    def __init__(self, app, timeout: float | None = DEFAULT_WRITE_TIMEOUT):
        self.app = app
        self.timeout = timeout or 0.0  # 0: no limit

    async def __call__(self, scope, receive, send) -> None:
        transport = _transport(send) if scope["type"] == "http" and self.timeout else None
        if transport is None:  # not Hypercorn on asyncio (or no limit): nothing to watch with
            return await self.app(scope, receive, send)
        pending: list[int] = []  # a number per send in progress (one at a time: ASGI sends are awaited)
        stalled = asyncio.Event()
        watchdog: asyncio.Task | None = None
        sends = 0

        async def watched_send(message) -> None:
            nonlocal watchdog, sends
            if stalled.is_set():
                raise ClientStalled()
            if watchdog is None:
                watchdog = asyncio.ensure_future(self._watch(transport, pending, stalled, scope))
            sends += 1
            pending.append(sends)
            try:
                await send(message)
            finally:
                pending.remove(sends)
            if stalled.is_set():  # aborted while this write waited: the rest goes nowhere
                raise ClientStalled()

        try:
            await self.app(scope, receive, watched_send)
        except ClientStalled:
            pass  # the connection is gone; nothing more to send, nothing to log as an error
        finally:
            if watchdog is not None:
                watchdog.cancel()

    async def _watch(self, transport, pending: list[int], stalled: asyncio.Event, scope) -> None:
        loop = asyncio.get_running_loop()
        mark: tuple[int, int, float] | None = None  # (send, buffered bytes, since when) while one waits
        while True:
            await asyncio.sleep(self.timeout / 4)
            if not pending:
                mark = None
                continue
            size, now = transport.get_write_buffer_size(), loop.time()
            if mark is None or mark[0] != pending[0] or size < mark[1]:
                mark = (pending[0], size, now)  # a new write, or the client read some: the clock restarts
                continue
            if now - mark[2] >= self.timeout:
                client = scope.get("client") or ("?",)
                log.info(
                    "%s %s: the client (%s) read nothing for %g s; closing its connection",
                    scope.get("method"),
                    scope.get("path"),
                    client[0],
                    self.timeout,
                )
                stalled.set()
                transport.abort()  # drops what is buffered for it; the server sees the connection lost
                return
