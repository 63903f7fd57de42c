"""Terminal chat with nanodp: `python chat.py [--model DIR] [--attention doublep|dense|topk] ...` (or nanodp-chat).

Type a message and press Enter. Pasted text arrives whole, however long and however many lines (bracketed
paste); Esc then Enter (or Alt-Enter) starts a new line while typing. Commands: /reset, /exit, /help.
Ctrl-C stops the current reply (or the reading of a long prompt) and keeps the conversation; Ctrl-D quits.
Sampling follows the model's generation_config.json where it sets it, else temperature 0.7, top-p 0.9,
repetition penalty 1.1; the seed is printed so a reply can be reproduced with --seed (--temperature 0: greedy).
"""

import argparse
import random
import sys

from rich.console import Console

from . import flags, parallel
from .runner import Counters
from .sampler import SamplingParams

HELP = (
    "/reset  start a new conversation\n/exit   quit (or Ctrl-D)\n/help   this text\n"
    "Enter sends; Esc then Enter (or Alt-Enter) adds a new line; pastes arrive whole\n"
    "Ctrl-C  stop the current reply (the conversation is kept)"
)
CHAT_DEFAULTS = dict(temperature=0.7, top_p=0.9, repetition_penalty=1.1)
COMMANDS = ("/reset", "/exit", "/quit", "/help")


def reader(interactive):
    """A function returning the next message (None at the end): a line editor on a terminal, else stdin lines."""
    if not interactive:

        def read_line():
            line = sys.stdin.readline()
            return None if line == "" else line.rstrip("\n")

        return read_line
    from prompt_toolkit import PromptSession
    from prompt_toolkit.formatted_text import HTML

    session = PromptSession()

    def read_tty():
        try:
            return session.prompt(HTML("<b><ansigreen>you&gt;</ansigreen></b> "))
        except EOFError:
            return None

    return read_tty


def sampling(args, eng):
    """Explicit flags win; then the model's generation_config.json; then CHAT_DEFAULTS. A seed is always set."""
    base, source = SamplingParams.model_defaults(eng.model_dir, max_new_tokens=args.max_new_tokens, **CHAT_DEFAULTS)
    given = {
        k: getattr(args, k)
        for k in ("temperature", "top_p", "top_k", "repetition_penalty")
        if getattr(args, k) is not None
    }
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    params = SamplingParams(**(base.__dict__ | given | {"seed": seed}))
    return params, source if not given else "flags" + (f" + {source}" if len(given) < 4 else "")


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python chat.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--system", default=None, help="system prompt")
    flags.add(ap, *flags.SAMPLING, *flags.ENGINE, max_new_tokens=512, temperature=None, top_p=None, top_k=None)
    ap.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="> 1 discourages repeats (default: the model's, else 1.1)",
    )
    args = ap.parse_args(argv)
    parallel.init(args.tp, main, argv)  # --tp N or torchrun: every rank runs main, rank 0 reads and prints
    con = Console(highlight=False)
    try:
        llm = flags.build_llm(args, max_batch=1, max_len=args.max_len or "auto")
        eng = llm.engine
        if not eng.tok.chat_template:
            raise ValueError(
                f"{eng.model_dir / 'tokenizer_config.json'} has no chat_template: chat needs one "
                "(python -m nanodp.generate runs plain prompts)"
            )
        params, source = sampling(args, eng)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    interactive = parallel.from_rank0(sys.stdin.isatty)  # under --tp rank 0 reads and shares every line
    read = reader(interactive) if parallel.is_main() else None
    con.print(
        f"nanodp chat: {eng.model_dir.name} on {eng.device} ({eng.sparse.attention} decode, context "
        f"{eng.max_len}). /help for commands.",
        markup=False,
        style="bold",
    )
    s = params
    con.print(
        f"sampling ({source}): temperature {s.temperature}, top-p {s.top_p}, top-k {s.top_k}, repetition "
        f"penalty {s.repetition_penalty}, seed {s.seed}",
        markup=False,
        style="dim",
    )
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            text = parallel.from_rank0(read)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, nothing lost
            continue
        if text is None:
            break
        if not interactive:
            con.print("you> " + text, markup=False, style="bold green")
        text = text.strip()
        if not text:
            continue
        if text.startswith("/") and text.split()[0] in COMMANDS:
            cmd = text.split()[0]
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/help":
                con.print(HELP, markup=False)
            else:
                messages = messages[:1] if args.system else []
                eng.reset_chat()
                con.print("(new conversation)", style="dim")
            continue
        if text.startswith("/") and " " not in text:
            con.print(f"unknown command {text}; /help lists them", markup=False, style="red")
            continue
        turn = messages + [{"role": "user", "content": text}]
        ids = eng.tok.encode_chat(turn)
        if len(ids) + 1 > eng.max_len:
            con.print(
                f"the conversation has reached the context limit ({len(ids)} tokens, context {eng.max_len}); "
                "/reset to start over",
                markup=False,
                style="red",
            )
            continue
        con.print("bot> ", end="", style="bold blue")
        eng.counters = Counters()
        eng.ctx.stats.reset()
        try:
            r = eng.stream(ids, params, on_text=lambda i, piece: con.print(piece, end="", markup=False))
            reply, note = (
                r.text,
                {"context": " [context limit reached: /reset]", "length": " [max tokens]"}.get(r.finish_reason, ""),
            )
        except KeyboardInterrupt:
            reply, note = eng.partial[0].text, " [stopped]"
        con.print()
        if not reply and note == " [stopped]":  # stopped before the first token: as if never sent
            con.print("(interrupted; the conversation is as it was)", style="dim")
            continue
        messages = turn + [{"role": "assistant", "content": reply}]
        kv = eng.ctx.stats.summary().get("kv_read_fraction")
        con.print(f"{eng.counters.line(kv, auto=eng.sparse.attention == 'auto')}{note}", style="dim", markup=False)
    con.print("bye", style="dim")
    return 0


if __name__ == "__main__":
    sys.exit(main())
