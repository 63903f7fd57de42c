"""The contiguous clustered KV cache (docs/DESIGN.md "The clustered KV cache", docs/INTERNALS.md "KV cache").

Per layer, sequence and KV head the token axis is
    [ sinks: 0 .. S | clustered: S .. tail_start (cluster 0, cluster 1, ...) | tail: tail_start .. len ]
with S = min(sinks, tail_start). The engine writes K/V at storage index = position (`layer.k[b, :, s:e]`)
and reports lengths through set_len / advance; cluster_pending() moves the oldest tail tokens into new
clusters. Positions (`pos`) are kept by the cache itself: they equal the storage index everywhere except
inside the clustered region, where the reorder permutes them together with K and V.

One allocation per tensor kind holds all layers ([n_layers, B, ...]); `layers[i]` are contiguous views with
exactly the per-layer shapes of the contract, so kernels see ordinary [B, Hkv, L, d] tensors while
clustering can treat all layers and heads of a sequence as one batch.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .cluster import MAX_ROWS, Tables, cluster_jobs, split_segments
from .config import ClusterConfig
from .kernels.kmeans import to_device


@dataclass
class LayerCache:
    k: torch.Tensor  # [B, Hkv, L, d]   model dtype
    v: torch.Tensor  # [B, Hkv, L, d]
    pos: torch.Tensor  # [B, Hkv, L]      int32 original position of the stored token
    centroids: torch.Tensor  # [B, Hkv, C, d]   mean of member keys
    vmean: torch.Tensor  # [B, Hkv, C, d]   mean of member values
    logsize: torch.Tensor  # [B, Hkv, C]      fp32 ln(members)
    cstart: torch.Tensor  # [B, Hkv, C + 1]  int32; cluster i is storage [cstart[i], cstart[i+1])
    ncl: torch.Tensor  # [B, Hkv]         int32 clusters in use
    kvar: torch.Tensor  # [B, Hkv, C, d]   per-dimension variance of member keys (estimate="gauss")


class ClusterEvent(NamedTuple):
    slot: int
    lo: int  # storage [lo, hi) was clustered; tail_start[slot] is now hi
    hi: int


def max_clusters(max_len, cfg):
    """Cluster capacity C that can never overflow. Every clustered token lies in [sinks, max_len - window)
    and each segment of m tokens adds at most m // cluster_size clusters; a sum of floors is at most the
    floor of the sum, so all prefill segments plus all re-clusterings together add <= this many."""
    return max(1, (max_len - cfg.window - cfg.sinks) // cfg.cluster_size)


class KVCache:
    def __init__(
        self,
        n_layers,
        max_batch,
        n_kv_heads,
        max_len,
        head_dim,
        dtype=torch.bfloat16,
        device="cuda",
        cfg=None,
        backend="auto",
    ):
        self.cfg = cfg if cfg is not None else ClusterConfig()
        self.backend = backend  # k-means kernels: "auto" (Triton on CUDA), "triton", "torch"
        self.n_layers, self.max_batch, self.n_kv_heads = n_layers, max_batch, n_kv_heads
        self.max_len, self.head_dim, self.dtype = max_len, head_dim, dtype
        self.device = torch.device(device)
        self.max_clusters = C = max_clusters(max_len, self.cfg)
        lead = (n_layers, max_batch, n_kv_heads)
        z = dict(device=self.device)
        self.store = Tables(
            k=torch.zeros(*lead, max_len, head_dim, dtype=dtype, **z),
            v=torch.zeros(*lead, max_len, head_dim, dtype=dtype, **z),
            pos=torch.arange(max_len, dtype=torch.int32, **z).expand(*lead, max_len).contiguous(),
            centroids=torch.zeros(*lead, C, head_dim, dtype=dtype, **z),
            vmean=torch.zeros(*lead, C, head_dim, dtype=dtype, **z),
            logsize=torch.full((*lead, C), float("-inf"), dtype=torch.float32, **z),
            cstart=torch.zeros(*lead, C + 1, dtype=torch.int32, **z),
            ncl=torch.zeros(*lead, dtype=torch.int32, **z),
            kvar=torch.zeros(*lead, C, head_dim, dtype=dtype, **z),
        )
        self.layers = [LayerCache(*(t[i] for t in self.store)) for i in range(n_layers)]
        self.lens = torch.zeros(max_batch, dtype=torch.int32, **z)
        self.tail_start = torch.zeros(max_batch, dtype=torch.int32, **z)
        # Host mirrors, so the per-step "is anything due?" check never waits for the GPU.
        self.lens_host = [0] * max_batch
        self.tail_host = [0] * max_batch

    # ------------------------------------------------------------------------------------ bookkeeping
    @staticmethod
    def estimate_bytes_per_token(n_layers, n_kv_heads, head_dim, dtype, cfg=None):
        """(kv, cluster metadata) bytes per token of capacity, all layers, for sizing before allocating."""
        cfg = cfg if cfg is not None else ClusterConfig()
        es = torch.empty((), dtype=dtype).element_size()
        per_cluster = 3 * head_dim * es + 4 + 4  # centroid + vmean + kvar + logsize + cstart
        return (
            n_layers * n_kv_heads * 2 * head_dim * es,
            n_layers * n_kv_heads * (4 + per_cluster / cfg.cluster_size),
        )  # + pos

    def bytes_per_token(self):
        """(kv bytes, cluster-metadata bytes) allocated per token of capacity, across all layers."""
        s = self.store
        meta = sum(
            t.numel() * t.element_size() for t in (s.pos, s.centroids, s.vmean, s.kvar, s.logsize, s.cstart, s.ncl)
        )
        kv = s.k.numel() * s.k.element_size() + s.v.numel() * s.v.element_size()
        return kv / (self.max_batch * self.max_len), meta / (self.max_batch * self.max_len)

    def set_len(self, slot, n):
        """Sequence `slot` now holds n tokens (the engine has written K/V for storage 0 .. n-1)."""
        if not 0 <= n <= self.max_len:
            raise ValueError(f"length {n} outside the cache capacity 0..{self.max_len}")
        if n < self.tail_host[slot]:
            raise ValueError(
                f"cannot shrink slot {slot} to {n} tokens below its clustered region "
                f"(tail_start {self.tail_host[slot]}); reset() it instead"
            )
        self.lens_host[slot] = n
        self.lens[slot] = n

    def advance(self, slots, n=1, active=None):
        """Each slot in `slots` (ints) gained n tokens (one decode step: n=1). `active`, a device bool tensor
        over slots 0..k-1 that is True exactly at `slots`, lets the device update skip copying indices."""
        slots = list(slots)
        for b in slots:
            if self.lens_host[b] + n > self.max_len:
                raise ValueError(f"slot {b} is full ({self.max_len} tokens)")
            self.lens_host[b] += n
        if active is not None:
            self.lens[: active.numel()] += active.to(torch.int32) * n
        elif slots:
            self.lens[torch.tensor(slots, device=self.device)] += n

    def reset(self, slot):
        """Empty sequence `slot` for reuse (K/V rows are left as they are; nothing reads past lens)."""
        s = self.store
        s.ncl[:, slot] = 0
        s.logsize[:, slot] = float("-inf")
        s.pos[:, slot] = torch.arange(self.max_len, dtype=torch.int32, device=self.device)
        self.lens_host[slot] = self.tail_host[slot] = 0
        self.lens[slot] = 0
        self.tail_start[slot] = 0

    # ------------------------------------------------------------------------------------- clustering
    def due(self, slots=None, force=False):
        """ClusterEvents that cluster_pending would run now (host-side check only, no GPU work)."""
        cfg = self.cfg
        need = cfg.cluster_size if force else cfg.recluster_every
        out = []
        for b in range(self.max_batch) if slots is None else slots:
            lo = max(self.tail_host[b], cfg.sinks)
            hi = self.lens_host[b] - cfg.window
            if hi - lo >= need:
                out.append(ClusterEvent(b, lo, hi))
        return out

    def cluster_pending(self, slots=None, force=False):
        """Cluster, per sequence b in `slots` (default: all), storage [lo, hi) with lo = max(tail_start,
        sinks) and hi = len - window, when hi - lo >= recluster_every, or with force=True (right after a
        prefill) whenever hi - lo >= cluster_size; smaller remainders stay in the exact tail. All layers and
        KV heads are clustered together; sequences whose segments have equal lengths share one batch.
        Returns the events run ([] costs only a host loop). No host-device sync."""
        events = self.due(slots, force)
        if not events:
            return []
        segs = [split_segments(ev.lo, ev.hi, self.cfg) for ev in events]
        # Round r runs the r-th segment of every event, so each sequence appends its clusters in order.
        for r in range(max(len(s) for s in segs)):
            by_len = {}
            for ev, ss in zip(events, segs):
                if r < len(ss):
                    by_len.setdefault(ss[r][1] - ss[r][0], []).append((ev.slot, *ss[r]))
            for n, jobs in by_len.items():
                per = max(1, MAX_ROWS // (n * self.n_layers * self.n_kv_heads))
                for i in range(0, len(jobs), per):
                    cluster_jobs(self.store, jobs[i : i + per], self.cfg, self.backend)
        for ev in events:
            self.tail_host[ev.slot] = ev.hi
        idx, hi = to_device([[ev.slot for ev in events], [ev.hi for ev in events]], self.device, torch.int32)
        self.tail_start[idx] = hi  # (torch.tensor(..., device=cuda) would sync)
        return events
