"""Bridge to weights/fetch_default.py (the default model's fetch + GGUF conversion script)."""
import importlib.util
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parent.parent / "weights" / "fetch_default.py"


def ensure_default_model(out_dir, quiet=False):
    if not _SCRIPT.is_file():
        raise FileNotFoundError(f"{_SCRIPT} is missing; run nanodp from its source checkout, or pass --model DIR")
    spec = importlib.util.spec_from_file_location("nanodp_fetch_default", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ensure_default_model(out_dir, quiet=quiet)
