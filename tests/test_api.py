"""The Python API: nanodp.LLM gives what the command-line tools give, and refuses what they refuse."""

import json

import pytest

from nanodp import LLM, SamplingParams
from nanodp import generate as gen_cli

PROMPTS = ["The capital of France is", "One, two, three,"]


@pytest.fixture(scope="module")
def llm(default_model):
    return LLM(device="cpu", max_batch=2)


def test_generate_equals_the_cli(llm, tmp_path):
    outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=10))
    out = tmp_path / "out.jsonl"
    argv = ["--output", str(out), "--max-new-tokens", "10", "--device", "cpu"]
    assert gen_cli.main(sum((["--prompt", p] for p in PROMPTS), []) + argv) == 0
    recs = sorted(map(json.loads, out.read_text().splitlines()), key=lambda r: r["index"])
    assert [o.text for o in outs] == [r["completion"] for r in recs]
    assert [o.completion_tokens for o in outs] == [r["completion_tokens"] for r in recs]
    assert [o.finish_reason for o in outs] == [r["finish_reason"] for r in recs]
    assert all(o.prompt_tokens > 0 and o.time_s > 0 and o.index == i for i, o in enumerate(outs))
    ids = llm.tokenizer.encode(PROMPTS[0])  # token ids give the same as the text
    assert llm.generate(ids, SamplingParams(max_new_tokens=10))[0].token_ids == outs[0].token_ids


def test_stream_concatenates_to_the_text(llm):
    sp = SamplingParams(max_new_tokens=12)
    assert "".join(llm.stream(PROMPTS[1], sp)) == llm.generate(PROMPTS[1], sp)[0].text


def test_chat_equals_the_template_path(llm, tmp_path):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    sp = SamplingParams(max_new_tokens=10)
    r = llm.chat(msgs, sp)
    assert "Paris" in r.text
    assert r.text == llm.generate([msgs], sp)[0].text == llm.generate(msgs[0]["content"], sp, chat=True)[0].text
    out = tmp_path / "out.jsonl"
    gen_cli.main(["--prompt", msgs[0]["content"], "--chat", "--max-new-tokens", "10", "--output", str(out)])
    assert json.loads(out.read_text())["completion"] == r.text
    follow = msgs + [{"role": "assistant", "content": r.text}, {"role": "user", "content": "And of Italy?"}]
    assert llm.chat(follow, sp).text == llm.generate([follow], sp)[0].text  # the cached prefix changes nothing


@pytest.mark.parametrize(
    "make, flag",
    [
        (lambda: SamplingParams(temperature=-1), "--temperature"),
        (lambda: SamplingParams(top_p=0), "--top-p"),
        (lambda: SamplingParams(seed=2**70), "--seed"),
        (lambda: LLM(attention="sparse", device="cpu"), "--attention"),
        (lambda: LLM(p1=0.5, p2=0.9, device="cpu"), "p2 <= p1"),
        (lambda: LLM(dense_layers=100, device="cpu"), "--dense-layers"),
        (lambda: LLM("meta-llama/Llama-3.2-1B", device="cpu"), "hub id"),
        (lambda: LLM(max_batch=0, device="cpu"), "--batch-size"),
        (lambda: LLM(colour="red", device="cpu"), "unknown option"),
    ],
)
def test_bad_arguments_raise_value_error(make, flag, default_model):
    with pytest.raises(ValueError, match=flag.replace("+", r"\+")):
        make()


def test_bad_prompts_raise_the_cli_messages(llm, capsys):
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate("")
    with pytest.raises(ValueError, match="no prompts"):
        llm.generate([])
    with pytest.raises(ValueError, match="context holds"):
        LLM(device="cpu", max_len=64).generate("word " * 100)
    with pytest.raises(ValueError, match="top_p \\(--top-p\\)"):
        llm.generate("hi", SamplingParams(top_p=2))
    with pytest.raises(SystemExit):
        gen_cli.main(["--prompt", "hi", "--top-p", "2"])
    assert "top_p (--top-p) must be in (0, 1]" in capsys.readouterr().err


def test_chat_after_generate_does_not_reuse_other_tokens(llm):
    """generate and stream reuse slot 0: the next chat turn must not take their tokens for its prefix."""
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    sp = SamplingParams(max_new_tokens=8)
    first = llm.chat(msgs, sp).text
    llm.generate(["Once upon a time there was a dragon who loved apples"], sp)
    assert llm.chat(msgs, sp).text == first
    next(iter(llm.stream("A story about a dragon", sp)))  # an abandoned stream, too
    assert llm.chat(msgs, sp).text == first


def test_stream_never_shows_part_of_a_stop_string(llm):
    sp = SamplingParams(max_new_tokens=16, stop=["The answer"])
    text = llm.generate(PROMPTS[0], sp)[0].text
    assert "".join(llm.stream(PROMPTS[0], sp)) == text
    assert "".join(llm.stream(PROMPTS[0], SamplingParams(max_new_tokens=16, stop=["Paris"]))) == " "


def test_a_cache_that_does_not_fit_leaves_the_engine_usable(monkeypatch, default_model):
    from nanodp import runner

    small = LLM(device="cpu", max_batch=1)
    real = runner.KVCache

    class Capped(real):
        def __init__(self, *a, **k):
            if a[3] > 1000:  # max_len
                raise RuntimeError("out of memory (simulated)")
            super().__init__(*a, **k)

    monkeypatch.setattr(runner, "KVCache", Capped)
    with pytest.raises(RuntimeError, match="simulated"):
        small.generate("hi", SamplingParams(max_new_tokens=2000))
    assert small.generate("The capital of France is", SamplingParams(max_new_tokens=4))[0].completion_tokens == 4


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            dict(max_len=9000),
            "--max-len 9000 exceeds the model's context of 8192 tokens: drop it or extend the context with --yarn F",
        ),
        (
            dict(max_len=20000, yarn=2),
            "--max-len 20000 exceeds the model's context of 16384 tokens with --yarn 2: drop it or raise --yarn to 3",
        ),
    ],
)
def test_a_max_len_beyond_the_context_is_refused_before_the_weights_load(kw, message, monkeypatch, default_model):
    from nanodp import runner

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before --max-len was checked")

    monkeypatch.setattr(runner, "load_model", no_load)
    with pytest.raises(ValueError, match="^" + message):
        LLM(device="cpu", **kw)


def test_max_len_within_the_yarn_context_is_taken_and_the_cli_refuses_beyond(default_model, capsys):
    assert LLM(device="cpu", max_len=9000, yarn=2).engine.max_len == 9000
    with pytest.raises(SystemExit) as e:
        gen_cli.main(["--prompt", "hi", "--max-len", "9000", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [
        "error: --max-len 9000 exceeds the model's context of 8192 tokens: drop it or extend the context with "
        "--yarn F (F >= 2)"
    ]


def test_a_second_generation_while_a_stream_is_open_raises(llm):
    sp = SamplingParams(max_new_tokens=8)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    alone = "".join(llm.stream(PROMPTS[1], sp))
    first = llm.stream(PROMPTS[1], sp)
    pieces = [next(first)]
    starts = [
        lambda: llm.generate(PROMPTS[0], sp),
        lambda: next(llm.stream(PROMPTS[0], sp)),
        lambda: llm.chat(msgs, sp),
        lambda: llm.engine.reset_chat(),
    ]
    for start in starts:
        with pytest.raises(RuntimeError, match="still using this engine's KV cache: finish it or call .close()"):
            start()
    assert "".join(pieces + list(first)) == alone  # the open stream went on untouched


def test_a_closed_dropped_or_failed_generation_releases_the_engine(llm):
    sp = SamplingParams(max_new_tokens=8)
    expected = llm.generate(PROMPTS[0], sp)[0].text
    s = llm.stream(PROMPTS[1], sp)
    next(s)
    s.close()
    assert llm.generate(PROMPTS[0], sp)[0].text == expected
    s = llm.stream(PROMPTS[1], sp)
    next(s)
    del s  # garbage-collected while open
    assert llm.generate(PROMPTS[0], sp)[0].text == expected

    def boom(out):
        raise KeyError("from on_done")

    with pytest.raises(KeyError) as failed:
        llm.generate(PROMPTS, sp, on_done=boom)
    assert failed.tb is not None  # the kept traceback holds generate's frame: the engine must be free anyway
    assert llm.generate(PROMPTS[0], sp)[0].text == expected
    assert "".join(llm.stream(PROMPTS[0], sp)) == expected
