"""Double-P decode: the twin against the definition, and the Triton kernels against the twin."""
import math
from dataclasses import dataclass

import pytest
import torch

from nanodp.kernels.doublep import group_scores, select_clusters, sparse_ref

KEYS = ("exact_tokens", "pseudo_tokens", "exact_clusters", "need_tokens", "fallback")


@dataclass
class Layer:
    k: torch.Tensor
    v: torch.Tensor
    centroids: torch.Tensor
    vmean: torch.Tensor
    logsize: torch.Tensor
    cstart: torch.Tensor
    ncl: torch.Tensor


def make_case(B=2, Hkv=2, g=4, d=64, lens=(200, 150), tail=(170, 0), sinks=4, dtype=torch.float32,
              style="skewed", max_size=32, needles=2, dup=0, seed=None, device="cpu"):
    """Random cache with contiguous clusters made directly: random sizes 1..max_size over
    [S, tail_start), centroid / vmean = exact member means, logsize = ln size. Slots past len / ncl
    hold NaN garbage (the kernels must never read them). style: "skewed" keys around a few directions
    the query aligns with, "flat" small random keys. `needles` tokens per head get key ~ 4*q/|q|.
    `dup` > 0 makes that many identical top clusters per head (planted ties)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    L = max(lens) + 5
    lens_t, ts_t = torch.tensor(lens, dtype=torch.int32), torch.tensor(tail, dtype=torch.int32)
    q = torch.randn(B, Hkv * g, d, generator=gen)
    if style == "skewed":
        dirs = torch.randn(B, Hkv, 6, d, generator=gen)
        k = dirs[:, :, torch.randint(0, 6, (L,), generator=gen)] * 1.5 + 0.5 * torch.randn(B, Hkv, L, d, generator=gen)
        q = q * 0.5 + dirs[:, :, :1].expand(B, Hkv, g, d).reshape(B, Hkv * g, d)
    else:
        k = 0.3 * torch.randn(B, Hkv, L, d, generator=gen)
    v = torch.randn(B, Hkv, L, d, generator=gen)
    sizes_all, ncl = [], torch.zeros(B, Hkv, dtype=torch.int32)
    for b in range(B):
        S = min(sinks, tail[b])
        for h in range(Hkv):
            sz = [3] * dup if tail[b] - S > 3 * dup else []
            n = tail[b] - S - sum(sz)
            while n > 0:
                sz.append(min(n, int(torch.randint(1, max_size + 1, (1,), generator=gen))))
                n -= sz[-1]
            if dup and sz[:dup] == [3] * dup:   # identical clusters (bitwise equal scores)
                qh = q[b, h * g:(h + 1) * g].mean(0)
                for c in range(dup):
                    k[b, h, S + 3 * c:S + 3 * c + 3] = 2 * qh / qh.norm() * d ** 0.25
                    v[b, h, S + 3 * c:S + 3 * c + 3] = v[b, h, S:S + 3]
            sizes_all.append((b, h, S, sz))
            ncl[b, h] = len(sz)
    for b in range(B):
        for h in range(Hkv):
            lo = min(sinks, tail[b]) + 3 * dup
            for _ in range(needles if tail[b] > lo else 0):
                j = int(torch.randint(lo, tail[b], (1,), generator=gen))
                qh = q[b, h * g + int(torch.randint(0, g, (1,), generator=gen))]
                k[b, h, j] = 4 * qh / qh.norm() * math.sqrt(d) ** 0.5
    k, v = k.to(dtype), v.to(dtype)
    C = int(ncl.max()) + 3
    nan = float("nan")
    cent = torch.full((B, Hkv, C, d), nan)
    vmean = torch.full((B, Hkv, C, d), nan)
    logsize = torch.full((B, Hkv, C), nan)
    cstart = torch.full((B, Hkv, C + 1), -12345, dtype=torch.int32)
    for b, h, S, sz in sizes_all:
        st = S
        for i, n in enumerate(sz):
            cent[b, h, i] = k[b, h, st:st + n].float().mean(0)
            vmean[b, h, i] = v[b, h, st:st + n].float().mean(0)
            logsize[b, h, i] = math.log(n)
            cstart[b, h, i] = st
            st += n
        cstart[b, h, len(sz)] = st
    for b in range(B):
        k[b, :, lens[b]:] = nan
        v[b, :, lens[b]:] = nan
    layer = Layer(k.to(device), v.to(device), cent.to(dtype).to(device), vmean.to(dtype).to(device),
                  logsize.to(device), cstart.to(device), ncl.to(device))
    return q.to(dtype).to(device), layer, lens_t.to(device), ts_t.to(device), sinks


def dense(q, layer, lens):
    """Plain softmax attention over every stored token."""
    B, Hq, d = q.shape
    Hkv, L = layer.k.shape[1], layer.k.shape[2]
    g = Hq // Hkv
    ok = torch.arange(L) < lens.long()[:, None, None]
    k = torch.where(ok[..., None], layer.k.float(), 0.0).repeat_interleave(g, 1)
    v = torch.where(ok[..., None], layer.v.float(), 0.0).repeat_interleave(g, 1)
    x = torch.einsum("bhd,bhld->bhl", q.float(), k) / math.sqrt(d)
    x = x.masked_fill(~ok, -math.inf)
    return torch.einsum("bhl,bhld->bhd", torch.softmax(x, -1), v)
