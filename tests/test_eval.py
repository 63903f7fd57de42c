"""The evaluation harness cannot silently break: task generators (sizes, answers, determinism) and a tiny
`python -m nanodp.eval` run on the CPU (dense answers a passkey; every metric is there and sane)."""

import json
from types import SimpleNamespace

import pytest

from nanodp.config import ClusterConfig
from nanodp.eval import cli
from nanodp.eval import harness as ev
from nanodp.eval import metrics as eval_metrics
from nanodp.eval.kinds import KINDS
from nanodp.eval.tasks import make_tasks
from nanodp.tokenizer import Tokenizer

PROSE = (
    "It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of boiled "
    "cabbage and old rag mats. At one end of it a coloured poster, too large for indoor display, had been "
    "tacked to the wall. Outside, even through the shut window-pane, the world looked cold. "
) * 3


@pytest.fixture(scope="module")
def tok(default_model):
    return Tokenizer(default_model)


def test_tasks_sized_answered_and_deterministic(tok, tmp_path):
    prose = tmp_path / "prose.txt"
    prose.write_text(PROSE)
    kw = dict(kinds=KINDS, lengths=[400, 1500], depths=[0.0, 0.5, 1.0], n=1)
    a = make_tasks(tok, seed=3, **kw)
    assert a == make_tasks(tok, seed=3, **kw), "same seed, different prompts"
    b = make_tasks(tok, seed=4, **kw)
    assert [t["prompt_ids"] for t in a] != [t["prompt_ids"] for t in b]
    assert len({t["id"] for t in a}) == len(a) == len(KINDS) * 2 * 3
    for t in a + make_tasks(tok, ["passkey", "multi_query"], [600], [0.3], 2, 5, haystack=str(prose), chat=True):
        n = len(t["prompt_ids"])
        assert 0.95 * t["length"] <= n <= t["length"], (t["id"], n)
        text = tok.decode(t["prompt_ids"])
        assert t["answers"] and all(ans in text for ans in t["answers"]), t["id"]
    deep = [t for t in a if t["kind"] == "passkey" and t["length"] == 1500]
    pos = [tok.decode(t["prompt_ids"]).find(t["answers"][0]) for t in deep]
    assert pos == sorted(pos), "depth 0 -> 0.5 -> 1 moves the needle towards the end"
    chat = make_tasks(tok, ["passkey"], [600], [0.3], 1, 5, chat=True)[0]
    assert tok.decode(chat["prompt_ids"], skip_special_tokens=False).startswith("<|im_start|>")
    capped = make_tasks(tok, ["single_needle"], [600], [0.5], 1, 5, max_prompt=500)[0]
    assert capped["length"] == 600 and len(capped["prompt_ids"]) <= 500


def test_methods_parse_and_score():
    assert ev.parse_method("doublep-max:0.95:0.7")["sparse"]["group_rule"] == "max"
    assert ev.parse_method("doublep-gauss:0.95:0.7:f256")["sparse"]["floor"] == 256
    assert ev.parse_method("doublep:0.95:0.7")["sparse"]["floor_frac"] == 0.0
    ccfg = ClusterConfig()  # a floor of F% of each head's clustered tokens; topk:F% of the prompt's
    args, ntok = SimpleNamespace(dense_layers=0), 1000 + ccfg.sinks + ccfg.window
    sp = ev.sparse_for(ev.parse_method("doublep:0.95:0.7:f10%"), 1000, ntok, {}, args, ccfg)
    assert (sp.floor, sp.floor_frac) == (0, 0.1)
    sp = ev.sparse_for(ev.parse_method("doublep:0.95:0.7"), 1000, ntok, {}, args, ccfg)  # no floor: none
    assert (sp.floor, sp.floor_frac) == (0, 0.0)
    assert ev.sparse_for(ev.parse_method("topk:10%"), 1000, ntok, {}, args, ccfg).budget == 100
    for bad in ("doublep:0.95:0.7:f10%%", "doublep:0.95:0.7:f150%"):  # refused before anything runs
        with pytest.raises(ValueError):
            ev.parse_method(bad)
    assert ev.parse_method("topk=doublep:0.9:0.7")["match"] == "doublep:0.9:0.7"
    assert ev.parse_method("topk:5%")["budget"] == "5%"
    for bad in ("doublep:0.5:0.9", "topk", "sparse"):
        with pytest.raises(ValueError):
            ev.parse_method(bad)
    task = {"answers": ["123", "456"]}
    assert ev.score(task, "It is 123 and 45") == 0.5 and ev.score(task, "456, 123.") == 1.0


def test_tiny_eval_run_on_cpu(default_model, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "--device",
        "cpu",
        "--lengths",
        "300",
        "--tasks",
        "passkey,single_needle",
        "--n",
        "1",
        "--depths",
        "0.5",
        "--answer-tokens",
        "10",
        "--methods",
        "dense,doublep:0.95:0.7",
        "--topk-match",
        "--fidelity-n",
        "1",
        "--teacher-tokens",
        "3",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval"]
    R = json.loads((out / "results.json").read_text())
    assert set(R["methods"]) == {"dense", "doublep:0.95:0.7", "topk=doublep:0.95:0.7"}
    pk = next(t for t in R["tasks"] if t["kind"] == "passkey")
    assert R["methods"]["dense"]["outputs"][pk["id"]]["score"] == 1.0, "dense must find the passkey at 300 tokens"
    d, s = line["methods"]["dense"], line["methods"]["doublep:0.95:0.7"]
    assert d["kv_bytes_max_len"] == 1.0 and d["kl"] == 0 and d["mass"] == 1.0 and d["agree"] == 3
    assert 0 < s["kv_bytes_max_len"] < 1 and 0 < s["exact_max_len"] < 1 and s["kl"] >= 0
    assert 0.3 < s["mass"] <= 1.0 + 1e-6 and s["mass_x"] <= s["mass"] + 1e-9 and s["err"] > 0
    fid = R["methods"]["doublep:0.95:0.7"]["fidelity"]["300"]
    assert len(fid["err_layers"]) == 30 and fid["n"] == 1
    kv = R["methods"]["topk=doublep:0.95:0.7"]["kv"]["300"]
    assert kv["sparse"]["attention"] == "topk" and kv["sparse"]["budget"] > 0
    assert R["pick"] == "doublep:0.95:0.7"  # the only candidate: picked, passing the targets or not
    # the same command and seed give the same prompts and scores; --pick-from adds the development run's pick
    short = argv[:-2] + ["--methods", "dense", "--no-topk-match", "--fidelity-n", "0", "--out"]
    assert cli.main(short[:-1] + ["--pick-from", str(out), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["meta"]["prompts_sha"] == R["meta"]["prompts_sha"]
    for m in ("dense", "doublep:0.95:0.7"):
        assert again["methods"][m]["outputs"] == R["methods"][m]["outputs"]
    # --resume keeps what a run already did (also the methods it is not asked for this time)
    assert cli.main(short + [str(out), "--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["methods"] == R["methods"]
    # out of time before the first batch: no results, but still a table and the JSON line
    capsys.readouterr()
    assert cli.main(short + [str(tmp_path / "none"), "--time-limit", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval"]["methods"] == {}


def test_plot_only_keeps_the_methods_asked_for(tmp_path, capsys):
    tasks = [{"id": "passkey-noise-300-d0.5-0", "kind": "passkey", "length": 300, "depth": 0.5}]
    out = {tasks[0]["id"]: {"score": 1.0, "agree": 3}}
    kv = {"kv_bytes": 0.3, "exact": {"mean": 0.2}, "pseudo": {"mean": 0.01}, "exact_layer_head": [[0.2]]}
    R = {
        "meta": {"args": {"seed": 0, "teacher_tokens": 3}, "prompts_sha": "0" * 12},
        "tasks": tasks,
        "methods": {
            m: {"outputs": out, "kv": {"300": kv}, "fidelity": {}} for m in ("dense", "doublep:1:1", "topk:5%")
        },
    }
    (tmp_path / "results.json").write_text(json.dumps(R))
    assert cli.main(["--plot-only", str(tmp_path), "--methods", "dense,topk:5%", "--out", str(tmp_path / "few")]) == 0
    assert sorted(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval"]["methods"]) == [
        "dense",
        "topk:5%",
    ]
    assert len(json.loads((tmp_path / "results.json").read_text())["methods"]) == 3  # the source is untouched


def test_plot_only(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    tasks = [
        {"id": f"passkey-noise-{n}-d{d}-0", "kind": "passkey", "length": n, "depth": d}
        for n in (300, 600)
        for d in (0.1, 0.9)
    ]
    out = {t["id"]: {"score": 1.0, "agree": 3} for t in tasks}
    kv = {"kv_bytes": 0.3, "exact": {"mean": 0.2}, "pseudo": {"mean": 0.01}, "exact_layer_head": [[0.2, 0.3]] * 4}
    R = {
        "meta": {
            "args": {"seed": 0, "teacher_tokens": 3},
            "prompts_sha": "0" * 12,
            "device": "cpu",
            "dtype": "torch.float32",
        },
        "tasks": tasks,
        "methods": {
            m: {"outputs": out, "kv": {"300": kv, "600": kv}, "fidelity": {}} for m in ("dense", "doublep:1:1")
        },
    }
    (tmp_path / "results.json").write_text(json.dumps(R))
    assert cli.main(["--plot-only", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval"]["pick"] == "doublep:1:1"
    assert all((tmp_path / f).is_file() for f in ("pareto.png", "depth.png", "exact_heads.png"))


def test_read_masks_match_the_kernel_selection():
    """The fidelity pass's masks are the twin's own selection: same exact-token counts, and with no pseudo-tokens
    the method's output is dense attention renormalised over the exact mask."""
    import math

    import torch

    from nanodp.bench.sparse import make_synthetic
    from nanodp.config import SparseConfig
    from nanodp.kernels.doublep import sparse_ref

    torch.manual_seed(0)
    q, layer, lens, tail = make_synthetic(2, 6, 2, 32, 700, device="cpu", dtype=torch.float32, rel_frac=0.1, boost=2.0)
    lens = lens - torch.tensor([0, 50], dtype=torch.int32)
    nf = dict(floor_frac=0.0)  # SparseConfig default has a floor
    for sp in (
        SparseConfig("doublep", 0.8, 0.8, **nf),
        SparseConfig("doublep", 0.8, 0.8, "max", **nf),
        SparseConfig("topk", budget=100),
        SparseConfig("doublep", 0.9, 0.6, **nf),
        SparseConfig("doublep", 0.8, 0.8, floor=120, **nf),
        SparseConfig("doublep", 0.9, 0.6, floor_frac=0.3),
    ):
        o, st = sparse_ref(q, layer, lens, tail, 4, sp)
        exact, kept = eval_metrics.read_masks(q, layer, lens, tail, sp, 4)
        assert torch.equal(exact.sum(-1).int(), st["exact_tokens"])
        assert bool((kept.sum(-1) > exact.sum(-1)).any()) == bool(st["pseudo_tokens"].sum() > 0)
        if sp.p1 == sp.p2:
            x = torch.einsum("bhgd,bhld->bhgl", q.view(2, 2, 3, 32), layer.k) / math.sqrt(32)
            ref = torch.einsum("bhgl,bhld->bhgd", x.masked_fill(~exact[:, :, None], -math.inf).softmax(-1), layer.v)
            assert torch.allclose(ref.reshape(o.shape), o, atol=1e-5)
