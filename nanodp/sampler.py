"""Sampling: greedy at temperature 0, else temperature, top-k and an exact top-p (nucleus) cut, seeded."""

import math
import secrets
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick each new token. temperature 0 is greedy; repetition_penalty > 1 divides the positive logits
    (multiplies the negative ones) of every token already in the prompt or the output, as transformers does.
    A seed makes sampling reproducible for the same prompts in the same batches (the batch shares one
    generator, so another batch size or order draws differently)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: list = field(default_factory=list)  # stop strings (not included in the output)
    seed: int | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        def bad(field_, what):  # one message for the API and the CLI: it names both
            raise ValueError(f"{field_} (--{field_.replace('_', '-')}) must be {what}, got {getattr(self, field_)!r}")

        def num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not (num(self.temperature) and self.temperature >= 0):
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not (num(self.top_p) and 0 < self.top_p <= 1):
            bad("top_p", "in (0, 1] (1 = off)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            bad("top_k", "an integer >= 0 (0 = off)")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            bad("max_new_tokens", "an integer >= 1")
        if not (num(self.repetition_penalty) and self.repetition_penalty > 0):
            bad("repetition_penalty", "a number > 0 (1 = off)")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            bad("seed", "an integer in [0, 2**63)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings (--stop) must be non-empty strings")

    @classmethod
    def model_defaults(cls, model_dir, **fallback) -> tuple["SamplingParams", str]:
        """The sampling defaults of the model's generation_config.json (temperature, top_p, top_k,
        repetition_penalty, where it sets do_sample or a temperature), else `fallback`; and where they came from."""
        import json
        from pathlib import Path

        try:
            gc = json.loads((Path(model_dir) / "generation_config.json").read_text())
        except (OSError, ValueError):
            gc = {}
        keys = ("temperature", "top_p", "top_k", "repetition_penalty")
        own = (
            {k: gc[k] for k in keys if k in gc}
            if isinstance(gc, dict) and (gc.get("do_sample") or "temperature" in gc)
            else {}
        )
        if gc.get("do_sample") is False:
            own["temperature"] = 0.0
        if own:
            return cls(**(fallback | own)), "generation_config.json"
        return cls(**fallback), "nanodp's chat defaults"


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Repetition penalty over the tokens marked in seen [B, V] (transformers' rule)."""
    pen = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, pen, logits)


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p; removed tokens get -inf. logits [B, V] fp32."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        # Nucleus: the smallest prefix of the sorted distribution whose mass reaches top_p. A token is kept
        # iff the mass strictly before it is < top_p, so the token that crosses top_p is kept and none after.
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    """prompts: the token ids of each row (for the repetition penalty; not needed without one)."""

    def __init__(self, params: SamplingParams, device, prompts=None):
        self.p = params
        self.gen, self.seen = None, None
        if params.temperature > 0:
            self.gen = torch.Generator(device=device)
            # no seed: one of the generator's own (torch.seed() would reseed the caller's global RNG)
            self.gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        self.prompts, self.device = prompts, device

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.p.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
                for b, ids in enumerate(self.prompts or []):
                    self.seen[b, torch.tensor(ids, device=logits.device)] = True
            logits = penalize(logits.float(), self.seen, self.p.repetition_penalty)
        if self.p.temperature == 0:
            tok = logits.argmax(-1)
        else:
            probs = filter_logits(logits.float(), self.p).softmax(-1)
            tok = torch.multinomial(probs, 1, generator=self.gen).squeeze(-1)
        if self.seen is not None:
            self.seen[torch.arange(tok.shape[0], device=tok.device), tok] = True
        return tok
