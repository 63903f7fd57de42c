"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))`, as vLLM and nano-vllm spell it.

    from nanodp import LLM, SamplingParams
    llm = LLM()                                   # the default model, fetched on first use
    out = llm.generate(["The capital of France is"], SamplingParams(max_new_tokens=8))
    print(out[0].text, out[0].finish_reason, out[0].completion_tokens)
    for piece in llm.stream("Tell me a story", SamplingParams(max_new_tokens=64)):
        print(piece, end="", flush=True)
    print(llm.chat([{"role": "user", "content": "What is the capital of France?"}]).text)

The command-line tools (`nanodp-generate`, `nanodp-chat`) run through this class.
"""

import contextlib
from dataclasses import dataclass

from .config import ClusterConfig, SparseConfig
from .sampler import SamplingParams

ENGINE_ARGS = ("device", "dtype", "kernels", "max_len", "yarn", "eager", "quiet")


@dataclass
class Output:
    """One prompt's result: the text and token ids generated, why it stopped ("stop": EOS or a stop string,
    "length": max_new_tokens, "context": the context is full), token counts and seconds until it finished."""

    index: int
    text: str
    token_ids: list
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_s: float


def _is_messages(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) and "role" in m for m in x)


def _is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


class LLM:
    """A loaded model and its KV cache.

    model: a Llama safetensors folder, or None for the default model (SmolLM2-135M-Instruct, fetched and
    converted on first use into $NANODP_HOME, a source checkout's weights/, or ~/.cache/nanodp).
    attention: decode attention, "dense", "doublep" or "topk"; further SparseConfig fields (p1, p2, floor, ...)
    and ClusterConfig fields (cluster_size, recluster_every, ...) go as keywords, and Engine options
    (device, dtype, kernels, max_len, yarn, eager, quiet). max_batch: prompts decoded together.
    The KV cache grows to what a call needs (longest prompt + max_new_tokens, capped at the context), unless
    max_len fixes it (a number, or "auto": the model's whole context, as far as memory allows).
    Bad options raise ValueError with the message the command line prints.
    """

    def __init__(self, model=None, attention: str | None = None, max_batch: int = 8, **options):
        from .engine import Engine

        sparse_fields, cluster_fields = set(SparseConfig.__dataclass_fields__), set(ClusterConfig.__dataclass_fields__)
        unknown = set(options) - sparse_fields - cluster_fields - set(ENGINE_ARGS)
        if unknown:
            raise ValueError(f"LLM: unknown option(s) {sorted(unknown)}")
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise ValueError(f"--batch-size must be >= 1, got {max_batch!r}")
        sp = {k: v for k, v in options.items() if k in sparse_fields}
        sparse = SparseConfig(**sp, **({"attention": attention} if attention else {}))
        cluster = ClusterConfig(**{k: v for k, v in options.items() if k in cluster_fields})
        eng = {k: v for k, v in options.items() if k in ENGINE_ARGS}
        eng.setdefault("quiet", True)
        self.fixed_len = eng.get("max_len") is not None  # "auto": the model's context (capped by memory)
        eng["max_len"] = None if eng.get("max_len") == "auto" else eng.get("max_len") or 256
        eng["max_batch"] = 1 if not self.fixed_len else max_batch  # else grown by reserve() to what a call needs
        self.max_batch = max_batch  # prompts per decode group; the cache grows to it on demand
        self.engine = Engine(model, sparse=sparse, cluster=cluster, **eng)
        self.tokenizer = self.engine.tok

    # -- prompts -> token ids
    def encode(self, prompt, chat: bool = False) -> list:
        """A string (the chat template applied when chat=True), a chat message list, or token ids."""
        tok = self.engine.tok
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("empty prompt: give some text")
            return tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
        if _is_messages(prompt):
            return tok.encode_chat(prompt)
        if _is_ids(prompt):
            if not all(0 <= t < self.engine.cfg.vocab_size for t in prompt):
                raise ValueError(f"token ids must be in [0, {self.engine.cfg.vocab_size})")
            return list(prompt)
        raise ValueError(
            "a prompt is a non-empty string, a list of chat messages ({'role', 'content'}) or a "
            f"list of token ids; got {type(prompt).__name__}"
        )

    def _batch(self, prompts, chat):
        single = isinstance(prompts, str) or _is_messages(prompts) or _is_ids(prompts)
        items = [prompts] if single else list(prompts)
        if not items:
            raise ValueError("no prompts given")
        return [self.encode(p, chat) for p in items]

    def context_limit(self) -> int:
        """The most tokens one sequence can hold: the model's context, or max_len when it was given."""
        return self.engine.max_len if self.fixed_len else self.engine.cfg.max_position_embeddings

    def reserve(self, ids_list, params: SamplingParams):
        """Size the KV cache for these prompts: the longest + max_new_tokens, capped at the context."""
        eng = self.engine
        longest = max(len(ids) for ids in ids_list)
        eng.check_fits(longest, limit=self.context_limit())
        if not self.fixed_len:
            eng.reserve(min(len(ids_list), self.max_batch), longest + params.max_new_tokens + 1)

    # -- generation
    def generate(self, prompts, sampling: SamplingParams | None = None, chat: bool = False, on_done=None) -> list:
        """Generate for one prompt or a list (strings, chat message lists or token-id lists), batched.
        Returns one Output per prompt, in order; on_done(Output) fires as each one finishes."""
        params = sampling or SamplingParams()
        ids_list = self._batch(prompts, chat)
        self.reserve(ids_list, params)
        outs = {}
        with contextlib.closing(self.engine.events(ids_list, params)) as events:  # frees the engine on errors too
            for kind, i, r in events:
                if kind == "done":
                    outs[i] = Output(
                        i, r.text, r.token_ids, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.time_s
                    )
                    if on_done:
                        on_done(outs[i])
        return [outs[i] for i in range(len(ids_list))]

    def stream(self, prompt, sampling: SamplingParams | None = None, chat: bool = False):
        """Yield the text of one prompt piece by piece as it is generated. The stream holds the engine until it
        ends or is closed (`.close()`, or dropped and garbage-collected): another generate / stream / chat
        started while it is open raises RuntimeError."""
        params = sampling or SamplingParams()
        ids = self._batch(prompt, chat)
        if len(ids) != 1:
            raise ValueError("stream takes one prompt")
        self.reserve(ids, params)
        with contextlib.closing(self.engine.events(ids, params)) as events:
            for kind, _, piece in events:
                if kind == "text":
                    yield piece

    def chat(self, messages, sampling: SamplingParams | None = None, on_text=None) -> Output:
        """One chat turn: the model's chat template over `messages`, the reply as an Output. Consecutive turns
        of one conversation reuse the cached prefix (only the new tokens are prefilled)."""
        if not _is_messages(messages):
            raise ValueError("chat takes a list of messages, each {'role': ..., 'content': ...}")
        params = sampling or SamplingParams()
        ids = self.encode(messages)
        eng = self.engine
        if not self.fixed_len and len(ids) + params.max_new_tokens + 1 > eng.max_len:
            self.reserve([ids], params)  # grows the cache (the conversation is prefilled afresh)
        r = eng.stream(ids, params, on_text=on_text)
        return Output(0, r.text, r.token_ids, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.time_s)
