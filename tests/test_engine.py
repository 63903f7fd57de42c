"""End to end on the default model (CPU, fp32): nanodp equals transformers; the CLIs work for a user."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanodp import LLM  # noqa: E402
from nanodp import generate as gen_cli  # noqa: E402
from nanodp.config import SparseConfig  # noqa: E402
from nanodp.engine import Engine  # noqa: E402
from nanodp.sampler import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hf(default_model):
    return transformers.AutoModelForCausalLM.from_pretrained(str(default_model), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def eng(default_model):
    return Engine(None, device="cpu", dtype="fp32", max_batch=2, max_len=1024, sparse=SparseConfig(attention="dense"))


def test_logits_and_greedy_equal_transformers(eng, hf):
    plain = eng.tok.encode("The capital of France is")
    chat = eng.tok.encode_chat([{"role": "user", "content": "Name three colors."}])
    logits = eng.prefill([plain, chat], [0, 0])
    with torch.no_grad():
        for b, ids in enumerate([plain, chat]):
            ref = hf(torch.tensor([ids])).logits[0, -1]
            assert (logits[b] - ref).abs().max() < 2e-3 * ref.abs().max()
    res = eng.generate([plain, chat], SamplingParams(temperature=0, max_new_tokens=40))
    for ids, r in zip([plain, chat], res):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=40,
                do_sample=False,
                eos_token_id=sorted(eng.tok.eos_ids),
                pad_token_id=0,
            )[0, len(ids) :].tolist()
        out = [t for t in out if t not in eng.tok.eos_ids][: len(r.token_ids)] if r.finish_reason == "stop" else out
        assert r.token_ids == out
        assert len(r.token_ids) >= 32 or r.finish_reason == "stop"
    assert "Paris" in res[0].text


def test_stop_strings_and_streaming(eng):
    ids = eng.tok.encode("One, two, three, four,")
    pieces = []
    full = eng.generate([ids], SamplingParams(temperature=0, max_new_tokens=12))[0]
    assert " six" in full.text
    r = eng.generate(
        [ids], SamplingParams(temperature=0, max_new_tokens=12, stop=[" six"]), on_text=lambda i, p: pieces.append(p)
    )[0]
    assert r.finish_reason == "stop" and r.text == full.text[: full.text.index(" six")]
    assert "".join(pieces).startswith(r.text)


def test_chat_turns_reuse_the_cache(eng):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    sp = SamplingParams(temperature=0, max_new_tokens=16)
    r1 = eng.stream(eng.tok.encode_chat(msgs), sp)
    assert "Paris" in r1.text
    before = eng.counters.prefill_tokens
    msgs += [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And of Italy?"}]
    ids = eng.tok.encode_chat(msgs)
    r2 = eng.stream(ids, sp)
    assert eng.counters.prefill_tokens - before < len(ids) // 2, "second turn re-prefilled the whole conversation"
    eng.reset_chat()
    r3 = eng.stream(ids, sp)  # same result from scratch
    assert r2.token_ids == r3.token_ids


def test_generate_cli_keeps_records_when_a_prompt_fails(tmp_path, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"prompt": "The capital of France is"},
                {"bad": 1},
                {"messages": [{"role": "user", "content": "Hi"}]},
                {"prompt": "x " * 3000},
                {"prompt": "One, two, three,"},
            ]
        )
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    calls = {"n": 0}
    real = LLM.generate

    def flaky(self, *a, **k):  # the second group dies mid-run
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure")
        return real(self, *a, **k)

    monkeypatch.setattr(LLM, "generate", flaky)
    rc = gen_cli.main(
        [
            "--prompts",
            str(prompts),
            "--output",
            str(out),
            "--batch-size",
            "1",
            "--max-new-tokens",
            "6",
            "--max-len",
            "512",
            "--device",
            "cpu",
            "--attention",
            "dense",
        ]
    )
    recs = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rc == 1 and sorted(recs) == [0, 1, 2, 3, 4]
    assert "Paris" in recs[0]["completion"] and recs[0]["finish_reason"] in ("length", "stop")
    assert "needs a 'prompt'" in recs[1]["error"]
    assert "simulated failure" in recs[2]["error"]
    assert "context holds 512" in recs[3]["error"]
    assert recs[4]["completion_tokens"] == 6 and recs[4]["prompt_tokens"] > 0


def test_generate_cli_refuses_bad_sampling(capsys):
    with pytest.raises(SystemExit):
        gen_cli.main(["--prompt", "hi", "--top-p", "0"])
    assert "top_p (--top-p) must be in (0, 1]" in capsys.readouterr().err


def test_chat_through_stdin():
    p = subprocess.run(
        [
            sys.executable,
            "chat.py",
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
            "--max-len",
            "512",
            "--temperature",
            "0",
        ],
        input="What is the capital of France?\n/reset\nSay hi.\n/exit\n",
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("bot>") == 2 and "Paris" in p.stdout
    assert "(new conversation)" in p.stdout and "tok/s" in p.stdout and p.stdout.rstrip().endswith("bye")
