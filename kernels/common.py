"""Helpers shared by the Triton kernel files."""

import functools
import os

import torch
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): kernels work in base 2 (exp2), x * LOG2E = x / ln 2
NEG = -1.0e30  # "minus infinity" for running maxima: finite, so exp2(NEG - NEG) = 1
LOG2E_C = tl.constexpr(LOG2E)  # the same, as constexprs for use inside @triton.jit functions
NEG_C = tl.constexpr(NEG)


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1, tests without CUDA)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device. Off-GPU: 132, the H200's count, so that the launch rules
    sized for the GPU can be exercised in the interpreter; callers that want small interpreter grids check
    interpreting() instead."""
    device = torch.device(device)
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count
