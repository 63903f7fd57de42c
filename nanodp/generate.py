"""Batch generation: `python -m nanodp.generate --prompt ... | --prompts FILE [--output out.jsonl]`."""
import argparse
import json
import sys
import time

from . import flags, parallel


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
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: %(default)s)")
    ap.add_argument("--output", help="JSONL file: one record per prompt, written as each finishes")
    flags.add(ap, *flags.SAMPLING, *flags.ENGINE)
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    con = Console(stderr=True)
    try:
        params = flags.sampling_from_args(args, stop=args.stop)
    except ValueError as e:
        ap.error(str(e))
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    items = read_prompts(args)
    if not items:
        ap.error("give --prompt TEXT (repeatable) or --prompts FILE")
    parallel.init(args.tp, main, argv)  # --tp N or torchrun: every rank runs main, rank 0 alone prints
    try:
        eng = flags.build_engine(args, max_batch=min(args.batch_size, len(items)))
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        con.print(f"[red]error:[/red] {e}")
        return 2
    out = open(args.output, "w", encoding="utf-8") if args.output and parallel.is_main() else None
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
