"""The README's accuracy-versus-bytes figure: Double-P with a per-head floor against fixed-budget top-k.
`python scripts/plot_floor.py [--out docs/results/h200-floor-pareto.png]` (needs matplotlib)

Reads the results.json files of `bash scripts/gpu_final.sh floor` and `floor2` (docs/results/h200-floor*-seed*.json;
when a method ran in both, floor2's run, with the relative floor resolved per head at every step, wins). Per seed
(1: development, 2: report) two panels: accuracy at 8K against KV bytes read at 8K, and accuracy over all
lengths (1K-8K) against KV bytes read averaged over the lengths.
"""
import argparse
import json
import re
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RES = Path(__file__).resolve().parents[1] / "docs" / "results"
SERIES = [  # label, name pattern, style
    ("Double-P 0.95 / 0.7 + floor F%", r"doublep:0\.95:0\.7:f(\d+)%", "o-"),
    ("top-k, same bytes as each of those", r"topk=doublep:0\.95:0\.7:f(\d+)%", "^--"),
    ("top-k F% of the tokens", r"topk:(\d+)%", "s:"),
    ("Double-P 0.95 / 0.7 + floor N tokens", r"doublep:0\.95:0\.7:f(\d+)", "D"),
    ("Double-P 0.95 / 0.7, no floor (the paper's)", r"doublep:0\.95:0\.7", "x"),
    ("dense", r"dense", "*"),
]


def summaries(seed):
    S = {}
    for run in ("floor", "floor2"):
        kind = "dev-seed1" if seed == 1 else "report-seed2"
        f = RES / f"h200-{run}-{kind}.json"
        if f.is_file():
            S.update(json.loads(f.read_text())["summary"])
    return S


def point(s, all_lengths):
    pl = s["per_length"]
    if all_lengths:
        return 100 * sum(v["kv_bytes"] for v in pl.values()) / len(pl), 100 * s["avg"]
    return 100 * pl["8192"]["kv_bytes"], 100 * pl["8192"]["acc"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RES / "h200-floor-pareto.png"))
    args = ap.parse_args()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    for col, (seed, all_lengths) in enumerate([(1, False), (1, True), (2, False), (2, True)]):
        ax, S = axes[col], summaries(seed)
        for label, pat, style in SERIES:
            pts = sorted((int(m.group(1)) if m.groups() else 0, *point(s, all_lengths))
                         for n, s in S.items() if (m := re.fullmatch(pat, n)))
            if pts:
                ax.plot([p[1] for p in pts], [p[2] for p in pts], style, label=label, ms=7)
        ax.set_xlabel("KV bytes read, % of dense" + (" (mean over lengths)" if all_lengths else " at 8K"))
        ax.set_ylabel("accuracy %" + (" (1K-8K)" if all_lengths else " at 8K"))
        ax.set_title(f"seed {seed} ({'development' if seed == 1 else 'report'}), "
                     f"{'all lengths' if all_lengths else '8K tokens'}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Default model, H200 bf16, 280 prompts per method (7 task kinds, 1K-8K)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
