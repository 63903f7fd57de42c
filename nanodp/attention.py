"""Attention dispatch: store new K/V in the cache, then run the prefill or decode backend.

Backends (DESIGN.md section 4): prefill is always dense causal flash attention; decode is `dense`,
`doublep` or `topk`. Each has a torch twin (CPU, the oracle) and a Triton kernel (GPU); `kernels`
picks which implementation runs.
"""
import torch

from .config import SparseConfig


def _impl(kernels: str):
    if kernels == "triton":
        from .kernels.decode import decode_triton as decode
        from .kernels.doublep_attn import sparse_triton as sparse
        from .kernels.prefill import prefill_triton as prefill
    else:
        from .kernels.decode import decode_ref as decode
        from .kernels.doublep import sparse_ref as sparse
        from .kernels.prefill import prefill_ref as prefill
    return prefill, decode, sparse


class DecodeStats:
    """Per layer and KV head, summed over decode steps: exact tokens, pseudo-tokens, mass kept, fallbacks.
    Device buffers updated in place, so a decode step captured in a CUDA graph keeps counting on replay."""

    def __init__(self, n_layers, n_kv, device):
        self.shape, self.device = (n_layers, n_kv), device
        self.sums, self.dense_tokens = {}, torch.zeros((), device=device)

    @torch.inference_mode()
    def reset(self):
        for t in self.sums.values():
            t.zero_()
        self.dense_tokens.zero_()

    def add(self, layer_idx, stats: dict, active):
        for key, val in stats.items():
            if key not in self.sums:  # first (eager) step allocates; graph captures come later
                self.sums[key] = torch.zeros(self.shape, device=self.device)
            self.sums[key][layer_idx].add_((val.float() * active[:, None]).sum(0))  # finished seqs excluded

    def summary(self) -> dict:
        """Averages per decode token: fraction of KV tokens read exactly, pseudo-tokens, mass kept."""
        if not self.sums or not float(self.dense_tokens):
            return {}
        per_layer = {k: v.cpu() for k, v in self.sums.items()}
        dense = float(self.dense_tokens)
        out = {"kv_read_fraction": float(per_layer["exact_tokens"].sum()) / dense}
        if "pseudo_tokens" in per_layer:
            out["pseudo_fraction"] = float(per_layer["pseudo_tokens"].sum()) / dense
        if "fallback" in per_layer:
            out["fallbacks"] = int(per_layer["fallback"].sum())
        out["per_layer_head"] = {k: v.tolist() for k, v in per_layer.items()}
        return out


class AttentionContext:
    def __init__(self, cache, sparse: SparseConfig, kernels: str = "torch"):
        self.cache, self.sparse, self.kernels = cache, sparse, kernels
        self.prefill_fn, self.decode_fn, self.sparse_fn = _impl(kernels)
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
    def begin_decode(self, slots: torch.Tensor, active: torch.Tensor, max_len: int):
        self.mode, self.slots_t, self.active, self.max_len = "decode", slots, active, max_len
        self.write_at = self.cache.lens[slots].long()
        self.lens_after = (self.write_at + 1).to(torch.int32)
        self.dense_tokens = self.lens_after.float().mul(active).sum()  # stays on device: no sync

    def attend(self, layer_idx, q, k, v):
        layer = self.cache.layers[layer_idx]
        if self.mode == "prefill":
            for i, slot in enumerate(self.slots):
                s, n = self.q_start_list[i], self.q_len_list[i]
                layer.k[slot, :, s:s + n] = k[i, :n].transpose(0, 1)
                layer.v[slot, :, s:s + n] = v[i, :n].transpose(0, 1)
            kv = self._slot_view(layer)
            o = self.prefill_fn(q.transpose(1, 2), kv[0], kv[1], self.q_start, self.q_len)
            return o.transpose(1, 2)
        slots, at = self.slots_t, self.write_at
        layer.k[slots, :, at] = k[:, 0]
        layer.v[slots, :, at] = v[:, 0]
        q1 = q[:, 0]  # [B, Hq, d]
        sp = self.sparse
        if sp.attention == "dense" or layer_idx < sp.dense_layers:
            o = self.decode_fn(q1, layer.k[:q1.shape[0]], layer.v[:q1.shape[0]], self.lens_after,
                               max_len=self.max_len)
            if sp.attention != "dense":
                self.stats.add(layer_idx, {"exact_tokens": self.lens_after[:, None].expand(-1, layer.k.shape[1])},
                               self.active)
        else:
            o, st = self.sparse_fn(q1, _SlotLayer(layer, q1.shape[0], self.max_len), self.lens_after,
                                   self.cache.tail_start[:q1.shape[0]], self.cache.cfg.sinks, sp.p1, sp.p2,
                                   group_rule=sp.group_rule, mode="topk" if sp.attention == "topk" else "doublep",
                                   budget=sp.budget, est_clusters=sp.est_clusters, capacity=sp.capacity,
                                   estimate=sp.estimate, pseudo_bias=sp.pseudo_bias)
            self.stats.add(layer_idx, st, self.active)
        if self.observer is not None:
            B = q1.shape[0]
            self.observer(layer_idx, q1, _SlotLayer(layer, B, self.max_len), self.lens_after, self.cache.tail_start[:B], o,
                          self.active)
        return o[:, None]

    def end_decode(self):
        if self.sparse.attention != "dense":
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
        for name in ("k", "v", "centroids", "vmean", "logsize", "cstart", "ncl", "kvar"):
            setattr(self, name, getattr(layer, name)[:n])
        if upto is not None:
            self.k, self.v = self.k[:, :, :upto], self.v[:, :, :upto]
