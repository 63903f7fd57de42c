"""Accuracy and fidelity of sparse decode against dense on the same prompts, in one run (docs/DESIGN.md, "Measuring").

    python -m nanodp.eval --seed 1 --out runs/dev                      # development seed: a (p1, p2) grid
    python -m nanodp.eval --seed 2 --pick-from runs/dev --out runs/report   # report seed, + the dev pick
    python -m nanodp.eval --plot-only runs/report          # tables again + plots from results.json
    python -m nanodp.eval --plot-only runs/report --pick-from runs/dev   # ... with the dev pick marked
    python -m nanodp.eval --plot-only runs/dev --methods dense,topk:10% --out runs/few   # only these methods
Results are saved after every batch; --time-limit stops starting new work and still prints the tables, and
--resume continues a run in the same --out folder.

Methods (--methods, comma separated, all on the same prompts; dense first, each topk=M right after M):
  dense | doublep:P1:P2 (group rule mean, the paper's) | doublep-max:P1:P2 (group rule max)
  doublep-union:P1:P2   per-head cuts, the KV head reads their union
  doublep-whole:P1:P2   whole-attention cut: the steady tokens join stage 1's softmax (combines: -union-whole)
  doublep-gauss:P1:P2   stage-1 estimate "gauss" (variance term); combines with the others (doublep-max-gauss)
  doublep...:P1:P2:fN   + a per-head floor: at least N exact clustered tokens by rank (fF%: F% of the head's)
  topk:N | topk:F%      N exact clustered tokens per (sequence, KV head), or F% of the prompt's clustered tokens
  topk=SPEC             per length, the mean exact clustered tokens the doublep method SPEC read in this run,
                        clusters ranked by SPEC's estimate
                        (--topk-match adds one for every doublep method): the same budget, a fixed cut
Metrics (the layout of --out/results.json is described in nanodp/eval/report.py):
  score    per task in [0, 1], RULER string match: the fraction of the expected strings that appear in the
           first max_new generated tokens (one answer for passkey / single_needle / multi_key).
  ruler    mean over the RULER-style kinds (everything but passkey) of their mean score.
  pk lost  passkey cases dense answers and the method does not.
  KV read  bytes a decode step reads over what dense reads (K and V of every token), all layers and heads:
           exact tokens (K, V) + pseudo-tokens (V̄ only: the centroid is read by the scan) + the stage-1 scan
           (every centroid and ln s). exact / pseudo: tokens per step over the context length, per (layer,
           KV head), with the spread over layers and heads (mean, p10, p90, min, max).
  Fidelity (--fidelity-n prompts per length, eager): dense's greedy continuation of --teacher-tokens tokens is
  fed to every method (teacher forcing); per decode step
  KL       KL(dense || method) of the next-token distributions, nats
  agree    decode steps until the method's greedy token first differs from dense's (= free-running agreement)
  err      ||o_method - o_dense|| / ||o_dense|| per layer, query head and step, o_dense over the same cache
           (dense rows show the floor of the kernels' rounding)
  mass     dense attention probability, per query head, on the tokens the method reads exactly or through a
           pseudo-token (steady tokens included); mass_x on exactly read tokens only; dense layers count 1.
  under    calibration: the share of (layer, query head, step) whose exactly read tokens hold less than p2 of
           the head's true attention (doublep only)
  needle   of the dense attention mass on the needle's tokens (tasks with one needle), the share the method
           reads exactly or through a pseudo-token
  KV read  also counts every byte stage 1 reads: per scored cluster its centroid, ln s and offset (+ variances
           with gauss), and the steady tokens' keys with the whole-attention cut
"""

import argparse
import math
import signal
import sys
import time

from .. import flags
from .harness import OutOfTime, parse_method, run_accuracy, run_fidelity
from .kinds import KINDS, MAX_NEW
from .tasks import fidelity_subset, make_tasks, prompts_sha


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m nanodp.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = ap.add_argument
    flags.add(ap, "model", "device", "dtype", "kernels", "yarn", "dense-layers", "cluster-size", "kmeans-iters")
    a("--lengths", default="1024,2048,4096,8192", help="prompt lengths in tokens (default: %(default)s)")
    a("--depths", default="0.1,0.5,0.9", help="needle depths, 0 = start, 1 = end (default: %(default)s)")
    a("--tasks", default="all", help=f"comma list of {', '.join(KINDS)}; or all / ruler (default: %(default)s)")
    a(
        "--n",
        type=int,
        default=2,
        help="samples per (kind, length, depth); kinds without depth: n x depths (default: %(default)s)",
    )
    a(
        "--seed",
        type=int,
        default=0,
        help="task seed: choose defaults on one seed, report on another (default: %(default)s)",
    )
    a(
        "--haystack",
        default="auto",
        help="auto, noise, varied or a text file of prose; a comma list: all of them (default: %(default)s)",
    )
    a("--chat", action="store_true", help="wrap every task in the model's chat template")
    a(
        "--methods",
        default="dense,doublep:0.95:0.7,doublep:0.95:0.9,doublep-max:0.95:0.7,doublep-max:0.95:0.9",
        help="comma list, see above (default: %(default)s)",
    )
    a(
        "--topk-match",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add topk=M for every doublep method M: the same mean exact budget, a fixed cut (default: on)",
    )
    a(
        "--fidelity-n",
        type=int,
        default=2,
        help="prompts per length for the fidelity pass, 0: none (default: %(default)s)",
    )
    a(
        "--teacher-tokens",
        type=int,
        default=16,
        help="teacher-forced decode steps in the fidelity pass (default: %(default)s)",
    )
    a("--answer-tokens", type=int, default=None, help="cap the per-kind answer lengths (default: per kind)")
    a("--batch-size", type=int, default=16, help="prompts decoded together (default: %(default)s)")
    a("--time-limit", type=float, default=None, help="seconds: start no new batch after this, report what is done")
    a("--out", default=None, help="folder: results.json (written as results come) and plots")
    a("--resume", action="store_true", help="keep what --out/results.json holds for the same prompts")
    a("--pick-from", default=None, help="folder of a development-seed run: add its picked method, report it here")
    a(
        "--plot-only",
        default=None,
        metavar="DIR",
        help="run no model: the tables, pick and plots of DIR/results.json again (results.json gets them too)",
    )
    args = ap.parse_args(argv)
    from . import report as plots

    if args.plot_only:
        R = plots.load(args.plot_only)
        if any(a == "--methods" or a.startswith("--methods=") for a in (sys.argv[1:] if argv is None else argv)):
            keep = [m.strip() for m in args.methods.split(",")]  # given explicitly: report these methods only
            R["methods"] = {n: m for n, m in R["methods"].items() if n in keep}
            out = args.out or args.plot_only
        else:
            out = args.plot_only
        plots.report(R, out, plots.load(args.pick_from).get("pick") if args.pick_from else None)
        return 0
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..config import ModelConfig
    from ..engine import Engine
    from ..loader import resolve_model_dir

    t0 = time.perf_counter()
    deadline = t0 + (math.inf if args.time_limit is None else args.time_limit)
    kinds = list(KINDS) if args.tasks == "all" else list(KINDS[1:]) if args.tasks == "ruler" else args.tasks.split(",")
    try:
        if set(kinds) - set(KINDS):
            raise ValueError(f"--tasks: unknown {sorted(set(kinds) - set(KINDS))}; known: {', '.join(KINDS)}")
        names = [s.strip() for s in args.methods.split(",") if s.strip()]
        dev = plots.load(args.pick_from).get("pick") if args.pick_from else None
        names = ["dense"] + [s for s in names if s != "dense"] + ([dev] if dev and dev not in names else [])
        if args.topk_match:
            names += [f"topk={s}" for s in names if s.startswith("doublep") and f"topk={s}" not in names]
        for s in names:
            if s.startswith("topk=") and s[5:] not in names:
                raise ValueError(f"--methods: {s} needs {s[5:]} in the same run")
        # each topk=M right after M, so that --time-limit cuts whole comparisons; fixed-budget topk last
        base = sorted(
            [parse_method(s) for s in names if not s.startswith("topk=")], key=lambda m: m["attention"] == "topk"
        )
        methods = [x for m in base for x in [m] + [parse_method(s) for s in names if s == f"topk={m['name']}"]]
        lengths, depths = [int(x) for x in args.lengths.split(",")], [float(x) for x in args.depths.split(",")]
        mdir = resolve_model_dir(args.model, quiet=True)
        mc = ModelConfig.from_dir(mdir)
        mc = mc.with_yarn(args.yarn) if args.yarn else mc
        # room after the prompt for the longest answer / teacher continuation
        reserve = max([min(MAX_NEW[k], args.answer_tokens or 10**9) for k in kinds] + [args.teacher_tokens]) + 2
        max_len = min(mc.max_position_embeddings, max(lengths) + reserve)
        eng = Engine(
            mdir,
            device=args.device,
            dtype=args.dtype,
            max_batch=args.batch_size,
            max_len=max_len,
            kernels=args.kernels,
            yarn=args.yarn,
            cluster=flags.cluster_from_args(args),
            quiet=True,
        )
        tasks = make_tasks(
            eng.tok,
            kinds,
            lengths,
            depths,
            args.n,
            args.seed,
            args.haystack.split(","),
            args.chat,
            max_prompt=max_len - reserve,
        )
    except (ValueError, OSError, RuntimeError) as e:
        print(f"nanodp.eval: error: {e}", file=sys.stderr)
        return 2
    for t in tasks:
        t["max_new"] = min(t["max_new"], args.answer_tokens or t["max_new"])
    args.fidelity_n = min(args.fidelity_n, args.batch_size)  # one batch per length
    sha, fid = prompts_sha(tasks), fidelity_subset(tasks, args.fidelity_n)
    R = {
        "meta": {
            "argv": sys.argv[1:] if argv is None else argv,
            "args": vars(args),
            "model": str(mdir),
            "device": str(eng.device),
            "dtype": str(eng.cache.dtype),
            "max_len": max_len,
            "prompts_sha": sha,
            "head_dim": eng.cfg.head_dim,
            "fidelity_ids": [t["id"] for t in fid],
        },
        "tasks": [{k: v for k, v in t.items() if k != "prompt_ids"} | {"tokens": len(t["prompt_ids"])} for t in tasks],
        "methods": {m["name"]: {"spec": m, "outputs": {}, "kv": {}, "fidelity": {}} for m in methods},
    }
    if args.resume:
        plots.resume(R, args.out)
    save = lambda: plots.save(R, args.out)  # noqa: E731

    def on_term(*_):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)  # `timeout` and schedulers: still print the table
    print(
        f"nanodp.eval: {len(tasks)} prompts x {len(methods)} methods, fidelity on {len(fid)}, "
        f"max_len {max_len}, prompts sha {sha[:12]}",
        file=sys.stderr,
    )
    ref = {}
    try:
        with Progress(
            TextColumn("[bold]eval {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        ) as bar:
            job = bar.add_task("", total=(len(tasks) + len(fid)) * len(methods))
            for m in methods:  # accuracy, then fidelity, method by method (dense first)
                bar.update(job, description=m["name"])
                run_accuracy(eng, m, tasks, args, R, save, lambda: bar.advance(job), deadline)
                if fid:
                    run_fidelity(eng, m, fid, args, R, save, ref, lambda: bar.advance(job), deadline)
    except (KeyboardInterrupt, OutOfTime) as e:
        print(
            f"nanodp.eval: {'out of time' if isinstance(e, OutOfTime) else 'interrupted'}; reporting what is done",
            file=sys.stderr,
        )
    finally:
        signal.signal(signal.SIGTERM, old_term)
    R["meta"]["wall_s"] = time.perf_counter() - t0
    plots.report(R, args.out, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
