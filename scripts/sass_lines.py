"""Static SASS instructions per source line of a decode kernel, compiled for an H100/H200 (sm_90) on any machine:
Triton compiles to a cubin without a GPU, and its bundled nvdisasm keeps the line table. Counts are static (each
instruction once, however often a loop runs it) and come from the local Triton, which may differ from the GPU's.

    python scripts/sass_lines.py attn|dense [--top 25]

attn: kernels/doublep_attn.py _attn_kernel at the default model's shape (g = 3, d = 64) and the engine's launch
(TILES); dense: kernels/decode.py _decode_split_kernel at the same shape, 32-token tiles. Prints the registers
and stack, then the source lines with the most instructions.
"""

import argparse
import collections
import re
import subprocess
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanodp.kernels import decode, doublep_attn
from nanodp.kernels.doublep import NBINS

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
T = doublep_attn.TILES
KERNELS = {  # name: (jit function, constexprs, pointer arguments and their types, launch options)
    "attn": (
        doublep_attn._attn_kernel,
        dict(
            G=3,
            GP=16,
            GP2=4,
            D=64,
            BLOCK_N=T["block_n"],
            CB=T["cb"],
            W=T["group"],
            NSP=16,
            NB=NBINS,
            PREC="tf32",
            MAXRULE=False,
            UNION=False,
            FLOOR=True,
            PLAN=False,
        ),
        dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "vm_ptr", "o_ptr"], "*bf16")
        | dict.fromkeys(["z_ptr", "zc_ptr", "plan_ptr", "st_ptr", "cls_ptr", "po_ptr", "pml_ptr"], "*fp32")
        | dict.fromkeys(["cst_ptr", "ncl_ptr", "lens_ptr", "ts_ptr", "cnt_ptr"], "*i32"),
        dict(num_warps=T["attn_warps"], num_stages=T["attn_stages"], maxnreg=T["attn_maxnreg"]),
    ),
    "dense": (
        decode._decode_split_kernel,
        dict(HKV=3, GROUP=3, G_PAD=16, D=64, BLOCK_N=32, FUSED=True, S_BLOCK=16, PREC="tf32"),
        dict.fromkeys(["Q", "K", "V", "O"], "*bf16")
        | dict.fromkeys(["Mp", "Lp", "Ap"], "*fp32")
        | dict.fromkeys(["CNT", "LENS"], "*i32"),
        dict(num_warps=4, num_stages=2),
    ),
}
FLOATS = ("qk_scale", "BPB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kernel", choices=sorted(KERNELS))
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    fn, const, ptrs, opts = KERNELS[args.kernel]
    sig = {n: "constexpr" if n in const else ptrs.get(n, "fp32" if n in FLOATS else "i32") for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32), options=opts)
    cubin = Path(f"/tmp/nanodp-{args.kernel}.cubin")
    cubin.write_bytes(k.asm["cubin"])
    res = subprocess.run([BIN / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
    print(f"triton {triton.__version__}, sm_90, {opts}:", re.search(r"REG:\d+ STACK:\d+", res).group(0))
    sass = subprocess.run([BIN / "nvdisasm", "-c", "-g", cubin], capture_output=True, text=True).stdout
    count, cur = collections.Counter(), None
    for line in sass.split("\n"):
        m = re.search(r'//## File "([^"]+)", line (\d+)', line)
        if m:
            cur = (Path(m.group(1)).name, int(m.group(2)))
        elif cur and re.match(r"\s+/\*[0-9a-f]{4}\*/\s+", line):
            count[cur] += 1
    total = sum(count.values())
    src = Path(fn.fn.__code__.co_filename).read_text().split("\n")
    here = Path(fn.fn.__code__.co_filename).name
    print(f"{total} instructions; by source line:")
    for (f, n), c in count.most_common(args.top):
        text = src[n - 1].strip()[:90] if f == here else ""
        print(f"  {c:5d} {100 * c / total:5.1f}%  {f}:{n}  {text}")


if __name__ == "__main__":
    main()
