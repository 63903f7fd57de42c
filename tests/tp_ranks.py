"""Helpers for tests/test_tp.py: run a function on N tensor-parallel ranks, each a spawned process joined over
gloo on 127.0.0.1, with a deadline; every rank is killed on failure or timeout. The rank functions live here
(not in the test module) so a spawned rank imports nanodp only."""

import os
import queue
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanodp import parallel


def run_ranks(n, fn, *args, timeout=120):
    """[fn(*args) on rank r for r in range(n)]; raises with the failing rank's traceback, or after `timeout` s."""
    store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, n, store.port, timeout, fn, args, q), daemon=True) for r in range(n)]
    try:
        for p in procs:
            p.start()
        out, deadline = {}, time.monotonic() + timeout
        while len(out) < n:
            try:
                r, ok, val = q.get(timeout=1)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in out]
                if dead:
                    raise AssertionError(f"rank {dead[0]} died (exit code {procs[dead[0]].exitcode})") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{n} ranks did not finish in {timeout} s") from None
                continue
            if not ok:
                raise AssertionError(f"rank {r} failed:\n{val}")
            out[r] = val
        return [out[r] for r in range(n)]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def _rank(r, n, port, timeout, fn, args, q):
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, n, is_master=False, timeout=timedelta(seconds=timeout))
        parallel.setup(r, n, store=store, timeout=timedelta(seconds=timeout))
        q.put((r, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the test
        q.put((r, False, traceback.format_exc()))
    finally:
        parallel.shutdown()
        q.close()
        q.join_thread()
    os._exit(0)  # skip interpreter teardown: the test has what it needs


def greedy(model, prompts, n_new, sparse_runs, cluster_kw, max_len, device="cpu"):
    """Greedy tokens for each SparseConfig keyword set in `sparse_runs`, on one engine, plus what each run read."""
    from nanodp.config import ClusterConfig, SparseConfig
    from nanodp.engine import Engine
    from nanodp.sampler import SamplingParams

    eng = Engine(
        model,
        device=device,
        dtype="fp32",
        max_batch=len(prompts),
        max_len=max_len,
        quiet=True,
        sparse=SparseConfig(**sparse_runs[0]),
        cluster=ClusterConfig(**cluster_kw),
    )
    out = {
        "world": parallel.world_size(),
        "kv_heads": eng.cache.n_kv_heads,
        "qkv": eng.model.model.layers[0].self_attn.qkv_proj.weight.tolist(),  # (lists: a queue shares tensors)
        "lm_head_rows": eng.model.lm_head.weight.shape[0],
        "runs": [],
    }
    for kw in sparse_runs:
        eng.set_sparse(SparseConfig(**kw))
        eng.ctx.stats.reset()
        res = eng.generate(prompts, SamplingParams(temperature=0, max_new_tokens=n_new))
        s = eng.ctx.stats.summary()
        out["runs"].append(
            {
                "tokens": [r.token_ids for r in res],
                "kv_read": s.get("kv_read_fraction", 1.0),
                "clustered": list(eng.cache.tail_host[: len(prompts)]),
                "graphs": len(eng.graphs),
            }
        )
    return out
