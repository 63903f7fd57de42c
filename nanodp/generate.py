"""Batch generation: `python -m nanodp.generate --prompt ... | --prompts FILE [--output out.jsonl]`.

Prompts: --prompt TEXT (repeatable) and/or --prompts FILE (one prompt per line, or .jsonl with a "prompt" or
chat "messages" field per line). Each prompt gets one record (prompt, completion, token counts, finish reason,
seconds), printed or written to --output as it finishes; a prompt that cannot run gets an error record and the
others go on. Ctrl-C (or SIGTERM) stops, keeps every record written so far and exits 130. Greedy by default.
"""

import argparse
import json
import os
import signal
import sys
import time

from . import flags, parallel


def read_prompts(args) -> list:
    """Each prompt is {"prompt": str} or {"messages": [...]}, or {"error": ...} for a line that cannot run."""
    items = [{"prompt": p} for p in args.prompt or []]
    if not args.prompts:
        return items
    with open(args.prompts, "rb") as f:
        raw = f.read().split(b"\n")
    for n, line in enumerate(raw, 1):
        try:
            line = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            items.append({"error": f"{args.prompts} line {n}: not UTF-8 ({e.reason} at byte {e.start})"})
            continue
        if not line.strip():
            continue
        if args.prompts.endswith(".jsonl"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                rec = {"error": f"line {n}: invalid JSON ({e})"}
            if not isinstance(rec, dict) or ("error" not in rec and "prompt" not in rec and "messages" not in rec):
                rec = {"error": f"line {n}: needs a 'prompt' or 'messages' field"}
            items.append(rec)
        else:
            items.append({"prompt": line})
    return items


def check_files(args, error):
    """Every file problem before the model loads (error: prints the one line and exits 2)."""
    if not args.prompt and not args.prompts:
        error("give --prompt TEXT (repeatable) or --prompts FILE")
    if args.prompts and not os.path.isfile(args.prompts):
        error(f"--prompts {args.prompts}: no such file")
    if args.output:
        if os.path.isdir(args.output):
            error(f"--output {args.output} is a folder: give a file name, e.g. {args.output.rstrip('/')}/out.jsonl")
        if args.prompts and os.path.exists(args.output) and os.path.samefile(args.output, args.prompts):
            error(f"--output {args.output} is the --prompts file: it would be overwritten; choose another name")
        try:
            open(args.output, "a", encoding="utf-8").close()
        except OSError as e:
            error(f"--output {args.output}: cannot write ({e.strerror}); choose a writable path")


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m nanodp.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    ap.add_argument("--prompts", help="file: one prompt per line, or .jsonl with 'prompt' or chat 'messages'")
    ap.add_argument("--chat", action="store_true", help="apply the model's chat template to plain prompts")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: %(default)s)")
    ap.add_argument("--output", help="JSONL file: one record per prompt, written as each finishes")
    flags.add(ap, *flags.SAMPLING, *flags.ENGINE)
    args = ap.parse_args(argv)
    from rich.console import Console

    con = Console(stderr=True, highlight=False)

    def error(msg):
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    try:
        params = flags.sampling_from_args(args, stop=args.stop)
        flags.check_engine_args(args)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    except ValueError as e:
        error(e)
    check_files(args, error)
    items = read_prompts(args)
    if not items:
        error(f"--prompts {args.prompts} holds no prompts (every line is empty)")
    parallel.init(args.tp, main, argv)  # --tp N or torchrun: every rank runs main, rank 0 alone prints
    try:
        llm = flags.build_llm(args, max_batch=min(args.batch_size, len(items)))
    except (ValueError, RuntimeError, OSError) as e:
        error(e)
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

    def prompt_of(i):
        return items[i].get("prompt", items[i].get("messages"))

    # Tokenize everything first: a prompt that cannot run gets its error record, the rest continue.
    runnable = []
    for i, it in enumerate(items):
        try:
            if "error" in it:
                raise ValueError(it["error"])
            ids = llm.encode(it["messages"] if "messages" in it else it["prompt"], chat=args.chat)
            llm.engine.check_fits(len(ids), limit=llm.context_limit())
            runnable.append((i, ids))
        except Exception as e:  # noqa: BLE001 - reported per prompt
            emit(i, {"index": i, "prompt": prompt_of(i), "error": str(e)})
    status = 0

    def on_term(*_):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    t0 = time.perf_counter()
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if runnable:
            try:
                llm.reserve([ids for _, ids in runnable], params)
            except (RuntimeError, MemoryError) as e:  # no memory for the cache these prompts need
                for i, _ in runnable:
                    emit(i, {"index": i, "prompt": prompt_of(i), "error": f"KV cache: {e}"})
                runnable = []
        with Progress(
            TextColumn("[bold]generate"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
            console=con,
            transient=False,
        ) as bar:
            task = bar.add_task("gen", total=len(items), completed=len(items) - len(runnable), rate="")
            for g in range(0, len(runnable), llm.engine.max_batch):
                group = runnable[g : g + llm.engine.max_batch]

                def done(o, group=group):
                    i = group[o.index][0]
                    emit(
                        i,
                        {
                            "index": i,
                            "prompt": prompt_of(i),
                            "completion": o.text,
                            "prompt_tokens": o.prompt_tokens,
                            "completion_tokens": o.completion_tokens,
                            "finish_reason": o.finish_reason,
                            "time_s": round(o.time_s, 4),
                        },
                    )
                    c = llm.engine.counters
                    bar.update(task, advance=1, rate=f"{c.decode_tokens / max(c.decode_s, 1e-9):.1f} tok/s")

                try:
                    llm.generate([ids for _, ids in group], params, on_done=done)
                except Exception as e:  # noqa: BLE001 - a failing group must not lose the others
                    for i, _ in group:
                        if records[i] is None:
                            emit(i, {"index": i, "prompt": prompt_of(i), "error": f"{type(e).__name__}: {e}"})
    except KeyboardInterrupt:
        status = 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if out:
            out.close()
    written = sum(r is not None for r in records)
    where = f" to {args.output}" if args.output else ""
    if status == 130:
        print(f"interrupted: {written} of {len(items)} written{where}", file=sys.stderr)
        return status
    c, wall = llm.engine.counters, time.perf_counter() - t0
    new = sum(r.get("completion_tokens", 0) for r in records)
    kv = llm.engine.ctx.stats.summary().get("kv_read_fraction")
    print(
        f"{len(items)} prompts ({sum('error' in r for r in records)} failed) | "
        f"{c.prefill_tokens} prompt tok at {c.prefill_tokens / max(c.prefill_s, 1e-9):.0f} tok/s | "
        f"{new} new tok, decode {c.decode_tokens / max(c.decode_s, 1e-9):.1f} tok/s"
        + (f" | KV read {100 * kv:.1f}%" if kv is not None else "")
        + (c.ran() if llm.engine.sparse.attention == "auto" else "")
        + f" | wall {wall:.1f} s",
        file=sys.stderr,
    )
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
