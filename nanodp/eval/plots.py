"""The evaluation's plots from results.json (matplotlib optional): accuracy against KV bytes per length
(pareto.png), accuracy per needle depth (depth.png) and exact tokens per layer and head (exact_heads.png)."""

import sys
from pathlib import Path

from .kinds import DEPTH_KINDS


def make_plots(R, out) -> list:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "plots skipped: matplotlib is not installed (pip install matplotlib, then python -m nanodp.eval "
            "--plot-only DIR)",
            file=sys.stderr,
        )
        return []
    out, S, files = Path(out), R["summary"], []
    lens = sorted({int(x) for s in S.values() for x in s["per_length"]})
    if not lens:
        return []
    mark = lambda n: "*" if n == "dense" else "^" if n.startswith("topk") else "s" if "max" in n else "o"  # noqa: E731
    fig, axs = plt.subplots(1, len(lens), figsize=(4.2 * len(lens), 3.8), squeeze=False)
    for ax, n in zip(axs[0], lens):
        for name, s in S.items():
            p = s["per_length"].get(str(n), {})
            if p.get("kv_bytes") is not None and p.get("acc") is not None:
                ax.scatter(100 * p["kv_bytes"], 100 * p["acc"], marker=mark(name), s=50, label=name)
        ax.set(title=f"{n} tokens", xlabel="KV bytes read (% of dense)", ylabel="accuracy (%)", xlim=(0, 105))
        ax.grid(alpha=0.3)
    axs[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    files.append(_save(fig, out / "pareto.png", plt))
    tasks = [t for t in R["tasks"] if t["kind"] in DEPTH_KINDS]
    depths = sorted({t["depth"] for t in tasks})
    if tasks:
        names, cols = list(S), min(4, len(S))
        rows = -(-len(names) // cols)
        fig, axs = plt.subplots(
            rows, cols, figsize=(3.2 * cols + 1, 3.0 * rows), squeeze=False, constrained_layout=True
        )
        for ax in axs.flat[len(names) :]:
            ax.axis("off")
        for ax, name in zip(axs.flat, names):
            out_m = R["methods"][name]["outputs"]
            grid = [
                [
                    _mean(
                        [
                            out_m[t["id"]]["score"]
                            for t in tasks
                            if t["length"] == n and t["depth"] == d and t["id"] in out_m
                        ]
                    )
                    for n in lens
                ]
                for d in depths
            ]
            im = ax.imshow(
                [[float("nan") if v is None else v for v in row] for row in grid],
                vmin=0,
                vmax=1,
                cmap="RdYlGn",
                aspect="auto",
            )
            ax.set(
                xticks=range(len(lens)),
                xticklabels=lens,
                yticks=range(len(depths)),
                yticklabels=depths,
                xlabel="length",
                ylabel="depth",
            )
            ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=axs.ravel().tolist(), label="accuracy (passkey, niah, mkey)")
        files.append(_save(fig, out / "depth.png", plt))
    sparse = {
        n: rec["kv"][str(lens[-1])]["exact_layer_head"]
        for n, rec in R["methods"].items()
        if rec["kv"].get(str(lens[-1]), {}).get("exact_layer_head")
    }
    if not sparse:
        return files
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, lh in sparse.items():
        xs = range(len(lh))
        (line,) = ax.plot(xs, [100 * sum(r) / len(r) for r in lh], marker=mark(name), ms=3, label=name)
        ax.fill_between(xs, [100 * min(r) for r in lh], [100 * max(r) for r in lh], alpha=0.15, color=line.get_color())
    ax.set(
        xlabel="layer",
        ylabel="exact tokens read (% of context)",
        yscale="log",
        title=f"exact tokens per layer at {lens[-1]} tokens (band: min-max over KV heads)",
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    files.append(_save(fig, out / "exact_heads.png", plt))
    return files


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _save(fig, path, plt):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)
