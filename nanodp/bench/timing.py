"""What every benchmark section shares: the common flags, the environment record, CUDA timing (graphs,
inputs rotated past L2, L2 flushes), the copy-bandwidth ceiling and table printing."""

import argparse
import datetime
import math
import platform
import statistics
import sys
import time

import torch

SHAPES = {"llama8b": (32, 8, 128), "default": (9, 3, 64)}  # (Hq, Hkv, d)


def common_parser():
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (a smoke run)")
    p.add_argument("--out", default=None, help="also write the final JSON line to this file")
    return p


def require_cuda(section):
    if not torch.cuda.is_available():
        sys.exit(
            f"nanodp.bench {section}: needs a CUDA GPU (torch.cuda.is_available() is False here); "
            f"it times the Triton kernels against torch SDPA on the device. Nothing was measured."
        )


def environment():
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        env.update(
            device=prop.name,
            sms=prop.multi_processor_count,
            cuda=torch.version.cuda,
            memory_gib=round(prop.total_memory / 2**30, 1),
        )
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
    run = lambda: [fn(*s) for s in sets]  # noqa: E731
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


def sizes(text):
    return [int(float(x[:-1]) * 1024) if x.lower().endswith("k") else int(x) for x in text.split(",") if x]


def cell(fn):
    """Run one benchmark cell; OOM or any failure marks the cell skipped instead of ending the run."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        return {"skipped": "out of memory"}
    except Exception as e:  # noqa: BLE001  (a failing cell must not lose the others)
        return {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"}
    finally:
        torch.cuda.empty_cache()


def time_us(fn, reps=30, graph=True):
    """Median microseconds of one call; as a CUDA graph replay unless capture fails (then eager)."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()
    run = graphed(fn) if graph else fn
    times = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def copy_bandwidth():
    """Device-to-device copy of 4 GiB: bytes read + written per second (the practical HBM ceiling)."""
    a = torch.empty(1 << 31, dtype=torch.int16, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * a.numel() * 2 * 5 / (time.perf_counter() - t)
    del a, b
    return bw
