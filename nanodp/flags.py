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
    "kernels": dict(
        default="auto",
        choices=["auto", "triton", "torch"],
        help="auto: Triton on CUDA, the torch twins on CPU (default: %(default)s)",
    ),
    "max-len": dict(type=int, default=None, help="KV cache tokens per sequence (default: the model's context)"),
    "yarn": dict(type=float, default=None, help="extend the context this many times with YaRN (default: off)"),
    "eager": dict(action="store_true", help="no CUDA graphs for decode steps"),
    "tp": dict(
        type=int,
        default=1,
        help="tensor-parallel ranks (GPUs): heads and MLP split across N processes, "
        "N must divide the KV heads; under torchrun its rank count "
        "(default: %(default)s)",
    ),
    # decode attention (SparseConfig)
    "attention": dict(
        default=_SP.attention,
        choices=["dense", "doublep", "topk", "auto"],
        help="decode attention; auto: Double-P where bench e2e --write-auto measured it faster on "
        "this GPU, dense elsewhere (default: %(default)s)",
    ),
    "p1": dict(type=float, default=_SP.p1, help="doublep: top-p of exact + pseudo clusters (default: %(default)s)"),
    "p2": dict(type=float, default=_SP.p2, help="doublep: top-p of exact clusters, <= p1 (default: %(default)s)"),
    "group-rule": dict(
        default=_SP.group_rule,
        choices=["mean", "max", "union"],
        help="how the query heads of a KV group share one cut: the mean of their distributions "
        "(the paper's), their max, or the union of per-head cuts (default: %(default)s)",
    ),
    "whole": dict(
        action=argparse.BooleanOptionalAction,
        default=_SP.whole,
        help="whole-attention cut: the steady tokens join stage 1's softmax, so p is a share of the head's "
        "whole attention (default: %(default)s)",
    ),
    "estimate": dict(
        default=_SP.estimate,
        choices=["centroid", "gauss"],
        help="stage-1 cluster score: centroid (the paper's) or gauss (+ 1/2 q^2 . key variance) (default: %(default)s)",
    ),
    "floor": dict(
        type=floor_arg,
        default=_floor_default(),
        help="doublep: at least N exact clustered tokens per head, or F%% of its clustered tokens, "
        f"by rank (0: none; default: {_floor_text(_floor_default())})",
    ),
    "budget": dict(type=int, default=_SP.budget, help="topk: exact clustered tokens per head (default: %(default)s)"),
    "dense-layers": dict(
        type=int, default=_SP.dense_layers, help="sparse decode keeps the first N layers dense (default: %(default)s)"
    ),
    # clustered cache (ClusterConfig)
    "recluster-every": dict(
        type=int,
        default=_CC.recluster_every,
        help="cluster the oldest tail tokens once this many lie beyond the window (default: %(default)s)",
    ),
    "cluster-size": dict(type=int, default=_CC.cluster_size, help="tokens per cluster (default: %(default)s)"),
    "kmeans-iters": dict(
        type=int,
        default=_CC.kmeans_iters,
        help="k-means rounds when clustering the cache, >= 1 (default: %(default)s)",
    ),
    # sampling (SamplingParams)
    "max-new-tokens": dict(type=int, default=_SA.max_new_tokens, help="tokens to generate (default: %(default)s)"),
    "temperature": dict(type=float, default=_SA.temperature, help="0 = greedy (default: %(default)s)"),
    "top-p": dict(type=float, default=_SA.top_p, help="nucleus sampling, 1 = off (default: %(default)s)"),
    "top-k": dict(type=int, default=_SA.top_k, help="0 = off (default: %(default)s)"),
    "seed": dict(type=int, default=None, help="sampling seed (default: random)"),
}
MODEL = ("model", "device", "dtype", "kernels", "max-len", "yarn", "eager", "tp")
SPARSE = ("attention", "p1", "p2", "group-rule", "whole", "estimate", "floor", "budget", "dense-layers")
CACHE = ("recluster-every", "cluster-size", "kmeans-iters")
ENGINE = MODEL + SPARSE + CACHE
SAMPLING = ("max-new-tokens", "temperature", "top-p", "top-k", "seed")


def add(ap: argparse.ArgumentParser, *names, **defaults):
    """Declare the named flags on `ap`; `defaults` (by dest, e.g. max_new_tokens=512) replace a default."""
    for name in names:
        kw = dict(FLAGS[name])
        dest = name.replace("-", "_")
        if dest in defaults:
            kw["default"] = defaults[dest]
            shown = "%(default)s" if defaults[dest] is not None else "the model's generation_config.json, else nanodp's"
            kw["help"] = kw.get("help", "").split(" (default")[0] + f" (default: {shown})"
        ap.add_argument(f"--{name}", **kw)
    return ap


def sparse_from_args(args, **override) -> SparseConfig:
    kw = dict(
        attention=getattr(args, "attention", "doublep"),
        p1=args.p1,
        p2=args.p2,
        group_rule=args.group_rule,
        whole=args.whole,
        estimate=args.estimate,
        budget=args.budget,
        dense_layers=args.dense_layers,
        **args.floor,
    )
    return SparseConfig(**(kw | override))


def cluster_from_args(args) -> ClusterConfig:
    """The ClusterConfig of the CACHE flags a command declares (the engine's default for any it does not)."""
    names = [f.replace("-", "_") for f in CACHE]
    return ClusterConfig(**{n: getattr(args, n) for n in names if hasattr(args, n)})


def sampling_from_args(args, **kw) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        **kw,
    )


def check_engine_args(args):
    """What the flags alone can tell is wrong, before anything loads (ValueError naming the flag)."""
    if args.max_len is not None and args.max_len < 2:
        raise ValueError(f"--max-len must be at least 2 tokens (a prompt token and a new one), got {args.max_len}")
    if args.yarn is not None and not args.yarn > 1:
        raise ValueError(f"--yarn factor must be > 1, got {args.yarn}")
    if args.device not in (None, "cpu") and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {args.device}: no CUDA device here (torch.cuda.is_available() is False); use --device cpu"
            )
    sparse_from_args(args)
    cluster_from_args(args)


def llm_options(args) -> dict:
    """The keywords of nanodp.LLM for the ENGINE flags."""
    sp = sparse_from_args(args)
    cc = cluster_from_args(args)
    return dict(
        device=args.device,
        dtype=args.dtype,
        kernels=args.kernels,
        max_len=args.max_len,
        yarn=args.yarn,
        eager=args.eager,
        **{k: getattr(sp, k) for k in sp.__dataclass_fields__ if k != "attention"},
        **{k: getattr(cc, k) for k in (f.replace("-", "_") for f in CACHE)},
    )


def build_llm(args, max_batch, **kw):
    """A nanodp.LLM from the ENGINE flags (kw: further options, e.g. quiet=False)."""
    from . import parallel
    from .api import LLM

    check_engine_args(args)
    if args.tp > 1 and args.tp != parallel.world_size():  # a command that never called parallel.init
        raise ValueError(
            f"--tp {args.tp}: this command runs on one rank only (use nanodp.generate, chat.py, bench e2e or torchrun)"
        )
    return LLM(args.model, attention=args.attention, max_batch=max_batch, **(llm_options(args) | kw))
