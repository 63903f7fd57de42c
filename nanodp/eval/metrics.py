"""Evaluation metrics: KV bytes read, per-layer output error and true mass kept (an observer on the engine's
decode attention), and teacher forcing. Definitions are in nanodp/eval/cli.py's docstring."""

import math

import torch

from ..config import SparseConfig
from ..kernels.doublep import select_ref


def spread(x) -> dict:
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    q = torch.quantile(x, torch.tensor([0.1, 0.9], dtype=torch.float64)).tolist()
    return {"mean": x.mean().item(), "p10": q[0], "p90": q[1], "min": x.min().item(), "max": x.max().item()}


class KVTally:
    """The engine's decode stats (per layer and KV head, summed over steps) summed over the batches of a length."""

    def __init__(self):
        self.s, self.dense, self.steps, self.scan, self.dl, self.gauss = {}, 0.0, 0, 0.0, 0, False

    def add(self, eng, steps):
        st = eng.ctx.stats
        if eng.sparse.attention == "dense" or not st.sums:  # dense decode keeps no stats: reads everything
            return
        self.dl, self.gauss = eng.sparse.dense_layers, eng.sparse.estimate == "gauss"
        for k, v in st.sums.items():
            self.s[k] = self.s.get(k, 0) + v.double().cpu()
        self.dense += float(st.dense_tokens)
        self.steps += sum(steps)
        ncl = eng.cache.store.ncl[:, : len(steps)].double().cpu()  # [layers, B, Hkv], fixed in decode
        scan = (ncl * torch.tensor(steps, dtype=torch.float64)[None, :, None]).sum(1)
        scan[: self.dl] = 0  # dense layers scan nothing
        self.scan = self.scan + scan

    def summary(self, d, es):
        if not self.s:
            return {"kv_bytes": 1.0, "exact": spread([1.0]), "pseudo": spread([0.0])}
        nl, nh = self.s["exact_tokens"].shape
        D = self.dense / (nl * nh)  # dense tokens per (layer, head), summed over steps
        scored = self.s["scored_clusters"] if "scored_clusters" in self.s else self.scan  # what stage 1 scored
        ex, ps, sc = self.s["exact_tokens"] / D, self.s.get("pseudo_tokens", torch.zeros(nl, nh)) / D, scored / D
        # bytes over dense's (K and V of every token): an exact token reads K and V, a pseudo-token its V̄ (its
        # centroid was read by the scan), the stage-1 scan every centroid and its ln s (fp32), + its key
        # variances with estimate="gauss"
        # bytes over dense's (K and V of every token): an exact token reads K and V, a pseudo-token its V̄ (its
        # centroid was read by the scan); the stage-1 scan reads per scored cluster its centroid, ln s and cstart
        # (+ its key variances with estimate="gauss"), and with the whole-attention cut the steady tokens' keys
        # (read again as exact tokens: counted twice, an upper bound). kernels/doublep.py lists them.
        steady = self.s.get("steady_scored", torch.zeros(nl, nh)) / D
        kvb = (ex * 2 * d * es + ps * d * es + sc * ((1 + self.gauss) * d * es + 8) + steady * d * es) / (2 * d * es)
        need = self.s.get("need_tokens", torch.zeros(nl, nh))[self.dl :].sum()  # exact clustered tokens asked for
        return {
            "kv_bytes": kvb.mean().item(),
            "kv_bytes_spread": spread(kvb),
            "exact": spread(ex),
            "pseudo": spread(ps),
            "scan": sc.mean().item(),
            "need_mean": need.item() / max(1, self.steps * (nl - self.dl) * nh),  # per head and step
            "exact_layer_head": ex.tolist(),
        }


def _members(cstart, sel, L):
    """Token mask [B, Hkv, L] of the clusters marked in sel [B, Hkv, C]: cluster i is storage [cstart_i, cstart_i+1)."""
    cst = cstart.long().clamp(0, L)
    diff = torch.zeros(*sel.shape[:2], L + 1, device=sel.device)
    diff.scatter_add_(-1, cst[..., :-1], sel.float())
    diff.scatter_add_(-1, cst[..., 1:], -sel.float())
    return diff.cumsum(-1)[..., :L] > 0.5


def read_masks(q, layer, lens, tail_start, sp: SparseConfig, sinks):
    """The method's selection (the twin's select_ref), as token masks [B, Hkv, L] over storage: (exact, kept).
    exact = steady tokens + tokens of the exact clusters X; kept = exact + tokens of the pseudo clusters A."""
    s = select_ref(q, layer, lens, tail_start, sinks, sp)
    return s.tokens, s.tokens | _members(layer.cstart, s.pseudo, layer.k.shape[2])


class Observer:
    """eng.ctx.observer: per layer and query head, sums over steps and sequences of the output's relative error
    against dense attention over the same cache, the true mass kept and the mass read exactly."""

    def __init__(self, eng, needles=None):
        """needles: per batch sequence, the original positions of its needle tokens (or None)."""
        nl, hq = eng.cfg.num_hidden_layers, eng.cfg.num_attention_heads
        self.eng, z = eng, dict(dtype=torch.float64, device=eng.device)
        self.err, self.mass, self.mass_x, self.under = (torch.zeros(nl, hq, **z) for _ in range(4))
        self.n = torch.zeros(nl, **z)
        self.mass_min = torch.ones(nl, hq, **z)
        self.needles = needles
        self.needle_dense = torch.zeros(nl, hq, **z)  # dense attention mass on the needle tokens ...
        self.needle_kept = torch.zeros(nl, hq, **z)  # ... of which the method reads exactly or as pseudo

    def __call__(self, li, q, layer, lens, tail_start, o, active):
        B, Hq, d = q.shape
        _, Hkv, L, _ = layer.k.shape
        scale, t = 1.0 / math.sqrt(d), torch.arange(L, device=q.device)
        live = t[None] < lens.long()[:, None]  # [B, L]
        x = torch.einsum("bhgd,bhld->bhgl", q.float().view(B, Hkv, Hq // Hkv, d), layer.k.float()) * scale
        p = torch.softmax(x.masked_fill(~live[:, None, None], -math.inf), -1)  # dense attention probabilities
        od = torch.einsum("bhgl,bhld->bhgd", p, torch.where(live[:, None, :, None], layer.v.float(), 0.0))
        od = od.reshape(B, Hq, d)  # = decode_ref's output
        err = (o.float() - od).norm(dim=-1) / od.norm(dim=-1).clamp_min(1e-30)
        sp = self.eng.sparse
        if sp.attention == "dense" or li < sp.dense_layers:
            mx = mk = torch.ones(B, Hkv, L, dtype=torch.bool, device=q.device)
        else:
            mx, mk = read_masks(q, layer, lens, tail_start, sp, self.eng.cache.cfg.sinks)
        kept_x = (p * mx[:, :, None]).sum(-1).reshape(B, Hq)
        kept = (p * mk[:, :, None]).sum(-1).reshape(B, Hq)
        w = active.double()[:, None]
        # calibration: the heads whose exact set holds less of their true attention than the cut asked for (p2;
        # for dense and topk p2 does not apply: 0). The steady tokens count as read (they always are).
        if sp.attention == "doublep" and li >= sp.dense_layers:
            self.under[li] += ((kept_x < sp.p2).double() * w).sum(0)
        if self.needles is not None:
            nd = torch.zeros(B, Hkv, L, dtype=torch.bool, device=q.device)
            for b, pos in enumerate(self.needles):
                if pos is not None:
                    nd[b] = torch.isin(layer.pos[b, :, :L].long(), pos.to(q.device)) & live[b]
            self.needle_dense[li] += ((p * nd[:, :, None]).sum(-1).reshape(B, Hq) * w).sum(0)
            self.needle_kept[li] += ((p * (nd & mk)[:, :, None]).sum(-1).reshape(B, Hq) * w).sum(0)
        self.err[li] += (err * w).sum(0)
        self.mass[li] += (kept * w).sum(0)
        self.mass_x[li] += (kept_x * w).sum(0)
        self.mass_min[li] = torch.minimum(self.mass_min[li], kept.double().masked_fill(w == 0, 1).amin(0))
        self.n[li] += active.sum()

    def summary(self):
        n = self.n.clamp_min(1)[:, None].cpu()
        e, m, mx = self.err.cpu() / n, self.mass.cpu() / n, self.mass_x.cpu() / n
        nd = self.needle_dense.sum().item()
        return {
            "err": spread(e),
            "mass": spread(m),
            "mass_x": spread(mx),
            "mass_min": self.mass_min.min().item(),
            "under_p": (self.under.cpu() / n).mean().item(),
            "needle_mass": self.needle_kept.sum().item() / nd if nd > 0 else None,
            "err_layers": e.mean(1).tolist(),
            "mass_layers": m.mean(1).tolist(),
            "mass_x_layers": mx.mean(1).tolist(),
        }


@torch.inference_mode()
def teacher_force(eng, prompts, n, feed=None):
    """Prefill prompts into slots 0..B-1, then n decode steps (the loop of Engine._run_group) fed feed[:, t]
    (None: the model's own greedy tokens). Returns (tokens fed [B, n], log-probs of the steps [B, n, V])."""
    B = len(prompts)
    for b in range(B):
        eng.cache.reset(b)
    logits = eng.prefill(prompts, [0] * B)
    active = torch.ones(B, dtype=torch.bool, device=eng.device)
    fed, lps = [], []
    for t in range(n):
        tok = logits.argmax(-1) if feed is None else feed[:, t]
        fed.append(tok)
        logits = eng.decode_step(tok, active)
        lps.append(logits.float().log_softmax(-1))
        eng.cache.advance(range(B), active=active)
        if eng.cluster_enabled:
            eng.cache.cluster_pending(range(B))
    return torch.stack(fed, 1), torch.stack(lps, 1)


def use(eng, cfg):
    if eng.sparse != cfg:  # set_sparse drops the captured CUDA graphs: only when the method changes
        eng.set_sparse(cfg)
