"""Kernel benchmark (GPU): our prefill and dense decode kernels against torch SDPA, same inputs, same run.

python -m nanodp.bench kernels [--quick]
"""

import argparse
import datetime
import math
import time

import torch

from .timing import (
    SHAPES,
    common_parser,
    environment,
    input_sets,
    l2_bytes,
    print_table,
    rel_err,
    require_cuda,
    sizes,
    time_cuda,
)


def bench_kernels(argv):
    p = argparse.ArgumentParser(
        prog="python -m nanodp.bench kernels",
        parents=[common_parser()],
        description="Dense attention kernels vs torch SDPA (bf16, random inputs): "
        "prefill TFLOP/s (causal) and decode TB/s (K+V bytes read + q/o).",
    )
    p.add_argument(
        "--shapes",
        default="llama8b,default",
        help=f"of {list(SHAPES)}: llama8b = 32q/8kv d128 (Llama-3.1-8B), default = 9q/3kv d64 (the default model)",
    )
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    p.add_argument("--contexts", default="8k,32k,128k", help="decode context lengths")
    p.add_argument("--prefill-lens", default="4k,16k,32k", help="prefill lengths T (B=1)")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--budget-s", type=float, default=210.0, help="skip remaining cells after this many seconds")
    args = p.parse_args(argv)
    require_cuda("kernels")
    from nanodp.kernels.decode import decode_config, decode_triton
    from nanodp.kernels.prefill import prefill_config, prefill_triton

    sdpa = torch.nn.functional.scaled_dot_product_attention
    if args.quick:
        args.batches, args.contexts, args.prefill_lens = "1,8", "8k,32k", "4k"
    reps = 5 if args.quick else 20
    dev, dt, t0 = torch.device("cuda"), torch.bfloat16, time.time()
    free = lambda: torch.cuda.mem_get_info()[0]  # noqa: E731
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt)  # noqa: E731
    results = {"prefill": [], "decode": []}
    print(
        f"device {torch.cuda.get_device_name(0)} | torch {torch.__version__} | "
        f"triton {environment()['triton']} | {datetime.datetime.now().isoformat(timespec='seconds')}"
    )

    def over_budget():
        return time.time() - t0 > args.budget_s

    for shape in args.shapes.split(","):
        Hq, Hkv, d = SHAPES[shape]
        if not args.skip_prefill:
            rows = []
            for T in sizes(args.prefill_lens):

                def cell():
                    if over_budget():
                        return {"skipped": "time budget"}
                    set_bytes = (Hq + 2 * Hkv) * T * d * 2
                    if 3 * set_bytes + (Hq * T * d * 2) * 4 > 0.8 * free():
                        return {"skipped": "does not fit"}
                    sets = input_sets(lambda: (rnd(1, Hq, T, d), rnd(1, Hkv, T, d), rnd(1, Hkv, T, d)), set_bytes, 4)
                    qs = torch.zeros(1, device=dev, dtype=torch.int32)
                    ql = torch.full((1,), T, device=dev, dtype=torch.int32)
                    ours = lambda q, k, v: prefill_triton(q, k, v, qs, ql)  # noqa: E731
                    ref = lambda q, k, v: sdpa(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
                    err = rel_err(ours(*sets[0]), ref(*sets[0]))
                    ms_o, ms_r = time_cuda(ours, sets, reps=reps), time_cuda(ref, sets, reps=reps)
                    flops = 2 * 2 * Hq * T * T / 2 * d
                    return dict(
                        ms=ms_o,
                        tflops=flops / ms_o / 1e9,
                        sdpa_ms=ms_r,
                        sdpa_tflops=flops / ms_r / 1e9,
                        vs_sdpa=ms_r / ms_o,
                        rel_err=err,
                        cfg=prefill_config(d, dt, False),
                    )

                r = dict(shape=shape, B=1, T=T, **cell(cell))
                results["prefill"].append(r)
                rows.append(
                    [
                        shape,
                        1,
                        T,
                        r.get("ms"),
                        r.get("tflops"),
                        r.get("sdpa_ms"),
                        r.get("sdpa_tflops"),
                        r.get("vs_sdpa"),
                        r.get("rel_err"),
                        r.get("skipped", ""),
                    ]
                )
            print_table(
                f"prefill, causal, Hq={Hq} Hkv={Hkv} d={d} bf16 (TFLOP/s = 2*2*Hq*T^2/2*d / time)",
                [
                    "shape",
                    "B",
                    "T",
                    "ours ms",
                    "ours TFLOP/s",
                    "sdpa ms",
                    "sdpa TFLOP/s",
                    "speed vs sdpa",
                    "rel err",
                    "note",
                ],
                rows,
            )
        if not args.skip_decode:
            rows = []
            for B in sizes(args.batches):
                for L in sizes(args.contexts):

                    def cell():
                        if over_budget():
                            return {"skipped": "time budget"}
                        kv_bytes = 2 * B * Hkv * L * d * 2
                        set_bytes = kv_bytes + 2 * B * Hq * d * 2
                        n_sets = max(1, min(32, math.ceil(2 * l2_bytes() / set_bytes)))
                        if n_sets * set_bytes + set_bytes // 4 > 0.8 * free():
                            return {"skipped": "does not fit"}
                        sets = input_sets(lambda: (rnd(B, Hq, d), rnd(B, Hkv, L, d), rnd(B, Hkv, L, d)), set_bytes)
                        lens = torch.full((B,), L, device=dev, dtype=torch.int32)
                        ours = lambda q, k, v: decode_triton(q, k, v, lens, max_len=L)  # noqa: E731
                        ref = lambda q, k, v: sdpa(q[:, :, None], k, v, enable_gqa=True)  # noqa: E731
                        err = rel_err(ours(*sets[0]), ref(*sets[0])[:, :, 0])
                        ms_o, ms_r = time_cuda(ours, sets, reps=reps), time_cuda(ref, sets, reps=reps)
                        cfg = decode_config(B, Hkv, L, d, dt, dev, False)
                        return dict(
                            us=ms_o * 1e3,
                            tbs=set_bytes / ms_o / 1e9,
                            sdpa_us=ms_r * 1e3,
                            sdpa_tbs=set_bytes / ms_r / 1e9,
                            vs_sdpa=ms_r / ms_o,
                            rel_err=err,
                            cfg=cfg,
                        )

                    r = dict(shape=shape, B=B, ctx=L, **cell(cell))
                    results["decode"].append(r)
                    rows.append(
                        [
                            shape,
                            B,
                            L,
                            (r.get("cfg") or {}).get("splits"),
                            r.get("us"),
                            r.get("tbs"),
                            r.get("sdpa_us"),
                            r.get("sdpa_tbs"),
                            r.get("vs_sdpa"),
                            r.get("rel_err"),
                            r.get("skipped", ""),
                        ]
                    )
            print_table(
                f"decode, Hq={Hq} Hkv={Hkv} d={d} bf16, all lens = ctx (TB/s = (K+V read + q + o) / time)",
                [
                    "shape",
                    "B",
                    "ctx",
                    "splits",
                    "ours µs",
                    "ours TB/s",
                    "sdpa µs",
                    "sdpa TB/s",
                    "speed vs sdpa",
                    "rel err",
                    "note",
                ],
                rows,
            )
    print(
        f"kernels section done in {time.time() - t0:.0f} s; rel err = |ours - sdpa| / |sdpa| on the timed "
        f"inputs (bf16: expect < 1e-2); speed vs sdpa > 1 means ours is faster."
    )
    return args, results
