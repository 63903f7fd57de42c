"""nanodp: a compact LLM inference engine with Double-P sparse decode attention."""
import importlib.util as _ilu
import os as _os
import sys as _sys

# kernels/ lives at the repository root and is installed as nanodp.kernels (see pyproject.toml).
# Running from a source checkout without installing, map it here so `nanodp.kernels` always
# means our folder and never an unrelated top-level `kernels` package.
_pkg = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_pkg)
if ("nanodp.kernels" not in _sys.modules and not _os.path.isdir(_os.path.join(_pkg, "kernels"))
        and _os.path.isfile(_os.path.join(_root, "pyproject.toml"))):
    _kdir = _os.path.join(_root, "kernels")
    if _os.path.isfile(_os.path.join(_kdir, "__init__.py")):
        _spec = _ilu.spec_from_file_location("nanodp.kernels", _os.path.join(_kdir, "__init__.py"),
                                             submodule_search_locations=[_kdir])
        _mod = _ilu.module_from_spec(_spec)
        _sys.modules["nanodp.kernels"] = _mod
        _spec.loader.exec_module(_mod)

__version__ = "0.1.0"
