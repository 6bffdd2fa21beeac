"""Session Border Controller."""

from sbc._compiled import activate as _activate
from sbc._compiled import compiled_modules

__all__ = ["__version__", "compiled_modules"]
__version__ = "0.1.0"

# Before any compiled module is imported: SBC_PURE_PYTHON, or a compiled module whose source
# changed since the build, makes them load from their .py sources (sbc/_compiled.py).
_activate()
