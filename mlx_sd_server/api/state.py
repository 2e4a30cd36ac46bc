"""What the routes share: the registry, the store, the worker and the server's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from quart import current_app

from mlx_sd_server.api.writes import DEFAULT_WRITE_TIMEOUT
from mlx_sd_server.job import Limits
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.store import Store
from mlx_sd_server.worker import Worker


@dataclass(frozen=True)
class Settings:
    api_key: str | None = None
    download_url_prefix: str | None = None  # public prefix of image urls (--download-url-prefix)
    # The address the server listens on, as a url ("http://127.0.0.1:8080"), set by `serve` from the bound
    # socket: image urls are built from download_url_prefix or this, never from the request's Host header.
    bound_url: str | None = None
    # Origins (scheme://host[:port], normalised) that browsers may call the API from; "*" for any. Empty:
    # CORS is off, and browsers' cross-origin POST/DELETE requests are refused.
    cors_origins: tuple[str, ...] = ()
    # Host header names (lower case, no port) the server answers; empty: any. `serve` sets the loopback
    # names when it listens on loopback, so a DNS-rebound web page cannot reach it by another name.
    allowed_hosts: tuple[str, ...] = ()
    max_upload_bytes: int = 20 * 2**20  # whole request body
    max_upload_pixels: int = 6000 * 6000  # decoded size of one uploaded image (phone photos fit)
    # decoded size of all of a request's uploads together: what an image, a mask and a control image could
    # take before an edit took several images, so that 16 inputs cost no more memory than those did
    max_upload_pixels_total: int = 3 * 6000 * 6000
    max_queue: int = 8
    limits: Limits = field(default_factory=Limits)
    task: str = "full"  # full | text2image (no edits) | image2image (no generations), the reference's --task
    # Seconds a response write may make no progress (the client reads nothing) before the connection is
    # aborted (api/writes.py); None: no limit.
    write_timeout: float | None = DEFAULT_WRITE_TIMEOUT


@dataclass
class ServerState:
    registry: ModelRegistry
    store: Store
    worker: Worker
    settings: Settings


def state() -> ServerState:
    return current_app.extensions["mlx_sd_server"]
