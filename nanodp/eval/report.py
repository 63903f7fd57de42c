"""Reporting for `python -m nanodp.eval`: results.json (layout below; save, resume), the per-method summary, the
defaults rule, the final tables, the one-line JSON summary and the plots (matplotlib is optional: `python -m
nanodp.eval --plot-only DIR` on any machine that has it makes the plots from DIR/results.json afterwards).

Plots: pareto.png (accuracy versus the fraction of KV bytes read, one panel per length), depth.png (accuracy of
the single-needle kinds over length x depth, per method), exact_heads.png (exact tokens read per step over the
context length, per layer: mean over KV heads with the min-max band, at the longest length).

results.json (rewritten after every batch, so an interrupted run keeps what it did):
  meta     argv, args, model, device, dtype, max_len, prompts_sha (hash of every prompt and answer: equal
           exactly when two runs saw the same prompts), head_dim, fidelity_ids, wall_s
  tasks    [{id, kind, haystack, length (the label), depth, answers, max_new, tokens (the prompt's real size)}]
  methods  {name: {spec,
             outputs:  {task id: {score, text, ids (greedy tokens, -1 = EOS), agree (leading tokens equal to dense's)}},
             kv:       {length: {kv_bytes (fraction of dense's bytes), kv_bytes_spread, exact, pseudo (tokens per
                        step / context: mean, p10, p90, min, max over layers x KV heads), scan, need_mean (exact
                        clustered tokens per head and step), exact_layer_head [layer][KV head],
                        sparse (the SparseConfig used), wall_s}},
             fidelity: {length: {kl, kl_p90, agree, n, err / mass / mass_x (spreads over layers x query heads),
                        mass_min, err_layers, mass_layers, mass_x_layers}}}}
  summary  per method what the table prints (kinds, ruler, avg, pk_lost/pk_n, per_length, ...); pick, pick_passed
"""

import json
import os
import sys
from pathlib import Path

from ..config import ClusterConfig
from .kinds import KINDS
from .plots import make_plots

SHORT = {
    "kv_retrieval": "kv",
    "passkey": "pass",
    "single_needle": "niah",
    "multi_key": "mkey",
    "multi_value": "mval",
    "multi_query": "mq",
    "variable_tracking": "vt",
    "common_words": "cwe",
}


def load(folder) -> dict:
    return json.loads((Path(folder) / "results.json").read_text())


def save(R, folder):
    """Write folder/results.json atomically (a reader or an interruption never sees half a file)."""
    if folder:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json.tmp").write_text(json.dumps(R))
        os.replace(out / "results.json.tmp", out / "results.json")


CLUSTERING = ("cluster_size", "kmeans_iters")  # run arguments that change the clusters every method sees


def resume(R, folder):
    """Take over every method's results of an earlier run into the same folder when it saw the same prompts
    (methods not asked for this time are kept too: a resumed run never drops results)."""
    if folder and (Path(folder) / "results.json").is_file():
        old = load(folder)
        before = {"kmeans_iters": 10}  # what runs from before the flag used (the default was 10 then)
        was = lambda a, k: a.get(k, before.get(k, getattr(ClusterConfig(), k)))  # noqa: E731
        other = [k for k in CLUSTERING if was(old["meta"]["args"], k) != was(R["meta"]["args"], k)]
        if old["meta"]["prompts_sha"] != R["meta"]["prompts_sha"]:
            print(f"nanodp.eval: {folder} holds other prompts; not resuming (it will be overwritten)", file=sys.stderr)
        elif other:
            print(f"nanodp.eval: {folder} was clustered with other {', '.join(other)}; not resuming", file=sys.stderr)
        else:
            R["methods"] |= old["methods"]


def report(R, folder=None, dev=None):
    """The end of a run: summary and pick into R, saved; the tables; the plots; the one-line JSON summary.
    dev: the method a development-seed run picked (its numbers on this run's seed are printed)."""
    S = R["summary"] = summarize(R)
    R["pick"], R["pick_passed"] = pick(S)
    save(R, folder)
    print_table(R, S, dev)
    if folder:
        files = make_plots(R, folder)
        print(
            f"results: {Path(folder) / 'results.json'}" + (f"; plots: {', '.join(files)}" if files else ""),
            file=sys.stderr,
        )
    print(json.dumps(summary_line(R, S, dev)))


def summarize(R):
    """Per method: accuracy per kind, RULER average, passkey losses vs dense, and per-length KV / fidelity."""
    tasks, S = R["tasks"], {}
    dense = R["methods"].get("dense", {}).get("outputs", {})
    for name, rec in R["methods"].items():
        out = rec["outputs"]
        done = [t for t in tasks if t["id"] in out]
        if not done:
            continue
        mean = lambda ts: sum(out[t["id"]]["score"] for t in ts) / len(ts) if ts else None  # noqa: E731
        kinds = {k: mean([t for t in done if t["kind"] == k]) for k in KINDS if any(t["kind"] == k for t in done)}
        ruler = [v for k, v in kinds.items() if k != "passkey"]
        pk = [t for t in done if t["kind"] == "passkey"]
        lost = sum(dense.get(t["id"], {}).get("score", 0) == 1 and out[t["id"]]["score"] < 1 for t in pk)
        lens = sorted({t["length"] for t in done})
        per_len = {
            str(L): {
                "acc": mean([t for t in done if t["length"] == L]),
                "kv_bytes": rec["kv"].get(str(L), {}).get("kv_bytes"),
                "exact": rec["kv"].get(str(L), {}).get("exact", {}).get("mean"),
            }
            for L in lens
        }
        fid = list(rec["fidelity"].values())
        fmean = lambda f: sum(f(x) for x in fid) / len(fid) if fid else None  # noqa: E731
        top = rec["kv"].get(str(lens[-1]), {})
        S[name] = {
            "complete": len(done) == len(tasks) and all(str(n) in rec["kv"] for n in lens),
            "kinds": kinds,
            "ruler": sum(ruler) / len(ruler) if ruler else None,
            "passkey": kinds.get("passkey"),
            "pk_lost": lost,
            "pk_n": len(pk),
            "avg": sum(kinds.values()) / len(kinds),
            "per_length": per_len,
            "kv_bytes_max_len": top.get("kv_bytes"),
            "exact_max_len": top.get("exact", {}).get("mean"),
            "pseudo_max_len": top.get("pseudo", {}).get("mean"),
            "max_len": lens[-1],
            "agree_gen": sum(out[t["id"]]["agree"] for t in done) / len(done),
            "kl": fmean(lambda x: x["kl"]),
            "agree": fmean(lambda x: x["agree"]),
            "err": fmean(lambda x: x["err"]["mean"]),
            "mass": fmean(lambda x: x["mass"]["mean"]),
            "mass_x": fmean(lambda x: x["mass_x"]["mean"]),
            "under_p": fmean(lambda x: x.get("under_p", 0.0)),
            "needle": fmean(lambda x: x.get("needle_mass") if x.get("needle_mass") is not None else 1.0),
        }
    return S


def passes(s, d):
    """The defaults rule's bar against dense d: at most 1 passkey case in 40 lost, RULER within half a point."""
    return s["pk_lost"] * 40 <= max(s["pk_n"], 1) and (s["ruler"] is None or s["ruler"] >= d["ruler"] - 0.005)


def pick(S):
    """The defaults rule -> (method, passed). Among the completed doublep methods, the one reading the fewest KV
    bytes at the longest length that loses at most 1 passkey case in 40 against dense and stays within 0.5 points
    of dense on the RULER average (passed=True); if none does, the most accurate one (passed=False)."""
    d = S.get("dense")
    cands = [(n, s) for n, s in S.items() if n.startswith("doublep") and s["complete"] and d]
    ok = [(s["kv_bytes_max_len"], n) for n, s in cands if passes(s, d)]
    if ok:
        return min(ok)[1], True
    return (max(cands, key=lambda x: (x[1]["avg"], -x[1]["kv_bytes_max_len"]))[0], False) if cands else (None, False)


def _f(x, fmt, scale=1.0):
    return "-" if x is None else format(x * scale, fmt)


def print_table(R, S, dev_pick=None):
    """The final compact tables (what a GPU run's output tail shows)."""
    from rich.console import Console
    from rich.table import Table

    con = Console(width=200)
    kinds = [k for k in KINDS if any(k in s["kinds"] for s in S.values())]
    L = max((s["max_len"] for s in S.values()), default=0)
    tt = R["meta"]["args"]["teacher_tokens"]
    con.print(
        f"nanodp.eval seed {R['meta']['args']['seed']}: accuracy % (RULER string match), KV bytes read at {L} "
        f"tokens, fidelity vs dense ({R['meta'].get('device')}, {R['meta'].get('dtype')})"
    )
    tab = Table(box=None, pad_edge=False)
    for c in (
        ["method"]
        + [SHORT[k] for k in kinds]
        + [
            "ruler",
            "avg",
            "pk lost",
            f"KV@{L}",
            "exact",
            "pseudo",
            "KL",
            f"agree/{tt}",
            "err",
            "mass",
            "mass_x",
            "under",
            "needle",
        ]
    ):
        tab.add_column(c, justify="left" if c == "method" else "right")
    for name, s in S.items():
        tag = (
            (" *" if name == R.get("pick") else "")
            + (" (dev)" if name == dev_pick else "")
            + ("" if s["complete"] else " (partial)")
        )
        tab.add_row(
            name + tag,
            *[_f(s["kinds"].get(k), ".0f", 100) for k in kinds],
            _f(s["ruler"], ".1f", 100),
            _f(s["avg"], ".1f", 100),
            f"{s['pk_lost']}/{s['pk_n']}",
            _f(s["kv_bytes_max_len"], ".1%"),
            _f(s["exact_max_len"], ".1%"),
            _f(s["pseudo_max_len"], ".1%"),
            _f(s["kl"], ".4f"),
            _f(s["agree"], ".1f"),
            _f(s["err"], ".3f"),
            _f(s["mass"], ".3f"),
            _f(s["mass_x"], ".3f"),
            _f(s.get("under_p"), ".1%"),
            _f(s.get("needle"), ".3f"),
        )
    con.print(tab)
    lens = sorted({int(x) for s in S.values() for x in s["per_length"]})
    con.print("accuracy % / KV bytes read %, per length")
    tab = Table(box=None, pad_edge=False)
    tab.add_column("method")
    for n in lens:
        tab.add_column(str(n), justify="right")
    for name, s in S.items():
        pl = [s["per_length"].get(str(n), {}) for n in lens]
        tab.add_row(name, *[f"{_f(p.get('acc'), '.0f', 100)} / {_f(p.get('kv_bytes'), '.1f', 100)}" for p in pl])
    con.print(tab)
    con.print(
        f"pick (fewest KV bytes at {L} with passkey losses <= 1/40 and RULER >= dense - 0.5): {R.get('pick')}"
        + ("" if R.get("pick_passed") or not R.get("pick") else " (none passes: the most accurate doublep)")
    )
    s, d = S.get(dev_pick or ""), S.get("dense")
    if dev_pick:
        con.print(
            f"development-seed pick {dev_pick} on this seed: "
            + (
                f"passkey lost {s['pk_lost']}/{s['pk_n']}, RULER {_f(s['ruler'], '.1f', 100)} vs dense "
                f"{_f(d['ruler'], '.1f', 100)}, KV@{L} {_f(s['kv_bytes_max_len'], '.1f', 100)}% -> "
                f"{'meets' if passes(s, d) else 'MISSES'} the targets"
                if s and d
                else "not run"
            )
        )


def summary_line(R, S, dev_pick=None):
    r = lambda x: None if x is None else round(x, 4)  # noqa: E731
    keys = (
        "avg",
        "ruler",
        "passkey",
        "pk_lost",
        "pk_n",
        "kv_bytes_max_len",
        "exact_max_len",
        "kl",
        "agree",
        "err",
        "mass",
        "mass_x",
        "under_p",
        "needle",
    )
    return {
        "eval": {
            "seed": R["meta"]["args"]["seed"],
            "prompts_sha": R["meta"]["prompts_sha"][:12],
            "pick": R.get("pick"),
            "pick_passed": R.get("pick_passed"),
            "dev_pick": dev_pick,
            "wall_s": r(R["meta"].get("wall_s")),
            "methods": {n: {k: r(s.get(k)) for k in keys} for n, s in S.items()},
        }
    }
