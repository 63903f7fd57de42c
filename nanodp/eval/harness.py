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

import torch

from .. import flags
from ..config import ClusterConfig, SparseConfig, floor_arg
from .metrics import KVTally, Observer, spread, teacher_force, use
from .tasks import KINDS, MAX_NEW, by_length, fidelity_subset, make_tasks, needle_positions, prompts_sha, score


class OutOfTime(Exception):
    """--time-limit reached: stop starting work, report what is done."""


def _amount(x: str) -> bool:
    """N tokens or F% of the prompt's clustered tokens (a topk budget, a doublep floor)."""
    return x.isdigit() or (x.endswith("%") and x[:-1].replace(".", "", 1).isdigit())


def _tokens(amount: str, ntok, ccfg) -> int:
    if amount.endswith("%"):
        return round(float(amount[:-1]) / 100 * max(0, ntok - ccfg.sinks - ccfg.window))
    return int(amount)


# doublep method tags -> SparseConfig keywords (the group rule, the whole-attention cut, the estimate)
TAGS = {
    "max": {"group_rule": "max"},
    "union": {"group_rule": "union"},
    "whole": {"whole": True},
    "gauss": {"estimate": "gauss"},
}


def parse_method(spec: str) -> dict:
    """A --methods entry -> {"name", "attention", "sparse": SparseConfig keywords, ...} (see the docstring)."""
    kind, *a = spec.split(":")
    if spec == "dense":
        return {"name": spec, "attention": "dense"}
    if spec.startswith("topk=doublep"):
        return {"name": spec, "attention": "topk", "match": spec[5:]}
    tags = kind.split("-")
    floor = a.pop()[1:] if len(a) == 3 and a[2][:1] == "f" and _amount(a[2][1:]) else "0"
    if tags[0] == "doublep" and len(a) == 2 and len(set(tags[1:])) == len(tags) - 1 and set(tags[1:]) <= set(TAGS):
        kw = {"p1": float(a[0]), "p2": float(a[1]), **floor_arg(floor)}
        for t in tags[1:]:
            kw |= TAGS[t]
        SparseConfig(**kw)  # validates (e.g. max and union together)
        return {"name": spec, "attention": "doublep", "sparse": kw}
    if kind == "topk" and len(a) == 1 and _amount(a[0]):
        return {"name": spec, "attention": "topk", "budget": a[0]}
    raise ValueError(
        f"--methods: {spec!r}; use dense, doublep[-max|-union][-whole][-gauss]:P1:P2[:fN|:fF%], topk:N, "
        "topk:F%, topk=doublep...:P1:P2"
    )


def sparse_for(m, length, ntok, R, args, ccfg) -> SparseConfig:
    """The SparseConfig of method m for prompts of `length` (mean ntok tokens); ccfg: the cache's ClusterConfig."""
    if m["attention"] == "dense":
        return SparseConfig(attention="dense")
    if m["attention"] == "doublep":  # F% floors resolve per head at every step
        return SparseConfig("doublep", dense_layers=args.dense_layers, **m["sparse"])
    estimate = "centroid"
    if "match" in m:
        kv = R["methods"].get(m["match"], {}).get("kv", {}).get(str(length))
        if kv is None:
            raise ValueError(f"{m['name']}: {m['match']} was not run at length {length} (add it to --methods)")
        # topk takes whole clusters until the budget is reached, overshooting by about half a cluster
        budget = max(0, round(kv["need_mean"] - ccfg.cluster_size / 2))
        estimate = parse_method(m["match"])["sparse"].get("estimate", "centroid")  # ranked by the same score
    else:
        budget = _tokens(m["budget"], ntok, ccfg)
    return SparseConfig("topk", budget=budget, dense_layers=args.dense_layers, estimate=estimate)


@torch.inference_mode()
def run_accuracy(eng, m, tasks, args, R, save, tick, deadline):
    """Greedy answers of one method for every task (batches of one length, similar max_new), scored."""
    from ..sampler import SamplingParams

    rec, d, es = R["methods"][m["name"]], eng.cfg.head_dim, eng.cache.layers[0].k.element_size()
    dense_out = R["methods"]["dense"]["outputs"]
    for length, ts in by_length(tasks):
        if str(length) in rec["kv"]:  # --resume: done before
            continue
        ts, tally, t0 = sorted(ts, key=lambda t: t["max_new"]), KVTally(), time.perf_counter()
        use(eng, sparse_for(m, length, sum(len(t["prompt_ids"]) for t in ts) / len(ts), R, args, eng.cache.cfg))
        for i in range(0, len(ts), args.batch_size):
            if time.perf_counter() > deadline:
                raise OutOfTime
            chunk = ts[i : i + args.batch_size]
            eng.ctx.stats.reset()
            res = eng.generate(
                [t["prompt_ids"] for t in chunk],
                SamplingParams(temperature=0, max_new_tokens=max(t["max_new"] for t in chunk)),
                on_done=lambda j, r: tick(),
            )
            tally.add(eng, [len(r.token_ids) - (r.finish_reason != "stop") for r in res])  # decode steps
            for t, r in zip(chunk, res):
                ids = (r.token_ids + [-1] * (r.finish_reason == "stop"))[: t["max_new"]]  # -1: EOS
                text = eng.tok.decode([x for x in ids if x >= 0])
                ref = dense_out.get(t["id"], {}).get("ids", ids)
                agree = next((k for k, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))
                rec["outputs"][t["id"]] = {"score": score(t, text), "text": text, "ids": ids, "agree": agree}
            save()
        rec["kv"][str(length)] = tally.summary(d, es) | {
            "sparse": eng.sparse.__dict__,
            "wall_s": time.perf_counter() - t0,
        }
        save()


@torch.inference_mode()
def run_fidelity(eng, m, tasks, args, R, save, ref, tick, deadline):
    """Teacher-forced KL and agreement, and the observer's per-layer metrics, on the fidelity subset."""
    rec, dense = R["methods"][m["name"]], m["name"] == "dense"
    graphs, eng.use_graphs = eng.use_graphs, False  # the observer needs eager steps
    try:
        for length, ts in by_length(tasks):
            if str(length) in rec["fidelity"] and (length in ref or not dense):
                continue
            if time.perf_counter() > deadline:
                raise OutOfTime
            use(eng, sparse_for(m, length, sum(len(t["prompt_ids"]) for t in ts) / len(ts), R, args, eng.cache.cfg))
            pos = [needle_positions(eng.tok, t) for t in ts]
            obs = eng.ctx.observer = Observer(eng, [None if x is None else torch.tensor(x) for x in pos])
            feed, lp = teacher_force(
                eng,
                [t["prompt_ids"] for t in ts],
                args.teacher_tokens,
                None if dense else ref[length][0].to(eng.device),
            )
            if dense:
                ref[length] = (feed.cpu(), lp)
            lpd = ref[length][1]
            kl = (lpd.exp() * (lpd - lp)).sum(-1).clamp_min(0)  # [B, steps]
            agree = (lp.argmax(-1) == lpd.argmax(-1)).int().cumprod(1).sum(1).float()  # steps until a miss
            rec["fidelity"][str(length)] = {
                "kl": kl.mean().item(),
                "kl_p90": spread(kl.cpu())["p90"],
                "agree": agree.mean().item(),
                "n": len(ts),
            } | obs.summary()
            for _ in ts:
                tick()
            save()
    finally:
        eng.ctx.observer, eng.use_graphs = None, graphs


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m nanodp.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = ap.add_argument
    flags.add(ap, "model", "device", "dtype", "kernels", "yarn", "dense-layers", "cluster-size")
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
            cluster=ClusterConfig(cluster_size=args.cluster_size),
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
