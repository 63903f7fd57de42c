"""The model runner: the KV cache it sizes, batched prefill, and one decode step (eager, or replayed from a CUDA
graph per batch size and context bucket), with the time and token counters. nanodp/engine.py runs the
generation loop on top of it. Under tensor parallelism (nanodp/parallel.py) every rank runs its own KV heads."""

import sys
import time
from dataclasses import dataclass, field

import torch

from . import auto, parallel
from .attention import AttentionContext
from .cache import KVCache
from .config import ClusterConfig, SparseConfig
from .loader import check_max_len, load_model, model_config, resolve_model_dir
from .tokenizer import Tokenizer


class PromptTooLong(ValueError):
    pass


@dataclass
class Counters:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    cluster_s: float = 0.0
    steps: dict = field(default_factory=dict)  # decode steps per attention that ran ("dense", "doublep", ...)

    def line(self, kv=None, auto=False) -> str:
        s = (
            f"prefill {self.prefill_tokens} tok in {self.prefill_s * 1e3:.0f} ms | decode {self.decode_tokens} tok "
            f"at {self.decode_tokens / max(self.decode_s, 1e-9):.1f} tok/s"
        )
        return s + (f" | KV read {100 * kv:.1f}%" if kv is not None else "") + (self.ran() if auto else "")

    def ran(self) -> str:
        """Which decode attention the steps ran (what --attention auto chose)."""
        n = max(1, sum(self.steps.values()))
        return " | auto ran " + ", ".join(f"{a} {100 * k / n:.0f}%" for a, k in sorted(self.steps.items()))


class ModelRunner:
    def __init__(
        self,
        model=None,
        device=None,
        dtype=None,
        max_batch=8,
        max_len=None,
        kernels="auto",
        sparse: SparseConfig | None = None,
        cluster: ClusterConfig | None = None,
        yarn=None,
        quiet=False,
        eager=False,
    ):
        """`model`: a Llama folder, None for the default model, or an already built LlamaForCausalLM (bench)."""
        self.device = parallel.place(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        if isinstance(model, torch.nn.Module):
            self.model_dir, self.model, self.tok = None, model, None
        else:
            self.model_dir = resolve_model_dir(model, quiet=quiet)
            check_max_len(max_len, model_config(self.model_dir, yarn), yarn)  # before the weights load
            self.model = load_model(self.model_dir, dtype=dtype, device=self.device, yarn=yarn)
            self.tok = Tokenizer(self.model_dir)
        self.cfg = self.model.cfg
        self.sparse = sparse or SparseConfig()
        if self.sparse.dense_layers > self.cfg.num_hidden_layers:
            raise ValueError(
                f"--dense-layers {self.sparse.dense_layers} exceeds the model's {self.cfg.num_hidden_layers} layers"
            )
        if kernels == "auto":
            kernels = "triton" if self.device.type == "cuda" else "torch"
        if kernels not in ("triton", "torch"):
            raise ValueError(f"--kernels must be auto, triton or torch, got {kernels!r}")
        self.kernels, self.cluster, self.quiet = kernels, cluster or ClusterConfig(), quiet
        self.cache, self.auto_table, self.max_batch, self.max_len = None, None, 0, 0
        self.cluster_enabled = self._needs_clusters()
        self.counters = Counters()
        self.busy = False  # a generation (nanodp/engine.py) is using the cache: one at a time
        # decode steps replay CUDA graphs, one per (batch size, context bucket); --eager turns them off
        self.use_graphs = self.device.type == "cuda" and not eager and kernels == "triton"
        self._allocate(max_batch, max_len)

    def _allocate(self, max_batch, max_len):
        """(Re)build the KV cache for max_batch sequences of max_len tokens (None: the model's context, capped
        by free memory on GPU), and what hangs on it: the attention context, graphs, the chat history. If the
        new cache cannot be allocated, the old sizes are rebuilt and the error raised: the engine stays usable."""
        old = (self.max_batch, self.max_len) if self.cache is not None else None
        self.cache = self.ctx = None  # free the old cache (and graphs) before allocating the new one
        self.graphs, self.graph_pool = {}, None
        dt = self.model.model.embed_tokens.weight.dtype
        hkv = self.model.model.layers[0].self_attn.hkv  # this rank's KV heads (all of them without TP)
        kv_b, meta_b = KVCache.estimate_bytes_per_token(
            self.cfg.num_hidden_layers, hkv, self.cfg.head_dim, dt, self.cluster
        )
        try:
            n = int(max_len or self._fit_len(kv_b + meta_b, max_batch))
            cache = KVCache(
                self.cfg.num_hidden_layers,
                max_batch,
                hkv,
                n,
                self.cfg.head_dim,
                dt,
                self.device,
                self.cluster,
                backend=self.kernels,
            )
        except (RuntimeError, MemoryError):  # out of memory (torch's OutOfMemoryError is a RuntimeError)
            if old is not None and old != (max_batch, max_len):
                self._allocate(*old)
            raise
        self.cache, self.max_batch, self.max_len = cache, max_batch, n
        if not self.quiet:
            print(
                f"nanodp: KV cache {max_batch} x {self.max_len} tokens, {kv_b / 1024:.1f} KiB/token K/V + "
                f"{meta_b / 1024:.2f} KiB/token cluster metadata ({100 * meta_b / kv_b:.1f}%)",
                file=sys.stderr,
            )
        self.ctx = AttentionContext(self.cache, self.sparse, self.kernels)
        self.history = []  # tokens fed into slot 0 by `stream` (chat), so a new turn prefills only its suffix

    def check_idle(self):
        """The cache has one user at a time: a generation that is still open (a stream not yet finished or
        closed) would be corrupted by another one, or by resizing or switching the cache under it."""
        if self.busy:
            raise RuntimeError(
                "another generation (an unfinished stream) is still using this engine's KV cache: "
                "finish it or call .close() on it before starting a new one"
            )

    def reserve(self, max_batch, max_len):
        """Grow the KV cache (never shrink it) to at least max_batch sequences of max_len tokens, capped at
        the model's context; what the cache held is dropped when it grows."""
        self.check_idle()
        max_len = min(max_len, self.cfg.max_position_embeddings)
        if max_batch > self.max_batch or max_len > self.max_len:
            self._allocate(max(max_batch, self.max_batch), max(max_len, self.max_len))

    def set_sparse(self, sparse: SparseConfig):
        """Switch the decode attention (e.g. between methods of an evaluation); takes effect from the next
        prompt, which is prefilled and clustered afresh."""
        self.check_idle()
        self.sparse = self.ctx.sparse = sparse
        self.cluster_enabled = self._needs_clusters()
        self.graphs.clear()
        self.graph_pool = None  # the old pool dies with its graphs: capture the next ones into a new one

    def _fit_len(self, bytes_per_token, max_batch) -> int:
        """The model's context, capped (on GPU) so max_batch sequences fit in 85% of the free memory, leaving
        the rest for activations and CUDA graphs."""
        n = self.cfg.max_position_embeddings
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
            n = parallel.agree_min(min(n, int(0.85 * free / (max_batch * bytes_per_token)) // 256 * 256))
            if n < 256:
                raise MemoryError(
                    f"only {free / 2**30:.1f} GiB free on {self.device}: not enough for a KV cache of "
                    f"{max_batch} sequences; lower --batch-size or pass --max-len"
                )
        return n

    # -- low level ---------------------------------------------------------------------------------------
    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def check_fits(self, n, limit=None):
        """A prompt of n tokens leaves room for one new token in `limit` (default: the cache's max_len)."""
        limit = limit or self.max_len
        if n + 1 > limit:
            raise PromptTooLong(
                f"prompt has {n} tokens but the context holds {limit} "
                f"(the model's limit is {self.cfg.max_position_embeddings}; see --max-len, --yarn)"
            )

    @torch.inference_mode()
    def prefill(self, chunks, starts) -> torch.Tensor:
        """Feed token lists `chunks[b]` to slots b at storage `starts[b]`; returns last-position logits [B, V]."""
        self._sync()
        t0 = time.perf_counter()
        B, T = len(chunks), max(len(c) for c in chunks)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, c in enumerate(chunks):
            ids[b, : len(c)] = torch.tensor(c)
        lens = [len(c) for c in chunks]
        pos = torch.tensor(starts)[:, None] + torch.arange(T)[None]
        self.ctx.begin_prefill(range(B), starts, lens)
        logits = self.model(
            ids.to(self.device), pos.to(self.device), self.ctx, last_index=torch.tensor(lens, device=self.device) - 1
        )
        for b in range(B):
            self.cache.set_len(b, starts[b] + lens[b])
        self._sync()
        t1 = time.perf_counter()
        if self.cluster_enabled:
            self.cache.cluster_pending(range(B), force=True)
            self._sync()
        self.counters.prefill_tokens += sum(lens)
        self.counters.prefill_s += t1 - t0
        self.counters.cluster_s += time.perf_counter() - t1
        return logits

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """One token per slot 0..B-1 (finished slots recompute in place and are ignored); logits [B, V]."""
        B = tokens.shape[0]
        # the dense kernel sizes its split grid from an upper bound of the lengths: a power-of-two bucket
        bucket = min(self.max_len, max(1024, 1 << max(self.cache.lens_host[:B]).bit_length()))
        att = self.step_attention(B, bucket)
        self.counters.steps[att] = self.counters.steps.get(att, 0) + 1
        if not self.use_graphs:
            return self._step(tokens, active, bucket)
        g = self.graphs.get((B, bucket))
        if g is None:
            g = self.graphs[(B, bucket)] = self._capture(tokens, active, bucket)
        g["tokens"].copy_(tokens)
        g["active"].copy_(active)
        g["graph"].replay()
        return g["logits"]

    def _needs_clusters(self) -> bool:
        """Clustering runs for sparse decode; for auto only if this GPU's table ever picks Double-P."""
        if self.sparse.attention != "auto":
            return self.sparse.attention != "dense"
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.auto_table = auto.load(name, self.model_dir.name if self.model_dir else "model")
        return "doublep" in self.auto_table.values()

    def step_attention(self, B, bucket) -> str:
        """The decode attention of a step of B sequences in this context bucket (--attention auto: nanodp/auto.py)."""
        if self.sparse.attention != "auto":
            return self.sparse.attention
        return auto.choose(self.auto_table, B, bucket)

    def _step(self, tokens, active, bucket):
        slots = torch.arange(tokens.shape[0], device=self.device)
        self.ctx.begin_decode(slots, active.float(), bucket, attention=self.step_attention(tokens.shape[0], bucket))
        logits = self.model(tokens[:, None], self.cache.lens[: tokens.shape[0], None].long(), self.ctx)
        self.ctx.end_decode()
        return logits

    def _capture(self, tokens, active, bucket):
        """Record one decode step in a CUDA graph. Everything it reads lives at fixed addresses: the static
        token/active buffers, the cache (lens, K/V, cluster tables: updated in place by clustering between
        steps) and the stats buffers. The warm-up steps recompute the same token, so nothing changes."""
        st = {"tokens": tokens.clone(), "active": active.clone()}
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # compile Triton kernels and allocate lazily created buffers outside capture
                self._step(st["tokens"], st["active"], bucket)
        torch.cuda.current_stream().wait_stream(s)
        saved = self.ctx.stats.table.clone(), self.ctx.stats.dense_tokens.clone()
        st["graph"] = torch.cuda.CUDAGraph()
        self.graph_pool = self.graph_pool or torch.cuda.graph_pool_handle()
        with torch.cuda.graph(st["graph"], pool=self.graph_pool):
            st["logits"] = self._step(st["tokens"], st["active"], bucket)
        self.ctx.stats.table.copy_(saved[0])  # warm-up and capture must not count as decoded tokens
        self.ctx.stats.dense_tokens.copy_(saved[1])
        return st
