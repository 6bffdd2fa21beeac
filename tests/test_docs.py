"""Every example in the docs is checked: each TOML example is a config
the SBC accepts, the `sbc check-config` error example is what the SBC prints, and the
Prometheus scrape example is valid YAML."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from sbc.cli import main
from sbc.config import parse_config

REPO = Path(__file__).resolve().parent.parent
DOCS = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md", REPO / "docker" / "README.md"]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)

# What a fragment needs around it to stand alone: TCP and TLS listeners on the core side
# (backends over TCP, peering over TLS) with a certificate, as a full config would have.
BASE: dict[str, Any] = {
    "core": {
        "listen": ["udp://127.0.0.1:5080", "tcp://127.0.0.1:5080", "tls://127.0.0.1:5081"],
        "tls": {"certificate": "../certs/server.pem", "private_key": "../certs/server.key"},
    }
}


def blocks(kind: str) -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for m in BLOCK.finditer(doc.read_text()):
            if m[1] == kind:
                line = doc.read_text()[: m.start()].count("\n") + 1
                found.append((f"{doc.relative_to(REPO)}:{line}", m[2]))
    return found


def merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def test_the_docs_have_toml_examples() -> None:
    assert len(blocks("toml")) >= 6


@pytest.mark.parametrize(("where", "text"), blocks("toml"), ids=lambda v: str(v)[:40])
def test_toml_example_is_a_valid_config(where: str, text: str, tmp_path: Path) -> None:
    # Relative paths are taken from the config's directory: ../certs/ next to it here, and
    # the example's absolute log directory is made under tmp_path.
    config_dir, certs = tmp_path / "config", tmp_path / "certs"
    config_dir.mkdir()
    certs.mkdir()
    for name in ("server.pem", "server.key", "ca.pem"):
        (certs / name).write_text("placeholder\n")
    text = text.replace("/var/log/sbc/", f"{tmp_path}/")
    data = merged(BASE, tomllib.loads(text))
    parse_config(data, source=where, base_dir=config_dir)


def test_check_config_error_example_is_what_the_sbc_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    example = next(text for _, text in [("", b[2]) for b in BLOCK.finditer(doc) if b[1] == ""]
                   if text.startswith("$ sbc check-config sbc.toml"))  # fmt: skip
    expected = example.splitlines()[1:]
    config = tmp_path / "sbc.toml"
    config.write_text(
        "[access]\nbogus = 1\n\n[access.tls]\n"
        'certificate = "/etc/sbc/certs/server.pem"\n\n'
        '[[core.backends]]\nuri = "sip:10.0.0.1"\n\n'
        '[[core.backends]]\nuri = "sip:10.0.0.2"\nweight = "x"\n\n'
        '[media]\nports = "30000-20000"\n'
    )
    assert main(["check-config", str(config)]) == 1
    printed = capsys.readouterr().err.replace(str(config), "sbc.toml").splitlines()
    assert printed == expected


@pytest.mark.parametrize(("where", "text"), blocks("yaml"), ids=lambda v: str(v)[:40])
def test_yaml_example_parses(where: str, text: str) -> None:
    assert yaml.safe_load(text), where
