"""`service install|uninstall|status`: the generated launchd/systemd files and the commands run,
without loading anything (the command runner is recorded instead)."""

import argparse
import os
import plistlib
import shlex
import shutil
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
    env_path = path.with_name("mlx-sd-server.env")
    assert f"EnvironmentFile={env_path}" in unit.splitlines()
    assert "sk-secret" not in unit and "Environment=" not in unit
    assert env_path.read_text() == 'API_KEY="sk-secret"\n'
    assert stat.S_IMODE(env_path.stat().st_mode) == 0o600
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


def test_launchd_agent_is_interactive(home):
    """Without ProcessType Interactive launchd throttles an agent's CPU and I/O like a background job."""
    service.main(parse("install"), platform="darwin", home=home, run=Recorder())
    agent = plistlib.loads((home / "Library" / "LaunchAgents" / f"{service.LAUNCHD_LABEL}.plist").read_bytes())
    assert agent["ProcessType"] == "Interactive"


KEYS = ["sk-$HOME-$$-${X}", 'a"b\\c`d e%f\'g', "ünï-κey"]


def systemd_env_file(text):
    """systemd's EnvironmentFile reading of KEY="value" lines (parse_env_file_internal's double-quote
    state): a backslash before one of \\ " ` $ yields that character, any other is kept; no expansion."""
    env = {}
    for line in text.splitlines():
        key, _, rest = line.partition("=")
        assert rest[0] == '"' and rest[-1] == '"', line
        value, i, body = "", 0, rest[1:-1]
        while i < len(body):
            if body[i] == "\\" and i + 1 < len(body) and body[i + 1] in '"\\`$':
                value, i = value + body[i + 1], i + 2
            else:
                assert body[i] != '"', "an unescaped quote ends the value early"
                value, i = value + body[i], i + 1
        env[key] = value
    return env


@pytest.mark.parametrize("key", KEYS)
def test_api_key_survives_the_environment_file_exactly(home, key):
    service.main(parse("install", "--api-key", key), platform="linux", home=home, run=Recorder())
    unit = service.service_for("linux", home)
    assert key not in unit.path.read_text()
    line = unit.env_path.read_text()
    assert systemd_env_file(line) == {"API_KEY": key}
    # A real shell, which would expand an unescaped $ or `, agrees.
    if shutil.which("bash"):
        out = subprocess.run(["bash", "-c", f'set -a; . "{unit.env_path}"; printf %s "$API_KEY"'],
                             capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
        assert out.stdout == key


def test_multiline_key_is_refused(home):
    with pytest.raises(SystemExit):
        service.main(parse("install", "--api-key", "a\nb"), platform="linux", home=home, run=Recorder())


def test_systemd_reinstall_without_key_and_uninstall_remove_the_environment_file(home):
    service.main(parse("install", "--api-key", "k"), platform="linux", home=home, run=Recorder())
    unit = service.service_for("linux", home)
    assert unit.env_path.exists()
    service.main(parse("install"), platform="linux", home=home, run=Recorder())
    assert not unit.env_path.exists() and "EnvironmentFile" not in unit.path.read_text()
    service.main(parse("install", "--api-key", "k"), platform="linux", home=home, run=Recorder())
    service.main(parse("uninstall"), platform="linux", home=home, run=Recorder())
    assert not unit.env_path.exists() and not unit.path.exists()


def test_systemd_analyze_verifies_the_unit(home, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    service.main(parse("install", *OPTIONS), platform="linux", home=home, run=Recorder())
    path = service.service_for("linux", home).path
    # --man=no: no man-page lookups for Documentation=; offline: no manager is needed.
    result = subprocess.run([analyze, "verify", "--man=no", str(path)], capture_output=True, text=True,
                            env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"}, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "mlx-sd-server" in line and "Failed to" not in line and "not found" not in line]
    if result.returncode != 0 and not problems:
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert problems == [], problems


def test_logs_commands(home, capsys):
    logs = argparse.Namespace(action="logs")  # built directly: the cli's choices are not this module's
    run = Recorder()
    assert service.main(logs, platform="linux", home=home, run=run) == 0
    assert run.calls == [["journalctl", "--user", "-u", "mlx-sd-server.service", "-n", "200", "--no-pager"]]
    unit = service.service_for("linux", home)
    assert unit.logs_command(follow=True).argv[-1] == "-f"

    run = Recorder()
    assert service.main(logs, platform="darwin", home=home, run=run) == 0
    assert run.calls == [] and "no logs yet" in capsys.readouterr().out
    agent = service.service_for("darwin", home)
    agent.logs.mkdir(parents=True)
    for path in agent.log_files():
        path.write_text("line\n")
    assert service.main(logs, platform="darwin", home=home, run=run) == 0
    assert run.calls == [["tail", "-n", "200", *map(str, agent.log_files())]]
    assert agent.logs_command(follow=True).argv[:4] == ["tail", "-n", "200", "-F"]


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_status_shows_url_and_health(home, capsys, platform):
    service.main(parse("install", "--host", "0.0.0.0", "--port", "9001"), platform=platform, home=home,
                 run=Recorder())
    capsys.readouterr()
    asked = []

    def get(url, timeout):
        asked.append((url, timeout))
        return '{"status": "ok", "default_model": "sd-turbo"}'

    assert service.main(parse("status"), platform=platform, home=home, run=Recorder(), get=get) == 0
    out = capsys.readouterr().out
    assert asked == [("http://127.0.0.1:9001/health", 2.0)]
    assert "url: http://127.0.0.1:9001" in out
    assert 'health: status="ok", default_model="sd-turbo"' in out

    def refuse(url, timeout):
        raise ConnectionRefusedError(111, "Connection refused")

    assert service.main(parse("status"), platform=platform, home=home, run=Recorder(3), get=refuse) == 3
    assert "health: not answering" in capsys.readouterr().out


def test_status_without_install_asks_nothing(home, capsys):
    def get(url, timeout):
        raise AssertionError("no service: nothing to ask")

    service.main(parse("status"), platform="linux", home=home, run=Recorder(3), get=get)
    assert "url:" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, url", [
    ([], "http://127.0.0.1:8080"),
    (["--port", "9000"], "http://127.0.0.1:9000"),
    (["--host", "::", "--port", "81"], "http://[::1]:81"),
    (["--socket-addr", "192.168.1.2:7000"], "http://192.168.1.2:7000"),
    (["--socket-addr", "[::1]:7000"], "http://[::1]:7000"),
])
def test_service_url(argv, url):
    assert service.service_url(["python", "-m", "mlx_sd_server.cli", "serve", *argv]) == url


def test_health_against_a_real_socket():
    """The default getter: a short GET with a timeout; a closed port reads as not answering."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert service.health(f"http://127.0.0.1:{port}", timeout=1.0).startswith("not answering")
