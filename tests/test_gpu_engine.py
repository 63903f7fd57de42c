"""GPU-only engine checks (skipped without CUDA): CUDA-graph decode equals eager decode, token for token,
for dense and Double-P; Triton dense decode logits match the torch twins in bf16."""

import pytest
import torch

from nanodp.config import SparseConfig
from nanodp.engine import Engine
from nanodp.sampler import SamplingParams

pytestmark = pytest.mark.gpu
TEXT = "Alice put the red key in the blue box. Bob took the green key. " * 40 + "Where is the red key?"


@pytest.mark.parametrize("attention", ["dense", "doublep", "topk"])
def test_graphs_equal_eager(default_model, attention):
    out = []
    for eager in (True, False):
        eng = Engine(
            None,
            device="cuda",
            max_batch=2,
            max_len=2048,
            eager=eager,
            sparse=SparseConfig(attention=attention, budget=256),
            quiet=True,
        )
        ids = [eng.tok.encode(TEXT), eng.tok.encode(TEXT[100:])]
        out.append([r.token_ids for r in eng.generate(ids, SamplingParams(temperature=0, max_new_tokens=300))])
        if not eager:
            assert eng.graphs, "no CUDA graph was captured"
    assert out[0] == out[1]


def test_triton_dense_logits_match_torch(default_model):
    logits = []
    for kernels in ("torch", "triton"):
        eng = Engine(
            None,
            device="cuda",
            max_batch=1,
            max_len=2048,
            kernels=kernels,
            eager=True,
            sparse=SparseConfig(attention="dense"),
            quiet=True,
        )
        ids = eng.tok.encode(TEXT)
        first = eng.prefill([ids], [0])
        tok = first.argmax(-1)
        logits.append((first, eng.decode_step(tok, torch.ones(1, dtype=torch.bool, device="cuda"))))
    for a, b in zip(*logits):
        assert (a - b).abs().max() < 0.05 * a.abs().max()
