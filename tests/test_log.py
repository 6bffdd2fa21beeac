"""Text and JSON log lines carry the extra fields."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from sbc.log import setup_logging


@pytest.fixture(autouse=True)
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_format() -> None:
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    log = logging.getLogger("sbc.core")
    log.debug("hidden")
    log.info("call %s", "up", extra={"call_id": "a84b4c76e66710", "peer": "[::1]:5060"})
    log.warning("odd", extra={"reason": "two words"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO sbc\.core call up "
        r"call_id=a84b4c76e66710 peer=\[::1\]:5060",
        lines[0],
    ), lines[0]
    assert lines[1].endswith('WARNING sbc.core odd reason="two words"')


def test_json_format_and_reconfigure() -> None:
    first = io.StringIO()
    setup_logging("info", "text", stream=first)
    out = io.StringIO()
    setup_logging("debug", "json", stream=out)  # replaces the text handler
    log = logging.getLogger("sbc.io.udp")
    log.debug("datagram", extra={"transport": "udp", "size": 412})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    assert first.getvalue() == ""
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert records[0]["level"] == "debug" and records[0]["logger"] == "sbc.io.udp"
    assert records[0]["msg"] == "datagram"
    assert records[0]["transport"] == "udp" and records[0]["size"] == 412
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", records[0]["ts"])
    assert records[1]["level"] == "error" and "RuntimeError: boom" in records[1]["exc"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        setup_logging("loud", "text")
    with pytest.raises(ValueError):
        setup_logging("info", "xml")
