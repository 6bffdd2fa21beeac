"""``python -m sbc.compiled``: which modules run compiled by mypyc here, and why not.

``--check`` exits 1 when reinstalling would change that (a compiled source edited since the
build, an extension gone, no build recorded, or a pure-Python install made with
SBC_PURE_PYTHON that is no longer set); the Makefile then reinstalls. The logic is in
sbc/_compiled.py, which ``import sbc`` runs.
"""

from __future__ import annotations

import sys

from sbc._compiled import needs_rebuild, status


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--check"]:
        why = needs_rebuild()
        if why is None:
            return 0
        print(f"sbc: the compiled build is out of date: {why}")
        return 1
    if args:
        print("usage: python -m sbc.compiled [--check]", file=sys.stderr)
        return 2
    st = status()
    if st["compiled"]:
        print(f"sbc: compiled by {st['compiler']}: {', '.join(st['compiled'])}")
    if st["reason"] is not None:
        print(f"sbc: pure Python: {st['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
