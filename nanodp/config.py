"""Configs as self-validating dataclasses: the model (from config.json) and the sparse-decode knobs."""

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A config value a user can fix; the message says which and why."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list = field(default_factory=list)
    torch_dtype: str = "float32"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("default", "llama3", "linear", "yarn"):
                raise ConfigError(
                    f"config.json: rope_scaling type {kind!r} is not supported (supported: llama3, linear, yarn)"
                )
            if kind != "default" and not self.rope_scaling.get("factor", 0) > 0:
                raise ConfigError("config.json: rope_scaling.factor must be positive")

    @property
    def group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        archs = d.get("architectures") or []
        if d.get("model_type") not in (None, "llama") or (archs and "LlamaForCausalLM" not in archs):
            raise ConfigError(
                f"unsupported architecture {archs or d.get('model_type')!r}: nanodp runs "
                "LlamaForCausalLM checkpoints only (Llama 2/3, SmolLM, TinyLlama, ...)"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ConfigError(f"config.json lacks {key!r}")
        eos = d.get("eos_token_id")
        eos = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
        rope = d.get("rope_scaling") or d.get("rope_parameters")  # transformers 5 writes rope_parameters
        theta = d.get("rope_theta", (rope or {}).get("rope_theta", 10000.0))
        if rope is not None and rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = None
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=rope,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
        )

    @classmethod
    def from_dir(cls, model_dir) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(
                f"{path} is missing: a model folder needs config.json, *.safetensors and "
                "tokenizer.json (see weights/README.md)"
            )
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object, not a {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{e} ({path})" if str(path) not in str(e) else str(e)) from None

    def with_yarn(self, factor: float) -> "ModelConfig":
        """Extend the context `factor` times with YaRN (run-time option, docs/DESIGN.md "Models")."""
        if not factor > 1:
            raise ConfigError(f"--yarn factor must be > 1, got {factor}")
        if self.rope_scaling is not None:
            raise ConfigError("this model already has rope_scaling; --yarn applies to unscaled models only")
        d = dict(self.__dict__)
        d["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": self.max_position_embeddings,
        }
        d["max_position_embeddings"] = int(self.max_position_embeddings * factor)
        return ModelConfig(**d)


@dataclass
class ClusterConfig:
    sinks: int = 4  # first tokens, always attended exactly
    window: int = 64  # newest tokens, always attended exactly
    cluster_size: int = 16  # about this many tokens per cluster (k = n // cluster_size)
    kmeans_iters: int = 6  # rounds of k-means (6 scored as 10 on the development seed: docs/RESULTS.md)
    segment_len: int = 8192  # k-means runs on segments of this many consecutive tokens
    recluster_every: int = 256  # cluster the oldest tail tokens once this many lie beyond the window

    def __post_init__(self):
        for name, low in (
            ("sinks", 0),
            ("window", 0),
            ("cluster_size", 1),
            ("kmeans_iters", 1),
            ("segment_len", 1),
            ("recluster_every", 1),
        ):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"ClusterConfig.{name} must be an int, got {val!r}")
            if val < low:
                raise ConfigError(f"ClusterConfig.{name} must be >= {low}, got {val}")
        for name in ("segment_len", "recluster_every"):
            if getattr(self, name) < self.cluster_size:
                raise ConfigError(
                    f"ClusterConfig.{name} ({getattr(self, name)}) must be >= cluster_size "
                    f"({self.cluster_size}): a segment must hold at least one cluster"
                )


@dataclass
class SparseConfig:
    """Decode attention: `dense`, `doublep` (two top-p cuts, docs/DESIGN.md), `topk` (fixed budget) or `auto`
    (Double-P where nanodp/auto.py's measured table says it is faster, dense elsewhere).
    kernels/doublep.py (the twin) defines every field's meaning; validated here once, not in the kernels.

    The Double-P defaults are the pick of nanodp's own evaluation on its development seed 1 (docs/RESULTS.md,
    "Accuracy"): the paper's p1=0.95, p2=0.7 and group mean, the gauss stage-1 estimate, plus a per-head floor of
    15% of the clustered tokens. The paper's setting as is: estimate="centroid", floor_frac=0. The default
    attention stays `dense`: Double-P is slower than dense on the default model at every measured batch size.
    """

    attention: str = "dense"
    p1: float = 0.95
    p2: float = 0.7
    group_rule: str = "mean"  # mean (the paper's), max, or union (each query head cuts its own P_h)
    whole: bool = False  # doublep: the steady tokens join stage 1's softmax (the whole-attention cut)
    budget: int = 1024  # topk: exact clustered tokens per (sequence, KV head)
    est_clusters: int = 0  # topk: clusters after the budget kept as pseudo-tokens (RetroInfer's zone)
    dense_layers: int = 0  # the first N layers always decode densely
    estimate: str = "gauss"  # stage-1 cluster mass: centroid (the paper's) or gauss (+ variance term)
    floor: int = 0  # doublep: at least this many exact clustered tokens per head, by rank ...
    floor_frac: float = 0.15  # ... and at least this fraction of the head's clustered tokens

    def __post_init__(self):
        if self.attention not in ("dense", "doublep", "topk", "auto"):
            raise ConfigError(f"--attention must be dense, doublep, topk or auto, got {self.attention!r}")
        if not (0.0 <= self.p2 <= self.p1 <= 1.0):
            raise ConfigError(f"need 0 <= p2 <= p1 <= 1, got p1={self.p1}, p2={self.p2}")
        if self.group_rule not in ("mean", "max", "union"):
            raise ConfigError(f"--group-rule must be mean, max or union, got {self.group_rule!r}")
        if self.whole and self.group_rule == "max":
            raise ConfigError("--whole works with the mean and union group rules, not max")
        if self.floor < 0 or not 0.0 <= self.floor_frac <= 1.0:
            raise ConfigError(f"--floor must be >= 0 tokens or 0-100%, got {self.floor} / {self.floor_frac:.0%}")
        if self.estimate not in ("centroid", "gauss"):
            raise ConfigError(f"--estimate must be centroid or gauss, got {self.estimate!r}")
        if self.budget < 0 or self.est_clusters < 0 or self.dense_layers < 0:
            raise ConfigError("--budget, --est-clusters and --dense-layers must be >= 0")

    @property
    def mode(self) -> str:
        """The selection the sparse kernels run: "topk" for attention="topk", else "doublep"."""
        return "topk" if self.attention == "topk" else "doublep"


def floor_arg(x: str) -> dict:
    """--floor N (tokens) or F% (of each head's clustered tokens) -> SparseConfig's floor and floor_frac."""
    try:
        return (
            {"floor": 0, "floor_frac": float(x[:-1]) / 100} if x.endswith("%") else {"floor": int(x), "floor_frac": 0.0}
        )
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N tokens or F%, got {x!r}") from None
