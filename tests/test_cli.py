"""Every bad input to the command-line tools gets one line `error: ...` naming the flag or file, exit code 2 and
no traceback; interrupted runs keep what they produced (CPU, the default model)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanodp import generate as gen_cli

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--device", "cpu", "--max-new-tokens", "4"]


def run(args, module="nanodp.generate", **kw):
    cmd = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, **kw)


def one_error(p, *words):
    """Exit code 2, no traceback, and a line `error: ...` holding every word."""
    assert p.returncode == 2, (p.returncode, p.stdout[-500:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), p.stderr


def model_copy(tmp_path, default_model, **edit):
    """A copy of the default model folder (weights linked) with some files replaced: name -> text."""
    d = tmp_path / "model"
    d.mkdir(parents=True)
    for f in Path(default_model).iterdir():
        (d / f.name).symlink_to(f.resolve())
    for name, text in edit.items():
        (d / name.replace("__", ".")).unlink(missing_ok=True)
        (d / name.replace("__", ".")).write_text(text)
    return d


def test_missing_and_bad_files_before_the_model_loads(tmp_path):
    one_error(run(["--prompts", str(tmp_path / "none.txt")]), "--prompts", "no such file")
    (tmp_path / "p.txt").write_text("hello\n")
    one_error(run(["--prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path)]), "--output", "folder")
    one_error(run(["--prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "p.txt")]), "--output", "--prompts")
    one_error(run(["--prompt", "hi", "--output", "/proc/nope/out.jsonl"]), "--output", "cannot write")
    (tmp_path / "empty.txt").write_text("\n\n")
    one_error(run(["--prompts", str(tmp_path / "empty.txt")]), "holds no prompts")
    if not _cuda():  # where CUDA exists, --device cuda is valid
        one_error(run(["--prompt", "hi", "--device", "cuda"]), "--device")


def _cuda():
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--max-len", "-5"], ["--max-len"]),
        (["--max-len", "0"], ["--max-len"]),
        (["--seed", str(2**70)], ["--seed"]),
        (["--top-p", "0"], ["--top-p"]),
        (["--temperature", "-1"], ["--temperature"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--p1", "0.5", "--p2", "0.9"], ["p2 <= p1"]),
        (["--dense-layers", "100"], ["--dense-layers", "30 layers"]),
        (["--model", "weights/Llama-3.2-1B-Instruct"], ["does not exist"]),
        (["--model", "meta-llama/Llama-3.2-1B"], ["hub id"]),
    ],
)
def test_bad_flags(args, words, capsys):
    with pytest.raises(SystemExit) as e:
        gen_cli.main(["--prompt", "hi", *FAST, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert [x for x in err.splitlines() if x.startswith("error: ")] and all(w in err for w in words), err


def test_broken_model_folders(tmp_path, default_model):
    one_error(
        run(
            [
                "--prompt",
                "hi",
                *FAST,
                "--model",
                str(model_copy(tmp_path / "a", default_model, tokenizer__json="{not json")),
            ]
        ),
        "tokenizer.json",
    )
    one_error(
        run(
            ["--prompt", "hi", *FAST, "--model", str(model_copy(tmp_path / "b", default_model, config__json="[1, 2]"))]
        ),
        "config.json",
        "JSON object",
    )
    one_error(
        run(
            [
                "--prompt",
                "hi",
                *FAST,
                "--model",
                str(model_copy(tmp_path / "c", default_model, tokenizer_config__json="{oops")),
            ]
        ),
        "tokenizer_config.json",
    )
    d = model_copy(tmp_path / "d", default_model)
    cfg = json.loads((Path(default_model) / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    one_error(run(["chat.py", "--device", "cpu", "--model", str(d)], module=None, input=""), "chat_template")
    p = run(["--prompt", "hi", "--chat", *FAST, "--model", str(d)])
    assert p.returncode == 1 and "chat_template" in p.stdout and "Traceback" not in p.stderr


def test_rich_markup_is_never_applied_to_user_text(tmp_path):
    weird = tmp_path / "[/dim] x [old]"
    one_error(run(["--prompts", str(weird / "p.txt")]), "[/dim] x [old]")
    p = run(
        ["chat.py", "--device", "cpu", "--max-new-tokens", "3", "--temperature", "0"],
        module=None,
        input="[/b] hello [bold]\n/exit\n",
    )
    assert p.returncode == 0 and "[/b] hello [bold]" in p.stdout, p.stderr


def test_empty_prompts_and_bad_lines_get_records(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"prompt": ""}\n{"prompt": "The capital of France is"}\n\xff\xfe bad bytes\n{"messages": 3}\n')
    out = tmp_path / "out.jsonl"
    p = run(["--prompts", str(f), "--output", str(out), *FAST])
    recs = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "empty prompt" in recs[0]["error"] and recs[1]["completion_tokens"] == 4
    assert "line 3" in recs[2]["error"] and "UTF-8" in recs[2]["error"] and "error" in recs[3]
    n_new = sum(r.get("completion_tokens", 0) for r in recs.values())
    assert f"{n_new} new tok" in p.stderr  # the summary counts what the records hold


def test_interrupt_keeps_written_records(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(f"Count to {n}:" for n in range(40)) + "\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanodp.generate",
            "--prompts",
            str(f),
            "--output",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "1",
            "--max-new-tokens",
            "8",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = out.read_text().splitlines()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"interrupted: {len(lines)} of 40 written to {out}" in err
    assert all(json.loads(x)["completion"] for x in lines)


def test_kv_cache_sized_to_the_batch(default_model):
    from nanodp import LLM, SamplingParams

    llm = LLM(device="cpu", max_batch=8)
    llm.generate(["Hi"] * 8, SamplingParams(max_new_tokens=3))
    assert llm.engine.max_batch == 8 and llm.engine.max_len <= 256  # not 8 x the 8192-token context


def test_help_shows_every_default():
    for module in ("nanodp.generate", "nanodp.eval", "nanodp.inspect"):
        text = run(["--help"], module=module).stdout
        opts = [b for b in text.split("\n  -")[1:] if not b.startswith("h, --help")]
        flagless = (
            "--prompt ",
            "--prompts",
            "--output",
            "--stop",
            "--chat",
            "--eager",
            "--model",
            "--device",
            "--dtype",
            "--out ",
            "--resume",
            "--pick-from",
            "--plot-only",
            "--prompt-file",
            "--topk-match",
            "--yarn",
            "--seed",
            "--max-len",
            "--time-limit",
            "--answer-tokens",
        )
        for o in opts:
            if not o.lstrip("-").startswith(tuple(f.strip("-") for f in flagless)):
                assert "default" in o, (module, o)


def test_chat_sampling_defaults_from_the_model(tmp_path, default_model):
    from nanodp.sampler import SamplingParams

    p, src = SamplingParams.model_defaults(default_model, temperature=0.7, top_p=0.9)
    assert (p.temperature, p.top_p, src) == (0.7, 0.9, "nanodp's chat defaults")
    d = model_copy(
        tmp_path,
        default_model,
        generation_config__json=json.dumps({"do_sample": True, "temperature": 0.3, "top_k": 20, "eos_token_id": 2}),
    )
    p, src = SamplingParams.model_defaults(d, temperature=0.7, top_p=0.9)
    assert (p.temperature, p.top_k, p.top_p, src) == (0.3, 20, 0.9, "generation_config.json")
    out = run(
        ["chat.py", "--device", "cpu", "--max-new-tokens", "3", "--model", str(d)], module=None, input="Hi\n/exit\n"
    ).stdout
    assert "temperature 0.3" in out and "seed " in out


def test_chat_interrupted_prefill_keeps_the_conversation(monkeypatch, capsys):
    """Ctrl-C while a prompt is prefilled returns to the prompt; the next turn sees only the earlier turns."""
    import io

    from nanodp import chat
    from nanodp.engine import Engine
    from nanodp.tokenizer import Tokenizer

    seen, real_prefill, real_encode = [], Engine.prefill, Tokenizer.encode_chat
    calls = {"n": 0}

    def prefill(self, *a, **k):
        calls["n"] += 1
        if calls["n"] in (1, 3):  # the first turn and the third turn are interrupted
            raise KeyboardInterrupt
        return real_prefill(self, *a, **k)

    monkeypatch.setattr(Engine, "prefill", prefill)
    monkeypatch.setattr(Tokenizer, "encode_chat", lambda self, m, *a: seen.append(m) or real_encode(self, m, *a))
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\nthird\nfourth\n/exit\n"))
    assert chat.main(["--device", "cpu", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("(interrupted; the conversation is as it was)") == 2 and "Traceback" not in out
    contents = [[m["content"] for m in msgs] for msgs in seen]
    assert contents[0] == ["first"] and contents[1] == ["second"]
    assert contents[3][0] == "second" and contents[3][2] == "fourth" and "third" not in contents[3]


pty = pytest.importorskip("pty")


def _pty_chat(inputs, timeout=200):
    """Drive `python chat.py` through a pseudo-terminal: send each input once the previous reply is done."""
    import select

    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.environ.update(OMP_NUM_THREADS="1", TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", COLUMNS="200")
        os.execv(
            sys.executable,
            [sys.executable, "chat.py", "--device", "cpu", "--max-new-tokens", "4", "--temperature", "0"],
        )
    buf, deadline = b"", time.time() + timeout

    def until(pattern, count):
        nonlocal buf
        while buf.count(pattern) < count and time.time() < deadline:
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    buf += os.read(fd, 65536)
                except OSError:
                    break

    try:
        for n, data in enumerate(inputs, 1):
            until(b"you>", n)
            time.sleep(0.5)
            os.write(fd, data[:-1])
            time.sleep(0.5)
            os.write(fd, data[-1:])  # Enter
            until(b"tok/s", n)
        os.write(fd, b"/exit\r")
        until(b"bye", 1)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    return buf.decode("utf-8", "replace")


@pytest.mark.skipif(shutil.which("stty") is None, reason="needs a terminal")
def test_chat_pastes_arrive_whole():
    long_line = " ".join(["the"] * 1500)  # 6K characters on one line, 1,500 tokens (4,096 would be ~1,024)
    multi = "line one\nline two\nline three"
    out = _pty_chat(
        [b"\x1b[200~" + long_line.encode() + b"\x1b[201~\r", b"\x1b[200~" + multi.encode() + b"\x1b[201~\r"]
    )
    assert out.count("bot>") == 2, out[-2000:]
    prefills = [int(x.split(" tok")[0]) for x in out.split("prefill ")[1:]]
    assert prefills[0] > 1500, prefills  # the whole line reached the model (+ the chat template)
