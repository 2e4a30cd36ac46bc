"""`mlx-sd-server serve`: build the registry, store and app from the command line, run Hypercorn."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from hypercorn.asyncio import serve
from hypercorn.config import Config

from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.job import Limits
from mlx_sd_server.registry import ModelRegistry, model_dir
from mlx_sd_server.store import FileStore

log = logging.getLogger("mlx_sd_server.server")

# One line per request: method, path, status, seconds, client.
ACCESS_LOG_FORMAT = "%(m)s %(U)s %(s)s %(L)ss %(h)s"


def hypercorn_config(host: str, port: int) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = logging.getLogger("mlx_sd_server.access")
    config.access_log_format = ACCESS_LOG_FORMAT
    config.errorlog = logging.getLogger("mlx_sd_server.server")
    return config


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        api_key=args.api_key or os.environ.get("API_KEY") or None,
        download_url_prefix=args.download_url_prefix,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_queue=args.max_queue,
        limits=Limits(max_n=args.max_n, max_steps=args.max_steps, max_pixels=args.max_pixels),
    )


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = model_dir(args.model_dir)
    registry = ModelRegistry(args.model, models, control_net=args.control_net, dtype=args.dtype, engine=args.engine,
                             low_memory=args.low_memory)
    store = FileStore(args.store_dir or models.parent / "files")
    settings = settings_from_args(args)
    app = create_app(registry, store, settings)
    log.info("models: %s (default %s); engine %s; files in %s; API key %s",
             ", ".join(registry.names()), registry.default_name, args.engine, store.root,
             "required" if settings.api_key else "not required")
    asyncio.run(serve(app, hypercorn_config(args.host, args.port)))
    return 0
