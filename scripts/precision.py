"""How far does each reduced-precision path drift from transformers fp32? (a maintained diagnostic)

    python scripts/precision.py [--model DIR] [--dtype bf16] [--prompts 8] [--every 5] [--device cpu|cuda] [--attribute]

For each prompt (chat turns and prose, 30-400 tokens) every path runs one prefill over the whole prompt;
printed per path, against transformers fp32 (eager attention, the reference):
  * max and mean |logit - ref| over all positions and the vocabulary (mean: over positions of the per-position
    max), and how often the argmax differs;
  * per decoder layer, the relative hidden-state error ||h - h_ref|| / ||h_ref|| of the residual stream after the
    layer, averaged over positions (per-position norms: position 0's massive activations would swamp a global
    norm).
Paths: transformers in --dtype (SDPA), nanodp in --dtype with the torch twins and, with CUDA, the Triton kernels.
On CPU this takes ~1 minute for 8 prompts (OMP_NUM_THREADS=2). `measure()` is what tests/test_precision.py uses.

--attribute: what each rounding costs. An fp32 forward (torch, the checkpoint's weights) rounds to --dtype at one
site only (ROUNDING below, e.g. `res`: the residual stream after each add, as Hugging Face keeps it) and is
measured the same way; then all sites, and all but the ones nanodp keeps in fp32 (~20 s a line on CPU).
"""

import argparse
import math
import os

import torch

PROMPTS = [
    ("chat", "What is the capital of France?"),
    ("chat", "Write a short poem about the sea, then explain which images you used and why."),
    ("chat", "I have 3 apples and buy 5 more, then give away 2. How many apples do I have? Think step by step."),
    (
        "prose",
        "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based inks and a wooden press adapted from those used to make wine. Within a "
        "few decades, presses had spread to more than two hundred cities across Europe, and the cost of books "
        "fell so quickly that reading, once the privilege of clergy and nobles, became common among merchants "
        "and artisans. Historians still debate how much of the Reformation, the scientific revolution and the "
        "rise of national languages can be credited to this one machine, but few doubt that the flood of "
        "cheap pamphlets changed how ideas travelled. Before the press, a scholar who wanted a copy of a text "
        "had to find a manuscript, borrow it and copy it by hand, a process that introduced errors with every "
        "generation. After it, thousands of identical copies could be compared, corrected and cited by page.",
    ),
    (
        "prose",
        "Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical "
        "energy. In the light-dependent reactions, which take place in the thylakoid membranes, water is split, "
        "oxygen is released and the energy carriers ATP and NADPH are produced. In the Calvin cycle, which runs "
        "in the stroma, these carriers drive the fixation of carbon dioxide into three-carbon sugars. The "
        "enzyme responsible for the first step, RuBisCO, is probably the most abundant protein on Earth, yet it "
        "is slow and often mistakes oxygen for carbon dioxide, wasting energy in a process called "
        "photorespiration. Plants in hot, dry climates have evolved workarounds: C4 plants such as maize "
        "concentrate carbon dioxide in special cells, and CAM plants such as cacti open their pores only at "
        "night. " * 2,
    ),
    (
        "chat",
        "Explain the difference between a list and a tuple in Python, with a small code example of each, and say "
        "when you would prefer one over the other.",
    ),
    (
        "prose",
        "Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker who had "
        "never left his workshop. Every morning he wound the hundred clocks that hung on his walls, and every "
        "evening he listened to them strike the hour together, one voice, as he liked to say. One winter night "
        "a single clock fell silent, and the clockmaker, for the first time in forty years, went out into the "
        "snow to find the reason.",
    ),
    ("chat", "Translate into French: 'The train to Lyon leaves at seven in the morning from platform four.'"),
]


def prompt_ids(tok, n):
    """The first n prompts as token lists (chat prompts through the chat template)."""
    return [
        tok.encode_chat([{"role": "user", "content": text}]) if kind == "chat" else tok.encode(text)
        for kind, text in PROMPTS[:n]
    ]


@torch.inference_mode()
def hf_run(model, ids):
    """(logits [T, V] fp32, [residual stream after each layer, fp32 [T, H]]) of a transformers model."""
    hs = []
    hooks = [
        lyr.register_forward_hook(lambda m, a, o: hs.append((o[0] if isinstance(o, tuple) else o)[0].float()))
        for lyr in model.model.layers
    ]
    try:
        dev = next(model.parameters()).device
        logits = model(torch.tensor([ids], device=dev)).logits[0].float()
    finally:
        for h in hooks:
            h.remove()
    return logits, hs


@torch.inference_mode()
def nanodp_run(model, ids, kernels):
    """The same for a nanodp model: one prefill through AttentionContext (dense), LM head on every position."""
    from nanodp.attention import AttentionContext
    from nanodp.cache import KVCache
    from nanodp.config import SparseConfig
    from nanodp.model import logits_fp32

    cfg, dev = model.cfg, model.lm_head.weight.device
    dt = model.model.embed_tokens.weight.dtype
    T = len(ids)
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, T + 1, cfg.head_dim, dt, dev, backend=kernels)
    ctx = AttentionContext(cache, SparseConfig(attention="dense"), kernels)
    ctx.begin_prefill([0], [0], [T])
    x, residual = model.model.embed_tokens(torch.tensor([ids], device=dev)), None
    cos, sin = model.rope.cos_sin(torch.arange(T, device=dev)[None])
    hs = []
    for layer in model.model.layers:
        x, residual = layer(x, residual, cos, sin, ctx)
        hs.append((x.float() + residual.float())[0])  # the stream after the layer, as the next norm adds it
    logits = logits_fp32(model.model.norm(x, residual, ctx)[0], model.lm_head.weight)[0]
    return logits, hs


def compare(run, ref):
    """Error figures of one run (logits, hs) against the reference run."""
    (lg, hs), (rl, rh) = run, ref
    d = (lg - rl).abs().amax(-1)  # [T]
    rel = [((h - r).norm(dim=-1) / r.norm(dim=-1)).mean().item() for h, r in zip(hs, rh)]
    flips = lg.argmax(-1) != rl.argmax(-1)
    return dict(
        max=d.max().item(),
        mean=d.mean().item(),
        flips=flips.sum().item(),
        last_flip=bool(flips[-1]),
        positions=len(d),
        layers=rel,
    )


ROUNDING = {
    "cs": "cos/sin tables",
    "norm_in": "r / rms before the norm weight",
    "norm_out": "norm output (GEMM in)",
    "qkv": "q/k/v GEMM output",
    "rope_out": "RoPE output (q, K cache)",
    "attn_p": "P before P V (flash)",
    "attn_out": "attention output (o_proj in)",
    "o": "o_proj output",
    "res": "residual stream",
    "gu": "gate/up GEMM output",
    "silu": "silu(gate) before * up",
    "act": "silu * up (down in)",
    "down": "down GEMM output",
    "logits": "logits",
}
NANODP_FP32 = {"cs", "norm_in", "res", "silu", "logits"}  # the sites nanodp no longer rounds


@torch.inference_mode()
def rounded_run(m, ids, sites, dtype):
    """(logits, hidden states) of an fp32 forward of nanodp model `m` (fp32) rounding to dtype at `sites` only."""
    cfg, d, T = m.cfg, m.cfg.head_dim, len(ids)
    rnd = lambda t, site: t.to(dtype).float() if site in sites else t  # noqa: E731
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))  # Hugging Face's, fp32
    ang = torch.arange(T).float()[:, None] * inv
    cos, sin = (rnd(f(torch.cat([ang, ang], -1)), "cs")[:, None] for f in (torch.cos, torch.sin))
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads

    def norm(h, w):
        return rnd(w * rnd(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps), "norm_in"), "norm_out")

    def rope(t):
        t1, t2 = t.chunk(2, -1)
        return rnd(t * cos + torch.cat([-t2, t1], -1) * sin, "rope_out")

    x, hs = m.model.embed_tokens(torch.tensor(ids)), []
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for L in m.model.layers:
        qkv = rnd(norm(x, L.input_layernorm.weight) @ L.self_attn.qkv_proj.weight.T, "qkv").view(T, hq + 2 * hkv, d)
        q, k, v = qkv.split([hq, hkv, hkv], 1)
        k, v = (t.repeat_interleave(hq // hkv, 1) for t in (rope(k), v))
        p = (torch.einsum("thd,shd->hts", rope(q), k) / math.sqrt(d)).masked_fill(~causal, -math.inf).softmax(-1)
        o = rnd(torch.einsum("hts,shd->thd", rnd(p, "attn_p"), v), "attn_out").reshape(T, hq * d)
        x = rnd(x + rnd(o @ L.self_attn.o_proj.weight.T, "o"), "res")
        gate, up = rnd(norm(x, L.post_attention_layernorm.weight) @ L.mlp.gate_up_proj.weight.T, "gu").chunk(2, -1)
        a = rnd(rnd(torch.nn.functional.silu(gate), "silu") * up, "act")
        x = rnd(x + rnd(a @ L.mlp.down_proj.weight.T, "down"), "res")
        hs.append(x)
    return rnd(norm(x, m.model.norm.weight) @ m.lm_head.weight.T, "logits"), hs


def measure(model_dir, dtype=torch.bfloat16, n_prompts=6, device="cpu", paths=None):
    """{path: [compare() per prompt]} for the given paths (default: hf, torch, and triton on CUDA)."""
    import transformers

    from nanodp.loader import load_model
    from nanodp.tokenizer import Tokenizer

    paths = paths or ["hf", "torch"] + (["triton"] if torch.device(device).type == "cuda" else [])
    load_hf = lambda dt, attn: (
        transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
            str(model_dir), dtype=dt, attn_implementation=attn
        )
        .to(device)
        .eval()
    )
    ids = prompt_ids(Tokenizer(model_dir), n_prompts)
    ref_model = load_hf(torch.float32, "eager")
    refs = [hf_run(ref_model, p) for p in ids]
    del ref_model
    out = {}
    for path in paths:
        if path == "hf":
            m = load_hf(dtype, "sdpa")
            out[path] = [compare(hf_run(m, p), r) for p, r in zip(ids, refs)]
        else:
            m = load_model(model_dir, dtype=dtype, device=device)
            out[path] = [compare(nanodp_run(m, p, path), r) for p, r in zip(ids, refs)]
        del m
    return out


def attribute(model_dir, dtype=torch.bfloat16, n_prompts=6):
    """{label: [compare() per prompt]}: one rounding site at a time, all of them, all but NANODP_FP32."""
    import transformers

    from nanodp.loader import load_model
    from nanodp.tokenizer import Tokenizer

    ids = prompt_ids(Tokenizer(model_dir), n_prompts)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    refs = [hf_run(ref, p) for p in ids]
    del ref
    m = load_model(model_dir, dtype=torch.float32)
    specs = {f"{k}: {v}": {k} for k, v in ROUNDING.items()}
    specs |= {"all sites (~ Hugging Face)": set(ROUNDING), "all but nanodp's fp32 ones": set(ROUNDING) - NANODP_FP32}
    return {
        label: [compare(rounded_run(m, p, sites, dtype), r) for p, r in zip(ids, refs)]
        for label, sites in specs.items()
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Llama folder (default: the default model)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--paths", default=None, help="comma list of hf,torch,triton (default: all that run here)")
    ap.add_argument("--every", type=int, default=5, help="print every k-th layer's error (and the last)")
    ap.add_argument("--attribute", action="store_true", help="the cost of each rounding site instead (CPU)")
    args = ap.parse_args()
    from nanodp.loader import DTYPES, resolve_model_dir

    if args.device == "cpu" or args.attribute:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    model_dir = resolve_model_dir(args.model, quiet=True)
    if args.attribute:
        res = attribute(model_dir, DTYPES[args.dtype], args.prompts)
    else:
        res = measure(
            model_dir, DTYPES[args.dtype], args.prompts, args.device, args.paths.split(",") if args.paths else None
        )
    n_layers = len(next(iter(res.values()))[0]["layers"])
    show = sorted({*range(0, n_layers, args.every), n_layers - 1})
    w = max(map(len, res)) + 1
    print(
        f"vs transformers fp32 (eager), {args.dtype}, {args.prompts} prompts "
        f"({sum(r['positions'] for r in next(iter(res.values())))} positions)"
    )
    print(
        f"{'path':{w}s} {'prompt':>6s} {'T':>4s} {'max|dl|':>7s} {'mean':>6s} {'flips':>5s} | rel. error of h after "
        "layer " + " ".join(f"{i:>6d}" for i in show)
    )

    def line(label, prompt, rows):
        n = sum(r["positions"] for r in rows)
        print(
            f"{label:{w}s} {prompt:>6} {n:4d} {max(r['max'] for r in rows):7.3f} "
            f"{sum(r['mean'] * r['positions'] for r in rows) / n:6.3f} {sum(r['flips'] for r in rows):5d} | "
            f"{'':20s}" + " ".join(f"{sum(r['layers'][j] for r in rows) / len(rows):6.4f}" for j in show)
        )

    for label, rows in res.items():
        for i, r in enumerate(rows if not args.attribute else []):
            line(label, i, [r])
        line(label, "all", rows)


if __name__ == "__main__":
    main()
