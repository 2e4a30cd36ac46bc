"""`mlx-sd-server service install|uninstall|status|logs`: run the server at login, like a Homebrew service.

macOS: a launchd agent (~/Library/LaunchAgents, logs in ~/Library/Logs), with ProcessType Interactive
(launchd throttles the CPU and I/O of agents without it). Linux: a systemd user unit (~/.config/systemd/user,
logs in the journal). The serve options given to `install` are baked into the service's command line, with
paths made absolute (a service does not start in the caller's directory); an API key goes into the
service's environment rather than its command line, so `ps` does not show it: the plist's
EnvironmentVariables (the plist is 0600), or on Linux a 0600 EnvironmentFile beside the unit (systemd does
not expand `$` in it, so a key holding `$` arrives unchanged).
"""

from __future__ import annotations

import argparse
import json
import os
import plistlib
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

from mlx_sd_server.cli import add_serve_options
from mlx_sd_server.registry import model_dir

NAME = "mlx-sd-server"
LAUNCHD_LABEL = "io.github.mlx-sd-server"


@dataclass(frozen=True)
class Command:
    argv: list[str]
    check: bool = True  # False: a failure is expected and harmless (e.g. stopping what is not running)


def serve_argv(args: argparse.Namespace) -> list[str]:
    """The `serve` command line equivalent to the parsed options, without the API key."""
    argv = [sys.executable, "-m", "mlx_sd_server.cli", "serve", "--model-dir", str(model_dir(args.model_dir).resolve())]
    parser = argparse.ArgumentParser(add_help=False)
    add_serve_options(parser)
    for action in parser._actions:  # argparse has no public list of a parser's options
        if not action.option_strings or action.dest in ("model_dir", "api_key"):
            continue
        value = getattr(args, action.dest, action.default)
        if value is None or value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # a switch such as --low-memory
            argv.append(flag)
            continue
        for item in value if isinstance(value, list) else [value]:
            argv += [flag, _absolute_if_path(action.dest, str(item))]
    return argv


# Options that may name files: made absolute, since the service does not start in the caller's directory.
PATH_OPTIONS = (
    "model",
    "control_net",
    "diffusion_model",
    "vae",
    "clip_l",
    "t5xxl",
    "clip_g",
    "t5_tokenizer",
    "llm",
    "llm_tokenizer",
    "lora_model_dir",
)


def _absolute_if_path(dest: str, value: str) -> str:
    if dest == "store_dir" or (dest in PATH_OPTIONS and Path(value).expanduser().exists()):
        return str(Path(value).expanduser().resolve())
    return value


def service_environment(args: argparse.Namespace) -> dict[str, str]:
    api_key = args.api_key or os.environ.get("API_KEY")
    return {"API_KEY": api_key} if api_key else {}


class LaunchdAgent:
    def __init__(self, home: Path, uid: int):
        self.path = home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        self.logs = home / "Library" / "Logs" / NAME
        self.target = f"gui/{uid}/{LAUNCHD_LABEL}"
        self.domain = f"gui/{uid}"

    def render(self, argv: list[str], env: dict[str, str]) -> bytes:
        agent = {
            "Label": LAUNCHD_LABEL,
            "ProgramArguments": argv,
            "RunAtLoad": True,
            "ProcessType": "Interactive",  # else launchd throttles CPU and I/O as for a background job
            "KeepAlive": {"SuccessfulExit": False},  # restart after a crash, not after a clean stop
            "StandardOutPath": str(self.logs / f"{NAME}.log"),
            "StandardErrorPath": str(self.logs / f"{NAME}.err.log"),
        }
        if env:
            agent["EnvironmentVariables"] = env
        return plistlib.dumps(agent)

    def install_commands(self) -> list[Command]:
        return [
            Command(["launchctl", "bootout", self.target], check=False),  # an older version, if loaded
            Command(["launchctl", "bootstrap", self.domain, str(self.path)]),
        ]

    def uninstall_commands(self) -> list[Command]:
        return [Command(["launchctl", "bootout", self.target], check=False)]

    def after_removal_commands(self) -> list[Command]:
        return []

    def status_command(self) -> Command:
        return Command(["launchctl", "print", self.target], check=False)

    def log_files(self) -> list[Path]:
        return [self.logs / f"{NAME}.log", self.logs / f"{NAME}.err.log"]

    def logs_command(self, follow: bool = False, lines: int = 200) -> Command:
        existing = [str(path) for path in self.log_files() if path.exists()]
        return Command(["tail", "-n", str(lines), *(["-F"] if follow else []), *existing], check=False)

    def installed_argv(self) -> list[str] | None:
        try:
            return list(plistlib.loads(self.path.read_bytes())["ProgramArguments"])
        except (OSError, ValueError, KeyError, plistlib.InvalidFileException):
            return None


class SystemdUserUnit:
    def __init__(self, home: Path):
        config = Path(os.environ.get("XDG_CONFIG_HOME", home / ".config"))
        self.path = config / "systemd" / "user" / f"{NAME}.service"
        self.env_path = self.path.with_name(f"{NAME}.env")  # 0600: holds the API key
        self.logs = None  # the journal: journalctl --user -u mlx-sd-server

    def render(self, argv: list[str], env: dict[str, str]) -> bytes:
        lines = [
            "[Unit]",
            "Description=mlx-sd-server (Stable Diffusion image server)",
            "After=network-online.target",
            "",
            "[Service]",
            "ExecStart=" + " ".join(_systemd_quote(arg) for arg in argv),
            # A path, not a quoted word: systemd expands only specifiers (%) in it.
            *([f"EnvironmentFile={str(self.env_path).replace('%', '%%')}"] if env else []),
            "Restart=on-failure",
            "RestartSec=5",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
        return "\n".join(lines).encode()

    @staticmethod
    def render_env(env: dict[str, str]) -> bytes:
        """The EnvironmentFile: KEY="value", with the characters systemd (like sh) unescapes inside double
        quotes escaped (\\ " $ `). systemd does no variable expansion here, so the value arrives as written."""
        lines = []
        for key, value in env.items():
            if "\n" in value or "\r" in value:
                raise SystemExit(f"service: {key} must be one line")
            escaped = "".join("\\" + c if c in '\\"$`' else c for c in value)
            lines.append(f'{key}="{escaped}"\n')
        return "".join(lines).encode()

    def install_commands(self) -> list[Command]:
        return [
            Command(["systemctl", "--user", "daemon-reload"]),
            Command(["systemctl", "--user", "enable", f"{NAME}.service"]),
            Command(["systemctl", "--user", "restart", f"{NAME}.service"]),
        ]

    def uninstall_commands(self) -> list[Command]:
        return [Command(["systemctl", "--user", "disable", "--now", f"{NAME}.service"], check=False)]

    def after_removal_commands(self) -> list[Command]:
        return [Command(["systemctl", "--user", "daemon-reload"])]

    def status_command(self) -> Command:
        return Command(["systemctl", "--user", "status", "--no-pager", f"{NAME}.service"], check=False)

    def logs_command(self, follow: bool = False, lines: int = 200) -> Command:
        return Command(
            [
                "journalctl",
                "--user",
                "-u",
                f"{NAME}.service",
                "-n",
                str(lines),
                "--no-pager",
                *(["-f"] if follow else []),
            ],
            check=False,
        )

    def installed_argv(self) -> list[str] | None:
        try:
            text = self.path.read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("ExecStart="):
                # _systemd_quote's quoting is sh's, plus %% for a literal %.
                return [arg.replace("%%", "%") for arg in shlex.split(line.removeprefix("ExecStart="))]
        return None


def _systemd_quote(value: str) -> str:
    """One word for ExecStart=: double-quoted, with systemd's `%` and `$` expansion escaped."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def service_for(platform: str, home: Path) -> LaunchdAgent | SystemdUserUnit:
    if platform == "darwin":
        return LaunchdAgent(home, os.getuid())
    if platform.startswith("linux"):
        return SystemdUserUnit(home)
    raise SystemExit(f"service: not supported on {platform} (macOS launchd and Linux systemd only)")


def main(
    args: argparse.Namespace,
    *,
    platform: str = sys.platform,
    home: Path | None = None,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    get: Callable[[str, float], str] | None = None,
) -> int:
    service = service_for(platform, home or Path.home())
    if args.action == "status":
        print(f"service file: {service.path} ({'present' if service.path.exists() else 'not installed'})")
        status = run(service.status_command().argv).returncode
        argv = service.installed_argv()
        if argv is not None:
            url = service_url(argv)
            print(f"url: {url}")
            print(f"health: {health(url, get or _http_get)}")
        return status
    if args.action == "logs":
        if isinstance(service, LaunchdAgent) and not any(path.exists() for path in service.log_files()):
            print(f"no logs yet in {service.logs}")
            return 0
        return run(service.logs_command(follow=bool(getattr(args, "follow", False))).argv).returncode
    if args.action == "install":
        service.path.parent.mkdir(parents=True, exist_ok=True)
        if service.logs is not None:
            service.logs.mkdir(parents=True, exist_ok=True)
        env = service_environment(args)
        if isinstance(service, SystemdUserUnit):
            if env:
                _write_private(service.env_path, service.render_env(env))
                print(f"wrote {service.env_path}")
            else:
                service.env_path.unlink(missing_ok=True)
        # 0600: the plist may hold the API key.
        _write_private(service.path, service.render(serve_argv(args), env))
        print(f"wrote {service.path}")
        return _run_all(service.install_commands(), run)
    status = _run_all(service.uninstall_commands(), run)
    if status == 0:
        service.path.unlink(missing_ok=True)
        print(f"removed {service.path}")
        if isinstance(service, SystemdUserUnit) and service.env_path.exists():
            service.env_path.unlink()
            print(f"removed {service.env_path}")
        status = _run_all(service.after_removal_commands(), run)
    return status


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when replacing an older file
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def service_url(argv: list[str]) -> str:
    """Where the installed service listens, from its command line (serve's defaults: 127.0.0.1:8080).
    A wildcard address (0.0.0.0, ::) is reached on this machine's loopback."""
    host, port = "127.0.0.1", "8080"
    for i, arg in enumerate(argv[:-1]):
        if arg == "--host":
            host = argv[i + 1]
        elif arg == "--port":
            port = argv[i + 1]
        elif arg == "--socket-addr":
            host, _, port = argv[i + 1].rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _http_get(url: str, timeout: float) -> str:
    with urlopen(url, timeout=timeout) as response:  # noqa: S310 (a URL we built: http to the service)
        return response.read(64 * 1024).decode("utf-8", "replace")


def health(url: str, get: Callable[[str, float], str] = _http_get, timeout: float = 2.0) -> str:
    """The service's /health answer in one line, or "not answering"."""
    try:
        body = get(f"{url}/health", timeout)
    except Exception as exc:  # refused, timed out, HTTP error, bad answer: all mean the same to the user
        return f"not answering ({type(exc).__name__}: {exc})" if str(exc) else "not answering"
    try:
        answer = json.loads(body)
    except ValueError:
        return body.strip()[:200]
    if isinstance(answer, dict):
        return ", ".join(f"{key}={json.dumps(value)}" for key, value in answer.items())
    return json.dumps(answer)


def _run_all(commands: list[Command], run: Callable[..., subprocess.CompletedProcess]) -> int:
    for command in commands:
        result = run(command.argv)
        if command.check and result.returncode != 0:
            print(f"service: '{' '.join(command.argv)}' failed ({result.returncode})", file=sys.stderr)
            return result.returncode
    return 0
