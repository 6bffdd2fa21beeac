"""The compiled build (setup.py, sbc/_compiled.py; README "Compiled build").

After the normal install the modules that pyproject.toml's ``[tool.sbc.compile]`` names run
as mypyc-compiled extension modules (under CI=true a missing compiled build fails, elsewhere
the test says why it skips). SBC_PURE_PYTHON=1 makes a process import their .py sources
instead; so does a compiled source edited since the build, or an extension gone (the whole
group, with one warning line naming the module). An install without a working C compiler,
or with SBC_PURE_PYTHON=1, installs pure Python and says why. Each check runs in a fresh
interpreter: the choice is made once per process, when ``sbc`` is imported.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
_SETUP = runpy.run_path(str(REPO / "setup.py"), run_name="sbc_setup")  # no setup() call
MODULES = sorted(_SETUP["module_name"](s) for s in _SETUP["compiled_sources"]())
CI = os.environ.get("CI") == "true"

# Imports every compiled module, then says where each came from and what sbc reports.
PROBE = f"""
import importlib, json, types
import sbc
from sbc._compiled import status
files = {{m: importlib.import_module(m).__file__ for m in {MODULES!r}}}
from sbc.sip.parser import parse_message
msg = parse_message(b"OPTIONS sip:a@example.com SIP/2.0\\r\\nVia: SIP/2.0/UDP h;branch=z9hG4bK1"
                    b"\\r\\nCall-ID: c\\r\\nCSeq: 1 OPTIONS\\r\\nContent-Length: 0\\r\\n\\r\\n")
assert msg.top_via.branch == "z9hG4bK1" and msg.cseq.seq == 1
print(json.dumps({{
    "files": files,
    "compiled": list(sbc.compiled_modules()),
    "status": status(),
    "python_functions": isinstance(parse_message, types.FunctionType),
}}))
"""


def _env(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SBC_PURE_PYTHON"}
    env.update(changes)
    return env


def _probe(cwd: Path = REPO, **env: str) -> tuple[dict[str, Any], str]:
    """Run PROBE in a fresh interpreter (``sbc`` from ``cwd``); its report and stderr."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=cwd,
        env=_env(PYTHONPATH=str(cwd), **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report, done.stderr


def _is_extension(path: str) -> bool:
    return path.endswith(tuple(EXTENSION_SUFFIXES))


def _compiled_build_or_skip() -> dict[str, Any]:
    """The probe's report of the installed tree when it runs compiled; otherwise a failure
    under CI=true and a skip elsewhere, saying why."""
    report, _ = _probe()
    if report["compiled"] != MODULES:
        why = f"no complete compiled build here: {report['status']['reason']}"
        if CI:
            pytest.fail(why)
        pytest.skip(why)
    return report


def test_the_listed_modules_are_compiled_extension_modules_after_the_install() -> None:
    assert "sbc.sip.parser" in MODULES
    report = _compiled_build_or_skip()
    assert all(_is_extension(f) for f in report["files"].values()), report["files"]
    assert not report["python_functions"]
    assert report["status"]["reason"] is None
    assert report["status"]["compiler"].startswith("mypyc ")


def test_sbc_pure_python_imports_the_py_sources_even_with_extensions_built() -> None:
    report, stderr = _probe(SBC_PURE_PYTHON="1")
    for module, path in report["files"].items():
        assert path.endswith(".py"), module
        assert Path(path) == REPO.joinpath(*module.split(".")).with_suffix(".py")
    assert report["compiled"] == []
    assert report["python_functions"]
    assert stderr == ""  # asked for: no warning


def _copy_tree(tmp_path: Path) -> Path:
    """The package as installed here (sources, extensions, recorded hashes) in tmp_path."""
    shutil.copytree(REPO / "sbc", tmp_path / "sbc", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _edit_source(tree: Path) -> tuple[str, str]:
    source = tree / "sbc" / "sip" / "uri.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    return "sbc.sip.uri", "sbc.sip.uri: source changed since it was compiled"


def _delete_extension(tree: Path) -> tuple[str, str]:
    (extension,) = (tree / "sbc" / "sip").glob("headers.*[!y]")  # not headers.py
    extension.unlink()
    return "sbc.sip.headers", "compiled build incomplete (extension missing: sbc.sip.headers)"


@pytest.mark.parametrize("change", [_edit_source, _delete_extension], ids=["edited", "deleted"])
def test_a_stale_or_missing_compiled_module_runs_from_source_with_its_group(
    tmp_path: Path, change: Callable[[Path], tuple[str, str]]
) -> None:
    _compiled_build_or_skip()
    tree = _copy_tree(tmp_path)
    report, stderr = _probe(cwd=tree)
    assert report["compiled"] == MODULES  # the copy itself runs compiled
    assert stderr == ""

    module, warning = change(tree)
    report, stderr = _probe(cwd=tree)

    assert report["files"][module] == str(tree.joinpath(*module.split(".")).with_suffix(".py"))
    # The other compiled modules call its functions in C: they run from source with it.
    assert all(f.endswith(".py") for f in report["files"].values()), report["files"]
    assert report["compiled"] == []
    assert report["python_functions"]
    assert module in report["status"]["reason"]
    warnings = stderr.splitlines()
    assert len(warnings) == 1, stderr
    assert warnings[0].startswith(warning)


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"CC": "/bin/false"}, "the C compiler does not work"),
        ({"SBC_PURE_PYTHON": "1"}, "SBC_PURE_PYTHON is set"),
    ],
    ids=["no-working-compiler", "SBC_PURE_PYTHON"],
)
def test_the_install_falls_back_to_pure_python_and_says_why(
    tmp_path: Path, env: dict[str, str], reason: str
) -> None:
    """setup.py's build_ext, in place in a copy of the project (the way an editable install
    runs it): no failure, the message, no extension left behind, a pure-Python package."""
    tree = _copy_tree(tmp_path)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tree,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"sbc: not compiled, installing pure Python: {reason}" in done.stderr
    assert not [p for p in (tree / "sbc").rglob("*") if _is_extension(p.name)]
    recorded = json.loads((tree / "sbc" / "_compiled_hashes.json").read_text())
    assert recorded["modules"] == {}
    assert recorded["pure_reason"].startswith(reason)

    report, stderr = _probe(cwd=tree)
    assert all(f.endswith(".py") for f in report["files"].values())
    assert report["compiled"] == []
    assert report["status"]["reason"].startswith(reason)
    assert stderr == ""
