"""What the routes share: the registry, the store, the worker and the server's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from quart import current_app

from mlx_sd_server.job import Limits
from mlx_sd_server.registry import ModelRegistry
from mlx_sd_server.store import FileStore
from mlx_sd_server.worker import Worker


@dataclass(frozen=True)
class Settings:
    api_key: str | None = None
    download_url_prefix: str | None = None  # None: the scheme and host the request came in on
    max_upload_bytes: int = 20 * 2**20  # whole request body
    max_upload_pixels: int = 6000 * 6000  # decoded size of one uploaded image (phone photos fit)
    max_queue: int = 8
    limits: Limits = field(default_factory=Limits)
    task: str = "full"  # full | text2image (no edits) | image2image (no generations), the reference's --task


@dataclass
class ServerState:
    registry: ModelRegistry
    store: FileStore
    worker: Worker
    settings: Settings


def state() -> ServerState:
    return current_app.extensions["mlx_sd_server"]
