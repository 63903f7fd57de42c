"""Tiny random Llama checkpoints written by transformers load in nanodp and give the same logits and tokens."""

import argparse
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanodp.config import ConfigError, ModelConfig, SparseConfig  # noqa: E402
from nanodp.engine import Engine  # noqa: E402
from nanodp.loader import WeightsError  # noqa: E402
from nanodp.runner import PromptTooLong  # noqa: E402
from nanodp.sampler import SamplingParams  # noqa: E402

VOCAB = 97


def make_tiny(path, heads=4, kv_heads=2, tie=False, rope_scaling=None, shard=None, head_dim=16, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=heads * head_dim,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        rope_theta=5000.0,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tie,
        eos_token_id=VOCAB - 1,
        bos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # larger weights than the default init so logits are not all near zero
        for p in model.parameters():
            p.mul_(3.0) if p.dim() == 2 else None
    model.save_pretrained(path, max_shard_size=shard or "2GB", safe_serialization=True)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


CASES = {
    "gqa": dict(heads=4, kv_heads=2),
    "mha_tied": dict(heads=4, kv_heads=4, tie=True),
    "llama3_rope_sharded": dict(
        heads=6,
        kv_heads=2,
        shard="40KB",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "yarn_rope": dict(
        heads=4, kv_heads=1, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    ),
    "linear_rope": dict(heads=4, kv_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_llama_matches_transformers(tmp_path, case):
    hf = make_tiny(tmp_path, **CASES[case])
    if CASES[case].get("shard"):
        assert (tmp_path / "model.safetensors.index.json").is_file()
    eng = Engine(str(tmp_path), device="cpu", max_batch=3, max_len=200, sparse=SparseConfig(attention="dense"))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB - 1, (n,), generator=g).tolist() for n in (5, 77, 31)]
    logits = eng.prefill(prompts, [0, 0, 0])
    for b, p in enumerate(prompts):
        ref = hf_logits(hf, p)
        assert torch.allclose(logits[b], ref, atol=1e-4, rtol=1e-4), (case, b, (logits[b] - ref).abs().max())
    # greedy decode in a batch equals transformers' greedy generate for each prompt alone
    res = eng.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
    for p, r in zip(prompts, res):
        out = hf.generate(
            torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=VOCAB - 1, pad_token_id=0
        )[0, len(p) :].tolist()
        if VOCAB - 1 in out:
            out = out[: out.index(VOCAB - 1)]
        assert r.token_ids == out, case


def test_batch_equals_alone(tmp_path):
    make_tiny(tmp_path)
    eng = Engine(str(tmp_path), device="cpu", max_batch=4, max_len=128, sparse=SparseConfig(attention="dense"))
    prompts = [torch.randint(1, VOCAB - 1, (n,)).tolist() for n in (3, 40, 17, 9)]
    sp = SamplingParams(temperature=0, max_new_tokens=10)
    batch = [r.token_ids for r in eng.generate(prompts, sp)]
    alone = [eng.generate([p], sp)[0].token_ids for p in prompts]
    assert batch == alone


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="hub id.*huggingface-cli download"):
        Engine("meta-llama/Llama-3.2-1B", device="cpu")
    with pytest.raises(WeightsError, match="does not exist.*nanodp.fetch"):
        Engine(str(tmp_path / "nope"), device="cpu")
    make_tiny(tmp_path)
    eng = Engine(str(tmp_path), device="cpu", max_batch=1, max_len=32, sparse=SparseConfig(attention="dense"))
    with pytest.raises(PromptTooLong, match="40 tokens.*context holds 32"):
        eng.generate([[1] * 40], SamplingParams())
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**cfg, "architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    )
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        Engine(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(WeightsError, match="corrupt"):
        Engine(str(tmp_path), device="cpu")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors"):
        Engine(str(tmp_path), device="cpu")
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json is missing"):
        Engine(str(tmp_path), device="cpu")


def test_config_validation():
    base = dict(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_key_value_heads=2,
        head_dim=4,
    )
    with pytest.raises(ConfigError, match="multiple"):
        ModelConfig(**base)
    with pytest.raises(ConfigError, match="p2 <= p1"):
        SparseConfig(p1=0.5, p2=0.9)
    with pytest.raises(ConfigError, match="floor"):
        SparseConfig(floor_frac=1.5)
    from nanodp.config import floor_arg

    assert floor_arg("256") == dict(floor=256, floor_frac=0.0) and floor_arg("40%") == dict(floor=0, floor_frac=0.4)
    with pytest.raises(argparse.ArgumentTypeError, match="F%"):
        floor_arg("many")
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig(**{**base, "num_key_value_heads": 1, "rope_scaling": {"rope_type": "dynamic", "factor": 2}})


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_projections_fused_after_loading(tmp_path, tie):
    """q/k/v and gate/up become one weight each, holding the same numbers; nothing is kept twice."""
    hf = make_tiny(tmp_path, heads=6, kv_heads=2, tie=tie)
    from nanodp.loader import load_model

    m = load_model(str(tmp_path))
    names = {n for n, _ in m.named_parameters()}  # shared (tied) parameters are listed once
    assert {n.split(".")[-2] for n in names if "layers" in n} == {
        "qkv_proj",
        "o_proj",
        "gate_up_proj",
        "down_proj",
        "input_layernorm",
        "post_attention_layernorm",
    }
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in hf.parameters())
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tie
    a, ha = m.model.layers[1].self_attn, hf.model.layers[1].self_attn
    assert torch.equal(a.qkv_proj.weight, torch.cat([ha.q_proj.weight, ha.k_proj.weight, ha.v_proj.weight]))
    mlp, hmlp = m.model.layers[1].mlp, hf.model.layers[1].mlp
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([hmlp.gate_proj.weight, hmlp.up_proj.weight]))
