"""Command-line flags, each declared once here and shared by generate, chat, eval and bench.

Defaults are read from the config dataclasses (SparseConfig, ClusterConfig, SamplingParams), so a flag's
default is always the engine's. `add(ap, *names)` declares the named flags on a parser; the *_from_args
helpers turn parsed flags back into the configs.
"""
import argparse

from .config import ClusterConfig, SparseConfig, floor_arg
from .sampler import SamplingParams

_SP, _CC, _SA = SparseConfig(), ClusterConfig(), SamplingParams()


def _floor_default():
    return {"floor": _SP.floor, "floor_frac": _SP.floor_frac}


def _floor_text(f):
    return f"{f['floor']}" if f["floor"] else f"{100 * f['floor_frac']:g}%%"


FLAGS = {
    # model and device
    "model": dict(default=None, help="Llama safetensors folder (default: SmolLM2-135M-Instruct, fetched on first use)"),
    "device": dict(default=None, help="cuda or cpu (default: cuda if available)"),
    "dtype": dict(default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU"),
    "kernels": dict(default="auto", choices=["auto", "triton", "torch"],
                    help="auto: Triton on CUDA, the torch twins on CPU (default: %(default)s)"),
    "max-len": dict(type=int, default=None, help="KV cache tokens per sequence (default: the model's context)"),
    "yarn": dict(type=float, default=None, help="extend the context this many times with YaRN (default: off)"),
    "eager": dict(action="store_true", help="no CUDA graphs for decode steps"),
    "tp": dict(type=int, default=1, help="tensor-parallel ranks (GPUs): heads and MLP split across N processes, "
                                         "N must divide the KV heads; under torchrun its rank count "
                                         "(default: %(default)s)"),
    # decode attention (SparseConfig)
    "attention": dict(default=_SP.attention, choices=["dense", "doublep", "topk"],
                      help="decode attention (default: %(default)s)"),
    "p1": dict(type=float, default=_SP.p1, help="doublep: top-p of exact + pseudo clusters (default: %(default)s)"),
    "p2": dict(type=float, default=_SP.p2, help="doublep: top-p of exact clusters, <= p1 (default: %(default)s)"),
    "group-rule": dict(default=_SP.group_rule, choices=["mean", "max"],
                       help="how the query heads of a KV group share one cut (default: %(default)s)"),
    "estimate": dict(default=_SP.estimate, choices=["centroid", "gauss"],
                     help="stage-1 cluster score: centroid (the paper's) or gauss (+ 1/2 q^2 . key variance) "
                          "(default: %(default)s)"),
    "floor": dict(type=floor_arg, default=_floor_default(),
                  help="doublep: at least N exact clustered tokens per head, or F%% of its clustered tokens, "
                       f"by rank (0: none; default: {_floor_text(_floor_default())})"),
    "budget": dict(type=int, default=_SP.budget, help="topk: exact clustered tokens per head (default: %(default)s)"),
    "dense-layers": dict(type=int, default=_SP.dense_layers,
                         help="sparse decode keeps the first N layers dense (default: %(default)s)"),
    # clustered cache (ClusterConfig)
    "recluster-every": dict(type=int, default=_CC.recluster_every,
                            help="cluster the oldest tail tokens once this many lie beyond the window "
                                 "(default: %(default)s)"),
    "cluster-size": dict(type=int, default=_CC.cluster_size, help="tokens per cluster (default: %(default)s)"),
    # sampling (SamplingParams)
    "max-new-tokens": dict(type=int, default=_SA.max_new_tokens, help="tokens to generate (default: %(default)s)"),
    "temperature": dict(type=float, default=_SA.temperature, help="0 = greedy (default: %(default)s)"),
    "top-p": dict(type=float, default=_SA.top_p, help="nucleus sampling, 1 = off (default: %(default)s)"),
    "top-k": dict(type=int, default=_SA.top_k, help="0 = off (default: %(default)s)"),
    "seed": dict(type=int, default=None, help="sampling seed (default: random)"),
}
MODEL = ("model", "device", "dtype", "kernels", "max-len", "yarn", "eager", "tp")
SPARSE = ("attention", "p1", "p2", "group-rule", "estimate", "floor", "budget", "dense-layers")
CACHE = ("recluster-every", "cluster-size")
ENGINE = MODEL + SPARSE + CACHE
SAMPLING = ("max-new-tokens", "temperature", "top-p", "top-k", "seed")


def add(ap: argparse.ArgumentParser, *names, **defaults):
    """Declare the named flags on `ap`; `defaults` (by dest, e.g. max_new_tokens=512) replace a default."""
    for name in names:
        kw = dict(FLAGS[name])
        dest = name.replace("-", "_")
        if dest in defaults:
            kw["default"] = defaults[dest]
            kw["help"] = kw.get("help", "").split(" (default")[0] + " (default: %(default)s)"
        ap.add_argument(f"--{name}", **kw)
    return ap


def sparse_from_args(args, **override) -> SparseConfig:
    kw = dict(attention=args.attention, p1=args.p1, p2=args.p2, group_rule=args.group_rule,
              estimate=args.estimate, budget=args.budget, dense_layers=args.dense_layers, **args.floor)
    return SparseConfig(**(kw | override))


def cluster_from_args(args) -> ClusterConfig:
    return ClusterConfig(recluster_every=args.recluster_every, cluster_size=args.cluster_size)


def sampling_from_args(args, **kw) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, **kw)


def build_engine(args, max_batch, **kw):
    """An Engine from the ENGINE flags (kw: further Engine arguments, e.g. quiet=True)."""
    from . import parallel
    from .config import ConfigError
    from .engine import Engine

    if args.tp > 1 and args.tp != parallel.world_size():  # a command that never called parallel.init
        raise ConfigError(f"--tp {args.tp}: this command runs on one rank only (use nanodp.generate, chat.py, "
                          "bench e2e or torchrun)")
    return Engine(args.model, device=args.device, dtype=args.dtype, max_batch=max_batch, max_len=args.max_len,
                  kernels=args.kernels, sparse=sparse_from_args(args), yarn=args.yarn,
                  cluster=cluster_from_args(args), eager=args.eager, **kw)
