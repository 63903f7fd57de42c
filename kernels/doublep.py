"""Double-P decode attention: the torch twin (the definition; DESIGN.md section 6).

One decode step, per (sequence b, KV head). The g query heads of a KV group share one selection.

  stage 1   z[h, i] = q_h . C_i * sm_scale + ln s_i            (C_i centroid, s_i cluster size)
            estimate="gauss" adds  1/2 sum_j (q_hj sm_scale)^2 var_ij   (var_ij: variance of dimension j
            of the member keys). z estimates ln sum_{k in i} e^{q.k sm_scale}: the centroid term alone is
            Jensen's lower bound, exact only when all members are equal; if the logits of the members were
            Gaussian, the mean of e^x would be e^{mean + var/2}, and with independent dimensions
            var(q.k) = sum_j q_j^2 var_ij. It lifts clusters that hide one key far above their mean (the
            needle of a copy head) and is exact for clusters of one token (var = 0).
            P_h = softmax_i z[h, :]   over the ncl clusters    (fp32)
            G_i = mean_h P_h[i]                                ("mean", the paper's rule)
                = max_h P_h[i] / sum_j max_h P_h[j]            ("max": ranked by the largest head,
                                                                renormalised so the cut is a fraction)
  cuts      sort G descending, cumulative sum c_k (c_0 = 0); n(p) = min{k: c_k >= p}, = ncl if never
            reached; p <= 0 gives 0 clusters, p >= 1 all of them. The cut keeps EVERY cluster whose
            score is >= the score at rank n (ties at the cut are all kept), so the result does not
            depend on the sort order. Equivalently t(p) = max{v : sum(G_i for G_i >= v) >= p}, which is
            how the kernel finds it (a bisection, no sort).
            exact  X = {i: G_i >= t(p2)}             every token of these clusters is attended
            pseudo A = {i: G_i >= t(p1)} minus X     one pseudo-token each: key C_i, value vmean_i,
                                                     logit bias ln s_i (s_i tokens sharing key C_i)
  output    one softmax over steady tokens E = [0, S) u [tail_start, len) (S = min(sinks, tail_start)),
            the tokens of X and the pseudo-tokens of A:
            o = (sum_{j in E,X} e^{x_j} v_j + sum_{i in A} s_i e^{xbar_i} vmean_i) / (same without v)
            pseudo_bias="centroid" (default): a pseudo-token's logit is the centroid z (ln s + q.C sm_scale)
            whatever the estimate; "estimate": the selection's z (with the gauss term). The gauss term counts
            the extra mass of the members far above the mean, but the pseudo value is the plain mean vmean_i,
            not those members' values, so weighting vmean_i by it moves the output towards the wrong value.
floor, floor_frac (doublep): X also takes the top clusters by rank until they hold
  f = max(floor, floor_frac * the head's clustered tokens) tokens (as topk with budget = f, f in fp32), so no
  head reads fewer exact clustered tokens than a fixed budget would: t(p2) becomes min(t(p2), t_floor) and
  t(p1) at most that (the Triton select kernel: a third search, on cluster sizes).
mode="topk" (RetroInfer-style baseline): the same ranking; X = the top clusters until their token count
  reaches `budget` (the crossing cluster included, ties at the cut kept; steady tokens not counted),
  A = the next `est_clusters` clusters by rank (the estimation zone).
capacity: the most exact clustered tokens one (b, KV head) work list holds. A head whose X needs more
  falls back to dense attention over all its tokens [0, len) (stats["fallback"] = True): never a
  silently truncated selection.
"""
import math

import torch

# per (sequence, KV head) statistics, in the row order of the fp32 [len(STAT_KEYS), B, Hkv] `stats_out` buffer
STAT_KEYS = ("exact_tokens", "pseudo_tokens", "exact_clusters", "need_tokens", "est_mass", "fallback")


ESTIMATES = ("centroid", "gauss")


def stage1_logits(q, layer, sm_scale=None, estimate="centroid"):
    """(zc, z) [B, Hkv, g, C] fp32, -inf past ncl: zc = q.C sm_scale + ln s (the centroid estimate) and z =
    the estimate asked for (zc itself for "centroid"), plus valid [B, Hkv, C]."""
    B, Hq, d = q.shape
    _, Hkv, C, _ = layer.centroids.shape
    g = Hq // Hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {ESTIMATES}, not {estimate!r}")
    valid = torch.arange(C, device=q.device) < layer.ncl[..., None]                     # [B, Hkv, C]
    qg = q.float().view(B, Hkv, g, d)
    cent = torch.where(valid[..., None], layer.centroids.float(), 0.0)   # slots past ncl may be garbage
    zc = torch.einsum("bhgd,bhcd->bhgc", qg, cent) * scale
    zc = (zc + layer.logsize.float()[:, :, None, :]).masked_fill(~valid[:, :, None, :], -math.inf)
    if estimate == "centroid":
        return zc, zc, valid
    var = torch.where(valid[..., None], layer.kvar.float(), 0.0)
    return zc, zc + 0.5 * scale * scale * torch.einsum("bhgd,bhcd->bhgc", qg * qg, var), valid


def group_scores(q, layer, sm_scale=None, group_rule="mean", estimate="centroid"):
    """Stage 1. Returns z [B, Hkv, g, C] (fp32 logits of the estimate, -inf past ncl), G [B, Hkv, C]
    (group distribution, -1 past ncl so invalid clusters sort last and never pass a threshold >= 0), valid."""
    _, z, valid = stage1_logits(q, layer, sm_scale, estimate)
    return z, _group(z, valid, group_rule), valid


def _group(z, valid, group_rule):
    """Per-head softmax over clusters, then the group distribution G (see group_scores)."""
    P = torch.softmax(z, dim=-1).nan_to_num(0.0)                          # ncl = 0: all -inf -> 0
    if group_rule == "mean":
        G = P.mean(dim=2)
    elif group_rule == "max":
        G = P.amax(dim=2)
        G = G / G.sum(-1, keepdim=True).clamp_min(1e-30)
    else:
        raise ValueError(f"group_rule must be 'mean' or 'max', not {group_rule!r}")
    return G.masked_fill(~valid, -1.0)


def _rank_of_cut(cum, target, nvalid):
    """n = min{k >= 0: c_k >= target} with c_0 = 0 (c = cum along the last axis, non-decreasing),
    clamped to nvalid when the target is never reached. target: a number, or one per row [...]."""
    target = torch.as_tensor(target, device=cum.device)
    n = (cum < target[..., None]).sum(-1) + (target > 0).long()
    return torch.minimum(n, nvalid)


def _score_at(Gs, n):
    """The score at rank n (1-based) in the descending order; n = 0 gives +inf (keep nothing)."""
    t = Gs.gather(-1, (n - 1).clamp_min(0)[..., None])[..., 0]
    return torch.where(n > 0, t, torch.full_like(t, math.inf))


def _p_target(p):
    return math.inf if p >= 1 else float(p)       # p >= 1: never reached, so every cluster is kept


def select_clusters(G, valid, sizes, p1, p2, mode="doublep", budget=None, est_clusters=0, floor=0, floor_frac=0.0):
    """The two cuts: (exact, pseudo) bool [B, Hkv, C] and the thresholds (t1, t2) [B, Hkv]."""
    Gs, order = G.sort(dim=-1, descending=True)
    nvalid = valid.sum(-1)
    if mode == "doublep":
        cum = Gs.clamp_min(0).cumsum(-1)                 # one cumulative sum gives both cuts
        t2 = _score_at(Gs, _rank_of_cut(cum, _p_target(p2), nvalid))
        t1 = _score_at(Gs, _rank_of_cut(cum, _p_target(p1), nvalid))
        if floor > 0 or floor_frac > 0:                  # at least f exact tokens, by rank
            f = (sizes.sum(-1).float() * float(floor_frac)).clamp_min(float(floor))
            tf = _score_at(Gs, _rank_of_cut(sizes.gather(-1, order).cumsum(-1), f, nvalid))
            t2 = torch.minimum(t2, tf)
            t1 = torch.minimum(t1, t2)
    elif mode == "topk":
        if budget is None:
            raise ValueError("mode='topk' needs a token budget")
        cum = sizes.gather(-1, order).cumsum(-1)         # tokens taken so far, in rank order
        t2 = _score_at(Gs, _rank_of_cut(cum, int(budget), nvalid))
        m2 = (G >= t2[..., None]).sum(-1)                # exact clusters, ties at the cut included
        t1 = _score_at(Gs, torch.minimum(m2 + int(est_clusters), nvalid))
    else:
        raise ValueError(f"mode must be 'doublep' or 'topk', not {mode!r}")
    exact = valid & (G >= t2[..., None])
    pseudo = valid & (G >= t1[..., None]) & ~exact
    return exact, pseudo, t1, t2


def sparse_ref(q, layer, lens, tail_start, sinks, p1, p2, group_rule="mean", mode="doublep",
               budget=None, est_clusters=0, capacity=None, sm_scale=None, estimate="centroid",
               pseudo_bias="centroid", stats_out=None, floor=0, floor_frac=0.0):
    """Double-P decode attention. q [B, Hq, d]; layer: k, v [B, Hkv, L, d], centroids, vmean
    [B, Hkv, C, d], logsize [B, Hkv, C], cstart [B, Hkv, C+1], ncl [B, Hkv] (kvar [B, Hkv, C, d] for
    estimate="gauss"); lens, tail_start [B] int32.
    Returns (o [B, Hq, d] in q.dtype, stats: dict of [B, Hkv] tensors, see STAT_KEYS;
    also written, as fp32 rows, into `stats_out` [len(STAT_KEYS), B, Hkv] if given)."""
    B, Hq, d = q.shape
    _, Hkv, L, _ = layer.k.shape
    g = Hq // Hkv
    dev = q.device
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    cap = L if capacity is None else int(capacity)

    if pseudo_bias not in ("centroid", "estimate"):
        raise ValueError(f"pseudo_bias must be 'centroid' or 'estimate', not {pseudo_bias!r}")
    zc, z, valid = stage1_logits(q, layer, scale, estimate)
    G = _group(z, valid, group_rule)
    cst = layer.cstart.long()
    sizes = torch.where(valid, cst[..., 1:] - cst[..., :-1], 0)
    exact, pseudo, _, _ = select_clusters(G, valid, sizes, p1, p2, mode, budget, est_clusters, floor, floor_frac)

    # capacity check: too many exact clustered tokens -> this head attends densely
    need = (sizes * exact).sum(-1)
    fallback = need > cap
    exact = torch.where(fallback[..., None], valid, exact)
    pseudo = pseudo & ~fallback[..., None]

    # token mask over storage: steady tokens, plus the ranges [cstart_i, cstart_i+1) of exact clusters
    t = torch.arange(L, device=dev)
    lens_, ts = lens.long()[:, None, None], tail_start.long()[:, None, None]
    S = ts.clamp(max=sinks)
    steady = (t < S) | ((t >= ts) & (t < lens_))                                          # [B, 1, L]
    diff = torch.zeros(B, Hkv, L + 1, device=dev)                 # difference array, cumsum = coverage
    diff.scatter_add_(-1, cst[..., :-1].clamp(0, L), exact.float())
    diff.scatter_add_(-1, cst[..., 1:].clamp(0, L), -exact.float())
    member = diff.cumsum(-1)[..., :L] > 0.5
    tok = steady | member
    tok = torch.where(fallback[..., None], t < lens_, tok)                              # [B, Hkv, L]

    # one softmax over exact tokens and pseudo-tokens. A pseudo-token's logit is its stage-1 score
    # zc = q.C*scale + ln s: the bias ln s makes it weigh like s tokens that all have key C_i
    # (pseudo_bias="estimate": the selection's z, see the module docstring).
    qg = q.float().view(B, Hkv, g, d)
    x_tok = torch.einsum("bhgd,bhld->bhgl", qg, layer.k.float()) * scale
    x_tok = x_tok.masked_fill(~tok[:, :, None, :], -math.inf)
    x_ps = (z if pseudo_bias == "estimate" else zc).masked_fill(~pseudo[:, :, None, :], -math.inf)
    w = torch.softmax(torch.cat([x_tok, x_ps], dim=-1), dim=-1)
    v = torch.where(tok[..., None], layer.v.float(), 0.0)           # unused slots may hold garbage
    vm = torch.where(pseudo[..., None], layer.vmean.float(), 0.0)
    o = torch.einsum("bhgl,bhld->bhgd", w[..., :L], v) + torch.einsum("bhgc,bhcd->bhgd", w[..., L:], vm)

    kept = exact | pseudo
    stats = {
        "exact_tokens": tok.sum(-1).int(),                       # tokens read exactly, steady included
        "pseudo_tokens": pseudo.sum(-1).int(),                   # pseudo-tokens (one per cluster)
        "est_mass": torch.where(kept, G, 0.0).sum(-1),           # group-score mass of kept clusters
        "fallback": fallback,                                    # this head attended densely
        "exact_clusters": exact.sum(-1).int(),
        "need_tokens": need.int(),                               # exact clustered tokens asked for
    }
    if stats_out is not None:
        for i, key in enumerate(STAT_KEYS):
            stats_out[i].copy_(stats[key])
    return o.reshape(B, Hq, d).to(q.dtype), stats


def sparse_triton(*args, **kwargs):
    """The Triton version (kernels/doublep_attn.py), same signature; imported lazily so that the twin
    works where Triton is not installed."""
    from .doublep_attn import sparse_triton as _impl
    return _impl(*args, **kwargs)
