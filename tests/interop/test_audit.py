"""``sbc audit --live`` against the real ``sbc run``: the cells its config claims, checked on
the wire from loopback (plain SIP, TLS versions and suites, client certificates, the
certificate, RTP/AVP where SRTP is mandatory, SDES re-keyed per leg), for an SBC whose config
says what it does, and for a config file that claims more than the running SBC does
(its checks flagged, exit 4); ``--require`` (exit 3); ``GET /audit``."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from sbc.cli import AUDIT_CONTRADICTED, AUDIT_UNMET

from .conftest import SbcFactory, SbcProcess, sbc_command
from .test_calls import admin_get


def audit(config: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    """``sbc audit --config CONFIG --format json ARGS``: exit code, its JSON, its stderr."""
    done = subprocess.run(
        [*sbc_command(), "audit", "--config", str(config), "--format", "json", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout), done.stderr


def checks(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for check in report["live"]:
        out.setdefault(check["name"], []).append(check)
    return out


def verdict(report: dict[str, Any], relation: str, plane: str, prop: str) -> str:
    [v] = [
        v for v in report["verdicts"]
        if (v["relation"], v["plane"], v["property"]) == (relation, plane, prop)
    ]  # fmt: skip
    return str(v["status"])


def with_tls(config: Path, path: Path, **keys: str) -> Path:
    """A copy of ``config`` with ``keys`` (TOML values) added to [access.tls]."""
    lines = "".join(f"{k} = {v}\n" for k, v in keys.items())
    text = config.read_text().replace("[access.tls]\n", f"[access.tls]\n{lines}", 1)
    path.write_text(text)
    return path


def test_the_running_sbc_does_what_its_config_says(sbc_factory: SbcFactory) -> None:
    """Mandatory SRTP on the access side, TLS beside plain UDP and TCP: every live check
    agrees with the config; the matrix says the access signalling is only optionally
    encrypted (and the SDES keys with it), so a requirement of either fails."""
    sbc = sbc_factory(media='access_srtp = "mandatory"')
    code, report, err = audit(sbc.config, "--live")
    assert code == 0, err
    found = checks(report)
    assert all(c["result"] in ("ok", "warning") for c in report["live"]), report["live"]
    # Plain SIP answered on UDP and TCP, never on the TLS listener's port.
    plain = [c["observed"] for c in found["plain-sip"]]
    assert any("UDP" in o and "answered" in o for o in plain)
    assert any(f"to 127.0.0.1:{sbc.tls4}" in o and "no answer" in o for o in plain)
    # TLS 1.1 and weak suites refused; served without a client certificate, as configured.
    assert "refused" in found["tls-version"][0]["observed"]
    assert "refused" in found["weak-cipher"][0]["observed"]
    assert "keep-alive answered" in found["client-certificate"][0]["observed"]
    assert re.search(r"expires in \d+ days", found["certificate"][0]["observed"])
    # Through calls to a user the check registered itself: RTP/AVP refused with 488, and the
    # SDES offer re-keyed (the callee does not get the caller's key).
    assert "488" in found["srtp-mandatory"][0]["observed"]
    assert "another's key" in found["sdes-rekey"][0]["observed"]
    # SRTP is mandatory, but its SDES keys may ride plain SIP: partly.
    assert verdict(report, "client-to-sbc", "media", "encryption") == "partly"
    assert verdict(report, "client-to-sbc", "signalling", "encryption") == "optional"
    require = sbc.config.with_name("require.toml")
    require.write_text(
        '[[require]]\nrelation = "client-to-sbc"\nplane = "media"\nproperty = "encryption"\n'
        '[[require]]\nrelation = "client-to-sbc"\nplane = "signalling"\n'
        'property = "encryption"\n'
    )  # fmt: skip
    code, _, err = audit(sbc.config, "--require", str(require))
    assert code == AUDIT_UNMET, err
    assert "client-to-sbc signalling encryption: optional" in err
    assert "client-to-sbc media encryption: partly" in err


def test_a_config_that_claims_more_than_the_sbc_does_is_flagged(
    sbc_factory: SbcFactory, tmp_path: Path
) -> None:
    """The SBC runs with its test config (optional SRTP, no client certificates); the
    audited file claims mutual TLS, TLS 1.3 only and mandatory SRTP: each of those live
    checks contradicts it, and the command exits 4."""
    sbc = sbc_factory()
    claimed = with_tls(sbc.config, tmp_path / "claimed.toml", verify_clients="true",
                       min_version='"1.3"')  # fmt: skip
    text = claimed.read_text().replace("[media]\n", '[media]\naccess_srtp = "mandatory"\n', 1)
    claimed.write_text(text)
    code, report, err = audit(claimed, "--live")
    assert code == AUDIT_CONTRADICTED, err
    contradicted = {c["name"] for c in report["live"] if c["result"] == "contradicts"}
    assert contradicted == {"client-certificate", "tls-version", "srtp-mandatory"}, report["live"]
    assert "contradicts its config: client-certificate" in err
    # The matrix of the claimed config itself: clients on TLS authenticated by their
    # certificates, but plain UDP and TCP are taken too.
    assert verdict(report, "client-to-sbc", "signalling", "authentication") == "optional"


def test_weak_suites_the_config_allows_are_taken_and_reported(
    sbc_factory: SbcFactory, tmp_path: Path
) -> None:
    """An SBC reloaded with ciphers that allow a SHA-1 MAC suite: the matrix says
    its TLS is only partly protected, the live check sees the weak suite taken (as its
    config says), and the config before the reload is contradicted by it."""
    sbc = sbc_factory()
    before = tmp_path / "before.toml"
    before.write_text(sbc.config.read_text())
    # The test certificate's key is ECDSA: a SHA-1 MAC suite it can use.
    with_tls(
        sbc.config, sbc.config, ciphers='"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-SHA"'
    )
    reload(sbc)
    code, report, err = audit(sbc.config, "--live")
    assert code == 0, err
    [weak] = checks(report)["weak-cipher"]
    assert weak["result"] == "ok" and "ECDHE-ECDSA-AES128-SHA" in weak["observed"], weak
    cells = [
        c for c in report["cells"]
        if (c["relation"], c["plane"], c["mechanism"], c["property"])
        == ("client-to-sbc", "signalling", "sips", "encryption")
    ]  # fmt: skip
    assert cells[0]["status"] == "partly" and "ECDHE-ECDSA-AES128-SHA" in cells[0]["why"][-1]
    code, report, _ = audit(before, "--live")
    assert code == AUDIT_CONTRADICTED
    assert checks(report)["weak-cipher"][0]["result"] == "contradicts"


def reload(sbc: SbcProcess) -> None:
    done = subprocess.run(
        [*sbc_command(), "reload", "--config", str(sbc.config),
         "--admin", f"127.0.0.1:{sbc.extra_ports['admin']}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_admin_endpoint_answers_the_running_configs_matrix(sbc_factory: SbcFactory) -> None:
    sbc = sbc_factory(media='access_srtp = "mandatory"')
    status, body = admin_get(sbc, "/audit")
    assert status == 200
    report = json.loads(body)
    assert report["config"] == str(sbc.config)
    assert verdict(report, "client-to-sbc", "media", "encryption") == "partly"
    # The same matrix as the command's.
    _, from_command, _ = audit(sbc.config)
    assert report["verdicts"] == from_command["verdicts"]
