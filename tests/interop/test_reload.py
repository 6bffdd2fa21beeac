"""Reload and shutdown of the real ``sbc run``, with Kamailio behind it and
SIPp user agents (a call alice -> bob crosses the SBC twice, so it is 2 calls to the SBC): a call in progress survives a good reload and a broken one; a backend added
by a reload takes traffic; SIGTERM drains: new calls get 503, the call in progress goes on
until [calls] drain_timeout, then both legs get BYE and the process exits 0."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import (
    Certs,
    Registrar,
    RegistrarFactory,
    SbcFactory,
    SbcProcess,
    _start,
    _stop,
    require,
    sbc_command,
    wait_until,
)
from .test_calls import Lab, labels, passed, received

pytestmark = pytest.mark.interop

DRAIN = 3.0  # [calls] drain_timeout of the drain test, seconds


def status(sbc: SbcProcess) -> dict[str, object]:
    url = f"http://127.0.0.1:{sbc.extra_ports['admin']}/status"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        report = json.loads(response.read())
    assert isinstance(report, dict)
    return report


def reload_state(sbc: SbcProcess) -> dict[str, object]:
    state = status(sbc)["reload"]
    assert isinstance(state, dict)
    return state


def sbc_reload(config: Path, sbc: SbcProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*sbc_command(), "reload", "--config", str(config),
         "--admin", f"127.0.0.1:{sbc.extra_ports['admin']}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_reload_adds_a_backend_refuses_a_broken_config_and_keeps_the_call(
    sbc_factory: SbcFactory, kamailio_registrars: RegistrarFactory, tmp_path: Path
) -> None:
    first, second = kamailio_registrars(2)
    records = tmp_path / "calls.jsonl"
    sbc = sbc_factory(
        extra=f'\n[[core.backends]]\nuri = "{first.uri}"\n\n[calls]\nrecords = "{records}"\n'
    )
    lab = Lab(sbc, first, records, tmp_path, require("sipp"))
    try:
        _reloads(lab, first, second, tmp_path)
    finally:
        for sipp in lab.running:
            sipp.stop()


def _reloads(lab: Lab, first: Registrar, second: Registrar, tmp_path: Path) -> None:
    sbc = lab.sbc
    # A call that lasts through both reloads: alice hangs up after 6 s.
    bob = lab.callee("call_basic_uas.xml", "bob")
    alice = lab.start("alice", "call_long_uac.xml", service="bob", extra=("-d", "6000"))
    wait_until("the call to be up", lambda: status(sbc)["calls"]["active"] == 2)  # type: ignore[index]
    original = sbc.config.read_text()

    # 1. A broken config: `sbc reload` names the key and does not signal the SBC at all...
    broken = tmp_path / "broken.toml"
    broken.write_text(original.replace("[calls]\n", "[calls]\nmax_cals = 3\n", 1))
    done = sbc_reload(broken, sbc)
    assert done.returncode == 1, done
    assert "calls.max_cals: unknown key" in done.stderr, done.stderr
    assert reload_state(sbc)["generation"] == 0
    # ...and the SBC itself refuses it when it is signalled directly: the old config stays.
    sbc.config.write_text(broken.read_text())
    sbc.proc.send_signal(signal.SIGHUP)
    wait_until("the refused reload", lambda: reload_state(sbc)["generation"] == 1)
    state = reload_state(sbc)
    assert state["ok"] is False and "calls.max_cals: unknown key" in str(state["error"]), state
    assert "reload refused, the running config stays" in sbc.log()
    # A listen address is no reload's business either.
    moved = re.sub(r'\[admin\]\nlisten = "[^"]+"', '[admin]\nlisten = "127.0.0.1:1"', original)
    assert moved != original
    sbc.config.write_text(moved)
    done = sbc_reload(sbc.config, sbc)
    assert done.returncode == 1 and "admin changed: needs a restart" in done.stderr, done

    # 2. A good config: the first backend drained (weight 0), a second one added.
    assert f'uri = "{first.uri}"' in original
    sbc.config.write_text(
        original.replace(
            f'uri = "{first.uri}"\n',
            f'uri = "{first.uri}"\nweight = 0\n\n[[core.backends]]\nuri = "{second.uri}"\n',
            1,
        )
    )
    done = sbc_reload(sbc.config, sbc)
    assert done.returncode == 0, done
    assert "reloaded" in done.stdout
    state = reload_state(sbc)
    assert state["ok"] is True and state["applied"] == 1, state
    backends = status(sbc)["backends"]
    assert [b["name"] for b in backends] == [first.uri, second.uri], backends  # type: ignore[union-attr, index]
    # The added backend takes the new work: a registration goes there, not to the first.
    assert lab.register("carol", lab.free_port()).status == 200
    wait_until("carol at the second backend", lambda: "carol" in second.aors())
    assert "carol" not in first.aors() and "bob" in first.aors()

    # The call survived both reloads: alice hangs up and both sides saw a clean call.
    a_msgs, b_msgs = passed(alice, bob)
    assert labels(received(b_msgs)) == ["INVITE", "ACK", "BYE"]
    assert labels(received(a_msgs))[-1] == "200 BYE"
    assert sbc.proc.poll() is None
    assert status(sbc)["calls"]["active"] == 0  # type: ignore[index]


def test_sigterm_drains_then_ends_the_call_and_exits(
    kamailio_registrars: RegistrarFactory, tmp_path: Path, certs: Certs
) -> None:
    (registrar,) = kamailio_registrars(1)
    records = tmp_path / "calls.jsonl"
    started = _start(
        tmp_path, certs, 0,
        extra=f'\n[[core.backends]]\nuri = "{registrar.uri}"\n'
        f'\n[calls]\nrecords = "{records}"\ndrain_timeout = {DRAIN:g}\n',
    )  # fmt: skip
    if isinstance(started, str):
        pytest.fail(started)
    sbc = started
    lab = Lab(sbc, registrar, records, tmp_path, require("sipp"))
    try:
        bob = lab.callee("call_basic_uas.xml", "bob")
        alice = lab.caller("call_idle_uac.xml", "bob", "alice")
        wait_until("the call to be up", lambda: status(sbc)["calls"]["active"] == 2)  # type: ignore[index]
        sigterm = time.time()
        sbc.proc.send_signal(signal.SIGTERM)
        wait_until("the drain", lambda: "draining: no new calls" in sbc.log())
        # A new call is refused (503 with Retry-After) while the first goes on.
        carol = lab.start("carol", "call_refused_uac.xml", service="bob")
        (c_msgs,) = passed(carol)
        refused = next(m for m in received(c_msgs) if m.status == 503)
        assert refused.first_line == "SIP/2.0 503 Shutting Down", refused.text
        assert status(sbc)["calls"]["active"] == 2  # type: ignore[index]
        # At the deadline both legs get BYE (Reason: cause 503), then the SBC exits 0.
        a_msgs, b_msgs = passed(alice, bob)
        for messages in (a_msgs, b_msgs):
            bye = next(m for m in received(messages) if m.method == "BYE")
            assert DRAIN - 0.5 <= bye.at - sigterm <= DRAIN + 3, (sigterm, bye.at)
            assert bye.header("Reason") == 'SIP;cause=503;text="shutdown"', bye.text
        assert sbc.proc.wait(timeout=10) == 0, sbc.log()
        log = sbc.log()
        assert "ending 2 calls with BYE" in log and "Traceback" not in log, log
    finally:
        for sipp in lab.running:
            sipp.stop()
        _stop(sbc.proc)
