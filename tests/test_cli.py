"""CLI: check-config, gen-certs, --version, in process and as ``python -m sbc``."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from sbc import __version__
from sbc.cli import main
from sbc.config import Config

REPO = Path(__file__).resolve().parent.parent


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "sbc", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.fixture
def good_config(tmp_path: Path) -> Path:
    path = tmp_path / "sbc.toml"
    path.write_text('[core]\n[[core.backends]]\nuri = "sip:127.0.0.1:5070"\n')
    return path


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text('[core]\nbogus = 1\n[[core.backends]]\nuri = "sip:a"\nweight = "x"\n')
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"sbc {__version__}\n"


def test_check_config_ok(good_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(good_config)]) == 0
    assert capsys.readouterr().out == f"{good_config}: ok\n"


def test_check_config_bad(bad_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(bad_config)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{bad_config}: core.bogus: unknown key; allowed: listen, tls, backends, probe_interval, probe_failures, probe_successes, probe_reply_codes, request_timeout, balance",
        f'{bad_config}: core.backends[0].weight: must be an integer >= 0, got "x"',
    ]


def test_run_stops_on_config_errors(bad_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", str(bad_config)]) == 1
    assert "core.bogus: unknown key" in capsys.readouterr().err


def test_reload_checks_the_config_before_it_signals(
    bad_config: Path, good_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken config is refused by `sbc reload` itself (no SBC is asked); a good one
    with no SBC answering at the admin address is one clear line."""
    assert main(["reload", "--config", str(bad_config)]) == 1
    assert "core.bogus: unknown key" in capsys.readouterr().err
    assert main(["reload", "--config", str(good_config), "--admin", "127.0.0.1:1"]) == 1
    assert capsys.readouterr().err.startswith(
        "sbc: error: no answer from the SBC's admin API at http://127.0.0.1:1"
    )


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["run"]) == 2
    assert "--config" in capsys.readouterr().err


def test_gen_certs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    args = ["gen-certs", "--out", str(out), "--hostname", "sbc.test", "--ip", "192.0.2.1"]
    assert main(args) == 0
    written = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in written) == [
        "ca.key",
        "ca.pem",
        "client.key",
        "client.pem",
        "server.key",
        "server.pem",
    ]
    assert main(args) == 1
    assert "use --force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert main(["gen-certs", "--out", str(tmp_path / "x"), "--ip", "nope"]) == 1
    assert capsys.readouterr().err.startswith("sbc: error: ")


def test_python_m_sbc(good_config: Path, bad_config: Path) -> None:
    ok = run_module("check-config", str(good_config))
    assert (ok.returncode, ok.stdout) == (0, f"{good_config}: ok\n")
    bad = run_module("check-config", str(bad_config))
    assert bad.returncode == 1
    assert "core.backends[0].weight: must be an integer >= 0" in bad.stderr
    assert "Traceback" not in bad.stderr
    version = run_module("--version")
    assert (version.returncode, version.stdout) == (0, f"sbc {__version__}\n")


def fake_app(monkeypatch: pytest.MonkeyPatch, run: Callable[[Config], int]) -> None:
    """Stand-in for sbc.app so ``sbc run`` is tested without sockets."""
    module = types.ModuleType("sbc.app")

    class StartupError(Exception):
        pass

    module.StartupError = StartupError  # type: ignore[attr-defined]
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sbc.app", module)


def test_run_passes_config_and_exit_code(
    good_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Config] = []

    def run(config: Config, path: str | None = None) -> int:
        seen.append(config)
        return 0

    fake_app(monkeypatch, run)
    monkeypatch.setattr("sbc.log.setup_logging", lambda level, fmt: None)
    assert main(["run", "--config", str(good_config)]) == 0
    assert seen[0].core.backends[0].uri == "sip:127.0.0.1:5070"


def test_run_startup_error_is_one_line(
    good_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(config: Config, path: str | None = None) -> int:
        raise sys.modules["sbc.app"].StartupError("cannot bind udp://127.0.0.1:5060: in use")

    fake_app(monkeypatch, run)
    monkeypatch.setattr("sbc.log.setup_logging", lambda level, fmt: None)
    assert main(["run", "--config", str(good_config)]) == 1
    assert capsys.readouterr().err == "sbc: error: cannot bind udp://127.0.0.1:5060: in use\n"
