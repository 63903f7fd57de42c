"""Tensor parallelism on CPU (gloo): N ranks give one rank's greedy tokens, dense and Double-P; bad --tp refused."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tp_ranks import greedy, run_ranks  # noqa: E402

from nanodp import parallel  # noqa: E402
from nanodp.config import ConfigError, ModelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 97  # not a multiple of 2: the lm_head shards are zero-padded
# Double-P that really selects: small clusters, a short window and no floor, over prompts of a few hundred tokens
DOUBLEP = dict(attention="doublep", p1=0.9, p2=0.6, floor_frac=0.0)
CLUSTER = dict(sinks=4, window=16, cluster_size=4, recluster_every=16)


def make_tiny(path, layers=2, hidden=64, heads=8, kv_heads=4, head_dim=16, seed=0):
    """A random Llama as tests/test_model.py builds one, with hidden != heads * head_dim (as the brief's shape)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        rope_theta=5000.0,
        eos_token_id=VOCAB - 1,
        bos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # larger weights than the default init: peaked attention, logits far from ties
        for p in model.parameters():
            p.mul_(3.0) if p.dim() == 2 else None
    model.save_pretrained(path, safe_serialization=True)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tp")
    return path, make_tiny(path)


def test_two_ranks_equal_one_on_a_tiny_llama(tiny):
    path, hf = tiny
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB - 1, (n,), generator=g).tolist() for n in (300, 211)]
    args = (str(path), prompts, 12, [dict(attention="dense"), DOUBLEP], CLUSTER, 400)
    one = greedy(*args)
    ranks = run_ranks(2, greedy, *args, timeout=90)
    assert one["world"] == 1 and [r["world"] for r in ranks] == [2, 2] and [r["kv_heads"] for r in ranks] == [2, 2]
    for i, mode in enumerate(("dense", "doublep")):
        assert max(len(t) for t in one["runs"][i]["tokens"]) == 12, mode
        assert [rk["runs"][i]["tokens"] for rk in ranks] == [one["runs"][i]["tokens"]] * 2, mode
    doublep = one["runs"][1]
    assert min(doublep["clustered"]) > 150 and doublep["kv_read"] < 0.8, "Double-P must select"
    assert ranks[0]["runs"][1]["kv_read"] < 0.8 and ranks[1]["runs"][1]["kv_read"] < 0.8
    # each rank's fused q/k/v holds its own query heads and the KV heads they read; lm_head rows ceil(97 / 2)
    a = hf.model.layers[0].self_attn
    for r, rk in enumerate(ranks):
        q, k, v = (w.weight.chunk(2)[r] for w in (a.q_proj, a.k_proj, a.v_proj))
        assert torch.equal(torch.tensor(rk["qkv"]), torch.cat([q, k, v])) and rk["lm_head_rows"] == 49


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_nccl_and_cuda_graphs_equal_one(tiny):
    """NCCL all-reduce / all-gather captured in each rank's CUDA graphs (fp32, Triton kernels)."""
    path, _ = tiny
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB - 1, (n,), generator=g).tolist() for n in (300, 211)]
    args = (str(path), prompts, 12, [dict(attention="dense"), DOUBLEP], CLUSTER, 400, "cuda")
    one = greedy(*args)
    ranks = run_ranks(2, greedy, *args, timeout=300)
    for i in range(2):
        assert [rk["runs"][i]["tokens"] for rk in ranks] == [one["runs"][i]["tokens"]] * 2
        assert all(rk["runs"][i]["graphs"] > 0 for rk in ranks)


def test_three_ranks_equal_one_on_the_default_model(default_model):
    """3 KV heads, one per rank; a ragged batch, 8 new tokens, dense then Double-P on the same engine."""
    from nanodp.tokenizer import Tokenizer

    tok = Tokenizer(default_model)
    story = (
        "The lighthouse keeper wrote in his log every evening. He noted the wind, the ships that passed and "
        "the colour of the sea. "
    ) * 6
    prompts = [tok.encode(story + "Every evening the keeper noted"), tok.encode("The capital of France is")]
    args = (str(default_model), prompts, 8, [dict(attention="dense"), DOUBLEP], CLUSTER, 256)
    one = greedy(*args)
    ranks = run_ranks(3, greedy, *args, timeout=150)
    assert [r["kv_heads"] for r in ranks] == [1, 1, 1]
    for i, mode in enumerate(("dense", "doublep")):
        assert all(len(t) == 8 for t in one["runs"][i]["tokens"]), mode
        assert [rk["runs"][i]["tokens"] for rk in ranks] == [one["runs"][i]["tokens"]] * 3, mode
    assert one["runs"][1]["clustered"][0] > 100 and one["runs"][1]["kv_read"] < 0.6, "Double-P must select"
    assert all(rk["runs"][1]["kv_read"] < 0.6 for rk in ranks)


TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--nnodes",
    "1",
    "--rdzv-backend",
    "c10d",
    "--rdzv-endpoint",
    "127.0.0.1:0",
    "--nproc-per-node",
    "2",
]


def run_cli(*args, launcher=(sys.executable,), timeout=120):
    """`python -m nanodp.generate ARGS` in its own session, so a hang kills every rank it started."""
    p = subprocess.Popen(
        [*launcher, "-m", "nanodp.generate", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return p.returncode, out, err


def test_tp_that_does_not_divide_the_kv_heads_is_refused():
    cfg = ModelConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=4,
    )
    with pytest.raises(ConfigError, match=r"^--tp 2 does not divide the model's 3 KV heads; use one of 1, 3$"):
        parallel.check(cfg, tp=2)
    parallel.check(cfg, tp=3)


def test_cli_refuses_bad_tp_on_the_default_model(default_model):
    rc, out, err = run_cli("--tp", "2", "--prompt", "hi", "--device", "cpu", "--max-len", "64")
    assert rc == 2, err
    lines = [ln for ln in (out + err).splitlines() if "--tp" in ln]
    assert lines == ["error: --tp 2 does not divide the model's 3 KV heads; use one of 1, 3"]


@pytest.mark.parametrize("launch", ["tp", "torchrun"])
def test_generate_cli_on_2_ranks(tiny, tmp_path, launch):
    """`python -m nanodp.generate --tp 2` (rank 0 spawns rank 1) or under torchrun: the output file is written
    once, by rank 0, with one rank's tokens."""
    path, _ = tiny
    prompt = " ".join(f"w{i}" for i in range(5, 60))
    out = tmp_path / "out.jsonl"
    how = dict(launcher=TORCHRUN) if launch == "torchrun" else {}
    rc, _, err = run_cli(
        *(["--tp", "2"] if launch == "tp" else []),
        "--model",
        str(path),
        "--prompt",
        prompt,
        "--prompt",
        "w3 w4",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        "--attention",
        "dense",
        "--output",
        str(out),
        **how,
    )
    assert rc == 0, err
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    from nanodp.tokenizer import Tokenizer

    tok = Tokenizer(path)
    ref = greedy(str(path), [tok.encode(prompt), tok.encode("w3 w4")], 6, [dict(attention="dense")], CLUSTER, 400)[
        "runs"
    ][0]["tokens"]
    assert sorted(r["index"] for r in recs) == [0, 1]
    for r in recs:
        assert r["completion_tokens"] == len(ref[r["index"]]) and r["completion"] == tok.decode(ref[r["index"]])
    assert err.count("2 prompts") == 1  # rank 1 prints nothing


def test_chat_with_tp_3(default_model):
    """`python chat.py --tp 3`: rank 0 reads stdin and hands each line to the other ranks; the replies are one
    rank's, printed once."""
    from nanodp.config import SparseConfig
    from nanodp.engine import Engine
    from nanodp.sampler import SamplingParams

    p = subprocess.Popen(
        [
            sys.executable,
            "chat.py",
            "--tp",
            "3",
            "--max-new-tokens",
            "8",
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--repetition-penalty",
            "1",
            "--max-len",
            "256",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate("What is the capital of France?\n/reset\nSay hi.\n/exit\n", timeout=150)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, err
    eng = Engine(None, device="cpu", max_batch=1, max_len=256, sparse=SparseConfig(attention="dense"), quiet=True)
    replies = []
    for q in ("What is the capital of France?", "Say hi."):
        eng.reset_chat()
        replies.append(
            eng.stream(
                eng.tok.encode_chat([{"role": "user", "content": q}]), SamplingParams(temperature=0, max_new_tokens=8)
            ).text
        )
    bots = [ln for ln in out.splitlines() if ln.startswith("bot>")]
    assert bots == [f"bot> {r}" for r in replies] and out.count("bye") == 1 and "Paris" in replies[0]
