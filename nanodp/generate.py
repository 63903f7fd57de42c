"""Batch generation: `python -m nanodp.generate --prompt ... | --prompts FILE [--output out.jsonl]`."""
import argparse
import json
import sys
import time

from .cache import ClusterConfig
from .config import SparseConfig, floor_arg


def add_engine_args(ap: argparse.ArgumentParser):
    ap.add_argument("--model", default=None, help="Llama safetensors folder (default: SmolLM2-135M-Instruct, "
                                                  "fetched on first use)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"])
    ap.add_argument("--attention", default=SparseConfig.attention, choices=["doublep", "dense", "topk"],
                    help="decode attention (default dense: see README, Accuracy)")
    ap.add_argument("--p1", type=float, default=SparseConfig.p1)
    ap.add_argument("--p2", type=float, default=SparseConfig.p2)
    ap.add_argument("--group-rule", default=SparseConfig.group_rule, choices=["mean", "max"])
    ap.add_argument("--budget", type=int, default=SparseConfig.budget, help="topk: exact tokens per head")
    ap.add_argument("--estimate", default=SparseConfig.estimate, choices=["centroid", "gauss"],
                    help="stage-1 cluster mass: centroid (the paper's) or gauss (+ 1/2 q^2.var, per-dim key "
                         "variance); topk ranks by it too")
    ap.add_argument("--pseudo-bias", default=SparseConfig.pseudo_bias, choices=["centroid", "estimate"],
                    help="pseudo-token logit: the centroid's, or the --estimate's")
    ap.add_argument("--floor", type=floor_arg, default=dict(floor=SparseConfig.floor, floor_frac=SparseConfig.floor_frac),
                    help="doublep: at least N exact clustered tokens per head, or F%% of its clustered tokens, "
                         "by rank (replaces the default 40%%; 0: none)")
    ap.add_argument("--dense-layers", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=None, help="KV cache tokens per sequence (default: model's)")
    ap.add_argument("--yarn", type=float, default=None, help="extend the context this many times with YaRN")
    ap.add_argument("--recluster-every", type=int, default=ClusterConfig.recluster_every)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs for decode steps")


def build_engine(args, max_batch):
    from .engine import Engine
    sparse = SparseConfig(attention=args.attention, p1=args.p1, p2=args.p2, group_rule=args.group_rule,
                          budget=args.budget, dense_layers=args.dense_layers, estimate=args.estimate,
                          pseudo_bias=args.pseudo_bias, **args.floor)
    return Engine(args.model, device=args.device, dtype=args.dtype, max_batch=max_batch, max_len=args.max_len,
                  kernels=args.kernels, sparse=sparse, yarn=args.yarn,
                  cluster=ClusterConfig(recluster_every=args.recluster_every), eager=args.eager)


def read_prompts(args) -> list:
    """Each prompt is {"prompt": str} or {"messages": [...]}; plain text files hold one prompt per line."""
    items = [{"prompt": p} for p in args.prompt or []]
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if args.prompts.endswith(".jsonl"):
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        rec = {"error": f"line {n}: invalid JSON ({e})"}
                    if "error" not in rec and "prompt" not in rec and "messages" not in rec:
                        rec = {"error": f"line {n}: needs a 'prompt' or 'messages' field"}
                    items.append(rec)
                else:
                    items.append({"prompt": line})
    return items


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nanodp.generate", description=__doc__)
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    ap.add_argument("--prompts", help="file: one prompt per line, or .jsonl with 'prompt' or chat 'messages'")
    ap.add_argument("--chat", action="store_true", help="apply the model's chat template to plain prompts")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--output", help="JSONL file: one record per prompt, written as each finishes")
    add_engine_args(ap)
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .sampler import SamplingParams
    con = Console(stderr=True)
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens, stop=args.stop, seed=args.seed)
    except ValueError as e:
        ap.error(str(e))
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    items = read_prompts(args)
    if not items:
        ap.error("give --prompt TEXT (repeatable) or --prompts FILE")
    try:
        eng = build_engine(args, max_batch=min(args.batch_size, len(items)))
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        con.print(f"[red]error:[/red] {e}")
        return 2
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    records = [None] * len(items)

    def emit(i, rec):
        records[i] = rec
        if out:
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
        else:
            body = rec["completion"] if "error" not in rec else "error: " + rec["error"]
            print(f"--- [{i}] {body}", flush=True)

    # Tokenize everything first: a prompt that cannot run gets its error record, the rest continue.
    runnable = []
    for i, it in enumerate(items):
        try:
            if "error" in it:
                raise ValueError(it["error"])
            if "messages" in it:
                ids = eng.tok.encode_chat(it["messages"])
            elif args.chat:
                ids = eng.tok.encode_chat([{"role": "user", "content": it["prompt"]}])
            else:
                ids = eng.tok.encode(it["prompt"])
            eng.check_fits(len(ids))
            runnable.append((i, ids))
        except Exception as e:  # noqa: BLE001 - reported per prompt
            emit(i, {"index": i, "prompt": it.get("prompt", it.get("messages")), "error": str(e)})
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[rate]}"), console=con, transient=False) as bar:
        task = bar.add_task("gen", total=len(items), completed=len(items) - len(runnable), rate="")
        for g in range(0, len(runnable), eng.max_batch):
            group = runnable[g:g + eng.max_batch]

            def done(j, r, group=group):
                i = group[j][0]
                emit(i, {"index": i, "prompt": items[i].get("prompt", items[i].get("messages")),
                         "completion": r.text, "prompt_tokens": r.prompt_tokens,
                         "completion_tokens": len(r.token_ids), "finish_reason": r.finish_reason})
                c = eng.counters
                bar.update(task, advance=1, rate=f"{c.decode_tokens / max(c.decode_s, 1e-9):.1f} tok/s")
            try:
                eng.generate([ids for _, ids in group], params, on_done=done)
            except Exception as e:  # noqa: BLE001 - a failing group must not lose the others
                for i, _ in group:
                    if records[i] is None:
                        emit(i, {"index": i, "prompt": items[i].get("prompt"), "error": f"{type(e).__name__}: {e}"})
    c, wall = eng.counters, time.perf_counter() - t0
    kv = eng.ctx.stats.summary().get("kv_read_fraction")
    con.print(f"[bold]{len(items)} prompts[/bold] ({sum('error' in r for r in records)} failed) | "
              f"{c.prefill_tokens} prompt tok at {c.prefill_tokens / max(c.prefill_s, 1e-9):.0f} tok/s | "
              f"{c.decode_tokens} new tok at {c.decode_tokens / max(c.decode_s, 1e-9):.1f} tok/s"
              + (f" | KV read {100 * kv:.1f}%" if kv is not None else "") + f" | wall {wall:.1f} s")
    if out:
        out.close()
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
