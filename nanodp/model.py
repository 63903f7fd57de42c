"""Llama, wired from small layers with Hugging Face parameter names (so checkpoints load without renaming).

Attention itself is not here: each layer hands its post-RoPE q, k, v to an attention context
(nanodp/attention.py) that stores k, v in the KV cache and runs the selected backend.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 like Hugging Face
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rope:
    """cos/sin tables indexed by position; q and k are rotated in halves (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""

    def __init__(self, cfg: ModelConfig, device):
        self.inv_freq, self.scale = rope_tables(cfg)
        self.inv_freq = self.inv_freq.to(device)
        self.device = device

    def cos_sin(self, positions, dtype):
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # [..., d/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)

    @staticmethod
    def apply(x, cos, sin):  # x [B, T, H, d]; cos/sin [B, T, d]
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return x * cos[:, :, None] + rotated * sin[:, :, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.hq, self.hkv, self.d = layer_idx, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.hq * self.d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.hq * self.d, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, ctx):
        B, T, _ = x.shape
        q = Rope.apply(self.q_proj(x).view(B, T, self.hq, self.d), cos, sin)
        k = Rope.apply(self.k_proj(x).view(B, T, self.hkv, self.d), cos, sin)
        v = self.v_proj(x).view(B, T, self.hkv, self.d)
        o = ctx.attend(self.layer_idx, q, k, v)  # [B, T, Hq, d]
        return self.o_proj(o.reshape(B, T, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, ctx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = None  # set by the loader once the device is known

    def forward(self, input_ids, positions, ctx, last_index=None):
        """input_ids, positions [B, T] -> logits [B, V] of position `last_index[b]` (default: the last)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, ctx)
        if last_index is None:
            x = x[:, -1]
        else:  # LM head on one position per sequence only
            x = x[torch.arange(x.shape[0], device=x.device), last_index]
        return self.lm_head(self.model.norm(x)).float()
