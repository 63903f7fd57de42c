"""Tokenizer (tokenizers or sentencepiece), the model's own chat template (jinja2), EOS ids, streaming decode."""

import json
from datetime import datetime
from pathlib import Path


class Tokenizer:
    def __init__(self, model_dir):
        d = Path(model_dir)
        self.cfg = _read_json(d / "tokenizer_config.json")
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
                raise ValueError(
                    f"{d / 'tokenizer.json'} cannot be read as a tokenizer ({str(e)[:120]}); "
                    "re-fetch or re-convert the model"
                ) from None
            self._sp = None
            self.vocab_size = self._tok.get_vocab_size()
        elif (d / "tokenizer.model").is_file():
            import sentencepiece as spm

            self._tok, self._sp = None, spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
            self.vocab_size = self._sp.get_piece_size()
        else:
            raise FileNotFoundError(f"{d} has neither tokenizer.json nor tokenizer.model")
        self.bos_token = _token_str(self.cfg.get("bos_token"))
        self.eos_token = _token_str(self.cfg.get("eos_token"))
        self.chat_template = self.cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default one
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        if self.chat_template is None and (d / "chat_template.jinja").is_file():
            self.chat_template = (d / "chat_template.jinja").read_text()
        # Every EOS id: generation_config.json, config.json and the tokenizer's eos_token (Llama 3 has several).
        eos = set()
        for f in ("generation_config.json", "config.json"):
            e = _read_json(d / f).get("eos_token_id")
            eos |= set(e if isinstance(e, list) else [] if e is None else [e])
        if self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            eos.add(self.token_to_id(self.eos_token))
        self.eos_ids = eos
        self.bos_id = self.token_to_id(self.bos_token) if self.bos_token else None

    def token_to_id(self, token):
        return self._tok.token_to_id(token) if self._tok else (self._sp.piece_to_id(token) if token else None)

    def encode(self, text: str, add_special_tokens=True) -> list[int]:
        """Plain prompts get the tokenizer's own special tokens (BOS where it adds one), like transformers."""
        if self._tok:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._sp.encode(text)
        add_bos = self.cfg.get("add_bos_token", True)
        return ([self._sp.bos_id()] if add_special_tokens and add_bos and self._sp.bos_id() >= 0 else []) + ids

    def decode(self, ids, skip_special_tokens=True) -> str:
        ids = list(ids)
        if self._tok:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._sp.decode(ids)

    def render_chat(self, messages, add_generation_prompt=True) -> str:
        """The model's own chat template, rendered as transformers' apply_chat_template does."""
        if not self.chat_template:
            raise ValueError(
                "this model has no chat_template in tokenizer_config.json: chat prompts need one; "
                "give plain prompts (no --chat)"
            )
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise ValueError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys
        )
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        special = {k: _token_str(v) for k, v in self.cfg.items() if k.endswith("_token")}
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )

    def encode_chat(self, messages, add_generation_prompt=True) -> list[int]:
        # The template writes its own special tokens (BOS included), so none are added again.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


class StreamDecoder:
    """Incremental detokenization: emit text only once it no longer ends in half a UTF-8 character.

    Decoding token by token is wrong for byte-level BPE (one character can span tokens) and for
    sentencepiece (a leading space depends on the previous token), so decode a window that starts a few
    tokens back and emit the part past what was already printed.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens=True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids, self.prefix, self.read = [], 0, 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        now = self.tok.decode(self.ids[self.prefix :], self.skip)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        now = self.tok.decode(self.ids[self.prefix :], self.skip)
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]


def _read_json(path: Path) -> dict:
    """A JSON object from `path` ({} if there is none); a broken file is an error naming it."""
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or re-create the file") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(d).__name__}")
    return d


def _token_str(t):
    return t.get("content") if isinstance(t, dict) else t
