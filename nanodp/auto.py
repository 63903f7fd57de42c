"""`--attention auto`: Double-P only where it measured faster than dense on this GPU, dense elsewhere.

`python -m nanodp.bench e2e --write-auto` times dense and Double-P (at the engine's defaults) per (batch size,
context) and writes, per GPU and model, a table {"B,ctx": "doublep" | "dense"} to $NANODP_HOME/auto/ (see
nanodp/fetch.py for NANODP_HOME). A decode step of B sequences whose longest cache bucket is ctx takes the entry
of the largest measured batch <= B and the largest measured context <= ctx; without one (or without a table)
it runs dense: Double-P is never chosen on a guess.
"""

import json
import re

from .fetch import HOME


def path(device: str, model: str):
    slug = lambda s: re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-")  # noqa: E731
    return HOME / "auto" / f"{slug(device)}--{slug(model)}.json"


def load(device: str, model: str) -> dict:
    try:
        return json.loads(path(device, model).read_text())
    except (OSError, ValueError):
        return {}


def save(device: str, model: str, table: dict):
    p = path(device, model)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return p


def choose(table: dict, B: int, ctx: int) -> str:
    cells = [tuple(map(int, k.split(","))) for k in table]
    bs = [b for b, _ in cells if b <= B]
    cs = [c for _, c in cells if c <= ctx]
    if not bs or not cs:
        return "dense"
    return table.get(f"{max(bs)},{max(cs)}", "dense")
