"""The evaluation's runs: method specs -> SparseConfig, the accuracy pass and the fidelity pass (definitions and
usage: nanodp/eval/cli.py, `python -m nanodp.eval --help`)."""

import time

import torch

from ..config import SparseConfig, floor_arg
from .metrics import KVTally, Observer, spread, teacher_force, use
from .tasks import by_length, needle_positions, score


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
