"""The sans-I/O layers import nothing they do not need: parsing SIP and SDP and running the
calls must not pull in the media stack (pylibsrtp, PyAV), the event loop (asyncio, uvloop)
or the metrics library. Checked in a fresh interpreter, where sys.modules shows everything
an import brought in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("pylibsrtp", "av", "asyncio", "uvloop", "prometheus_client", "cryptography")

SANS_IO = (
    "sbc.sip.parser",
    "sbc.sip.transaction",
    "sbc.sip.dialog",
    "sbc.sdp.sdp",
    "sbc.sdp.sdes",
    "sbc.media.codec_policy",
    "sbc.media.session",
    "sbc.calls",
    "sbc.core",
)


@pytest.mark.parametrize("module", SANS_IO)
def test_a_sans_io_module_imports_no_io_or_media_library(module: str) -> None:
    code = (
        f"import json, sys; import {module}; "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == [], f"importing {module} imported these"
