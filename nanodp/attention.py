"""Attention dispatch: rotate q and k and store new K/V in the cache (one fused op), then run the prefill or
decode backend. The context also carries the model's fused elementwise ops (`ctx.ops`).

Backends (docs/DESIGN.md "Kernels"): prefill is always dense causal flash attention; decode is `dense`,
`doublep` or `topk`. Each has a torch twin (CPU, the oracle) and a Triton kernel (GPU); `kernels`
picks which implementation runs.
"""

from types import SimpleNamespace

import torch

from .config import SparseConfig
from .kernels.doublep import STAT_KEYS


def _impl(kernels: str):
    from .kernels import fused

    if kernels == "triton":
        from .kernels.decode import decode_triton as decode
        from .kernels.doublep_attn import sparse_triton as sparse
        from .kernels.prefill import prefill_triton as prefill
    else:
        from .kernels.decode import decode_ref as decode
        from .kernels.doublep import sparse_ref as sparse
        from .kernels.prefill import prefill_ref as prefill
    suffix = "_triton" if kernels == "triton" else "_ref"
    ops = SimpleNamespace(**{op: getattr(fused, op + suffix) for op in ("add_rmsnorm", "silu_mul", "rope_store")})
    return prefill, decode, sparse, ops


class DecodeStats:
    """Per layer and KV head, summed over decode steps: exact tokens, pseudo-tokens, mass kept.
    Each layer of a step writes its [len(STAT_KEYS), B, Hkv] values into this step's slab (the sparse kernel
    stores them there directly); `end_step` adds the whole slab, weighted by `active`, to the sums: a few
    launches per step, not per layer. All buffers keep their addresses, so CUDA-graph replays keep counting."""

    def __init__(self, n_layers, n_kv, device):
        self.table = torch.zeros(n_layers, len(STAT_KEYS), n_kv, device=device)
        self.sums = {k: self.table[:, i] for i, k in enumerate(STAT_KEYS)}  # views: [n_layers, n_kv] each
        self.dense_tokens = torch.zeros((), device=device)
        self.slabs = {}  # batch size -> [n_layers, len(STAT_KEYS), B, n_kv], the current step's values

    def slab(self, B):
        if B not in self.slabs:  # first (eager) step of a batch size allocates; graph captures come later
            self.slabs[B] = torch.zeros(
                self.table.shape[0], len(STAT_KEYS), B, self.table.shape[2], device=self.table.device
            )
        return self.slabs[B]

    @torch.inference_mode()
    def reset(self):
        self.table.zero_()
        self.dense_tokens.zero_()

    def end_step(self, active):
        """active [B] float: finished sequences (0) are excluded."""
        self.table.add_(torch.einsum("lkbh,b->lkh", self.slab(active.shape[0]), active))

    def summary(self) -> dict:
        """Averages per decode token: fraction of KV tokens read exactly, pseudo-tokens, mass kept."""
        if not float(self.dense_tokens):
            return {}
        per_layer = {k: v.cpu() for k, v in self.sums.items()}
        dense = float(self.dense_tokens)
        return {
            "kv_read_fraction": float(per_layer["exact_tokens"].sum()) / dense,
            "pseudo_fraction": float(per_layer["pseudo_tokens"].sum()) / dense,
            "per_layer_head": {k: v.tolist() for k, v in per_layer.items()},
        }


class AttentionContext:
    def __init__(self, cache, sparse: SparseConfig, kernels: str = "torch"):
        self.cache, self.sparse, self.kernels = cache, sparse, kernels
        self.prefill_fn, self.decode_fn, self.sparse_fn, self.ops = _impl(kernels)
        self.stats = DecodeStats(len(cache.layers), cache.layers[0].k.shape[1], cache.lens.device)
        self.mode = None
        # observer(layer_idx, q, layer, lens, tail_start, o, active) sees every decode attention call
        # (the evaluation hooks in here for per-layer errors and mass kept; eager mode only)
        self.observer = None

    # -- prefill: a padded batch of new chunks, sequence b's chunk goes to storage q_start[b] .. +q_len[b]
    def begin_prefill(self, slots, q_start, q_len):
        self.mode, self.slots = "prefill", list(slots)
        self.q_start_list, self.q_len_list = list(q_start), list(q_len)
        dev = self.cache.lens.device
        self.q_start = torch.tensor(self.q_start_list, dtype=torch.int32, device=dev)
        self.q_len = torch.tensor(self.q_len_list, dtype=torch.int32, device=dev)

    # -- decode: one new token per slot, stored at index lens[slot]; `active` marks unfinished sequences
    def begin_decode(self, slots: torch.Tensor, active: torch.Tensor, max_len: int, attention=None):
        """attention: this step's decode attention (what `auto` chose; default: the config's)."""
        self.mode, self.slots_t, self.active, self.max_len = "decode", slots, active, max_len
        self.step_attention = attention or self.sparse.attention
        self.write_at = self.cache.lens[slots].long()
        self.lens_after = (self.write_at + 1).to(torch.int32)
        if self.sparse.attention != "dense":  # the denominator of the sparse stats (on device: no sync)
            self.dense_tokens = self.lens_after.float().mul(active).sum()

    def attend(self, layer_idx, q, k, v, cos, sin):
        """q [B, T, Hq, d], k/v [B, T, Hkv, d] before RoPE, cos/sin [B, T, d] -> o [B, T, Hq, d]."""
        layer = self.cache.layers[layer_idx]
        if self.mode == "prefill":
            kv = self._slot_view(layer)
            q = self.ops.rope_store(q, k, v, cos, sin, kv[0], kv[1], self.q_start, self.q_len)
            o = self.prefill_fn(q.transpose(1, 2), kv[0], kv[1], self.q_start, self.q_len)
            return o.transpose(1, 2)
        # decode slots are 0..B-1 (the engine runs them so): token b goes to storage write_at[b] of slot b
        B = q.shape[0]
        q1 = self.ops.rope_store(q, k, v, cos, sin, layer.k[:B], layer.v[:B], self.write_at)[:, 0]  # [B, Hq, d]
        sp = self.sparse
        if self.step_attention == "dense" or layer_idx < sp.dense_layers:
            o = self.decode_fn(q1, layer.k[:B], layer.v[:B], self.lens_after, max_len=self.max_len)
            if self.step_attention != "dense":  # a dense layer of a sparse step reads every token exactly
                st = self.stats.slab(B)[layer_idx]
                st.zero_()
                st[0].copy_(self.lens_after[:, None].expand(-1, layer.k.shape[1]))
        else:
            o, _ = self.sparse_fn(
                q1,
                _SlotLayer(layer, B, self.max_len),
                self.lens_after,
                self.cache.tail_start[:B],
                self.cache.cfg.sinks,
                sp,
                stats_out=self.stats.slab(B)[layer_idx],
            )
        if self.observer is not None:
            self.observer(
                layer_idx,
                q1,
                _SlotLayer(layer, B, self.max_len),
                self.lens_after,
                self.cache.tail_start[:B],
                o,
                self.active,
            )
        return o[:, None]

    def end_decode(self):
        if self.sparse.attention != "dense":
            if self.step_attention == "dense":  # auto ran dense: every layer read every token exactly (one add)
                self.stats.sums["exact_tokens"].add_(self.dense_tokens)
            else:
                self.stats.end_step(self.active)
            self.stats.dense_tokens.add_(self.dense_tokens * len(self.cache.layers) * self.cache.layers[0].k.shape[1])

    def _slot_view(self, layer):
        # slots of one prefill are 0..B-1 (the engine allocates them so), so a leading slice is a view
        assert self.slots == list(range(len(self.slots))), "prefill slots must be 0..B-1"
        n = len(self.slots)
        return layer.k[:n], layer.v[:n]


class _SlotLayer:
    """The first `n` batch slots of a layer cache, as views (decode runs slots 0..n-1); K/V cut to the first
    `upto` tokens (an upper bound of the lengths), so the torch twin never scans the unused capacity."""

    def __init__(self, layer, n, upto=None):
        for name in ("k", "v", "pos", "centroids", "vmean", "logsize", "cstart", "ncl", "kvar"):
            setattr(self, name, getattr(layer, name)[:n])
        if upto is not None:
            self.k, self.v = self.k[:, :, :upto], self.v[:, :, :upto]
