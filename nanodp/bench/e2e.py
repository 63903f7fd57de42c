"""End-to-end decode benchmark: `python -m nanodp.bench e2e` (GPU).

Per cell (model x batch x context x attention): fill the cache to `context` tokens, then time decode steps
exactly as generation runs them (CUDA-graph replay, argmax, the host loop, re-clustering every
`recluster_every` tokens). Reports time per output token, tokens/s, the fraction of KV read, and model
bandwidth utilisation: (weight bytes + KV bytes actually read per step) / step time / measured copy bandwidth.

Models: `default` = SmolLM2-135M-Instruct with its real weights and a real prose prompt (so Double-P sees
real attention); `llama8b` = the Llama-3.1-8B shape with random weights and a random-filled cache: fine for
dense speed, meaningless for sparse decode (random attention is flat), so only dense runs there.

Tensor parallel: `--tp N` (or torchrun --nproc-per-node N -m nanodp.bench e2e ...) runs every cell on N GPUs;
weight and KV bytes (and so MBU) are per GPU. The decode speed at TP=1 and TP=2, Llama-8B shape, 32K, B=8:
    python -m nanodp.bench e2e --models llama8b --batches 8 --contexts 32k --tp 1
    python -m nanodp.bench e2e --models llama8b --batches 8 --contexts 32k --tp 2
"""

import argparse
import json
import time

import torch

from .. import flags, parallel
from ..config import ModelConfig
from ..engine import Engine
from ..eval.haystack import prose
from ..runner import Counters
from .timing import cell, common_parser, copy_bandwidth, print_table, require_cuda, sizes

LLAMA8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
)


def random_llama(cfg: ModelConfig):
    from ..model import LlamaForCausalLM, Rope

    dev = parallel.place(torch.device("cuda"))
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)  # under TP: this rank's shards
    m = m.to_empty(device=dev).to(torch.bfloat16)
    torch.manual_seed(0)  # replicated tensors (embeddings, norms) equal on every rank
    for _, p in m.named_parameters():
        p.data.normal_(0, 0.02) if p.dim() == 2 else p.data.fill_(1.0)
    m.rope = Rope(cfg, dev)
    return m.fuse_projections().eval().requires_grad_(False)


def run_cell(eng, B, ctx, steps, real_prompt, seed):
    """Fill B sequences to ctx tokens, decode `steps` tokens each; returns timings and KV fractions."""
    for b in range(B):
        eng.cache.reset(b)
    eng.counters = Counters()
    if real_prompt:
        prompts = [prose(eng.tok, ctx, seed + b) for b in range(B)]
        eng.prefill(prompts, [0] * B)  # compiles the kernels of these shapes: the timed prefill is next
        for b in range(B):
            eng.cache.reset(b)
        eng.counters = Counters()
        eng.prefill(prompts, [0] * B)
    else:  # random K/V: dense decode speed does not depend on the values
        for layer in eng.cache.layers:
            layer.k[:B, :, :ctx].normal_()
            layer.v[:B, :, :ctx].normal_()
        for b in range(B):
            eng.cache.set_len(b, ctx)
    dev = eng.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tok = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    for _ in range(3):  # capture the graph for this bucket, then measure
        logits = eng.decode_step(tok, active)
        tok = logits.argmax(-1)
        eng.cache.advance(range(B), active=active)
    eng.ctx.stats.reset()
    eng.counters.steps = {}
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = eng.decode_step(tok, active)
        tok = logits.argmax(-1)
        tok.tolist()  # the host reads each token, as generation does (stop checks, streaming)
        eng.cache.advance(range(B), active=active)
        if eng.cluster_enabled:
            eng.cache.cluster_pending(range(B))
    sync()
    dt = (time.perf_counter() - t0) / steps
    s = eng.ctx.stats.summary()
    return dict(
        ms_per_step=dt * 1e3,
        tok_s=B / dt,
        kv_read=s.get("kv_read_fraction", 1.0),
        pseudo=s.get("pseudo_fraction", 0.0),
        prefill_s=eng.counters.prefill_s,
        cluster_s=eng.counters.cluster_s,
        ran="/".join(sorted(eng.counters.steps)),
    )


def bench_e2e(argv):
    p = argparse.ArgumentParser(
        prog="python -m nanodp.bench e2e",
        parents=[common_parser()],
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", default="default,llama8b", help="default and/or llama8b (default: %(default)s)")
    p.add_argument("--batches", default="1,8,32", help="batch sizes (default: %(default)s)")
    p.add_argument(
        "--contexts", default="8k,32k,128k", help="the default model runs at most its 8K (default: %(default)s)"
    )
    p.add_argument("--attentions", default="dense,doublep", help="decode attentions to time (default: %(default)s)")
    p.add_argument(
        "--write-auto",
        action="store_true",
        help="write the --attention auto table of this GPU from the default model's cells, then time auto",
    )
    flags.add(p, "p1", "p2", "group-rule", "whole", "estimate", "floor", "budget", "dense-layers", "kmeans-iters", "tp")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per cell (default: %(default)s)")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' generate")
    p.add_argument("--seed", type=int, default=0, help="prose seed (default: %(default)s)")
    p.add_argument("--tiles", default=None, help="JSON over the Double-P launch shapes (kernels/doublep_attn.py TILES)")
    args = p.parse_args(argv)
    try:
        flags.cluster_from_args(args)
    except ValueError as e:
        p.error(str(e))
    if args.tiles:  # launch shapes on the real cache, for sweeps (scripts/tune_sparse.py sweeps synthetic ones)
        from ..kernels import doublep_attn

        if args.write_auto:
            p.error("--tiles and --write-auto: the auto table is for the engine's own launch shapes; drop one")
        try:
            tiles = json.loads(args.tiles)
        except ValueError:
            tiles = None
        if not isinstance(tiles, dict) or not all(type(v) is int and v >= 0 for v in tiles.values()):
            p.error(f"--tiles takes a JSON object of integers >= 0, e.g. '{{\"group\": 1}}', got {args.tiles!r}")
        unknown = set(tiles) - set(doublep_attn.TILES)
        if unknown:
            p.error(f"--tiles: unknown launch shapes {sorted(unknown)}; known: {sorted(doublep_attn.TILES)}")
        doublep_attn.TILES.update(tiles)
        try:
            doublep_attn.check_tiles()
        except ValueError as e:
            p.error(f"--tiles: {e}")
    require_cuda("e2e")
    parallel.init(args.tp, bench_e2e, argv)
    bw = copy_bandwidth()
    print(
        f"device {torch.cuda.get_device_name(0)} | copy bandwidth {bw / 1e12:.2f} TB/s (read + write) | "
        f"TP {parallel.world_size()}"
    )
    results, rows = {"copy_tb_s": bw / 1e12, "tp": parallel.world_size(), "tiles": args.tiles, "cells": []}, []
    for model_name in args.models.split(","):
        real = model_name == "default"
        if real:
            model, ctxs = None, [c for c in sizes(args.contexts) if c <= 8192]
        else:
            model, ctxs = random_llama(ModelConfig(**LLAMA8B)), sizes(args.contexts)
        atts = [a for a in args.attentions.split(",") if a != "auto"]
        cells = [(ctx, B, att) for ctx in ctxs for B in sizes(args.batches) for att in atts]
        if real and (args.write_auto or "auto" in args.attentions.split(",")):
            cells += [(ctx, B, "auto") for ctx in ctxs for B in sizes(args.batches)]
        for ctx, B, att in cells:
            if att == "auto" and args.write_auto and "auto_table" not in results:
                results["auto_table"] = write_auto(results["cells"])
            if att != "dense" and not real:
                continue  # random weights: flat attention, sparse numbers would mean nothing
            max_len = min(ctx, 8192) if real else ctx + args.steps + 64
            fill = ctx - args.steps - 8 if real else ctx
            sp, cc = flags.sparse_from_args(args, attention=att), flags.cluster_from_args(args)

            def measure():
                eng = Engine(model, device="cuda", max_batch=B, max_len=max_len, sparse=sp, cluster=cc, quiet=True)
                try:
                    r = run_cell(eng, B, fill, args.steps, real, args.seed)
                    w = sum(t.numel() * t.element_size() for t in eng.model.parameters())
                    per_tok = eng.cfg.num_hidden_layers * eng.cache.n_kv_heads * eng.cfg.head_dim * 2 * 2
                    kv = per_tok * B * (fill + args.steps / 2) * r["kv_read"]
                    r.update(mbu=(w + kv) / (r["ms_per_step"] / 1e3) / bw, weight_gb=w / 1e9, kv_gb_per_step=kv / 1e9)
                    return r
                finally:
                    del eng

            r = dict(model=model_name, B=B, ctx=ctx, attention=att, **cell(measure))
            results["cells"].append(r)
            kv_gbs = r["kv_gb_per_step"] / (r["ms_per_step"] / 1e3) if "kv_gb_per_step" in r else None
            cl = 100 * r["cluster_s"] / r["prefill_s"] if r.get("prefill_s") else None
            rows.append(
                [
                    model_name,
                    B,
                    ctx,
                    att,
                    r.get("ms_per_step"),
                    r.get("tok_s"),
                    None if "kv_read" not in r else 100 * r["kv_read"],
                    kv_gbs,
                    r.get("mbu"),
                    r.get("prefill_s"),
                    cl,
                    r.get("ran", ""),
                    r.get("skipped", ""),
                ]
            )
        if real and not args.no_transformers and parallel.world_size() == 1:
            results["transformers"] = cell(lambda: hf_generate(args, ctxs[-1]))
        model = None  # free the random 8B weights before the next model
        torch.cuda.empty_cache()
    print_table(
        f"end-to-end decode (bf16, CUDA graphs, TP {parallel.world_size()})",
        [
            "model",
            "B",
            "ctx",
            "attention",
            "ms/token",
            "tok/s",
            "KV read %",
            "KV GB/s",
            "MBU",
            "prefill s",
            "cluster %",
            "ran",
            "note",
        ],
        rows,
    )
    print(
        "KV GB/s: KV bytes read per step / step time (all of the step, so a lower bound of the attention's);"
        " cluster %: clustering time / prefill time (prefill excludes clustering)"
    )
    if "transformers" in results:
        print(f"transformers generate, default model, B=1, ctx {ctxs[-1]}: {results['transformers']}")
    return args, results


def write_auto(cells):
    """The auto table from the default model's dense and doublep cells: doublep where its step was faster."""
    from .. import auto

    ms = {(c["B"], c["ctx"], c["attention"]): c.get("ms_per_step") for c in cells if c["model"] == "default"}
    table = {
        f"{B},{ctx}": "doublep"
        if ms.get((B, ctx, "doublep")) and ms[(B, ctx, "doublep")] < ms[(B, ctx, a)]
        else "dense"
        for (B, ctx, a) in ms
        if a == "dense" and ms[(B, ctx, a)]
    }
    path = auto.save(torch.cuda.get_device_name(0), "SmolLM2-135M-Instruct", table)
    print(f"auto table {table} -> {path}")
    return table


def hf_generate(args, ctx):
    """transformers' generate (bf16, SDPA) on the same model and prompt: ms per output token at B=1."""
    import transformers

    from ..loader import resolve_model_dir
    from ..tokenizer import Tokenizer

    d = resolve_model_dir(None, quiet=True)
    m = (
        transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16, attn_implementation="sdpa")
        .cuda()
        .eval()
    )
    ids = torch.tensor([prose(Tokenizer(d), ctx - 64, args.seed)], device="cuda")
    times = {}
    for n in (4, 36):
        m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        times[n] = time.perf_counter() - t
    ms = (times[36] - times[4]) / 32 * 1e3  # prefill cancels out
    return {"ms_per_token": ms, "tok_s": 1e3 / ms}
