"""Benchmarks: `python -m nanodp.bench SECTION [options]` (SECTION --help lists its options).

A section is a function `section(argv) -> (args, results)`: it parses its own options with a parser built on
`common_parser()` (so --quick and --out work everywhere), prints its tables, and returns a JSON-able dict.
`main` prints one final JSON line (environment + results) and writes it to --out. Sections live in any
module and are registered below as "module:function" strings, imported only when asked for.
Shared helpers: `time_cuda` (median ms, CUDA graphs, input rotation past L2), `input_sets`, `print_table`.
"""
import argparse
import datetime
import importlib
import json
import math
import platform
import statistics
import sys
import time

import torch

SECTIONS = {
    "kernels": "nanodp.bench:bench_kernels",
    "cluster": "nanodp.bench:section_cluster",
    "sparse": "nanodp.bench:section_sparse",
    "e2e": "nanodp.bench_e2e:bench_e2e",
}
SHAPES = {"llama8b": (32, 8, 128), "default": (9, 3, 64)}   # (Hq, Hkv, d)


def common_parser():
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (a smoke run)")
    p.add_argument("--out", default=None, help="also write the final JSON line to this file")
    return p


def require_cuda(section):
    if not torch.cuda.is_available():
        sys.exit(f"nanodp.bench {section}: needs a CUDA GPU (torch.cuda.is_available() is False here); "
                 f"it times the Triton kernels against torch SDPA on the device. Nothing was measured.")


def environment():
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        env.update(device=prop.name, sms=prop.multi_processor_count, cuda=torch.version.cuda,
                   memory_gib=round(prop.total_memory / 2**30, 1))
    return env


def l2_bytes():
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 60 << 20) or (60 << 20)


def input_sets(make, set_bytes, max_sets=32):
    """Enough independent input sets (fresh random each) that cycling through them streams > 2x L2
    from HBM, so timings never measure the cache."""
    n = max(1, min(max_sets, math.ceil(2 * l2_bytes() / max(set_bytes, 1))))
    return [make() for _ in range(n)]


def graphed(fn):
    """`fn` recorded in a CUDA graph (warmed up on a side stream first); `fn` itself if it cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay
    except Exception as e:  # noqa: BLE001 - not capturable: time eager launches instead
        print(f"  (graph capture failed: {type(e).__name__}: {e}; timing eagerly)", file=sys.stderr)
        torch.cuda.synchronize()
        return fn


def time_cuda(fn, sets=((),), warmup=3, reps=20, graph=True):
    """Median ms of one fn(*s) call. All sets run back to back per repetition, captured in one CUDA
    graph when possible (no launch gaps, as the engine runs), else launched eagerly."""
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    run = lambda: [fn(*s) for s in sets]   # noqa: E731
    if graph:
        run = graphed(run)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        run()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) / len(sets)


def print_table(title, columns, rows):
    rows = [["" if c is None else (f"{c:.3g}" if isinstance(c, float) else str(c)) for c in r] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
        t = Table(title=title)
        for c in columns:
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(*r)
        Console(width=max(120, sum(len(c) + 3 for c in columns))).print(t)
    except ImportError:
        w = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
        print(f"\n{title}\n" + "  ".join(c.rjust(x) for c, x in zip(columns, w)))
        for r in rows:
            print("  ".join(c.rjust(x) for c, x in zip(r, w)))
    sys.stdout.flush()


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _sizes(text):
    return [int(float(x[:-1]) * 1024) if x.lower().endswith("k") else int(x) for x in text.split(",") if x]


def _cell(fn):
    """Run one benchmark cell; OOM or any failure marks the cell skipped instead of ending the run."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        return {"skipped": "out of memory"}
    except Exception as e:  # noqa: BLE001  (a failing cell must not lose the others)
        return {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"}
    finally:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ section: kernels
def bench_kernels(argv):
    p = argparse.ArgumentParser(prog="python -m nanodp.bench kernels", parents=[common_parser()],
                                description="Dense attention kernels vs torch SDPA (bf16, random inputs): "
                                "prefill TFLOP/s (causal) and decode TB/s (K+V bytes read + q/o).")
    p.add_argument("--shapes", default="llama8b,default", help=f"of {list(SHAPES)}: llama8b = 32q/8kv d128 "
                   "(Llama-3.1-8B), default = 9q/3kv d64 (the default model)")
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
    free = lambda: torch.cuda.mem_get_info()[0]   # noqa: E731
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt)   # noqa: E731
    results = {"prefill": [], "decode": []}
    print(f"device {torch.cuda.get_device_name(0)} | torch {torch.__version__} | "
          f"triton {environment()['triton']} | {datetime.datetime.now().isoformat(timespec='seconds')}")

    def over_budget():
        return time.time() - t0 > args.budget_s

    for shape in args.shapes.split(","):
        Hq, Hkv, d = SHAPES[shape]
        if not args.skip_prefill:
            rows = []
            for T in _sizes(args.prefill_lens):
                def cell():
                    if over_budget():
                        return {"skipped": "time budget"}
                    set_bytes = (Hq + 2 * Hkv) * T * d * 2
                    if 3 * set_bytes + (Hq * T * d * 2) * 4 > 0.8 * free():
                        return {"skipped": "does not fit"}
                    sets = input_sets(lambda: (rnd(1, Hq, T, d), rnd(1, Hkv, T, d), rnd(1, Hkv, T, d)), set_bytes, 4)
                    qs = torch.zeros(1, device=dev, dtype=torch.int32)
                    ql = torch.full((1,), T, device=dev, dtype=torch.int32)
                    ours = lambda q, k, v: prefill_triton(q, k, v, qs, ql)          # noqa: E731
                    ref = lambda q, k, v: sdpa(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
                    err = rel_err(ours(*sets[0]), ref(*sets[0]))
                    ms_o, ms_r = time_cuda(ours, sets, reps=reps), time_cuda(ref, sets, reps=reps)
                    flops = 2 * 2 * Hq * T * T / 2 * d
                    return dict(ms=ms_o, tflops=flops / ms_o / 1e9, sdpa_ms=ms_r, sdpa_tflops=flops / ms_r / 1e9,
                                vs_sdpa=ms_r / ms_o, rel_err=err, cfg=prefill_config(d, dt, False))
                r = dict(shape=shape, B=1, T=T, **_cell(cell))
                results["prefill"].append(r)
                rows.append([shape, 1, T, r.get("ms"), r.get("tflops"), r.get("sdpa_ms"), r.get("sdpa_tflops"),
                             r.get("vs_sdpa"), r.get("rel_err"), r.get("skipped", "")])
            print_table(f"prefill, causal, Hq={Hq} Hkv={Hkv} d={d} bf16 (TFLOP/s = 2*2*Hq*T^2/2*d / time)",
                        ["shape", "B", "T", "ours ms", "ours TFLOP/s", "sdpa ms", "sdpa TFLOP/s",
                         "speed vs sdpa", "rel err", "note"], rows)
        if not args.skip_decode:
            rows = []
            for B in _sizes(args.batches):
                for L in _sizes(args.contexts):
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
                        ours = lambda q, k, v: decode_triton(q, k, v, lens, max_len=L)     # noqa: E731
                        ref = lambda q, k, v: sdpa(q[:, :, None], k, v, enable_gqa=True)   # noqa: E731
                        err = rel_err(ours(*sets[0]), ref(*sets[0])[:, :, 0])
                        ms_o, ms_r = time_cuda(ours, sets, reps=reps), time_cuda(ref, sets, reps=reps)
                        cfg = decode_config(B, Hkv, L, d, dt, dev, False)
                        return dict(us=ms_o * 1e3, tbs=set_bytes / ms_o / 1e9, sdpa_us=ms_r * 1e3,
                                    sdpa_tbs=set_bytes / ms_r / 1e9, vs_sdpa=ms_r / ms_o, rel_err=err, cfg=cfg)
                    r = dict(shape=shape, B=B, ctx=L, **_cell(cell))
                    results["decode"].append(r)
                    rows.append([shape, B, L, (r.get("cfg") or {}).get("splits"), r.get("us"), r.get("tbs"),
                                 r.get("sdpa_us"), r.get("sdpa_tbs"), r.get("vs_sdpa"), r.get("rel_err"),
                                 r.get("skipped", "")])
            print_table(f"decode, Hq={Hq} Hkv={Hkv} d={d} bf16, all lens = ctx (TB/s = (K+V read + q + o) / time)",
                        ["shape", "B", "ctx", "splits", "ours µs", "ours TB/s", "sdpa µs", "sdpa TB/s",
                         "speed vs sdpa", "rel err", "note"], rows)
    print(f"kernels section done in {time.time() - t0:.0f} s; rel err = |ours - sdpa| / |sdpa| on the timed "
          f"inputs (bf16: expect < 1e-2); speed vs sdpa > 1 means ours is faster.")
    return args, results


def section_cluster(argv):
    """Clustering time vs dense prefill (32 layers x 8 KV heads, d=128) and one re-clustering event."""
    p = argparse.ArgumentParser(prog="python -m nanodp.bench cluster", parents=[common_parser()])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tune", action="store_true")
    args = p.parse_args(argv)
    require_cuda("cluster")
    from nanodp.bench_cluster import bench_cluster
    return args, bench_cluster(args)


def section_sparse(argv):
    """Double-P attention step (score + cut + attention + combine) vs the dense decode kernel."""
    p = argparse.ArgumentParser(prog="python -m nanodp.bench sparse", parents=[common_parser()])
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--contexts", type=int, nargs="+")
    p.add_argument("--shapes", nargs="+")
    p.add_argument("--p1", type=float)
    p.add_argument("--p2", type=float)
    p.add_argument("--reps", type=int)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--estimate", choices=["centroid", "gauss"], help="stage-1 estimate (default centroid)")
    args = p.parse_args(argv)
    require_cuda("sparse")
    from nanodp.bench_sparse import bench_sparse
    return args, bench_sparse(args)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in SECTIONS:
        names = ", ".join(SECTIONS)
        print(f"usage: python -m nanodp.bench SECTION [options]   (SECTION: {names}; SECTION --help for its options)")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    mod, fn = SECTIONS[argv[0]].split(":")
    args, results = getattr(importlib.import_module(mod), fn)(argv[1:])
    line = json.dumps({"section": argv[0], "env": environment(), "results": results}, default=str)
    if getattr(args, "out", None):
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
