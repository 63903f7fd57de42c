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


_BLOCKS = {}  # (kernel name, device, its compile-time arguments) -> resident blocks per SM


def blocks_per_sm(key, compiled=None):
    """Blocks of a compiled Triton kernel that fit on one SM at once (resident_blocks). With `compiled` (what
    a launch returns) it is measured and kept under `key`; without, the kept value or None."""
    if compiled is not None and key not in _BLOCKS:
        import triton

        compiled._init_handles()
        props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
        m = compiled.metadata
        _BLOCKS[key] = resident_blocks(compiled.n_regs, m.shared, m.num_warps, props["max_num_regs"],
                                       props["max_shared_mem"])  # fmt: skip
    return _BLOCKS.get(key)


def resident_blocks(n_regs, shared, warps, sm_regs=65536, sm_shared=232448, sm_warps=64):
    """Occupancy, as the Triton fused-softmax tutorial computes it: registers are allocated per thread in
    steps of 8, the driver reserves 1 KB of shared memory a block."""
    regs = -(-n_regs // 8) * 8 * 32 * warps
    return max(1, min(sm_regs // regs, sm_shared // (shared + 1024), sm_warps // warps))


def wave_fit(units, slots, cap):
    """Programs per unit (n in 1..cap) when units * n programs run `slots` at a time: a unit's work takes
    cdiv(units * n, slots) waves of 1/n of it; the smallest n within 5% of the fewest waves' worth."""
    t = {n: -(-units * n // slots) / n for n in range(1, cap + 1)}
    best = min(t.values())
    return min(n for n in t if t[n] <= 1.05 * best)


_ZEROS, _RETIRED = {}, []


def zero_buffer(dev, name, n):
    """Buffers that are zero between launches (counters, histograms: the program that uses them last resets
    them), per device and name. A larger need allocates a new one, but the old one is kept (and stays zero),
    never freed: a CUDA graph captured earlier still reads and resets it. One stream at a time."""
    buf = _ZEROS.get((str(dev), name))
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        buf = _ZEROS[(str(dev), name)] = torch.zeros(max(n, 1024), device=dev, dtype=torch.int32)
    return buf
