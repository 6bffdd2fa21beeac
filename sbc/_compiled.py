"""Which modules run compiled by mypyc, and the fallback to their Python sources.

The build (setup.py; README "Compiled build") compiles the sans-I/O hot path into extension
modules next to their sources and records the SHA-256 of each compiled source in
``_compiled_hashes.json``. ``activate``, called once by ``import sbc``, decides for the whole
process, before any of them is imported:

- SBC_PURE_PYTHON set (and not "0"): every compiled module is imported from its .py;
- a source that no longer matches its recorded hash (edited since the build), or an extension
  that is gone: the same, with one warning line naming the module.

The compiled modules form one mypyc group: they call each other's functions and classes
directly in C, not through ``sys.modules``, so a stale extension would still run when called
from another compiled module. They therefore run compiled all together or all from source.

``compiled_modules()`` (also ``sbc.compiled_modules()``) names the modules that run compiled
in this process; ``python -m sbc.compiled`` prints the state.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec
from importlib.util import spec_from_file_location
from types import ModuleType
from typing import Any

PURE_ENV = "SBC_PURE_PYTHON"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
HASHES_FILE = os.path.join(PACKAGE_DIR, "_compiled_hashes.json")  # written by setup.py


def pure_requested() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


class _SourceFinder:
    """A meta-path finder, first on sys.meta_path: the compiled modules' .py sources."""

    def __init__(self, sources: dict[str, str]) -> None:
        self.sources = sources  # module name -> path of its .py

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        source = self.sources.get(fullname)
        return None if source is None else spec_from_file_location(fullname, source)


class Build:
    """What the last install built (the generated hashes file), checked against the tree."""

    def __init__(self, info: dict[str, Any] | None) -> None:
        self.found = info is not None  # False: never built, or cleaned (make clean)
        info = info or {}
        modules: dict[str, dict[str, str]] = info.get("modules") or {}
        self.modules = modules
        self.pure_reason: str | None = info.get("pure_reason")
        self.pure_env: bool = bool(info.get("pure_env"))
        self.compiler: str | None = info.get("compiler")
        group = info.get("group") or {}
        self._group_module: str = group.get("module", "")
        self._group_ext: str = group.get("extension", "")

    def source(self, name: str) -> str:
        return os.path.join(PACKAGE_DIR, self.modules[name]["source"])

    def stale(self) -> list[str]:
        """Compiled modules whose source changed since the build."""
        import hashlib  # only when there is a compiled build to check

        out = []
        for name, entry in self.modules.items():
            try:
                with open(self.source(name), "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            except OSError:
                continue  # no source to fall back to: the extension it is
            if digest != entry["sha256"]:
                out.append(name)
        return out

    def unloadable(self) -> list[str]:
        """Compiled modules whose extension (or the group's runtime library) is missing or
        not one this interpreter imports (built for another Python version)."""
        extensions = [(n, n, e["extension"]) for n, e in self.modules.items()]
        if self.modules:
            extensions.append((self._group_module, "the mypyc runtime library", self._group_ext))
        return [
            what
            for module, what, ext in extensions
            if not (
                os.path.basename(ext)
                in {module.rpartition(".")[2] + suffix for suffix in EXTENSION_SUFFIXES}
                and os.path.exists(os.path.join(PACKAGE_DIR, ext))
            )
        ]


class _State:
    def __init__(self, build: Build, from_source: dict[str, str], reason: str | None) -> None:
        self.build = build
        self.from_source = from_source  # module -> .py, imported from source in this process
        self.reason = reason  # why the compiled modules run from source here, if they do


_state: _State | None = None


def _read_build() -> Build:
    try:
        with open(HASHES_FILE, encoding="utf-8") as f:
            return Build(json.load(f))
    except (OSError, ValueError):
        return Build(None)


def activate() -> None:
    """Decide, once per process, whether the compiled modules load compiled or from source."""
    global _state
    if _state is not None:
        return
    build = _read_build()
    reason = None
    stale: list[str] = []
    if build.modules:
        if pure_requested():
            reason = f"{PURE_ENV} is set"
        else:
            stale = build.stale()
            gone = build.unloadable()
            if stale:
                reason = f"source changed since compiled: {', '.join(stale)}"
            elif gone:
                reason = f"extension missing: {', '.join(gone)}"
    sources: dict[str, str] = {}
    if reason is not None:
        sources = {n: build.source(n) for n in build.modules if os.path.exists(build.source(n))}
        sys.meta_path.insert(0, _SourceFinder(sources))
    _state = _State(build, sources, reason)
    if reason is not None and not pure_requested():
        import logging

        log = logging.getLogger("sbc.compiled")
        tail = (
            f"the {len(build.modules)} compiled modules (one mypyc group) run from their .py "
            "sources until reinstalled (make venv, or pip install -e .)"
        )
        for name in stale:
            log.warning("%s: source changed since it was compiled; %s", name, tail)
        if not stale:
            log.warning("compiled build incomplete (%s); %s", reason, tail)


def _state_now() -> _State:
    activate()
    assert _state is not None
    return _state


def _runs_compiled(name: str) -> bool:
    module = sys.modules.get(name)
    if module is not None:
        return str(getattr(module, "__file__", "")).endswith(tuple(EXTENSION_SUFFIXES))
    state = _state_now()
    return name in state.build.modules and name not in state.from_source


def compiled_modules() -> tuple[str, ...]:
    """The modules that run compiled by mypyc in this process (imported or not yet)."""
    return tuple(sorted(n for n in _state_now().build.modules if _runs_compiled(n)))


def status() -> dict[str, Any]:
    """For ``sbc status`` and the Makefile: what runs compiled, what does not and why."""
    state = _state_now()
    build = state.build
    reason = state.reason or build.pure_reason
    if not build.found:
        reason = "not built (no sbc/_compiled_hashes.json: pip install -e . builds it)"
    return {
        "compiled": list(compiled_modules()),
        "from_source": sorted(state.from_source),
        "reason": reason,
        "compiler": build.compiler,
    }


def needs_rebuild() -> str | None:
    """Why reinstalling would change what runs compiled here, or None. Not a missing C
    compiler, which a reinstall does not cure (it would rebuild on every run)."""
    build = _state_now().build
    if not build.found:
        return "no compiled build recorded"
    if build.pure_env and not pure_requested():
        return f"installed pure Python because {PURE_ENV} was set"
    stale = build.stale()
    if stale:
        return f"source changed since compiled: {', '.join(stale)}"
    gone = build.unloadable()
    if gone:
        return f"extension missing: {', '.join(gone)}"
    return None
