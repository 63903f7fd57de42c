"""Double-P decode attention: the torch twin (THE definition; docs/DESIGN.md "Double-P decode").
Config: nanodp.config.SparseConfig.

One decode step, per (sequence b, KV head); its g query heads h share one work list. Steady tokens
E = [0, S) u [tail_start, len), S = min(sinks, tail_start), are always attended exactly.

stage 1   z[h, i] = q_h . C_i * scale + ln s_i   (C_i centroid, s_i cluster size, scale = 1/sqrt(d), fp32)
          estimate="gauss" adds 1/2 sum_j (q_hj scale)^2 var_ij (var_ij: variance of dimension j of the members;
          if the member logits were Gaussian, ln mean e^x = mean + var/2). zc = the centroid z alone: the
          pseudo-token logit whatever the estimate.
          whole=True: x_hj = q_h . k_j * scale for the steady tokens joins the softmax:
            LSE_h = ln(sum_i e^{z_hi} + [whole] sum_{j in E} e^{x_hj}),  P_h[i] = e^{z_hi - LSE_h},
            steady share e_h = [whole] sum_{j in E} e^{x_hj - LSE_h}          (sum_i P_h[i] + e_h = 1)
ranking   a "unit" cuts one score distribution u over the clusters, with steady share S:
            mean   (KV head)    u_i = mean_h P_h[i],  S = mean_h e_h             (the paper's group rule)
            max    (KV head)    u_i = max_h P_h[i],   S = 0  (no whole)          (renormalised by the cut)
            union  (each head)  u_i = P_h[i],         S = e_h     (and the mean unit for floors and topk)
bins      reference R = the unit's ln max_h e^{M_h - LSE_h} (max, union) or ln mean_h e^{M_h - LSE_h} (mean),
          M_h = max_i z_hi: an upper bound of ln max_i u_i, exact for max and union, at most ln g above for mean.
          bin b_i = min(floor((R - ln u_i) * BINS_PER_NAT), NBINS - 1), clamped at 0: BINS_PER_NAT = 64 bins
          per nat (1/64 nat wide, u within 1.6% in a bin), NBINS = 1024 (16 nats); the last bin also holds
          every cluster further below. The cut counts clusters per bin, n_k, and weighs each by its bin's
          midpoint, H_k = n_k e^{R - (k + 1/2) / BINS_PER_NAT} (a cluster's weight is within 0.8% of its u_i;
          integer counts: a GPU histogram merges exactly); cum_k = H_0 + .. + H_k. (est_mass uses the exact u.)
cut       n(p) = the first bin where the steady + cluster mass reaches p of the whole:
            T = cum_{NBINS-1};  n(p) = -1 (keep none) if p <= 0 or S >= p (S + T);
                                       NBINS - 1 (all) if p >= 1;  else min(#{k: S + cum_k < p (S + T)}, NBINS-1)
          keep every cluster with b_i <= n(p): the boundary bin is kept WHOLE, so ties (equal scores share a
          bin) are always kept together and the result depends on no order. (The kernel: equal up to fp32
          rounding of the logits and of the sum over the bins.)
          exact  X = {b_i <= n(p2)}; pseudo A = {b_i <= n(p1)} minus X (one pseudo-token each: key C_i, value
          vmean_i, logit zc_i, i.e. s_i tokens sharing key C_i). union: X = U_h X_h, A = (U_h A_h u X_h) - X.
floor     doublep, floor / floor_frac: X also takes the mean unit's bins (for union too: per KV head, on
          G = mean_h P_h, not per query head, so the floor stays a per-KV-head budget) until they hold
          f = max(floor, floor_frac * the head's clustered tokens) tokens: n_f = -1 if f <= 0, else
          min(#{k: tok_k < f}, NBINS-1) (tok_k = cumulative tokens of the bins), and A gets X's clusters too.
topk      (RetroInfer-style; ranks by the mean unit, or max; whole is ignored) X = bins until their tokens reach
          `budget` (n_f with f = budget), then A = the next bins until the cluster count reaches |X| +
          est_clusters (cluster-count bins, same rule), minus X.
output    o = (sum_{j in E u X} e^{x_j} v_j + sum_{i in A} e^{zc_i} vmean_i) / (same without v).

Bytes stage 1 reads per (sequence, KV head), for nanodp/eval/metrics.py KVTally (es = bytes per element):
  per scored cluster (stats "scored_clusters" = ncl): centroid d*es + ln s 4 + cstart 4 (+ kvar d*es, gauss);
  whole: the keys of the steady tokens, d*es each (stats "steady_scored"); they are read again as exact tokens.
  attention: exact token 2 d es (K and V, stats "exact_tokens", steady included); pseudo-token vmean d es.
"""

import math
from typing import NamedTuple

import torch

# per (sequence, KV head) statistics, in the row order of the fp32 [len(STAT_KEYS), B, Hkv] `stats_out` buffer
STAT_KEYS = (
    "exact_tokens",
    "pseudo_tokens",
    "exact_clusters",
    "need_tokens",
    "est_mass",
    "scored_clusters",
    "steady_scored",
)
BINS_PER_NAT = 64  # fine bins per nat of log-score
NBINS = 1024  # fine bins; the last one holds everything below R - 16 nats


class Selection(NamedTuple):
    exact: torch.Tensor  # [B, Hkv, C] bool: clusters read exactly
    pseudo: torch.Tensor  # [B, Hkv, C] bool: clusters read as one pseudo-token
    tokens: torch.Tensor  # [B, Hkv, L] bool: tokens read exactly (steady + members of exact clusters)
    head_exact: torch.Tensor  # [B, Hkv, g, C] bool: each query head's own exact cut (union; else = exact)
    need: torch.Tensor  # [B, Hkv] exact clustered tokens asked for
    est_mass: torch.Tensor  # [B, Hkv] mean over the g heads of the estimated attention share kept
    zc: torch.Tensor  # [B, Hkv, g, C] centroid logits (the pseudo-token logits)
    steady: torch.Tensor  # [B, 1, L] bool


def stage1_logits(q, layer, estimate="centroid"):
    """(zc, z) [B, Hkv, g, C] fp32, -inf past ncl: zc = q.C scale + ln s and z = the estimate (zc for
    "centroid"), plus valid [B, Hkv, C]."""
    B, Hq, d = q.shape
    _, Hkv, C, _ = layer.centroids.shape
    g, scale = Hq // Hkv, 1.0 / math.sqrt(d)
    valid = torch.arange(C, device=q.device) < layer.ncl[..., None]  # [B, Hkv, C]
    qg = q.float().view(B, Hkv, g, d)
    cent = torch.where(valid[..., None], layer.centroids.float(), 0.0)  # slots past ncl may be garbage
    zc = torch.einsum("bhgd,bhcd->bhgc", qg, cent) * scale
    zc = (zc + layer.logsize.float()[:, :, None, :]).masked_fill(~valid[:, :, None, :], -math.inf)
    if estimate == "centroid":
        return zc, zc, valid
    var = torch.where(valid[..., None], layer.kvar.float(), 0.0)
    return zc, zc + 0.5 * scale * scale * torch.einsum("bhgd,bhcd->bhgc", qg * qg, var), valid


def steady_mask(lens, tail_start, sinks, L):
    t = torch.arange(L, device=lens.device)
    ts = tail_start.long()[:, None, None]
    return (t < ts.clamp(max=sinks)) | ((t >= ts) & (t < lens.long()[:, None, None]))  # [B, 1, L]


def unit_scores(q, layer, lens, tail_start, sinks, sp):
    """The ranking of the module docstring: (lu [B, Hkv, U, C] ln u (-inf past ncl), R [B, Hkv, U],
    S [B, Hkv, U], lP [B, Hkv, g, C] ln P_h, e [B, Hkv, g]). U = g units for union (then one more, the mean
    unit, last), else 1."""
    B, Hq, d = q.shape
    Hkv, L = layer.k.shape[1], layer.k.shape[2]
    g = Hq // Hkv
    _, z, valid = stage1_logits(q, layer, sp.estimate)
    lse = torch.logsumexp(z, -1)  # [B, Hkv, g]
    if sp.whole and sp.mode == "doublep":
        x = torch.einsum("bhgd,bhld->bhgl", q.float().view(B, Hkv, g, d), layer.k.float()) / math.sqrt(d)
        lseE = torch.logsumexp(x.masked_fill(~steady_mask(lens, tail_start, sinks, L)[:, :, None], -math.inf), -1)
        LSE = torch.logaddexp(lse, lseE)
        e = torch.exp(lseE - LSE).nan_to_num(0.0)
    else:
        LSE, e = lse, torch.zeros_like(lse)
    lP = (z - LSE[..., None]).masked_fill(~valid[:, :, None], -math.inf)  # ln P_h[i]; -inf past ncl
    top = z.amax(-1) - LSE  # ln max_i P_h[i]
    mean = (torch.logsumexp(lP, 2) - math.log(g), torch.logsumexp(top, 2) - math.log(g), e.mean(2))
    if sp.group_rule == "max":
        units = [(lP.amax(2), top.amax(2), torch.zeros_like(e[..., 0]))]
    else:
        units = [mean]
    if sp.group_rule == "union" and sp.mode == "doublep":
        units = [(lP[:, :, h], top[:, :, h], e[:, :, h]) for h in range(g)] + units
    lu, R, S = (torch.stack([u[k] for u in units], 2) for k in range(3))
    return lu.masked_fill(~valid[:, :, None], -math.inf), R.nan_to_num(0.0), S, lP, e


def bins_of(lu, R):
    """Fine bin of every cluster (NBINS past ncl, never kept)."""
    f = ((R[..., None] - lu) * BINS_PER_NAT).floor().clamp(0, NBINS - 1)
    return torch.where(torch.isfinite(lu), f, float(NBINS)).long()


def hist(bins, w):
    """Per unit: sum of w over the clusters of each fine bin, [..., NBINS]."""
    out = torch.zeros(*bins.shape[:-1], NBINS + 1, dtype=w.dtype, device=w.device)
    return out.scatter_add_(-1, bins, w)[..., :NBINS]


def cut(cum, target, base=0.0):
    """n = min(#{k: base + cum_k < target}, NBINS - 1), or -1 where base >= target (both per unit)."""
    n = ((base[..., None] if torch.is_tensor(base) else base) + cum < target[..., None]).sum(-1)
    return torch.where(target > base, n.clamp(max=NBINS - 1), -1)


def bin_weights(R):
    """H_k / n_k per unit: the midpoint score of each bin, [..., NBINS]."""
    k = torch.arange(NBINS, device=R.device, dtype=torch.float32)
    return torch.exp(R[..., None] - (k + 0.5) / BINS_PER_NAT)


def mass_cuts(lu, R, S, p):
    """n(p) per unit (the cut of the module docstring), with the cumulative fractions for tests."""
    b = bins_of(lu, R)
    cum = (hist(b, torch.ones_like(b)).float() * bin_weights(R)).cumsum(-1)
    tot = S + cum[..., -1]
    if p >= 1:
        return torch.full_like(S, NBINS - 1, dtype=torch.long), (S[..., None] + cum) / tot[..., None]
    return cut(cum, p * tot, S), (S[..., None] + cum) / tot[..., None]


def select_ref(q, layer, lens, tail_start, sinks, sp) -> Selection:
    """The selection of one decode step (module docstring), as masks; used by sparse_ref and the evaluation."""
    B, Hq, d = q.shape
    Hkv, L = layer.k.shape[1], layer.k.shape[2]
    g = Hq // Hkv
    zc, _, valid = stage1_logits(q, layer, "centroid")
    lu, R, S, lP, e = unit_scores(q, layer, lens, tail_start, sinks, sp)
    b = bins_of(lu, R)  # [B, Hkv, U, C]
    cst = layer.cstart.long()
    sizes = torch.where(valid, cst[..., 1:] - cst[..., :-1], 0)
    if sp.mode == "doublep":
        n2, _ = mass_cuts(lu, R, S, sp.p2)
        n1, _ = mass_cuts(lu, R, S, sp.p1)
        own = b <= n2[..., None]  # each unit's own exact cut
        ex = own[:, :, :g].any(2) if sp.group_rule == "union" else own[:, :, 0]
        kept = (b <= n1[..., None])[:, :, :g].any(2) if sp.group_rule == "union" else b[:, :, 0] <= n1[..., 0, None]
        if sp.floor > 0 or sp.floor_frac > 0:  # on the last unit (mean or max)
            f = (sizes.sum(-1).float() * float(sp.floor_frac)).clamp_min(float(sp.floor))
            nf = cut(hist(b[:, :, -1], sizes).float().cumsum(-1), f)
            ex = ex | (b[:, :, -1] <= nf[..., None])
        head_exact = own[:, :, :g] if sp.group_rule == "union" else ex[:, :, None].expand(-1, -1, g, -1)
    else:
        bu = b[:, :, -1]
        n2 = cut(hist(bu, sizes).float().cumsum(-1), torch.full((B, Hkv), float(sp.budget), device=q.device))
        ex = bu <= n2[..., None]
        n1 = cut(hist(bu, valid.long()).float().cumsum(-1), (ex.sum(-1) + sp.est_clusters).float())
        kept = bu <= n1[..., None]
        head_exact = ex[:, :, None].expand(-1, -1, g, -1)
    ex, kept = ex & valid, (kept | ex) & valid
    need = (sizes * ex).sum(-1)
    ps = kept & ~ex
    # token mask over storage: steady tokens, plus the ranges [cstart_i, cstart_i+1) of exact clusters
    steady = steady_mask(lens, tail_start, sinks, L)
    diff = torch.zeros(B, Hkv, L + 1, device=q.device)  # difference array, cumsum = coverage
    diff.scatter_add_(-1, cst[..., :-1].clamp(0, L), ex.float())
    diff.scatter_add_(-1, cst[..., 1:].clamp(0, L), -ex.float())
    tok = steady | (diff.cumsum(-1)[..., :L] > 0.5)
    # estimated share kept, per head: its P mass over the kept clusters (+ its steady share), averaged
    mass = (lP.exp() * (ex | ps)[:, :, None]).sum(-1) + e
    return Selection(ex, ps, tok, head_exact, need, mass.mean(-1), zc, steady)


def sparse_ref(q, layer, lens, tail_start, sinks, sp, stats_out=None):
    """Double-P decode attention. q [B, Hq, d]; layer: k, v [B, Hkv, L, d], centroids, vmean [B, Hkv, C, d],
    logsize [B, Hkv, C], cstart [B, Hkv, C+1], ncl [B, Hkv] (kvar [B, Hkv, C, d] for estimate="gauss");
    lens, tail_start [B] int32; sp a SparseConfig. Returns (o [B, Hq, d] in q.dtype, stats: dict of [B, Hkv]
    tensors, see STAT_KEYS; also written, as fp32 rows, into `stats_out` [len(STAT_KEYS), B, Hkv] if given)."""
    B, Hq, d = q.shape
    Hkv, L = layer.k.shape[1], layer.k.shape[2]
    g = Hq // Hkv
    s = select_ref(q, layer, lens, tail_start, sinks, sp)
    # one softmax over exact tokens and pseudo-tokens (logit zc: it weighs vmean_i like s_i tokens of key C_i)
    qg = q.float().view(B, Hkv, g, d)
    x_tok = torch.einsum("bhgd,bhld->bhgl", qg, layer.k.float()) / math.sqrt(d)
    x_tok = x_tok.masked_fill(~s.tokens[:, :, None, :], -math.inf)
    x_ps = s.zc.masked_fill(~s.pseudo[:, :, None, :], -math.inf)
    w = torch.softmax(torch.cat([x_tok, x_ps], dim=-1), dim=-1)
    v = torch.where(s.tokens[..., None], layer.v.float(), 0.0)  # unused slots may hold garbage
    vm = torch.where(s.pseudo[..., None], layer.vmean.float(), 0.0)
    o = torch.einsum("bhgl,bhld->bhgd", w[..., :L], v) + torch.einsum("bhgc,bhcd->bhgd", w[..., L:], vm)
    whole = sp.whole and sp.mode == "doublep"
    stats = {
        "exact_tokens": s.tokens.sum(-1).int(),  # tokens read exactly, steady included
        "pseudo_tokens": s.pseudo.sum(-1).int(),  # pseudo-tokens (one per cluster)
        "exact_clusters": s.exact.sum(-1).int(),
        "need_tokens": s.need.int(),  # exact clustered tokens asked for
        "est_mass": s.est_mass,  # estimated attention share kept
        "scored_clusters": layer.ncl.int().clone(),  # clusters stage 1 scored
        "steady_scored": (s.steady.sum(-1).expand(B, Hkv) * whole).int(),  # steady keys stage 1 read
    }
    if stats_out is not None:
        for i, key in enumerate(STAT_KEYS):
            stats_out[i].copy_(stats[key])
    return o.reshape(B, Hq, d).to(q.dtype), stats
