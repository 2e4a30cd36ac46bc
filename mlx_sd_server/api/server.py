"""`mlx-sd-server serve`: build the registry, store and app from the command line, run Hypercorn.

The listening socket is bound before anything else (a busy port is one line, not a traceback, and not
after minutes of converting a model). SIGTERM and SIGINT stop gracefully: the running job ends after its
current step, waiting requests are answered 503, and the process exits with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import ipaddress
import logging
import os
import signal
import socket
from urllib.parse import urlsplit

from hypercorn.asyncio import serve
from hypercorn.config import Config
from hypercorn.logging import AccessLogAtoms
from hypercorn.logging import Logger as HypercornLogger

try:
    from hypercorn.utils import UnexpectedMessageError

    _EXPECTED_WHILE_STOPPING: tuple[type[Exception], ...] = (UnexpectedMessageError,)
except ImportError:  # an older Hypercorn: nothing to recognise
    _EXPECTED_WHILE_STOPPING = ()

from convert.cli import split_files
from mlx_sd_server import store as store_module
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.api.cors import normalise_origin
from mlx_sd_server.api.writes import DEFAULT_WRITE_TIMEOUT
from mlx_sd_server.cli import keep_alive, memory_size
from mlx_sd_server.job import Limits
from mlx_sd_server.registry import DEFAULT_KEEP_ALIVE, ModelRegistry, model_dir
from mlx_sd_server.store import FileStore, Store

log = logging.getLogger("mlx_sd_server.server")

DEFAULT_HOST = "127.0.0.1"  # this machine only; --host 0.0.0.0 for every interface
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
GRACEFUL_SECONDS = 5.0  # after a stop signal, how long open connections get to receive their answers

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# One line per request: method, path (as sent, control characters percent-encoded), status, seconds, client.
ACCESS_LOG_FORMAT = "%(m)s %(U)s %(s)s %(L)ss %(h)s %(task)s"  # task: the X-Task-Id it answered with, or -

# Control characters (C0, DEL, C1) and the Unicode line separators, as backslash escapes.
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """`text` with every control character backslash-escaped: one log record is one line, and a request
    cannot write terminal escape sequences into the log."""
    return text.translate(_ESCAPES)


def escape_bytes(raw: bytes) -> str:
    """A request target as it came, printable: bytes outside visible ASCII percent-encoded (`%0A`)."""
    return "".join(chr(b) if 0x21 <= b <= 0x7E else f"%{b:02X}" for b in raw)


class OneLineFormatter(logging.Formatter):
    """Escapes control characters in log messages (tracebacks, which are ours, stay multi-line)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


class AccessLogger(HypercornLogger):
    """Hypercorn's logger, with the request's path and query in the access log exactly as sent on the
    wire (percent-encoded where the client encoded them) rather than decoded: a `%0a` in a path cannot
    start a forged log line."""

    def atoms(self, request, response, request_time):
        # What Logger.atoms makes, as the dict it is, updated in place: a copy would lose its "-" for a
        # missing key.
        atoms = AccessLogAtoms(request, response, request_time)
        path = escape_bytes(request.get("raw_path") or request["path"].encode("utf-8", "surrogateescape"))
        query = escape_bytes(request.get("query_string", b""))
        path_with_query = path + ("?" + query if query else "")
        method = one_line(atoms["m"])
        protocol = one_line(atoms["H"])
        headers = {name.lower(): value for name, value in (response or {}).get("headers", [])}
        atoms.update(
            {
                "U": path,
                "q": query,
                "Uq": path_with_query,
                "m": method,
                "task": escape_bytes(headers.get(b"x-task-id", b"-")),
                "r": f"{method} {path} {protocol}",
                "R": f"{method} {path_with_query} {protocol}",
            }
        )
        return atoms


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper())
    for handler in logging.getLogger().handlers:
        handler.setFormatter(OneLineFormatter(LOG_FORMAT))


def hypercorn_config(host: str, port: int) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = logging.getLogger("mlx_sd_server.access")
    config.access_log_format = ACCESS_LOG_FORMAT
    config.errorlog = logging.getLogger("mlx_sd_server.server")
    config.logger_class = AccessLogger
    config.graceful_timeout = GRACEFUL_SECONDS
    return config


def settings_from_args(args: argparse.Namespace) -> Settings:
    try:
        cors_origins = tuple(dict.fromkeys(normalise_origin(origin) for origin in getattr(args, "cors_origin", [])))
    except ValueError as exc:
        raise SystemExit(f"mlx-sd-server serve: --cors-origin: {exc}") from None
    prefix = args.download_url_prefix
    if prefix and urlsplit(prefix).scheme not in ("http", "https"):
        raise SystemExit(
            f"mlx-sd-server serve: --download-url-prefix must start with http:// or https://, got {prefix!r}"
        )
    return Settings(
        api_key=args.api_key or os.environ.get("API_KEY") or None,
        download_url_prefix=prefix,
        cors_origins=cors_origins,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_queue=args.max_queue,
        limits=Limits(max_n=args.max_n, max_steps=args.max_steps, max_pixels=args.max_pixels),
        task=args.task,
        # --write-timeout SECONDS where the command line has it (0: no limit), else the default
        write_timeout=DEFAULT_WRITE_TIMEOUT
        if getattr(args, "write_timeout", None) is None
        else args.write_timeout or None,
    )


def bind_address(args: argparse.Namespace) -> tuple[str, int]:
    """--socket-addr HOST:PORT (the reference's; [::1]:8080 for IPv6) wins over --host and --port; the host
    defaults to 127.0.0.1 (this machine only)."""
    if not args.socket_addr:
        return args.host or DEFAULT_HOST, args.port
    host, _, port = args.socket_addr.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"mlx-sd-server serve: --socket-addr must be HOST:PORT, got {args.socket_addr!r}")
    return host.strip("[]"), int(port)


def log_reference_flags(args: argparse.Namespace) -> None:
    """The reference's flags that MLX has no use for are accepted; say so once, at start."""
    for flag in ("clip_on_cpu", "vae_on_cpu", "control_net_cpu"):
        if getattr(args, flag):
            log.info(
                "--%s has no effect: MLX's CPU and GPU share unified memory, so there is no GPU memory "
                "to save by moving a component",
                flag.replace("_", "-"),
            )


def registry_from_args(args: argparse.Namespace) -> ModelRegistry:
    """The served models: split files (the reference's --diffusion-model ...) first, then each --model."""
    try:
        split = split_files(args)
    except ValueError as exc:
        raise SystemExit(f"mlx-sd-server serve: {exc}") from None
    return ModelRegistry(
        ([split] if split else []) + args.model,
        model_dir(args.model_dir),
        control_net=args.control_net,
        dtype=args.dtype,
        engine=args.engine,
        low_memory=args.low_memory,
        model_name=args.model_name,
        strict_model_names=args.strict_model_names,
        lora_dir=args.lora_model_dir,
        lora_fuse_budget=int(args.lora_fuse_gb * 2**30),
        max_memory=memory_size(args.max_memory) if getattr(args, "max_memory", None) else None,
        keep_alive=keep_alive(args.keep_alive) if getattr(args, "keep_alive", None) else DEFAULT_KEEP_ALIVE,
    )


def store_from_args(args: argparse.Namespace) -> Store:
    """--store s3://BUCKET/PREFIX: an S3 bucket; else --store-dir; else $MLX_SD_STORE (an s3:// location);
    else the folder beside the models. A bad location or bucket exits with one line."""
    max_age = getattr(args, "store_max_age", None)
    max_gb = getattr(args, "store_max_gb", None)
    seconds = store_module.max_age(max_age) if max_age else None
    size = store_module.max_gb(max_gb) if max_gb else None
    location = getattr(args, "store", None)
    if location and args.store_dir:
        raise SystemExit("mlx-sd-server serve: --store and --store-dir name two stores; give one")
    if not location and not args.store_dir:
        location = os.environ.get(store_module.STORE_ENV) or None
    urls = getattr(args, "store_urls", "files")
    if not location:
        if urls == "presigned":
            raise SystemExit(
                "mlx-sd-server serve: --store-urls presigned needs an S3 store (--store s3://BUCKET/PREFIX)"
            )
        return FileStore(args.store_dir or model_dir(args.model_dir).parent / "files", max_age=seconds, max_bytes=size)
    try:
        store_module.s3_location(location)
        from mlx_sd_server.s3_store import S3Store  # boto3: the s3 extra, needed only here
    except ValueError as error:
        raise SystemExit(f"mlx-sd-server serve: ${store_module.STORE_ENV}: {error}") from None
    except ImportError:
        raise SystemExit("mlx-sd-server serve: an S3 store needs boto3: pip install 'mlx-sd-server[s3]'") from None
    try:
        return S3Store(
            location,
            max_age=seconds,
            max_bytes=size,
            urls=urls,
            url_expiry=getattr(args, "store_url_expiry", 3600),
        )
    except ValueError as error:
        raise SystemExit(f"mlx-sd-server serve: {location}: {error}") from None


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound (as Hypercorn binds it); an address that cannot be had is one line."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if error.errno == errno.EADDRINUSE:
            reason = "the port is in use (another mlx-sd-server, or another program); choose another with --port"
        elif error.errno == errno.EADDRNOTAVAIL:
            reason = "that address is not one of this machine's"
        elif error.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need root); choose another with --port"
        else:
            reason = error.strerror or str(error)
        raise SystemExit(f"mlx-sd-server serve: cannot listen on {where}: {reason}") from None
    return sock


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address.lower() == "localhost"


def url_for(host: str, port: int) -> str:
    """The url clients on this machine (loopback, a named address) or the network (a wildcard bind: this
    machine's host name) reach the server at."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname() or "localhost"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listening_settings(settings: Settings, host: str, sock: socket.socket) -> Settings:
    """bound_url from the bound socket; on loopback, the Host names answered (DNS-rebinding protection)."""
    address, port = sock.getsockname()[:2]
    allowed_hosts: tuple[str, ...] = ()
    if is_loopback(address):
        names = [*LOOPBACK_NAMES, host, address]
        if settings.download_url_prefix:
            names.append(urlsplit(settings.download_url_prefix).hostname or "")
        allowed_hosts = tuple(dict.fromkeys(name.lower() for name in names if name))
    return dataclasses.replace(settings, bound_url=url_for(host, port), allowed_hosts=allowed_hosts)


def warn_about_exposure(settings: Settings, sock: socket.socket) -> None:
    address = sock.getsockname()[0]
    if not is_loopback(address) and not settings.api_key:
        log.warning(
            "listening on %s without an API key: anyone who can reach this machine can run jobs and list, "
            "read and delete its images. Set --api-key (or API_KEY), or leave --host at 127.0.0.1",
            address,
        )
    if "*" in settings.cors_origins and not settings.api_key:
        log.warning(
            "--cors-origin '*' without an API key: every web page opened in a browser on this machine "
            "can run jobs and read and delete its images"
        )


async def serve_until_stopped(app, config: Config) -> None:
    """Hypercorn, until SIGTERM or SIGINT: then the worker answers waiting requests 503 at once (their
    answers go out while Hypercorn closes the connections) and finishes its current step. A second signal
    exits at once."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():
            log.warning("%s again: exiting now", name)
            logging.shutdown()
            os._exit(128 + signum)
        log.info("%s: stopping (the running job ends after its current step; waiting requests get 503)", name)
        stopping.set()

    def quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """Connections cut when the graceful time is up are expected then, not errors with tracebacks."""
        error = context.get("exception")
        if isinstance(error, asyncio.CancelledError) or (
            stopping.is_set() and isinstance(error, _EXPECTED_WHILE_STOPPING)
        ):
            log.debug("while stopping: %s", context.get("message"))
            return
        loop.default_exception_handler(context)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.set_exception_handler(quiet_cancellations)

    async def shutdown_trigger() -> None:
        await stopping.wait()
        app.extensions["mlx_sd_server"].worker.shutdown()

    await serve(app, config, shutdown_trigger=shutdown_trigger)


def main(args: argparse.Namespace) -> int:
    if getattr(args, "ray", False):  # Ray Serve: replicas behind one address (mlx_sd_server/cluster.py)
        from mlx_sd_server.cluster import serve_with_ray

        return serve_with_ray(args)
    configure_logging(args.log_level)
    host, port = bind_address(args)
    log_reference_flags(args)
    settings = settings_from_args(args)
    sock = bind_socket(host, port)  # first: a busy port fails now, not after loading models
    try:
        settings = listening_settings(settings, host, sock)
        warn_about_exposure(settings, sock)
        registry = registry_from_args(args)
        store = store_from_args(args)
        app = create_app(registry, store, settings)
        log.info(
            "models: %s (default %s); engine %s; task %s; files in %s; API key %s",
            ", ".join(registry.names()),
            registry.default_name,
            args.engine,
            args.task,
            store.location,
            "required" if settings.api_key else "not required",
        )
        url_prefix = settings.download_url_prefix or settings.bound_url
        assert url_prefix is not None  # listening_settings set bound_url
        log.info(
            "image urls start with %s; cross-origin (CORS) requests: %s",
            url_prefix.rstrip("/"),
            ", ".join(settings.cors_origins) or "off (--cors-origin ORIGIN to allow a web app)",
        )
        config = hypercorn_config(host, port)
        sock.listen(config.backlog)
        config.bind = [f"fd://{sock.detach()}"]  # Hypercorn's from here on
        asyncio.run(serve_until_stopped(app, config))
    except KeyboardInterrupt:  # Ctrl-C before serving began (e.g. while converting a model)
        log.info("interrupted")
        return 130
    finally:
        sock.close()
    log.info("stopped")
    return 0
