"""How many kernels does one decode step launch? Counted without a GPU: every aten op that would launch a
kernel (views, allocations and other metadata-only ops excluded) plus every Triton launch, for one eager
decode step of the default model (bf16 by default, so the casts are those of the GPU step; the numbers
computed on CPU do not matter here). On CPU the Triton kernels run in the interpreter (slow, a few seconds).

    OMP_NUM_THREADS=1 python scripts/count_step_kernels.py --kernels triton [--model DIR] [--ctx 64]

GEMMs count as one kernel each (cuBLAS may add a split-K reduction on some shapes); `scripts/profile_step.py`
measures the real CUDA step.
"""
import argparse
import collections
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

NO_KERNEL = {"view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "slice",
             "select", "split", "split_with_sizes", "unsqueeze", "squeeze", "as_strided", "alias", "detach", "unbind",
             "chunk", "empty", "empty_like", "empty_strided", "new_empty", "lift_fresh", "_local_scalar_dense",
             "is_nonzero", "item", "promote_types", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size", "stride"}


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.paused = collections.Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if not self.paused and name not in NO_KERNEL and not (name == "to" and out is args[0]):  # a no-op cast
            self.ops[name] += 1
        return out


def count_triton(counter):
    """Wrap Triton's launch entry points (compiled and interpreted) so each launch counts once."""
    from triton.runtime import interpreter, jit
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        run = cls.run

        def wrapped(self, *a, _run=run, **k):
            if k.get("warmup"):
                return _run(self, *a, **k)
            name = getattr(getattr(self, "fn", None), "__name__", "kernel")
            counter.ops["triton:" + name] += 1
            counter.paused, was = True, counter.paused  # the interpreter's own host copies are not kernels
            try:
                return _run(self, *a, **k)
            finally:
                counter.paused = was
        cls.run = wrapped


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--kernels", default="triton", choices=["triton", "torch"])
    ap.add_argument("--ctx", type=int, default=64, help="prompt tokens before the step")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", help="bf16 (as on the GPU) or fp32; only the count matters")
    a = ap.parse_args()
    from nanodp.config import SparseConfig
    from nanodp.engine import Engine
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    eng = Engine(a.model, device=dev, max_batch=a.batch, max_len=max(256, 2 * a.ctx), kernels=a.kernels,
                 dtype=a.dtype, eager=True, quiet=True, sparse=SparseConfig(attention="dense"))
    eng.prefill([[1 + (i * 7 + b) % 1000 for i in range(a.ctx)] for b in range(a.batch)], [0] * a.batch)
    tok = torch.ones(a.batch, dtype=torch.long, device=dev)
    act = torch.ones(a.batch, dtype=torch.bool, device=dev)
    eng.decode_step(tok, act)  # warm-up (lazy allocations, Triton compilation)
    counter = Counter()
    count_triton(counter)
    with counter:
        eng.decode_step(tok, act)
    total, layers = sum(counter.ops.values()), eng.cfg.num_hidden_layers
    print(f"{total} kernels per decode step ({a.kernels}, {a.dtype}, B={a.batch}, {layers} layers, "
          f"{total / layers:.1f} per layer incl. per-step work)")
    for name, n in counter.ops.most_common():
        print(f"  {n:5d}  {name}")


if __name__ == "__main__":
    main()
