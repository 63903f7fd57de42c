"""--attention auto: Double-P only in the (batch, context) cells a measured table marks faster, dense elsewhere."""

import pytest

from nanodp import auto
from nanodp.config import SparseConfig
from nanodp.engine import Engine
from nanodp.sampler import SamplingParams


def test_choose_takes_the_largest_measured_cell_below():
    t = {"1,8192": "dense", "8,8192": "doublep", "32,8192": "doublep", "8,2048": "dense"}
    assert auto.choose(t, 1, 8192) == "dense" and auto.choose(t, 16, 8192) == "doublep"
    assert auto.choose(t, 8, 4096) == "dense"  # the 2048 row: the largest context measured below
    assert auto.choose(t, 4, 1024) == "dense"  # nothing measured this small: dense, never a guess
    assert auto.choose({}, 32, 8192) == "dense"


def test_engine_runs_what_the_table_says(tmp_path, monkeypatch, default_model):
    monkeypatch.setattr(auto, "HOME", tmp_path)
    auto.save("cpu", "SmolLM2-135M-Instruct", {"2,512": "doublep", "1,512": "dense"})  # max_len 512 caps the bucket
    eng = Engine(
        None,
        device="cpu",
        max_batch=2,
        max_len=512,
        quiet=True,
        sparse=SparseConfig("auto", p1=1.0, p2=1.0, floor_frac=0.0),
    )
    assert eng.cluster_enabled  # auto keeps the clusters Double-P needs
    sp = SamplingParams(max_new_tokens=4)
    prompts = [eng.tok.encode("The capital of France is " * 20), eng.tok.encode("One, two, three, " * 20)]
    eng.ctx.stats.reset()
    eng.generate(prompts[:1], sp)
    assert set(eng.counters.steps) == {"dense"}
    assert eng.ctx.stats.summary()["kv_read_fraction"] == 1.0  # a dense step counts every token, in one add
    eng.counters.steps = {}
    out = eng.generate(prompts, sp)
    assert set(eng.counters.steps) == {"doublep"} and "auto ran doublep 100%" in eng.counters.line(auto=True)
    dense = Engine(None, device="cpu", max_batch=2, max_len=512, quiet=True, sparse=SparseConfig("dense"))
    assert [r.token_ids for r in out] == [r.token_ids for r in dense.generate(prompts, sp)]  # p = 1: exact


def test_bench_writes_the_table(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from nanodp.bench import e2e

    monkeypatch.setattr(auto, "HOME", tmp_path)
    monkeypatch.setattr(e2e.torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    cells = [
        dict(model="default", B=B, ctx=8192, attention=a, ms_per_step=ms)
        for B, a, ms in [(1, "dense", 1.0), (1, "doublep", 1.3), (32, "dense", 2.5), (32, "doublep", 1.6)]
    ]
    assert e2e.write_auto(cells) == {"1,8192": "dense", "32,8192": "doublep"}
    assert auto.load("Fake GPU", "SmolLM2-135M-Instruct") == {"1,8192": "dense", "32,8192": "doublep"}
