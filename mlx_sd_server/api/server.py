"""`mlx-sd-server serve`: build the registry, store and app from the command line, run Hypercorn."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from hypercorn.asyncio import serve
from hypercorn.config import Config

from convert.cli import split_files
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
        task=args.task,
    )


def bind_address(args: argparse.Namespace) -> tuple[str, int]:
    """--socket-addr HOST:PORT (the reference's; [::1]:8080 for IPv6) wins over --host and --port."""
    if not args.socket_addr:
        return args.host, args.port
    host, _, port = args.socket_addr.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"mlx-sd-server serve: --socket-addr must be HOST:PORT, got {args.socket_addr!r}")
    return host.strip("[]"), int(port)


def log_reference_flags(args: argparse.Namespace) -> None:
    """The reference's flags that MLX has no use for are accepted; say so once, at start."""
    for flag in ("clip_on_cpu", "vae_on_cpu", "control_net_cpu"):
        if getattr(args, flag):
            log.info("--%s has no effect: MLX's CPU and GPU share unified memory, so there is no GPU memory "
                     "to save by moving a component", flag.replace("_", "-"))
    if args.lora_model_dir:
        log.warning("--lora-model-dir %s: LoRAs are not applied in this version; prompts with <lora:...> tags "
                    "are refused (400)", args.lora_model_dir)


def registry_from_args(args: argparse.Namespace) -> ModelRegistry:
    """The served models: split files (the reference's --diffusion-model ...) first, then each --model."""
    try:
        split = split_files(args)
    except ValueError as exc:
        raise SystemExit(f"mlx-sd-server serve: {exc}") from None
    return ModelRegistry(([split] if split else []) + args.model, model_dir(args.model_dir),
                         control_net=args.control_net, dtype=args.dtype, engine=args.engine,
                         low_memory=args.low_memory, model_name=args.model_name,
                         strict_model_names=args.strict_model_names)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = bind_address(args)
    log_reference_flags(args)
    registry = registry_from_args(args)
    store = FileStore(args.store_dir or model_dir(args.model_dir).parent / "files")
    settings = settings_from_args(args)
    app = create_app(registry, store, settings)
    log.info("models: %s (default %s); engine %s; task %s; files in %s; API key %s",
             ", ".join(registry.names()), registry.default_name, args.engine, args.task, store.root,
             "required" if settings.api_key else "not required")
    asyncio.run(serve(app, hypercorn_config(host, port)))
    return 0
