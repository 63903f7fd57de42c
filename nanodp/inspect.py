"""Look inside the clustered KV cache: `python -m nanodp.inspect [--prompt-file F | --length N]`.

Prefills one prompt, clusters it, and prints per layer: the fraction of the keys' squared norm their centroid
explains (1 - sum |k - C|^2 / sum |k|^2), clusters per KV head, the largest cluster, the share of clustered
tokens in clusters over 3x the target size and the cluster-size histogram; plus the clustering time and the
cache's bytes per token (K/V and cluster metadata).
"""

import argparse
import time

import torch

from . import flags
from .cluster import format_size_report, size_report
from .eval.haystack import prose
from .sampler import SamplingParams


def layer_report(layer, b, lo, hi):
    """Per KV head of sequence b: (clusters, sizes tensor, explained fraction) over storage [lo, hi)."""
    out = []
    for h in range(layer.k.shape[1]):
        n = int(layer.ncl[b, h])
        st = layer.cstart[b, h, : n + 1].long()
        sizes = st[1:] - st[:-1]
        keys = layer.k[b, h, lo:hi].float()
        owner = torch.repeat_interleave(torch.arange(n, device=keys.device), sizes)
        resid = keys - layer.centroids[b, h, :n].float()[owner]
        out.append((n, sizes.cpu(), 1 - float(resid.pow(2).sum() / keys.pow(2).sum().clamp_min(1e-30))))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m nanodp.inspect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompt-file", help="a text file to prefill (default: generated prose)")
    ap.add_argument(
        "--length",
        type=int,
        default=2048,
        help="tokens of generated prose when no file is given (default: %(default)s)",
    )
    flags.add(ap, *flags.ENGINE)
    args = ap.parse_args(argv)
    args.attention = "doublep" if args.attention == "dense" else args.attention
    llm = flags.build_llm(args, max_batch=1)
    eng = llm.engine
    ids = eng.tok.encode(open(args.prompt_file).read()) if args.prompt_file else prose(eng.tok, args.length, 0)
    ids = ids[: llm.context_limit() - 1]
    llm.reserve([ids], SamplingParams(max_new_tokens=1))
    eng.prefill([ids], [0])
    c = eng.counters
    lo, hi = min(eng.cache.cfg.sinks, eng.cache.tail_host[0]), eng.cache.tail_host[0]
    kv, meta = eng.cache.bytes_per_token()
    print(
        f"{len(ids)} tokens | clustered storage [{lo}, {hi}) | prefill {c.prefill_s * 1e3:.0f} ms, "
        f"clustering {c.cluster_s * 1e3:.0f} ms ({100 * c.cluster_s / max(c.prefill_s, 1e-9):.0f}% of prefill)"
    )
    print(f"bytes per token of capacity: K/V {kv:.0f}, cluster metadata {meta:.0f} ({100 * meta / kv:.1f}%)")
    expl = [sum(r[2] for r in layer_report(layer, 0, lo, hi)) / layer.k.shape[1] for layer in eng.cache.layers]
    print("explained fraction per layer: " + " ".join(f"{x:.2f}" for x in expl))
    print(format_size_report(size_report(eng.cache, 0)))


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"({time.time() - t:.1f} s)")
