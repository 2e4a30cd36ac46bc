"""`mlx-sd-server service install|uninstall|status`: run the server at login, like a Homebrew service.

macOS: a launchd agent (~/Library/LaunchAgents, logs in ~/Library/Logs). Linux: a systemd user unit
(~/.config/systemd/user). The serve options given to `install` are baked into the service's command
line, with paths made absolute (a service does not start in the caller's directory); an API key goes
into the service's environment rather than its command line, so `ps` does not show it.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
PATH_OPTIONS = ("model", "control_net", "diffusion_model", "vae", "clip_l", "t5xxl", "clip_g", "t5_tokenizer",
                "lora_model_dir")


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
            "KeepAlive": {"SuccessfulExit": False},  # restart after a crash, not after a clean stop
            "StandardOutPath": str(self.logs / f"{NAME}.log"),
            "StandardErrorPath": str(self.logs / f"{NAME}.err.log"),
        }
        if env:
            agent["EnvironmentVariables"] = env
        return plistlib.dumps(agent)

    def install_commands(self) -> list[Command]:
        return [Command(["launchctl", "bootout", self.target], check=False),  # an older version, if loaded
                Command(["launchctl", "bootstrap", self.domain, str(self.path)])]

    def uninstall_commands(self) -> list[Command]:
        return [Command(["launchctl", "bootout", self.target], check=False)]

    def after_removal_commands(self) -> list[Command]:
        return []

    def status_command(self) -> Command:
        return Command(["launchctl", "print", self.target], check=False)


class SystemdUserUnit:
    def __init__(self, home: Path):
        config = Path(os.environ.get("XDG_CONFIG_HOME", home / ".config"))
        self.path = config / "systemd" / "user" / f"{NAME}.service"
        self.logs = None  # the journal: journalctl --user -u mlx-sd-server

    def render(self, argv: list[str], env: dict[str, str]) -> bytes:
        lines = [
            "[Unit]",
            "Description=mlx-sd-server (Stable Diffusion image server)",
            "After=network-online.target",
            "",
            "[Service]",
            "ExecStart=" + " ".join(_systemd_quote(arg) for arg in argv),
            *(f"Environment={_systemd_quote(f'{key}={value}')}" for key, value in env.items()),
            "Restart=on-failure",
            "RestartSec=5",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
        return "\n".join(lines).encode()

    def install_commands(self) -> list[Command]:
        return [Command(["systemctl", "--user", "daemon-reload"]),
                Command(["systemctl", "--user", "enable", f"{NAME}.service"]),
                Command(["systemctl", "--user", "restart", f"{NAME}.service"])]

    def uninstall_commands(self) -> list[Command]:
        return [Command(["systemctl", "--user", "disable", "--now", f"{NAME}.service"], check=False)]

    def after_removal_commands(self) -> list[Command]:
        return [Command(["systemctl", "--user", "daemon-reload"])]

    def status_command(self) -> Command:
        return Command(["systemctl", "--user", "status", "--no-pager", f"{NAME}.service"], check=False)


def _systemd_quote(value: str) -> str:
    """One word for ExecStart=/Environment=: double-quoted, with systemd's `%` and `$` expansion escaped."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def service_for(platform: str, home: Path) -> LaunchdAgent | SystemdUserUnit:
    if platform == "darwin":
        return LaunchdAgent(home, os.getuid())
    if platform.startswith("linux"):
        return SystemdUserUnit(home)
    raise SystemExit(f"service: not supported on {platform} (macOS launchd and Linux systemd only)")


def main(args: argparse.Namespace, *, platform: str = sys.platform, home: Path | None = None,
         run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int:
    service = service_for(platform, home or Path.home())
    if args.action == "status":
        print(f"service file: {service.path} ({'present' if service.path.exists() else 'not installed'})")
        return run(service.status_command().argv).returncode
    if args.action == "install":
        service.path.parent.mkdir(parents=True, exist_ok=True)
        if service.logs is not None:
            service.logs.mkdir(parents=True, exist_ok=True)
        # 0600: the file may hold the API key.
        fd = os.open(service.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when replacing an older file
        with os.fdopen(fd, "wb") as f:
            f.write(service.render(serve_argv(args), service_environment(args)))
        print(f"wrote {service.path}")
        return _run_all(service.install_commands(), run)
    status = _run_all(service.uninstall_commands(), run)
    if status == 0:
        service.path.unlink(missing_ok=True)
        print(f"removed {service.path}")
        status = _run_all(service.after_removal_commands(), run)
    return status


def _run_all(commands: list[Command], run: Callable[..., subprocess.CompletedProcess]) -> int:
    for command in commands:
        result = run(command.argv)
        if command.check and result.returncode != 0:
            print(f"service: '{' '.join(command.argv)}' failed ({result.returncode})", file=sys.stderr)
            return result.returncode
    return 0
