"""The build: the sans-I/O hot path compiled ahead of time by mypyc (README, "Compiled build").

Everything else about the package is in pyproject.toml; this file only adds the C extensions.
The modules that ``[tool.sbc.compile]`` in pyproject.toml names are compiled by mypyc (it
ships with mypy, a build requirement) into extension modules next to their sources (an
editable install, ``pip install -e``, builds them in place), all in one mypyc group whose
runtime library is ``sbc/_mypyc__mypyc.<ext suffix>``. The SHA-256 of every compiled source
is recorded in ``sbc/_compiled_hashes.json`` (generated, git-ignored); sbc/_compiled.py reads
it when ``sbc`` is imported and loads the whole group from its .py sources when one of them
changed since.

Nothing is compiled, and the package installs as pure Python with a message saying why, when
SBC_PURE_PYTHON is set (and not "0"), when there is no working C compiler or no Python
headers (Debian: gcc, python3-dev), or when mypyc or the compiler fails. The message is in
the build output (``pip install -v``) and in the generated file, which ``python -m
sbc.compiled`` prints (the Makefile does, after installing).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import sys
import sysconfig
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
PACKAGE = "sbc"
HASHES = "_compiled_hashes.json"  # in the package directory
GROUP = "sbc._mypyc"  # mypyc's runtime library for the group: sbc._mypyc__mypyc
PURE_ENV = "SBC_PURE_PYTHON"


def compiled_sources() -> list[str]:
    """The sources ``[tool.sbc.compile]`` names (include globs less exclude patterns),
    relative to the project root, sorted."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)["tool"]["sbc"]["compile"]
    found = {
        path.relative_to(ROOT).as_posix()
        for pattern in config["include"]
        for path in ROOT.glob(pattern)
    }
    excluded = config.get("exclude", [])
    return sorted(p for p in found if not any(fnmatch.fnmatchcase(p, x) for x in excluded))


def module_name(source: str) -> str:
    return source.removesuffix(".py").replace("/", ".")


def pure_requested() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def compiler_problem() -> str | None:
    """Why no extension module can be compiled here (no Python headers, no working C
    compiler), or None. A one-line probe, compiled the way build_ext compiles."""
    # distutils once setuptools is imported: setuptools' copy (3.12 has none of its own)
    from distutils.ccompiler import new_compiler
    from distutils.errors import CCompilerError, DistutilsError
    from distutils.sysconfig import customize_compiler

    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python headers (no Python.h in {include}; Debian: apt-get install python3-dev)"
    compiler: Any = new_compiler()
    try:
        customize_compiler(compiler)
        with tempfile.TemporaryDirectory(prefix="sbc-cc-") as tmp:
            probe = os.path.join(tmp, "probe.c")
            with open(probe, "w") as f:
                f.write("#include <Python.h>\nint sbc_probe(void) { return Py_IsInitialized(); }\n")
            include_dirs = {include, sysconfig.get_paths()["platinclude"]}
            compiler.compile([probe], output_dir=tmp, include_dirs=sorted(include_dirs))
    except (CCompilerError, DistutilsError, OSError) as exc:
        cc = (getattr(compiler, "compiler_so", None) or ["cc"])[0]
        status = re.search(r"exit (?:status|code) -?\d+", str(exc))
        detail = status.group() if status else (str(exc).splitlines() or [repr(exc)])[0][:160]
        return f"the C compiler does not work ({cc}: {detail}; Debian: apt-get install gcc)"
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` as a new file (a new inode), unless it holds ``data`` already.
    Rewriting a loaded extension in place would crash the processes that run it."""
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _InPlaceAtomically(build_ext):
    """build_ext whose in-place copies (editable installs) replace each extension by a new
    file instead of rewriting it: an SBC or test run may have it loaded."""

    def copy_extensions_to_source(self) -> None:
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            fullname = self.get_ext_fullname(ext.name)
            filename = self.get_ext_filename(fullname)
            package_dir = build_py.get_package_dir(fullname.rpartition(".")[0])
            built = Path(self.build_lib, filename)
            _replace(Path(package_dir, built.name), built.read_bytes())


_BUILD_EXT_OPTIONS = (
    "build_lib", "build_temp", "inplace", "editable_mode", "force", "parallel", "debug",
    "compiler", "plat_name",
)  # fmt: skip


class BuildExt(build_ext):
    """build_ext that makes its extensions with mypyc when it runs (not when setup.py is
    read: pip reads it several times per install), and falls back to pure Python."""

    def run(self) -> None:
        from distutils.errors import CCompilerError, DistutilsError

        sources = compiled_sources()
        # Hashed before mypyc reads them: a source edited meanwhile can only look stale.
        hashes = {source: _sha256(ROOT / source) for source in sources}
        reason = f"{PURE_ENV} is set" if pure_requested() else compiler_problem()
        extensions: list[Any] = []
        if reason is None:
            extensions, reason = self._mypyc(sources)
        if reason is not None:
            self._pure(reason)
            return
        # The extensions are known only now, after this command was finalized: a fresh
        # build_ext with the same options builds them.
        self.distribution.ext_modules = extensions
        builder = _InPlaceAtomically(self.distribution)
        for option in _BUILD_EXT_OPTIONS:
            setattr(builder, option, getattr(self, option))
        try:
            builder.ensure_finalized()
            builder.run()
        except (CCompilerError, DistutilsError, OSError) as exc:
            self._pure(f"compiling failed ({exc})")
            return
        self.extensions, self.ext_map = builder.extensions, builder.ext_map  # get_outputs
        self._record(hashes)

    def _mypyc(self, sources: list[str]) -> tuple[list[Any], str | None]:
        try:
            from mypyc.build import mypycify
        except ImportError as exc:
            return [], f"mypyc is missing ({exc}); it comes with mypy, a build requirement"
        try:
            extensions = mypycify(
                # sbc/sip has no __init__.py: module names from the directories
                ["--explicit-package-bases", *sources],
                opt_level="3",
                group_name=GROUP,
                target_dir=os.path.join("build", "mypyc"),
            )
        except (Exception, SystemExit) as exc:  # mypyc reports its errors by sys.exit
            return [], f"mypyc failed on {len(sources)} modules (its errors above; {exc!r})"
        return extensions, None

    def _package_dirs(self) -> list[Path]:
        """Where the package is built: build_lib, and the sources for an in-place build."""
        dirs = [Path(self.build_lib, PACKAGE)]
        if self.inplace:
            dirs.append(Path(self.get_finalized_command("build_py").get_package_dir(PACKAGE)))
        return dirs

    def _write(self, info: dict[str, Any]) -> None:
        data = (json.dumps(info, indent=1, sort_keys=True) + "\n").encode()
        for pkg in self._package_dirs():
            pkg.mkdir(parents=True, exist_ok=True)
            _replace(pkg / HASHES, data)

    def _pure(self, reason: str) -> None:
        sys.stderr.write(f"sbc: not compiled, installing pure Python: {reason}\n")
        # Extensions of an earlier build would be imported (their sources unchanged).
        names = [module_name(s) for s in compiled_sources()] + [f"{GROUP}__mypyc"]
        for pkg in self._package_dirs():
            for name in names:
                stem = Path(pkg.parent, *name.split("."))
                for old in stem.parent.glob(f"{stem.name}.*"):
                    if old.suffix in (".so", ".pyd"):
                        old.unlink()
        self._write({"modules": {}, "pure_reason": reason, "pure_env": pure_requested()})

    def _record(self, hashes: dict[str, str]) -> None:
        import mypy.version

        def in_package(path: str) -> str:
            return Path(path).relative_to(PACKAGE).as_posix()

        modules = {}
        for source, digest in hashes.items():
            name = module_name(source)
            modules[name] = {
                "source": in_package(source),
                "sha256": digest,
                "extension": in_package(self.get_ext_filename(name)),
            }
        group = f"{GROUP}__mypyc"
        self._write(
            {
                "compiler": f"mypyc {mypy.version.__version__}",
                "group": {"module": group, "extension": in_package(self.get_ext_filename(group))},
                "modules": modules,
                "pure_reason": None,
            }
        )
        print(f"sbc: compiled by mypyc: {', '.join(modules)}")


class BinaryDistribution(Distribution):
    """Always runs build_ext (which decides what to compile) and makes platform wheels."""

    def has_ext_modules(self) -> bool:
        return True


if __name__ == "__main__":
    setup(distclass=BinaryDistribution, cmdclass={"build_ext": BuildExt})
