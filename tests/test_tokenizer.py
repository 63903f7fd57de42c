"""The tokenizer, chat template and streaming decode agree with transformers on the default model."""

import pytest

transformers = pytest.importorskip("transformers")

from nanodp.tokenizer import StreamDecoder, Tokenizer  # noqa: E402

TEXTS = [
    "Hello, world!",
    "  leading spaces\n\nand newlines\t tabs",
    "naïve café 日本語 🤖👍🏽 ∑x²",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2? 🤔"},
    ],
]


@pytest.fixture(scope="module")
def toks(default_model):
    return Tokenizer(default_model), transformers.AutoTokenizer.from_pretrained(str(default_model))


def test_encode_decode_match_transformers(toks):
    ours, hf = toks
    for t in TEXTS:
        assert ours.encode(t) == hf.encode(t), t
        ids = hf.encode(t)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(toks, gen):
    ours, hf = toks
    for conv in CONVERSATIONS:
        assert ours.render_chat(conv, gen) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        ref = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert ours.encode_chat(conv, gen) == list(ref)


def test_eos_ids(toks):
    ours, _ = toks
    assert ours.token_to_id("<|im_end|>") in ours.eos_ids


def test_streaming_equals_full_decode(toks):
    ours, _ = toks
    for t in TEXTS:
        ids = ours.encode(t)
        s = StreamDecoder(ours)
        pieces = [s.push(i) for i in ids] + [s.flush()]
        assert "".join(pieces) == ours.decode(ids)
        assert not any("\ufffd" in p for p in pieces[:-1]), "printed half a UTF-8 character"
