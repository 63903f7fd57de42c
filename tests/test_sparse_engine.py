"""Engine-level equivalences on the default model: clustering and Double-P at p=1 change nothing; the
Triton kernels (interpreter on CPU) give the torch twins' tokens."""

import pytest

from nanodp.config import ClusterConfig, SparseConfig
from nanodp.engine import Engine
from nanodp.sampler import SamplingParams

TEXT = (
    "The lighthouse keeper wrote in his log every evening. He noted the wind, the ships that passed and "
    "the colour of the sea. "
) * 12 + "Question: what did the keeper note every evening? Answer:"


def run(attention="dense", kernels="torch", cluster=False, n=24, **kw):
    eng = Engine(
        None,
        device="cpu",
        dtype="fp32",
        max_batch=2,
        max_len=1024,
        kernels=kernels,
        sparse=SparseConfig(attention=attention, **kw),
        cluster=ClusterConfig(recluster_every=32),
        quiet=True,
    )
    eng.cluster_enabled = cluster or attention != "dense"
    ids = [eng.tok.encode(TEXT), eng.tok.encode(TEXT[40:])]
    res = eng.generate(ids, SamplingParams(temperature=0, max_new_tokens=n))
    return eng, [r.token_ids for r in res]


@pytest.fixture(scope="module")
def dense_tokens(default_model):
    return run()[1]


def test_clustering_and_reclustering_leave_dense_output_unchanged(dense_tokens):
    eng, toks = run(cluster=True, n=80)
    assert eng.cache.tail_host[0] > 0 and int(eng.cache.layers[0].ncl[0].min()) > 0
    events = (eng.cache.lens_host[0] - eng.cache.cfg.window - eng.cache.cfg.sinks) // 32
    assert events >= 2, "the decode must trigger several re-clusterings"
    assert [t[:24] for t in toks] == dense_tokens


@pytest.mark.parametrize("kw", [dict(p1=1.0, p2=1.0), dict(p1=0.0, p2=0.0, floor_frac=1.0)], ids=["p1", "floor"])
def test_doublep_all_exact_equals_dense(dense_tokens, kw):
    """Every cluster exact, by the cuts (p = 1) or by a floor of 100% of the clustered tokens."""
    eng, toks = run("doublep", **kw)
    assert toks == dense_tokens
    s = eng.ctx.stats.summary()
    assert s["kv_read_fraction"] == pytest.approx(1.0, abs=1e-6)


def test_doublep_reads_less(dense_tokens):
    eng, toks = run("doublep", p1=0.95, p2=0.7, floor_frac=0.0, n=8)
    s = eng.ctx.stats.summary()
    assert 0 < s["kv_read_fraction"] < 0.9 and s["pseudo_fraction"] > 0
    eng, toks = run("doublep", n=8)  # the defaults: + a floor of 15% of the clustered tokens
    assert s["kv_read_fraction"] < eng.ctx.stats.summary()["kv_read_fraction"] < 1


def test_triton_kernels_equal_torch_twins(default_model):
    """The interpreter is slow: a short ragged batch, a few tokens, dense and Double-P (nothing clustered)."""
    outs = {}
    for kernels in ("torch", "triton"):
        eng = Engine(
            None,
            device="cpu",
            dtype="fp32",
            max_batch=2,
            max_len=256,
            kernels=kernels,
            quiet=True,
            sparse=SparseConfig(attention="dense"),
        )
        ids = [eng.tok.encode("The capital of France is"), eng.tok.encode("One, two, three, four,")]
        outs[kernels] = [r.token_ids for r in eng.generate(ids, SamplingParams(temperature=0, max_new_tokens=3))]
    assert outs["triton"] == outs["torch"]
