"""Terminal chat with nanodp: `python chat.py [--model DIR] [--attention doublep|dense|topk] ...`.

Commands: /reset (new conversation), /exit, /help. Ctrl-C stops the current reply and keeps the conversation.
"""
import argparse
import sys

from rich.console import Console

from . import flags, parallel
from .engine import Counters

HELP = "/reset  start a new conversation\n/exit   quit (or Ctrl-D)\n/help   this text\nCtrl-C  stop the current reply"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", default=None, help="system prompt")
    flags.add(ap, *flags.SAMPLING, *flags.ENGINE, max_new_tokens=512)
    args = ap.parse_args(argv)
    parallel.init(args.tp, main, argv)  # --tp N or torchrun: every rank runs main, rank 0 reads and prints
    con = Console(highlight=False)
    try:
        params = flags.sampling_from_args(args)
        eng = flags.build_engine(args, max_batch=1)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        con.print(f"[red]error:[/red] {e}")
        return 2
    interactive = parallel.from_rank0(sys.stdin.isatty)
    con.print(f"[bold]nanodp[/bold] chat: {eng.model_dir.name} on {eng.device} "
              f"({eng.sparse.attention} decode, context {eng.max_len}). /help for commands.")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = parallel.from_rank0(
                lambda: con.input("[bold green]you>[/bold green] ") if interactive else sys.stdin.readline())
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive:
            if line == "":
                break
            line = line.rstrip("\n")
            con.print(f"[bold green]you>[/bold green] {line}")
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/help":
            con.print(HELP)
            continue
        if text == "/reset":
            messages = messages[:1] if args.system else []
            eng.reset_chat()
            con.print("[dim](new conversation)[/dim]")
            continue
        ids = eng.tok.encode_chat(messages + [{"role": "user", "content": text}])
        if len(ids) + 1 > eng.max_len:
            con.print(f"[red]the conversation has reached the context limit ({len(ids)} tokens, context "
                      f"{eng.max_len}); /reset to start over[/red]")
            continue
        messages.append({"role": "user", "content": text})
        con.print("[bold blue]bot>[/bold blue] ", end="")
        eng.counters = Counters()
        eng.ctx.stats.reset()
        try:
            r = eng.stream(ids, params, on_text=lambda i, piece: con.print(piece, end="", markup=False))
            reply, note = r.text, {"context": " [context limit reached: /reset]", "length": " [max tokens]"}.get(
                r.finish_reason, "")
        except KeyboardInterrupt:
            reply, note = eng.partial[0].text, " [stopped]"
        con.print()
        messages.append({"role": "assistant", "content": reply})
        kv = eng.ctx.stats.summary().get("kv_read_fraction")
        con.print(f"{eng.counters.line(kv)}{note}", style="dim", markup=False)
    con.print("[dim]bye[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
