"""Convert a llama-architecture GGUF (byte-level BPE vocabulary) into a Hugging Face Llama folder.

Every tensor is dequantized to bf16 or fp32 and renamed to the Hugging Face name; llama.cpp's row permutation of
q_proj / k_proj is undone (`unpermute`); the tokenizer is rebuilt from the GGUF vocabulary and merges. Writes
model.safetensors, config.json, generation_config.json, tokenizer.json and tokenizer_config.json.
nanodp/fetch.py calls it for the default model; `convert_gguf(path, out_dir)` works on any such GGUF.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

DEFAULT_DTYPE = "bf16"  # the Q4_1 values lose nothing that matters in bf16; half the size of fp32
# llama.cpp pre-tokenizer types whose regex splits every digit first (llama-vocab.cpp), as the
# original tokenizer.json's Sequence[Digits(individual_digits), ByteLevel] does.
DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(name: str) -> str:
    """llama.cpp tensor name -> Hugging Face Llama name ('blk.3.attn_q.weight' -> 'model.layers.3...')."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in LAYER_NAMES:
        raise ValueError(f"unsupported GGUF tensor {name!r}")
    return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of q_proj / k_proj (shape [n_head * head_dim, in]).

    Hugging Face's RoPE rotates the pair (i, i + head_dim/2) of each head ("rotate_half"); ggml's rotates
    adjacent rows (2i, 2i+1). So convert_hf_to_gguf.py reorders each head's rows:
        w.reshape(n_head, 2, head_dim//2, in).swapaxes(1, 2).reshape(out, in)
    i.e. HF row (head h, half s, index i) goes to GGUF row (h, i, s): the two halves are interleaved.
    The inverse reads the GGUF rows as (n_head, head_dim//2, 2) and swaps those two axes back.
    """
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _f32(x) -> float:
    return float(str(np.float32(x)))  # 9.999999747e-06 (float32 metadata) -> 1e-05


def convert_gguf(gguf_path, out_dir, dtype: str = DEFAULT_DTYPE) -> Path:
    """Write a Hugging Face LlamaForCausalLM folder from a llama-architecture GGUF (byte-level BPE vocab)."""
    import gguf
    import torch
    from safetensors.torch import save_file

    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be bf16 or fp32, not {dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(gguf_path))

    def meta(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    if meta("general.architecture") != "llama" or meta("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"{gguf_path}: only llama-architecture GGUFs without rope scaling are supported")
    tokens = meta("tokenizer.ggml.tokens")
    n_head = meta("llama.attention.head_count")
    n_kv = meta("llama.attention.head_count_kv", n_head)
    hidden = meta("llama.embedding_length")
    head_dim = meta("llama.attention.key_length") or meta("llama.rope.dimension_count") or hidden // n_head
    ids = {k: meta(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}

    # Weights. GGUF lists dimensions fastest-first ([in, out]); the numpy arrays are already [out, in].
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    tensors = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, n_kv)
        tensors[hf_name(t.name)] = torch.tensor(w).to(torch_dtype)
    tied = "lm_head.weight" not in tensors
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out_dir / "model.safetensors", 0o644)  # safetensors creates it owner-only

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": meta("llama.feed_forward_length"),
        "num_hidden_layers": meta("llama.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(meta("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": meta("llama.context_length"),
        "vocab_size": meta("llama.vocab_size") or len(tokens),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"],
        "torch_dtype": "bfloat16" if dtype == "bf16" else "float32",
    }
    gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"]}
    for name, obj in (("config.json", config), ("generation_config.json", gen)):
        (out_dir / name).write_text(json.dumps(obj, indent=2) + "\n")
    _write_tokenizer(meta, tokens, ids, out_dir)
    return out_dir


def _write_tokenizer(meta, tokens, ids, out_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer {meta('tokenizer.ggml.model')!r} is not supported (byte-level BPE only)")
    pre = meta("tokenizer.ggml.pre", "gpt2")
    if pre not in DIGIT_SPLIT_PRE | {"gpt2", "default"}:
        raise ValueError(f"pre-tokenizer {pre!r} is not supported")
    merges = [tuple(m.split(" ")) for m in meta("tokenizer.ggml.merges")]  # byte-level symbols hold no spaces
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if pre in DIGIT_SPLIT_PRE
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    add_bos = bool(meta("tokenizer.ggml.add_bos_token", False))
    if add_bos:
        bos = tokens[ids["bos"]]
        tok.post_processor = processors.Sequence(
            [
                tok.post_processor,
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids["bos"])]
                ),
            ]
        )
    # Control tokens (type 3: <|im_start|>, <|endoftext|>, ...) are matched whole, never split by BPE.
    control = [i for i, ty in enumerate(meta("tokenizer.ggml.token_type")) if ty == 3]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    tok.save(str(out_dir / "tokenizer.json"))

    def name(k):
        return tokens[ids[k]] if ids[k] is not None else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta("llama.context_length"),
        "bos_token": name("bos"),
        "eos_token": name("eos"),
        "pad_token": name("padding"),
        "unk_token": name("unknown"),
        "added_tokens_decoder": {
            str(i): {
                "content": tokens[i],
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i in control
        },
        "chat_template": meta("tokenizer.chat_template"),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
