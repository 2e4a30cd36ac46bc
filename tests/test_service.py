"""`service install|uninstall|status`: the generated launchd/systemd files and the commands run,
without loading anything (the command runner is recorded instead)."""

import os
import plistlib
import shlex
import stat
import subprocess
import sys

import pytest

from mlx_sd_server import service
from mlx_sd_server.cli import build_parser


class Recorder:
    def __init__(self, returncode=0):
        self.calls = []
        self.returncode = returncode

    def __call__(self, argv, **kwargs):
        self.calls.append(argv)
        return subprocess.CompletedProcess(argv, self.returncode)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("API_KEY", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("MLX_SD_MODEL_DIR", str(tmp_path / "models"))
    (tmp_path / "ckpt dir").mkdir()
    (tmp_path / "ckpt dir" / "my model.safetensors").write_bytes(b"")
    return tmp_path / "home"


def parse(action, *options):
    return build_parser().parse_args(["service", action, *options])


OPTIONS = ("--model", "tiny-random-sd", "--model", "ckpt dir/my model.safetensors", "--port", "9000",
           "--api-key", "sk-secret", "--store-dir", "files", "--max-queue", "3", "--host", "127.0.0.1")


def expected_argv(tmp_path):
    return [sys.executable, "-m", "mlx_sd_server.cli", "serve", "--model-dir", str(tmp_path / "models"),
            "--model", "tiny-random-sd", "--model", str(tmp_path / "ckpt dir" / "my model.safetensors"),
            "--host", "127.0.0.1", "--port", "9000", "--store-dir", str(tmp_path / "files"), "--max-queue", "3"]


def test_launchd_install_writes_agent_and_bootstraps_it(home, tmp_path):
    run = Recorder()
    assert service.main(parse("install", *OPTIONS), platform="darwin", home=home, run=run) == 0
    path = home / "Library" / "LaunchAgents" / f"{service.LAUNCHD_LABEL}.plist"
    agent = plistlib.loads(path.read_bytes())
    assert agent["Label"] == service.LAUNCHD_LABEL
    assert agent["ProgramArguments"] == expected_argv(tmp_path)
    assert agent["EnvironmentVariables"] == {"API_KEY": "sk-secret"}
    assert agent["RunAtLoad"] is True and agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["StandardOutPath"] == str(home / "Library" / "Logs" / "mlx-sd-server" / "mlx-sd-server.log")
    assert (home / "Library" / "Logs" / "mlx-sd-server").is_dir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    target = f"gui/{os.getuid()}/{service.LAUNCHD_LABEL}"
    assert run.calls == [["launchctl", "bootout", target], ["launchctl", "bootstrap", f"gui/{os.getuid()}", str(path)]]


def test_baked_command_line_parses_back_to_the_same_options(home, tmp_path):
    args = parse("install", *OPTIONS)
    argv = service.serve_argv(args)
    assert "sk-secret" not in argv
    again = build_parser().parse_args(argv[3:])
    for name in ("host", "port", "max_queue", "max_n", "engine", "low_memory"):
        assert getattr(again, name) == getattr(args, name)
    assert again.model[0] == "tiny-random-sd"


def test_switches_are_baked_without_a_value(home):
    argv = service.serve_argv(parse("install", "--low-memory"))
    assert argv[argv.index("--low-memory") + 1:] == []  # no stray "True" after it
    assert build_parser().parse_args(argv[3:]).low_memory is True


def test_systemd_install_writes_unit_and_enables_it(home, tmp_path):
    run = Recorder()
    assert service.main(parse("install", *OPTIONS), platform="linux", home=home, run=run) == 0
    path = home / ".config" / "systemd" / "user" / "mlx-sd-server.service"
    unit = path.read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert shlex.split(exec_start.removeprefix("ExecStart=")) == expected_argv(tmp_path)  # same quoting rules here
    assert 'Environment="API_KEY=sk-secret"' in unit.splitlines()
    assert "Restart=on-failure" in unit and "WantedBy=default.target" in unit
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert run.calls == [["systemctl", "--user", "daemon-reload"],
                         ["systemctl", "--user", "enable", "mlx-sd-server.service"],
                         ["systemctl", "--user", "restart", "mlx-sd-server.service"]]


def test_systemd_quoting_escapes_specifiers_and_variables():
    assert service._systemd_quote('a "b" 100% $HOME\\x') == '"a \\"b\\" 100%% $$HOME\\\\x"'


def test_no_api_key_means_no_environment(home):
    service.main(parse("install"), platform="darwin", home=home, run=Recorder())
    agent = plistlib.loads((home / "Library" / "LaunchAgents" / f"{service.LAUNCHD_LABEL}.plist").read_bytes())
    assert "EnvironmentVariables" not in agent
    assert agent["ProgramArguments"][4:] == ["--model-dir", str(home.parent / "models")]


@pytest.mark.parametrize("platform, unload, reload", [
    ("darwin", [["launchctl", "bootout", f"gui/{os.getuid()}/{service.LAUNCHD_LABEL}"]], []),
    ("linux", [["systemctl", "--user", "disable", "--now", "mlx-sd-server.service"]],
     [["systemctl", "--user", "daemon-reload"]]),
])
def test_uninstall_unloads_and_removes(home, platform, unload, reload):
    service.main(parse("install"), platform=platform, home=home, run=Recorder())
    installed = service.service_for(platform, home).path
    assert installed.exists()
    run = Recorder()
    assert service.main(parse("uninstall"), platform=platform, home=home, run=run) == 0
    assert not installed.exists()
    assert run.calls == unload + reload


def test_status_reports_the_managers_answer(home, capsys):
    run = Recorder(returncode=3)
    assert service.main(parse("status"), platform="linux", home=home, run=run) == 3
    assert run.calls == [["systemctl", "--user", "status", "--no-pager", "mlx-sd-server.service"]]
    assert "not installed" in capsys.readouterr().out


def test_failing_load_is_reported(home, capsys):
    assert service.main(parse("install"), platform="linux", home=home, run=Recorder(returncode=1)) == 1
    assert "failed" in capsys.readouterr().err


def test_unsupported_platform(home):
    with pytest.raises(SystemExit):
        service.main(parse("status"), platform="win32", home=home, run=Recorder())
