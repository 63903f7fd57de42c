"""bf16 accuracy (CPU, torch twins): nanodp's logits stay closer to transformers fp32 than transformers bf16 does.

The figures come from scripts/precision.py (the same prompts and measures). Before the residual stream, cos/sin and
logits went fp32 and the fused ops rounded once, nanodp bf16 was about as far from fp32 as transformers bf16
(mean |dlogit| 0.41 vs 0.43 on 8 prompts); now it is about half (0.22): pinned here with a margin.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


def _precision():
    spec = importlib.util.spec_from_file_location("precision", ROOT / "scripts" / "precision.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bf16_twins_beat_transformers_bf16(default_model):
    torch.manual_seed(0)
    res = _precision().measure(default_model, torch.bfloat16, n_prompts=4, paths=["hf", "torch"])
    agg = {}
    for path, rows in res.items():
        n = sum(r["positions"] for r in rows)
        agg[path] = dict(
            max=max(r["max"] for r in rows),
            mean=sum(r["mean"] * r["positions"] for r in rows) / n,
            last_layer=sum(r["layers"][-1] for r in rows) / len(rows),
        )
    print(agg)
    hf, ours = agg["hf"], agg["torch"]
    assert ours["mean"] <= 0.75 * hf["mean"], agg  # ~0.5x measured (was ~0.95x before the fix)
    assert ours["max"] <= hf["max"] + 0.05, agg
    assert ours["last_layer"] <= hf["last_layer"], agg
    assert not res["torch"][0]["last_flip"], "first reply token of 'What is the capital of France?' differs from fp32"
