"""Tensor parallelism (Megatron-style) over torch.distributed: gloo on CPU, NCCL on CUDA.

Each of the N ranks builds its layers at its own sizes (model.py asks `world_size()`), and the loader cuts every
checkpoint tensor to this rank's part (`shard`) before q/k/v and gate/up are fused, so each fused weight holds
exactly this rank's heads:
  q/k/v_proj, gate/up_proj  column-parallel: rank r has query heads [r Hq/N, (r+1) Hq/N) and the KV heads they read,
                            [r Hkv/N, (r+1) Hkv/N) (N must divide Hkv), and a balanced slice of the MLP units
  o_proj, down_proj         row-parallel: the matching input columns, then one all-reduce of [B, T, hidden] each
                            (two per layer: the only communication inside the layers)
  attention                 the KV cache, clustering and Double-P's selection are per KV head: local, no communication
  embed_tokens, norms       replicated: a lookup reads B rows; a vocab-parallel table would add a third all-reduce
  lm_head                   sharded by vocabulary (ceil(V/N) rows each, zero rows past V), one all-gather of the
                            logits per step: for Llama-8B it is 1 GB of bf16 each rank would otherwise read per step
  sampling                  rank 0's token ids are broadcast each step, so every rank runs the same decode steps
Only rank 0 prints or writes files (the other ranks' stdout/stderr go to /dev/null; their tracebacks still show).

Launch (the CLIs call `init(args.tp, main, argv)` right after parsing their flags):
  python -m nanodp.generate --tp N ...  /  python chat.py --tp N  /  python -m nanodp.bench e2e --tp N ...
      this process becomes rank 0 (it keeps the terminal) and starts ranks 1..N-1 with torch.multiprocessing
      (spawn); they rerun main(argv) and join through a TCP store on 127.0.0.1. If one dies, all are stopped;
      Ctrl-C ends the whole run (ranks cannot stop one reply together).
  torchrun --nproc-per-node N -m nanodp.generate ...   every rank joins from WORLD_SIZE / RANK / LOCAL_RANK.
"""

import atexit
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError

_S = {"world": 1, "rank": 0, "local": 0, "children": [], "store": None, "closing": False}
LONG = timedelta(hours=24)  # chat ranks wait for the user's next line inside a collective; dead ranks are caught anyway


def world_size() -> int:
    return _S["world"]


def rank() -> int:
    return _S["rank"]


def is_main() -> bool:
    return _S["rank"] == 0


# -- sharding -----------------------------------------------------------------------------------------------
def check(cfg, tp=None):
    """Refuse a TP size that does not divide the KV heads (each rank keeps whole KV heads and their query heads)."""
    tp = tp or _S["world"]
    if cfg.num_key_value_heads % tp:
        ok = ", ".join(str(n) for n in range(1, cfg.num_key_value_heads + 1) if cfg.num_key_value_heads % n == 0)
        raise ConfigError(f"--tp {tp} does not divide the model's {cfg.num_key_value_heads} KV heads; use one of {ok}")


def part(n: int) -> int:
    """This rank's share of n units split as evenly as possible (torch.tensor_split's sizes)."""
    return n // _S["world"] + (_S["rank"] < n % _S["world"])


def vocab_part(vocab: int) -> int:
    """Rows of this rank's lm_head: equal for all ranks (the all-gather needs it), zero-padded past the vocabulary."""
    return -(-vocab // _S["world"])


def shard(name: str, t: torch.Tensor) -> torch.Tensor:
    """This rank's part of checkpoint tensor `name` (Hugging Face Llama names); replicated tensors pass through."""
    n, r = _S["world"], _S["rank"]
    kind = name.split(".")[-2] if name.endswith(".weight") else ""
    if n == 1 or kind not in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj", "lm_head"):
        return t
    if kind == "lm_head":
        c = vocab_part(t.shape[0])
        rows = t[r * c : (r + 1) * c]
        return torch.cat([rows, rows.new_zeros(c - rows.shape[0], t.shape[1])]) if rows.shape[0] < c else rows.clone()
    dim = 1 if kind in ("o_proj", "down_proj") else 0  # row-parallel layers are cut along their inputs
    return torch.tensor_split(t, n, dim=dim)[r].clone(memory_format=torch.contiguous_format)


# -- communication (no-ops on one rank) ---------------------------------------------------------------------
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum the row-parallel partial outputs in place (o_proj, down_proj)."""
    if _S["world"] > 1:
        dist.all_reduce(x)
    return x


def gather_vocab(x: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V/N] logits of this rank's vocabulary rows -> [B, V] on every rank."""
    if _S["world"] == 1:
        return x
    n, x = _S["world"], x.contiguous()
    out = x.new_empty(n * x.shape[0], *x.shape[1:])  # the ranks' [B, V/N] blocks one after another
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x)  # (the latter: torch < 2.13)
    return out.view(n, *x.shape).movedim(0, -2).flatten(-2)[..., :vocab]


def broadcast(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank (the sampled token ids)."""
    if _S["world"] > 1:
        dist.broadcast(x, src=0)
    return x


def agree_min(n: int) -> int:
    """The smallest n over the ranks (e.g. the context that fits every GPU's free memory)."""
    if _S["world"] == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def from_rank0(fn):
    """fn() run on rank 0 only (e.g. reading the terminal); its value, or its EOFError / KeyboardInterrupt, on all."""
    if _S["world"] == 1:
        return fn()
    box = [None]
    if is_main():
        try:
            box[0] = ("value", fn())
        except (EOFError, KeyboardInterrupt) as e:
            box[0] = ("raise", type(e))
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    kind, val = box[0]
    if kind == "raise":
        raise val()
    return val


def place(device: torch.device) -> torch.device:
    """`cuda` without an index means this rank's GPU (LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None and _S["world"] > 1:
        return torch.device("cuda", _S["local"])
    return device


# -- process group ------------------------------------------------------------------------------------------
def setup(rank_: int, world: int, local_rank: int | None = None, store=None, timeout: timedelta = LONG):
    """Join a group of `world` ranks as `rank_`, through `store` (a TCPStore) or else torchrun's env://."""
    local_rank = rank_ if local_rank is None else local_rank
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if cuda:
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"  # host-side collectives (agree_min, from_rank0) use gloo
    kw = dict(store=store) if store is not None else dict(init_method="env://")
    dist.init_process_group(backend, rank=rank_, world_size=world, timeout=timeout, **kw)
    _S.update(world=world, rank=rank_, local=local_rank % max(1, torch.cuda.device_count()) if cuda else local_rank)


def shutdown():
    """Leave the group; rank 0 of a `--tp N` launch then waits for its ranks (and stops any that hang)."""
    _S["closing"] = True
    if dist.is_initialized():
        dist.destroy_process_group()
    for p in _S["children"]:
        p.join(timeout=30)
        if p.is_alive():
            p.terminate()
    _S.update(world=1, rank=0, local=0, children=[], store=None)


def init(tp: int = 1, main=None, argv=None) -> int:
    """For a CLI: join torchrun's group (WORLD_SIZE set), or with tp > 1 start ranks 1..tp-1 running main(argv)
    and become rank 0. Returns the world size; leaves the group at exit."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1:
        raise SystemExit(f"--tp must be >= 1, got {tp}")
    if env_world > 1:
        if tp not in (1, env_world):
            raise SystemExit(f"--tp {tp} does not match the {env_world} ranks torchrun started")
        store = None
        if "NANODP_TP_STORE" in os.environ:  # a rank started by _spawn: rank 0 hosts the store
            host, port = os.environ["NANODP_TP_STORE"].rsplit(":", 1)
            store = dist.TCPStore(host, int(port), env_world, is_master=False, timeout=LONG)
        setup(int(os.environ["RANK"]), env_world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), store)
    elif tp > 1:
        _spawn(tp, main, sys.argv[1:] if argv is None else list(argv))
    else:
        return 1
    atexit.register(shutdown)
    if not is_main():
        _silence()
    return world_size()


def _spawn(tp, main, argv):
    store = dist.TCPStore("127.0.0.1", 0, tp, is_master=True, wait_for_workers=False, timeout=LONG)
    ctx = torch.multiprocessing.get_context("spawn")
    for r in range(1, tp):
        env = {
            "WORLD_SIZE": str(tp),
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "NANODP_TP_STORE": f"127.0.0.1:{store.port}",
        }
        p = ctx.Process(target=_child, args=(main, argv, env, os.getpid()), daemon=True)
        p.start()
        _S["children"].append(p)
    _S["store"] = store
    signal.signal(signal.SIGINT, lambda *_: _abort("interrupted"))
    threading.Thread(target=_watch, daemon=True).start()
    setup(0, tp, 0, store=store)


def _child(main, argv, env, parent):
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides (Ctrl-C there stops every rank)
    threading.Thread(target=_orphan_watch, args=(parent,), daemon=True).start()
    try:
        main(argv)  # its return code is rank 0's to report
    except SystemExit:
        pass
    except BaseException:  # noqa: BLE001 - report with the rank, then exit non-zero so rank 0 stops the rest
        print(f"nanodp: rank {env['RANK']} failed:", file=sys.__stderr__)
        traceback.print_exc(file=sys.__stderr__)
        sys.exit(1)


def _watch():
    """Rank 0: if a rank dies abnormally, stop the others and exit (instead of waiting in a collective forever)."""
    from multiprocessing.connection import wait

    left = {p.sentinel: (r, p) for r, p in enumerate(_S["children"], 1)}
    while left:
        for s in wait(list(left)):
            r, p = left.pop(s)
            p.join()
            if p.exitcode != 0 and not _S["closing"]:
                _abort(f"rank {r} exited with code {p.exitcode}")


def _orphan_watch(parent):
    """A spawned rank: exit if rank 0 is gone (killed), rather than wait in a collective."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _abort(why):
    print(f"nanodp: {why}; stopping all ranks", file=sys.__stderr__, flush=True)
    for p in _S["children"]:
        if p.is_alive():
            p.kill()
    os._exit(1)


def _silence():
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    sys.excepthook = lambda *exc: (
        print(f"nanodp: rank {rank()} failed:", file=sys.__stderr__),
        traceback.print_exception(*exc, file=sys.__stderr__),
    )
