"""The cache flags reach the engine's ClusterConfig from every command that declares them (CPU, default model)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanodp import flags
from nanodp.config import ClusterConfig

ROOT = Path(__file__).resolve().parent.parent


def parse(*argv, names=flags.ENGINE):
    return flags.add(argparse.ArgumentParser(), *names).parse_args(list(argv))


def test_kmeans_iters_default_is_the_engines():
    assert parse().kmeans_iters == ClusterConfig().kmeans_iters == 6
    assert flags.cluster_from_args(parse("--kmeans-iters", "3")).kmeans_iters == 3
    assert flags.llm_options(parse("--kmeans-iters", "3"))["kmeans_iters"] == 3
    # a command declaring only some cache flags gets the engine's defaults for the others
    cc = flags.cluster_from_args(parse("--kmeans-iters", "4", names=("kmeans-iters",)))
    assert cc == ClusterConfig(kmeans_iters=4)
    with pytest.raises(ValueError, match="kmeans_iters"):
        flags.check_engine_args(parse("--kmeans-iters", "0"))


def test_kmeans_iters_reaches_the_engine(default_model):
    llm = flags.build_llm(parse("--device", "cpu", "--kmeans-iters", "3", "--max-len", "64"), max_batch=1)
    assert llm.engine.cluster.kmeans_iters == 3 and llm.engine.cache.cfg.kmeans_iters == 3


def test_eval_passes_kmeans_iters_to_its_engine(monkeypatch, default_model):
    import nanodp.engine
    from nanodp.eval import cli

    seen = {}

    def engine(*a, cluster=None, **kw):
        seen["cluster"] = cluster
        raise ValueError("stop here")

    monkeypatch.setattr(nanodp.engine, "Engine", engine)
    assert cli.main(["--device", "cpu", "--kmeans-iters", "2", "--cluster-size", "8", "--lengths", "64"]) == 2
    assert seen["cluster"] == ClusterConfig(kmeans_iters=2, cluster_size=8)


@pytest.mark.parametrize("module", ["nanodp.eval", "nanodp.generate", "nanodp.bench e2e", "chat.py"])
def test_every_command_declares_kmeans_iters(module):
    cmd = [sys.executable, *(["-m"] if module != "chat.py" else []), *module.split(), "--help"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert "--kmeans-iters" in out and "(default: 6)" in out.split("--kmeans-iters KMEANS_ITERS\n")[1][:200], module


def test_bench_e2e_refuses_a_bad_kmeans_iters_before_the_gpu():
    p = subprocess.run(
        [sys.executable, "-m", "nanodp.bench", "e2e", "--kmeans-iters", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "kmeans_iters must be >= 1" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize(
    "args,msg",
    [
        (['{"nope": 1}'], "unknown launch shapes ['nope']"),
        (["group=1"], "JSON object"),
        (["5"], "JSON object"),
        (['["group"]'], "JSON object"),
        (['{"group": "8"}'], "JSON object"),
        (['{"group": 0}'], "group (0) and cb (32) must be >= 1"),
        (['{"group": 12}'], "group must divide cb"),
        (['{"attn_maxnreg": 16}'], "attn_maxnreg (16) must be 0 (no cap) or 32-255"),
        (['{"group": 1}', "--write-auto"], "--tiles and --write-auto"),
    ],
)
def test_bench_e2e_refuses_bad_tiles_before_the_gpu(args, msg):
    cmd = [sys.executable, "-m", "nanodp.bench", "e2e", "--tiles", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr


def test_eval_resume_keeps_only_runs_with_the_same_clusters(tmp_path, capsys):
    from nanodp.eval import report

    old = {"meta": {"prompts_sha": "x", "args": {"cluster_size": 16}}, "methods": {"dense": {"outputs": 1}}}
    (tmp_path / "results.json").write_text(json.dumps(old))
    for kmeans_iters, kept in ((10, True), (3, False)):  # a run from before the flag had the default, 10
        R = {"meta": {"prompts_sha": "x", "args": {"cluster_size": 16, "kmeans_iters": kmeans_iters}}, "methods": {}}
        report.resume(R, tmp_path)
        assert ("dense" in R["methods"]) == kept
    assert "other kmeans_iters" in capsys.readouterr().err
