"""Llama, wired from small layers with Hugging Face parameter names (so checkpoints load without renaming).

After loading, `fuse_projections()` concatenates q/k/v and gate/up into one GEMM each. The elementwise work
between the GEMMs runs as fused kernels chosen by the forward context `ctx` (nanodp/attention.py: Triton on
CUDA, torch twins on CPU): residual add + RMSNorm, SiLU * up, and, inside `ctx.attend`, RoPE + the KV-cache
store. The residual stream is carried beside the activations so each add fuses into the next norm.

Precision (docs/INTERNALS.md "Precision", scripts/precision.py): weights, GEMM inputs and outputs and the KV
cache are in the model dtype; the residual stream, RoPE's cos/sin and the logits are fp32, and the fused ops
round once. In bf16 that halves the logit error against fp32 compared with Hugging Face's bf16 path, which rounds
the residual stream (the largest single loss), the normalised row before its weight, cos/sin and the logits.
Under tensor parallelism (nanodp/parallel.py) every rank builds its layers at its own sizes: its query and KV heads,
its MLP units and lm_head rows; o_proj and down_proj outputs are all-reduced and the logits all-gathered.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import parallel
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual, ctx):
        """r = x + residual (x alone when residual is None); returns (w * r / sqrt(mean(r^2) + eps), r), with r in
        fp32 and the output in x's dtype, rounded once (kernels/fused.py add_rmsnorm_ref)."""
        return ctx.ops.add_rmsnorm(x, residual, self.weight, self.eps)


def rope_tables(cfg: ModelConfig):
    """Inverse frequencies and the attention (cos/sin) factor for RoPE, as Hugging Face defines them."""
    d, base = cfg.head_dim, cfg.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = cfg.rope_scaling or {}
    kind, factor, attn = rs.get("rope_type", rs.get("type", "default")), rs.get("factor", 1.0), 1.0
    if kind == "linear":
        inv = inv / factor
    elif kind == "llama3":
        # Long wavelengths are slowed down by `factor`, short ones kept, and the band between is blended.
        old = rs["original_max_position_embeddings"]
        lo, hi = old / rs.get("low_freq_factor", 1.0), old / rs.get("high_freq_factor", 4.0)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo, inv / factor, inv)
        smooth = (old / wavelen - rs.get("low_freq_factor", 1.0)) / (
            rs.get("high_freq_factor", 4.0) - rs.get("low_freq_factor", 1.0)
        )
        mid = (wavelen >= hi) & (wavelen <= lo)
        inv = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif kind == "yarn":
        # YaRN: interpolate the low frequencies, keep the high ones, ramp between; scale logits by mscale.
        old = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
        mscale = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0  # noqa: E731
        attn = rs.get("attention_factor") or (
            mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
            if rs.get("mscale") and rs.get("mscale_all_dim")
            else mscale(factor)
        )
        corr = lambda rot: d * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
        lo, hi = corr(rs.get("beta_fast") or 32), corr(rs.get("beta_slow") or 1)
        if rs.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        extrap = 1 - ramp
        inv = (inv / factor) * (1 - extrap) + inv * extrap
    return inv.float(), float(attn)


class Rope:
    """cos/sin tables indexed by position; q and k are rotated in halves (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)
    (kernels/fused.py rope_ref)."""

    def __init__(self, cfg: ModelConfig, device):
        self.inv_freq, self.scale = rope_tables(cfg)
        self.inv_freq = self.inv_freq.to(device)
        self.device = device

    def cos_sin(self, positions):
        """fp32 tables [..., d] (rounding them to bf16, as Hugging Face does, costs accuracy for nothing: the RoPE
        kernel computes in fp32)."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # [..., d/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.scale != 1.0:  # YaRN's attention factor (skipped otherwise: two launches per decode step)
            cos, sin = cos * self.scale, sin * self.scale
        return cos, sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        tp = parallel.world_size()  # this rank's heads (all of them on one rank)
        self.layer_idx, self.d = layer_idx, cfg.head_dim
        self.hq, self.hkv = cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp
        self.q_proj = nn.Linear(cfg.hidden_size, self.hq * self.d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.hq * self.d, cfg.hidden_size, bias=False)

    def fuse(self):
        self.qkv_proj = _cat_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, ctx):
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, self.hq + 2 * self.hkv, self.d)
        q, k, v = qkv.split([self.hq, self.hkv, self.hkv], dim=2)  # views, pre-RoPE
        o = ctx.attend(self.layer_idx, q, k, v, cos, sin)  # rotates q, k; stores k, v; [B, T, Hq, d]
        return parallel.all_reduce(self.o_proj(o.reshape(B, T, self.hq * self.d)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        units = parallel.part(cfg.intermediate_size)  # this rank's MLP units
        self.gate_proj = nn.Linear(cfg.hidden_size, units, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, units, bias=False)
        self.down_proj = nn.Linear(units, cfg.hidden_size, bias=False)

    def fuse(self):
        self.gate_up_proj = _cat_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x, ctx):  # SwiGLU: down(silu(gate x) * up x)
        return parallel.all_reduce(self.down_proj(ctx.ops.silu_mul(self.gate_up_proj(x))))


def _cat_linear(*linears):
    """One bias-free Linear whose output is the concatenation of the given ones' outputs."""
    w = torch.cat([lin.weight for lin in linears])
    with torch.device("meta"):
        fused = nn.Linear(w.shape[1], w.shape[0], bias=False)
    fused.weight = nn.Parameter(w, requires_grad=False)
    return fused


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos, sin, ctx):
        """x: the previous block's output (layer 0: the embeddings), not yet added to `residual`, the residual
        stream (fp32; None at layer 0). Returns this layer's (MLP output, residual stream)."""
        h, residual = self.input_layernorm(x, residual, ctx)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, ctx), residual, ctx)
        return self.mlp(h, ctx), residual


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        parallel.check(cfg)
        self.cfg = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, parallel.vocab_part(cfg.vocab_size), bias=False)
        self.rope = None  # set by the loader once the device is known

    def fuse_projections(self):
        """q/k/v -> qkv_proj and gate/up -> gate_up_proj, one GEMM each (the loader calls this). Layer by layer,
        dropping the originals, so at most one layer's projections exist twice."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def forward(self, input_ids, positions, ctx, last_index=None):
        """input_ids, positions [B, T] -> logits [B, V] of position `last_index[b]` (default: the last)."""
        x, residual = self.model.embed_tokens(input_ids), None
        cos, sin = self.rope.cos_sin(positions)
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, ctx)
        if last_index is None:
            x, residual = x[:, -1], residual[:, -1]
        else:  # LM head on one position per sequence only
            rows = torch.arange(x.shape[0], device=x.device)
            x, residual = x[rows, last_index], residual[rows, last_index]
        logits = logits_fp32(self.model.norm(x, residual, ctx)[0], self.lm_head.weight)
        return parallel.gather_vocab(logits, self.cfg.vocab_size)


_MM_OUT_DTYPE = [hasattr(torch.ops.aten.mm, "dtype")]  # torch.mm(..., out_dtype=) (CUDA, torch >= 2.8)


def logits_fp32(h, weight):
    """h @ weight.T as fp32, never rounded to 16 bits: bf16 logits near 25 are 0.125 apart, so a near tie would
    become an exact one. CUDA: one 16-bit GEMM with an fp32 output (a torch without it: the 16-bit logits, as
    upcasting the vocabulary-sized weight every step would cost more than the head itself); CPU: upcast operands."""
    if h.dtype == torch.float32:
        return F.linear(h, weight)
    h2 = h.reshape(-1, h.shape[-1])
    if h.is_cuda:
        if _MM_OUT_DTYPE[0]:
            try:
                return torch.mm(h2, weight.t(), out_dtype=torch.float32).view(*h.shape[:-1], -1)
            except (RuntimeError, TypeError):  # this build has no CUDA kernel for it (found in the eager warm-up)
                _MM_OUT_DTYPE[0] = False
        return F.linear(h, weight).float()
    return F.linear(h2.float(), weight.float()).view(*h.shape[:-1], -1)
