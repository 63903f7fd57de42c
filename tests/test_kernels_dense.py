"""Dense attention kernels (prefill, decode) against their torch twins, and the twins against float64.

On CPU the Triton kernels run in the interpreter (fp16/fp32, small sizes); `gpu` tests run bf16 on CUDA
at realistic sizes. Every test draws a fresh seed and prints it, so a failure can be replayed.
"""

import math
import random

import pytest
import torch

from nanodp.kernels.decode import decode_config, decode_ref, decode_triton
from nanodp.kernels.prefill import prefill_config, prefill_ref, prefill_triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-3, 1e-2), torch.bfloat16: (2e-2, 2e-2)}


def seeded(tag):
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    print(f"{tag} seed={seed}")
    return torch.Generator(device=DEV).manual_seed(seed)


def rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, device=DEV, dtype=torch.float32).to(dtype)


def prefill_case(B, Hq, Hkv, d, q_start, q_len, L, dtype, gen, plant=()):
    """Random q/k/v; q padding rows and cache slots past each sequence's keys are NaN (must not be read)."""
    T = max(q_len)
    q, k, v = (
        rand(B, Hq, T, d, dtype=dtype, gen=gen),
        rand(B, Hkv, L, d, dtype=dtype, gen=gen),
        rand(B, Hkv, L, d, dtype=dtype, gen=gen),
    )
    for b, i, j, scale in plant:  # key j := scale * query i of head 0: one huge logit for that row
        k[b, 0, q_start[b] + j] = (scale * q[b, 0, i].float()).to(dtype)
    for b in range(B):
        q[b, :, q_len[b] :] = float("nan")
        k[b, :, q_start[b] + q_len[b] :] = float("nan")
        v[b, :, q_start[b] + q_len[b] :] = float("nan")
    i32 = dict(device=DEV, dtype=torch.int32)
    return q, k, v, torch.tensor(q_start, **i32), torch.tensor(q_len, **i32)


def check_prefill(q, k, v, qs, ql, dtype):
    out = torch.full_like(q, float("nan"))
    o = prefill_triton(q, k, v, qs, ql, out=out)
    assert o is out
    ref = prefill_ref(q, k, v, qs, ql)
    atol, rtol = TOL[dtype]
    for b, n in enumerate(ql.tolist()):
        assert torch.isfinite(o[b, :, :n]).all(), f"unwritten or non-finite valid rows in sequence {b}"
        assert torch.isnan(o[b, :, n:]).all(), f"rows beyond q_len written in sequence {b}"
        torch.testing.assert_close(o[b, :, :n].float(), ref[b, :, :n].float(), atol=atol, rtol=rtol)


def naive_f64(q, k, v, lo, n):
    """softmax(q k^T / sqrt d) v in float64 with an explicit causal mask; q [Hq, n, d], k/v [Hkv, L, d]."""
    g = q.shape[0] // k.shape[0]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for h in range(q.shape[0]):
        qh, kh, vh = q[h].double(), k[h // g].double(), v[h // g].double()
        for i in range(n):
            keys = lo + i + 1  # row i sees keys 0 .. lo + i
            s = kh[:keys] @ qh[i] / math.sqrt(q.shape[-1])
            w = torch.exp(s - s.max())
            out[h, i] = (w / w.sum()) @ vh[:keys]
    return out


# ---------------------------------------------------------------- prefill (interpreter on CPU)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize(
    "Hq,Hkv,d",
    [(2, 2, 64), (3, 1, 128), (8, 2, 64), (8, 1, 128)],
    ids=["mha-d64", "gqa3-d128", "gqa4-d64", "gqa8-d128"],
)
def test_prefill_ragged(Hq, Hkv, d, dtype):
    gen = seeded(f"prefill Hq={Hq} Hkv={Hkv} d={d} {dtype}")
    # ragged: a fresh prompt not a tile multiple, a second turn (q_start > 0), a single-token chunk
    q, k, v, qs, ql = prefill_case(3, Hq, Hkv, d, [0, 23, 40], [71, 38, 1], 96, dtype, gen)
    check_prefill(q, k, v, qs, ql, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_prefill_second_turn(dtype):
    gen = seeded(f"prefill second turn {dtype}")
    q, k, v, qs, ql = prefill_case(1, 4, 2, 64, [150], [37], 200, dtype, gen)
    check_prefill(q, k, v, qs, ql, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_prefill_huge_logit(dtype):
    gen = seeded(f"prefill huge logit {dtype}")
    # row 250 meets a logit of ~+300 in the first key tile, row 200 on its own diagonal key
    plant = [(0, 250, 5, 40.0), (0, 200, 200, 40.0)]
    q, k, v, qs, ql = prefill_case(1, 2, 1, 64, [0], [290], 290, dtype, gen, plant)
    check_prefill(q, k, v, qs, ql, dtype)
    o = prefill_triton(q, k, v, qs, ql)
    torch.testing.assert_close(o[0, 0, 250].float(), v[0, 0, 5].float(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "ptr"])
@pytest.mark.parametrize("d", [64, 128])
def test_prefill_gpu_tiles(d, tma):
    gen = seeded(f"prefill GPU tile config d={d} tma={tma}")
    # the GPU's tile sizes (BLOCK_M 128), TMA descriptors or pointers, run here through the interpreter
    q, k, v, qs, ql = prefill_case(2, 4, 2, d, [0, 100], [300, 129], 300, torch.float16, gen)
    out = torch.full_like(q, float("nan"))
    cfg = dict(prefill_config(d, torch.float16, interpret=False), TMA=tma)
    prefill_triton(q, k, v, qs, ql, out=out, config=cfg)
    ref = prefill_ref(q, k, v, qs, ql)
    for b, n in enumerate(ql.tolist()):
        assert torch.isnan(out[b, :, n:]).all()
        torch.testing.assert_close(out[b, :, :n].float(), ref[b, :, :n].float(), atol=3e-3, rtol=1e-2)


def test_prefill_twin_vs_float64():
    gen = seeded("prefill twin")
    q, k, v, qs, ql = prefill_case(2, 6, 2, 32, [0, 9], [13, 7], 20, torch.float32, gen)
    o = prefill_ref(q, k, v, qs, ql)
    for b in range(2):
        n = int(ql[b])
        exp = naive_f64(q[b, :, :n], k[b], v[b], int(qs[b]), n)
        torch.testing.assert_close(o[b, :, :n].double(), exp, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- decode (interpreter on CPU)
def decode_case(B, Hq, Hkv, d, lens, L, dtype, gen):
    q = rand(B, Hq, d, dtype=dtype, gen=gen)
    k, v = rand(B, Hkv, L, d, dtype=dtype, gen=gen), rand(B, Hkv, L, d, dtype=dtype, gen=gen)
    for b, n in enumerate(lens):  # cache slots past lens must never be read
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    return q, k, v, torch.tensor(lens, device=DEV, dtype=torch.int32)


def check_decode(q, k, v, lens, dtype, **kw):
    out = torch.full_like(q, float("nan"))
    o = decode_triton(q, k, v, lens, out=out, **kw)
    assert o is out
    assert torch.isfinite(o).all(), "non-finite decode output (read past lens or unwritten head)"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(o.float(), decode_ref(q, k, v, lens).float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize(
    "Hq,Hkv,d",
    [(2, 2, 64), (3, 1, 128), (8, 2, 64), (8, 1, 128)],
    ids=["mha-d64", "gqa3-d128", "gqa4-d64", "gqa8-d128"],
)
def test_decode_ragged(Hq, Hkv, d, dtype):
    gen = seeded(f"decode Hq={Hq} Hkv={Hkv} d={d} {dtype}")
    q, k, v, lens = decode_case(3, Hq, Hkv, d, [300, 1, 97], 300, dtype, gen)
    check_decode(q, k, v, lens, dtype)
    check_decode(q, k, v, lens, dtype, max_len=300)


def test_decode_bucket_and_many_splits():
    gen = seeded("decode bucket / many splits")
    # a length bucket (max_len < L), and a forced 80-split grid: the combine takes 64 splits per step
    # at d=128, so it loops
    q, k, v, lens = decode_case(2, 4, 1, 128, [1200, 33], 1280, torch.float32, gen)
    check_decode(q, k, v, lens, torch.float32, max_len=1216)
    for fused in (False, True):
        cfg = dict(BLOCK_N=16, num_warps=4, num_stages=1, splits=80, chunk=16, FUSED=fused)
        check_decode(q, k, v, lens, torch.float32, config=cfg)


@pytest.mark.parametrize("fused", [False, True], ids=["two-launch", "fused"])
@pytest.mark.parametrize("d", [64, 128])
def test_decode_gpu_tiles(d, fused):
    gen = seeded(f"decode GPU tile config d={d} fused={fused}")
    # the GPU's tiles and split rule, separate combine kernel or last-program combine, twice in a row
    # (the fused path's split counters must reset themselves)
    q, k, v, lens = decode_case(2, 8, 2, d, [1000, 130], 1000, torch.float16, gen)
    cfg = dict(decode_config(2, 2, 1000, d, torch.float16, torch.device("cpu"), interpret=False), FUSED=fused)
    check_decode(q, k, v, lens, torch.float16, config=cfg)
    lens[0] = 999
    check_decode(q, k, v, lens, torch.float16, config=cfg)


def test_decode_huge_logit():
    gen = seeded("decode huge logit")
    q, k, v, lens = decode_case(1, 4, 1, 64, [280], 280, torch.float16, gen)
    k[0, 0, 260] = (40.0 * q[0, 2].float()).to(torch.float16)  # logit ~ +320 for head 2
    check_decode(q, k, v, lens, torch.float16)


def test_decode_twin_vs_float64():
    gen = seeded("decode twin")
    q, k, v, lens = decode_case(2, 6, 3, 32, [17, 5], 20, torch.float32, gen)
    o = decode_ref(q, k, v, lens)
    for b in range(2):
        n = int(lens[b])
        exp = naive_f64(q[b, :, None], k[b, :, :n], v[b, :, :n], n - 1, 1)[:, 0]
        torch.testing.assert_close(o[b].double(), exp, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- GPU, bf16, realistic sizes
@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv,d", [(32, 8, 128), (9, 3, 64)], ids=["llama8b", "default"])
def test_gpu_prefill_bf16(Hq, Hkv, d):
    gen = seeded(f"gpu prefill Hq={Hq} d={d}")
    q, k, v, qs, ql = prefill_case(
        3, Hq, Hkv, d, [0, 1000, 3], [2100, 777, 1], 3200, torch.bfloat16, gen, plant=[(0, 1500, 7, 8.0)]
    )
    check_prefill(q, k, v, qs, ql, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_gpu_other_dtypes(dtype):
    gen = seeded(f"gpu fp16/fp32 {dtype}")
    q, k, v, qs, ql = prefill_case(2, 8, 2, 128, [0, 300], [700, 129], 1000, dtype, gen)
    check_prefill(q, k, v, qs, ql, dtype)
    q, k, v, lens = decode_case(2, 8, 2, 64, [5000, 77], 5000, dtype, gen)
    check_decode(q, k, v, lens, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["two-launch", "fused"])
@pytest.mark.parametrize("Hq,Hkv,d", [(32, 8, 128), (9, 3, 64)], ids=["llama8b", "default"])
def test_gpu_decode_bf16_and_graph(Hq, Hkv, d, fused):
    gen = seeded(f"gpu decode Hq={Hq} d={d} fused={fused}")
    cfg = lambda n: dict(decode_config(4, Hkv, n, d, torch.bfloat16, q.device), FUSED=fused)  # noqa: E731
    q, k, v, lens = decode_case(4, Hq, Hkv, d, [40000, 1, 12345, 32768], 40000, torch.bfloat16, gen)
    check_decode(q, k, v, lens, torch.bfloat16, max_len=40000, config=cfg(40000))
    # captured once for a length bucket, replayed with other lengths: no host sync in the launch
    k, v = torch.nan_to_num(k, nan=0.5), torch.nan_to_num(v, nan=-0.5)
    lens.copy_(torch.tensor([32768, 2, 30000, 17], dtype=torch.int32))
    decode_triton(q, k, v, lens, max_len=32768, config=cfg(32768))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = decode_triton(q, k, v, lens, max_len=32768, config=cfg(32768))
    for new in ([32768, 2, 30000, 17], [5, 32000, 1, 4096], [1, 1, 32768, 32768]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        torch.testing.assert_close(o.float(), decode_ref(q, k, v, lens).float(), atol=2e-2, rtol=2e-2)
