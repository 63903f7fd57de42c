"""Find a model folder, read its config and safetensors shards, and build the model on the target device.
Under tensor parallelism each rank keeps only its part of every tensor (parallel.shard), cut before fusing."""

import json
import math
import re
from pathlib import Path

import torch

from . import parallel
from .config import ConfigError, ModelConfig
from .fetch import DEFAULT_DIR as DEFAULT_MODEL
from .model import LlamaForCausalLM, Rope

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


class WeightsError(ValueError):
    """A problem with a model folder that a user can act on; the message says how."""


def resolve_model_dir(path=None, fetch_default=True, quiet=False) -> Path:
    """`None` means the default model, fetched and converted on first use."""
    if path is None:
        if not (DEFAULT_MODEL / ".complete").is_file() and fetch_default:
            from .fetch import ensure_default_model

            if not quiet:
                print(f"nanodp: the default model is not in {DEFAULT_MODEL}; fetching it now (one time, ~92 MB)")
            ensure_default_model(DEFAULT_MODEL, quiet=quiet)
        path = DEFAULT_MODEL
    p = Path(path).expanduser()
    if not p.is_dir():
        # "org/name" with no local folder "org" is a hub id; "weights/name" (weights/ exists) is a local path
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not p.exists() and not p.parent.exists():
            raise WeightsError(
                f"{path!r} looks like a Hugging Face hub id; nanodp never downloads from a model hub at run time. "
                f"Fetch it first, e.g. `huggingface-cli download {path} --local-dir weights/{p.name}`, "
                f"then pass --model weights/{p.name}"
            )
        raise WeightsError(
            f"model folder {str(p)!r} does not exist. Run `python -m nanodp.fetch` for the "
            "default model, or see weights/README.md for Hugging Face Llama checkpoints"
        )
    return p


def _shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{index} is corrupt ({e})") from None
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise WeightsError(
                f"{model_dir} is incomplete: shard(s) {missing} named in {index.name} are missing; "
                "download the folder again"
            )
        return [model_dir / f for f in files]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pth")):
        raise WeightsError(
            f"{model_dir} holds PyTorch .bin/.pth weights; nanodp reads safetensors only "
            "(most Hugging Face repos ship them: download the *.safetensors files)"
        )
    raise WeightsError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def read_state_dict(model_dir: Path, dtype, device) -> dict:
    from safetensors import SafetensorError, safe_open

    sd = {}
    for f in _shards(model_dir):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for name in fh.keys():
                    if not name.endswith("rotary_emb.inv_freq"):
                        sd[name] = parallel.shard(name, fh.get_tensor(name)).to(device=device, dtype=dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise WeightsError(f"{f} is corrupt or truncated ({e}); download it again") from None
    return sd


def model_config(model_dir, yarn=None) -> ModelConfig:
    """config.json, with the context extended by --yarn when given (nothing heavy is read)."""
    cfg = ModelConfig.from_dir(resolve_model_dir(model_dir))
    return cfg.with_yarn(yarn) if yarn else cfg


def check_max_len(max_len, cfg: ModelConfig, yarn=None):
    """An explicit --max-len must fit the model's context (max_position_embeddings, YaRN-extended with --yarn)."""
    n = cfg.max_position_embeddings
    if max_len is None or max_len <= n:
        return
    if yarn:
        orig = cfg.rope_scaling["original_max_position_embeddings"]
        fix = f"drop it or raise --yarn to {math.ceil(max_len / orig)}"
    elif cfg.rope_scaling is None:
        fix = f"drop it or extend the context with --yarn F (F >= {math.ceil(max_len / n)})"
    else:  # already rope-scaled: --yarn does not apply
        fix = "drop it"
    with_yarn = f" with --yarn {yarn:g}" if yarn else ""
    raise ValueError(f"--max-len {max_len} exceeds the model's context of {n} tokens{with_yarn}: {fix}")


def load_model(model_dir, dtype=None, device="cpu", yarn=None) -> LlamaForCausalLM:
    model_dir = resolve_model_dir(model_dir)
    cfg = model_config(model_dir, yarn)
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    sd = read_state_dict(model_dir, dtype, device)
    if "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = parallel.shard("lm_head.weight", sd["model.embed_tokens.weight"])  # tied embeddings
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing:
        raise WeightsError(f"{model_dir}: {len(missing)} tensor(s) missing from the safetensors, e.g. {missing[:3]}")
    if extra:
        raise WeightsError(f"{model_dir}: unexpected tensors {extra[:3]} (not a plain Llama checkpoint?)")
    for name, t in sd.items():
        if t.shape != model.state_dict()[name].shape:
            raise WeightsError(
                f"{model_dir}: {name} has shape {tuple(t.shape)}, config.json implies "
                f"{tuple(model.state_dict()[name].shape)}"
            )
    model.load_state_dict(sd, assign=True)
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in sd
    del sd  # the model holds the only references now, so fusing frees each original as it goes
    if tied and parallel.world_size() == 1:  # (a TP rank's lm_head holds a copy of its vocabulary rows)
        model.lm_head.weight = model.model.embed_tokens.weight
    model.fuse_projections()
    model.rope = Rope(cfg, device)
    return model.eval().requires_grad_(False)


__all__ = [
    "ConfigError",
    "WeightsError",
    "check_max_len",
    "load_model",
    "model_config",
    "resolve_model_dir",
    "DEFAULT_MODEL",
]
