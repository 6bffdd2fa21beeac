"""``sbc audit``: the deployment's security matrix from its config (sbc/audit.py): the cells
of several deployments, the paper's shape in text, markdown and JSON, --require."""

from __future__ import annotations

import itertools
import json
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sbc import audit
from sbc.audit import (
    AUTH,
    CLIENT_CLIENT,
    CLIENT_SBC,
    DIGEST,
    ENCRYPTION,
    MEDIA,
    SBC_CLIENT,
    SBC_CORE,
    SBC_SBC,
    SIGNALLING,
    SIPS,
    SIPS_SRTP,
    Cell,
)
from sbc.cli import AUDIT_UNMET, main
from sbc.config import Config, parse_config

REPO = Path(__file__).resolve().parent.parent


def config(tmp_path: Path, data: dict[str, Any]) -> Config:
    """A config whose TLS files exist (the schema checks that they do)."""
    for name in ("server.pem", "server.key", "ca.pem"):
        (tmp_path / name).write_text("x")
    for side in ("access", "core"):
        tls = data.get(side, {}).get("tls")
        if tls is not None:
            for key, name in (("certificate", "server.pem"), ("private_key", "server.key")):
                tls.setdefault(key, str(tmp_path / name))
            if tls.get("ca") is True:
                tls["ca"] = str(tmp_path / "ca.pem")
    return parse_config(data)


def cell(cells: list[Cell], relation: str, plane: str, mechanism: str, prop: str) -> Cell:
    [found] = [
        c for c in cells
        if (c.relation, c.plane, c.mechanism, c.property) == (relation, plane, mechanism, prop)
    ]  # fmt: skip
    return found


def verdict(cells: list[Cell], relation: str, plane: str, prop: str) -> tuple[str, str | None]:
    [v] = [
        v for v in audit.verdicts(cells) if (v.relation, v.plane, v.property) == (relation, plane, prop)
    ]  # fmt: skip
    return v.status, v.mechanism


def complete(cells: list[Cell]) -> None:
    """Exactly one cell per relation, plane, mechanism and property."""
    keys = Counter((c.relation, c.plane, c.mechanism, c.property) for c in cells)
    assert set(keys) == set(
        itertools.product(audit.RELATIONS, audit.PLANES, audit.MECHANISMS, audit.PROPERTIES)
    )
    assert max(keys.values()) == 1


PLAIN = {"access": {"listen": ["udp://127.0.0.1:5060", "tcp://127.0.0.1:5060"]},
         "media": {"access_srtp": "off"}}  # fmt: skip
TLS_SRTP = {
    "access": {"listen": ["tls://127.0.0.1:5061"], "tls": {}},
    "media": {"access_srtp": "mandatory"},
}


def test_all_plain_protects_nothing_the_sbc_could(tmp_path: Path) -> None:
    cells = audit.matrix(config(tmp_path, PLAIN))
    complete(cells)
    for relation in (CLIENT_SBC, SBC_CLIENT):
        for prop in (AUTH, ENCRYPTION):
            assert verdict(cells, relation, MEDIA, prop) == ("not", None)
        assert verdict(cells, relation, SIGNALLING, ENCRYPTION) == ("not", None)
    c = cell(cells, CLIENT_SBC, SIGNALLING, SIPS, ENCRYPTION)
    assert c.status == "not" and "no tls:// or wss://" in c.why[0]
    # Without backends: the embedded registrar challenges nobody; no core, no peers.
    assert cell(cells, CLIENT_SBC, SIGNALLING, DIGEST, AUTH).status == "not"
    for relation in (SBC_SBC, SBC_CORE):
        assert {c.status for c in cells if c.relation == relation} == {"n/a"}
    # End-to-end keys stay the parties' choice (relayed untouched).
    assert verdict(cells, CLIENT_CLIENT, MEDIA, ENCRYPTION) == ("optional", "mikey+srtp")


def test_tls_only_with_mandatory_srtp_protects_the_access_hop(tmp_path: Path) -> None:
    cells = audit.matrix(config(tmp_path, TLS_SRTP))
    complete(cells)
    assert verdict(cells, CLIENT_SBC, SIGNALLING, ENCRYPTION) == ("protected", SIPS)
    assert verdict(cells, CLIENT_SBC, MEDIA, ENCRYPTION) == ("protected", SIPS_SRTP)
    # The SBC reaches clients over the connections they opened: the paper's footnote 4.
    c = cell(cells, SBC_CLIENT, SIGNALLING, SIPS, ENCRYPTION)
    assert (c.status, c.kind) == ("protected", audit.OUTGOING_NAT)
    # TLS without client certificates: the SBC does not authenticate clients by it.
    assert cell(cells, CLIENT_SBC, SIGNALLING, SIPS, AUTH).status == "not"
    # Per hop: the SBC re-keys the media, so nothing is protected from it end to end.
    c = cell(cells, CLIENT_CLIENT, MEDIA, SIPS_SRTP, ENCRYPTION)
    assert c.status == "not" and "re-keyed per leg" in c.why[0]
    # Mandatory SRTP whose keys may ride plain SIP is only partly protected.
    weaker = {**TLS_SRTP, "access": {"listen": ["tls://127.0.0.1:5061", "udp://127.0.0.1:5060"],
                                      "tls": {}}}  # fmt: skip
    cells = audit.matrix(config(tmp_path, weaker))
    assert verdict(cells, CLIENT_SBC, SIGNALLING, ENCRYPTION) == ("optional", SIPS)
    c = cell(cells, CLIENT_SBC, MEDIA, SIPS_SRTP, ENCRYPTION)
    assert c.status == "partly" and "plain SIP" in c.why[0]


def test_mutual_tls_authenticates_clients_and_peers(tmp_path: Path) -> None:
    data = {
        "access": {"listen": ["tls://127.0.0.1:5061"], "tls": {"verify_clients": True,
                                                                 "ca": True}},
        "core": {"listen": ["tls://127.0.0.1:5081"], "tls": {"ca": True},
                 "backends": [{"uri": "sip:10.0.0.1:5061;transport=tls"}]},
        "media": {"access_srtp": "mandatory", "peer_srtp": "mandatory", "core_srtp": "mandatory"},
        "peers": [{"name": "p", "uri": "sips:peer.example.net", "domains": ["example.net"]}],
    }  # fmt: skip
    cells = audit.matrix(config(tmp_path, data))
    complete(cells)
    assert verdict(cells, CLIENT_SBC, SIGNALLING, AUTH) == ("protected", SIPS)
    for relation in (SBC_SBC, SBC_CORE):
        for plane in (SIGNALLING, MEDIA):
            for prop in (AUTH, ENCRYPTION):
                assert verdict(cells, relation, plane, prop)[0] == "protected", (relation, plane)
    # Digest: the backends' challenges pass through: client authentication only.
    c = cell(cells, CLIENT_SBC, SIGNALLING, DIGEST, AUTH)
    assert (c.status, c.kind) == ("partly", audit.CLIENT_AUTH)
    # Peers without a CA to check them against: their certificates are not checked.
    del data["core"]["tls"]["ca"]
    data["core"]["backends"] = []
    cells = audit.matrix(config(tmp_path, data))
    assert cell(cells, SBC_SBC, SIGNALLING, SIPS, AUTH).status == "not"
    assert cell(cells, SBC_SBC, SIGNALLING, SIPS, ENCRYPTION).status == "protected"


def test_passthrough_leaves_sdes_keys_to_the_parties(tmp_path: Path) -> None:
    data = {**TLS_SRTP, "media": {"access_srtp": "mandatory", "srtp_passthrough": True}}
    cells = audit.matrix(config(tmp_path, data))
    c = cell(cells, CLIENT_CLIENT, MEDIA, SIPS_SRTP, ENCRYPTION)
    assert (c.status, c.kind) == ("partly", audit.SDP_PARTS)
    assert "srtp_passthrough = true" in c.why[0]


def test_weak_ciphers_are_named(tmp_path: Path) -> None:
    assert audit.weak_ciphers(None) == []
    assert audit.weak_ciphers("ECDHE-RSA-AES128-GCM-SHA256") == []
    weak = audit.weak_ciphers("ECDHE-RSA-AES128-GCM-SHA256:AES128-SHA:@SECLEVEL=0")
    assert weak == ["AES128-SHA"]
    data = {**TLS_SRTP, "access": {"listen": ["tls://127.0.0.1:5061"],
                                   "tls": {"ciphers": "AES128-SHA:ECDHE-RSA-AES128-GCM-SHA256"}}}  # fmt: skip
    cells = audit.matrix(config(tmp_path, data))
    c = cell(cells, CLIENT_SBC, SIGNALLING, SIPS, ENCRYPTION)
    assert c.status == "partly" and "AES128-SHA" in c.why[-1]


def test_the_matrix_in_text_markdown_and_json(tmp_path: Path) -> None:
    cells = audit.matrix(config(tmp_path, TLS_SRTP))
    text = audit.render_text(cells, "x.toml", None)
    assert "Authentication, encryption and integrity" in text
    rows = [line for line in text.splitlines() if line.startswith("Client to SBC ")]
    assert rows[1].endswith("protected (SIPS + SRTP, all data)"), rows
    markdown = audit.render_markdown(cells, "x.toml", None)
    assert "| Client to SBC | SIP Sign. |" in markdown
    data = audit.report(config(tmp_path, TLS_SRTP), "x.toml")
    assert json.loads(audit.to_json(data))["verdicts"][0]["relation"] == CLIENT_SBC


def test_requirements_are_checked_and_bad_ones_named(tmp_path: Path) -> None:
    cells = audit.matrix(config(tmp_path, PLAIN))
    required = audit.requirements({"require": [
        {"relation": CLIENT_SBC, "plane": MEDIA, "property": ENCRYPTION},
        {"relation": CLIENT_CLIENT, "plane": MEDIA, "property": ENCRYPTION, "mechanism": "sips+srtp"},
    ]})  # fmt: skip
    assert audit.unmet(cells, required) == [
        "client-to-sbc media encryption: not",
        "client-to-client media encryption by SIPS + SRTP: not",
    ]
    assert audit.unmet(audit.matrix(config(tmp_path, TLS_SRTP)), required[:1]) == []
    for bad, message in (
        ({}, "at least one"),
        ({"require": [{"relation": "x", "plane": MEDIA, "property": AUTH}]}, "require[0].relation"),
        ({"require": [{"relation": CLIENT_SBC, "plane": MEDIA, "property": AUTH, "x": 1}]},
         "unknown key x"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            audit.requirements(bad)


def test_the_command_exits_with_the_unmet_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    path = tmp_path / "sbc.toml"
    path.write_text('[access]\nlisten = ["udp://127.0.0.1:5060"]\n')
    require = tmp_path / "require.toml"
    require.write_text(
        '[[require]]\nrelation = "client-to-sbc"\nplane = "signalling"\nproperty = "encryption"\n'
    )
    assert main(["audit", "--config", str(path), "--require", str(require)]) == AUDIT_UNMET
    out = capsys.readouterr()
    assert "Security matrix of" in out.out
    assert "required but not protected: client-to-sbc signalling encryption: not" in out.err
    assert main(["audit", "--config", str(path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"] == str(path)
    require.write_text("[[require]]\nrelation = 1\n")
    assert main(["audit", "--config", str(path), "--require", str(require)]) == 1
    assert "require[0].relation" in capsys.readouterr().err
    # --live needs the SBC of the config running (its admin API answering).
    path.write_text(
        '[access]\nlisten = ["udp://127.0.0.1:5060"]\n[admin]\nlisten = "127.0.0.1:9"\n'
    )
    assert main(["audit", "--config", str(path), "--live"]) == 1
    assert "--live: no answer from the SBC's admin API" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["config/sbc.toml", "docker/sbc.toml"])
def test_the_shipped_configs_have_a_whole_matrix(name: str, tmp_path: Path) -> None:
    data = tomllib.loads((REPO / name).read_text())
    for side in ("access", "core"):  # their certificates may not be made yet (make certs)
        for key in ("certificate", "private_key", "ca"):
            data.get(side, {}).get("tls", {}).pop(key, None)
    cells = audit.matrix(config(tmp_path, data))
    complete(cells)
    assert verdict(cells, CLIENT_SBC, SIGNALLING, ENCRYPTION)[0] == "optional"


@pytest.mark.parametrize("name", ["config/sbc.toml", "docker/sbc.toml"])
def test_docs_show_the_shipped_configs_as_the_command_does(name: str, tmp_path: Path) -> None:
    """docs/security.md holds `sbc audit --format markdown` of each shipped config as it
    is now (its certificates may not exist here: they decide no cell)."""
    data = tomllib.loads((REPO / name).read_text())
    for side in ("access", "core"):
        for key in ("certificate", "private_key", "ca"):
            data.get(side, {}).get("tls", {}).pop(key, None)
    loaded = config(tmp_path, data)
    doc = (REPO / "docs" / "security.md").read_text()
    marker = f"<!-- sbc audit --config {name} --format markdown -->\n"
    shown = doc.split(marker, 1)[1].split("\n<!-- end -->", 1)[0]
    assert shown + "\n" == audit.render_markdown(audit.matrix(loaded), name, None)
