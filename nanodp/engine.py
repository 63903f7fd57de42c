"""The engine: the generation loop over the model runner (nanodp/runner.py): sampling, stopping (EOS, stop
strings, length, a full cache), streaming text as it arrives, and chat turns that reuse the cached prefix.
Under tensor parallelism every rank runs this same loop."""

import contextlib
import time
from dataclasses import dataclass, field

import torch

from . import parallel
from .runner import ModelRunner
from .sampler import Sampler, SamplingParams
from .tokenizer import StreamDecoder


@dataclass
class Result:
    prompt_tokens: int
    token_ids: list = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # "stop" (EOS or a stop string), "length" (max_new_tokens), "context" (cache full)
    time_s: float = 0.0  # from the start of its group's prefill until it finished

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Engine(ModelRunner):
    """Generation over token-id prompts: batched (`generate`, `events`) or one chat conversation in slot 0
    (`stream`, `stream_events`). One generation uses the KV cache at a time."""

    def generate(self, prompts, params: SamplingParams, on_text=None, on_done=None) -> list:
        """Batched generation over token-id prompts, in groups of max_batch. `on_text(i, piece)` streams text,
        `on_done(i, result)` fires as each prompt finishes. A prompt that does not fit raises before any work."""
        results = {}
        with contextlib.closing(self.events(prompts, params)) as events:  # closed (the engine freed) on errors too
            for kind, i, x in events:
                if kind == "text" and on_text:
                    on_text(i, x)
                elif kind == "done":
                    results[i] = x
                    if on_done:
                        on_done(i, x)
        return [results[i] for i in range(len(prompts))]

    def events(self, prompts, params: SamplingParams):
        """The generator behind `generate`: yields ("text", i, piece) as text arrives and ("done", i, Result).
        It holds the engine from its first step until it finishes or is closed (or garbage-collected)."""
        with self._exclusive():
            for p in prompts:
                self.check_fits(len(p))
            for g in range(0, len(prompts), self.max_batch):
                yield from self._run_group(prompts[g : g + self.max_batch], params, g)

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold the KV cache for one generation; a second one started meanwhile raises (check_idle)."""
        self.check_idle()
        self.busy = True
        try:
            yield
        finally:
            self.busy = False

    def _run_group(self, group, params, base, starts=None, reset=True):
        B = len(group)
        for b in range(B if reset else 0):
            self.cache.reset(b)
        starts = starts or [0] * B
        t_start = time.perf_counter()
        res = self.partial = [Result(prompt_tokens=starts[b] + len(group[b])) for b in range(B)]
        logits = self.prefill(group, starts)
        sampler = Sampler(params, self.device, prompts=group if reset else [self.history + group[0]])
        streams = [StreamDecoder(self.tok) for _ in range(B)]
        sent = [0] * B  # characters of res[b].text already yielded (the start of a stop string is held back)
        active = torch.ones(B, dtype=torch.bool, device=self.device)
        done = [False] * B
        if reset:
            self.history = []  # slot 0 no longer holds the chat's tokens
        t0 = time.perf_counter()
        while True:
            tok = parallel.broadcast(sampler(logits))  # TP: rank 0's tokens, so all ranks decode the same steps
            tok_host = tok.tolist()  # waits for the step: the decode clock is exact here
            now = time.perf_counter()
            self.counters.decode_s += now - t0
            t0 = now
            for b in range(B):
                if done[b]:
                    continue
                t = tok_host[b]
                reason = None
                if t in self.tok.eos_ids:
                    reason = "stop"
                else:
                    res[b].token_ids.append(t)
                    res[b].text += streams[b].push(t)
                    reason = self._stop_string(res[b], params)
                    safe = len(res[b].text) - _held_back(res[b].text, params.stop)
                    if reason is None and safe > sent[b]:
                        yield "text", base + b, res[b].text[sent[b] : safe]
                        sent[b] = safe
                    if reason is None and len(res[b].token_ids) >= params.max_new_tokens:
                        reason = "length"
                    elif reason is None and self.cache.lens_host[b] + 1 >= self.max_len:
                        reason = "context"
                if reason:
                    done[b] = True
                    if reason != "stop" or t in self.tok.eos_ids:
                        res[b].text += streams[b].flush()
                    if len(res[b].text) > sent[b]:
                        yield "text", base + b, res[b].text[sent[b] :]
                    res[b].finish_reason, res[b].time_s = reason, time.perf_counter() - t_start
                    active[b] = False
                    yield "done", base + b, res[b]
            if all(done):
                break
            logits = self.decode_step(tok, active)
            self.cache.advance([b for b in range(B) if not done[b]], active=active)
            self.counters.decode_tokens += B - sum(done)
            if self.cluster_enabled:
                self.cache.cluster_pending(range(B))

    @staticmethod
    def _stop_string(r: Result, params):
        for s in params.stop:
            i = r.text.find(s)
            if i >= 0:
                r.text = r.text[:i]
                return "stop"
        return None

    # -- chat: one conversation in slot 0, the cache kept across turns --------------------------------------
    def stream(self, ids, params: SamplingParams, on_text=None) -> Result:
        """`stream_events` with a callback `on_text(0, piece)`; returns the Result."""
        with contextlib.closing(self.stream_events(ids, params)) as events:
            for kind, i, x in events:
                if kind == "text" and on_text:
                    on_text(i, x)
        return x

    def stream_events(self, ids, params: SamplingParams):
        """Generate for `ids` in slot 0, reusing the cached prefix: only the tokens after the longest common
        prefix with what slot 0 already holds are prefilled (the next chat turn). Yields as `events`."""
        with self._exclusive():
            self.check_fits(len(ids))
            n = 0
            for a, b in zip(self.history, ids):
                if a != b:
                    break
                n += 1
            n = min(n, len(ids) - 1)  # always prefill at least one token to get logits
            if n < self.cache.tail_host[0] or n == 0:  # clustered tokens are reordered: cannot truncate there
                self.cache.reset(0)
                n = 0
            else:
                self.cache.set_len(0, n)
            self.history = ids[:n]
            try:
                yield from self._run_group([ids[n:]], params, 0, starts=[n], reset=False)
            finally:  # also on Ctrl-C or an abandoned generator: remember exactly what the cache holds now
                self.history = (ids + self.partial[0].token_ids)[: self.cache.lens_host[0]]

    def reset_chat(self):
        self.check_idle()
        self.history = []
        self.cache.reset(0)


def _held_back(text, stops) -> int:
    """How many trailing characters of text could be the start of a stop string (not streamed yet)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)
