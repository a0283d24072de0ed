"""simclr_nscl.py end to end, as docs/simclr_nscl.md runs it: a tiny digits run writes checkpoints, resuming from
its epoch-1 checkpoint reproduces epoch 2 exactly, eval-gap / gap-vs-classes write their CSVs and plots, and a
2-process torchrun (gloo) trains NSCL on class-balanced global batches. The training run and torchrun are
subprocesses; resume and the evaluations call the same entry points in-process (each interpreter start costs
seconds on a shared CPU)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import simclr_nscl as sn  # noqa: E402

TINY = ["--preset", "digits", "--epochs", "2", "--train-subset", "200", "--batch-size", "100", "--save-every", "1",
        "--log-every", "1", "--loss", "nscl"]


def run(*args, torchrun=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    out = subprocess.run(launcher + ["simclr_nscl.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("nscl") / "run"
    run(*TINY, "--output-dir", d)
    return d


def test_checkpoints_and_log(run_dir):
    assert sorted(p.name for p in run_dir.glob("*.pt")) == [f"ckpt_epoch000{e}.pt" for e in range(3)]
    backbone, meta = common.load_backbone(run_dir / "ckpt_epoch0002.pt")
    heads = common.load_heads(run_dir / "ckpt_epoch0002.pt")
    assert meta["method"] == "simclr_nscl" and meta["eval_encoder"] == "online" and heads["normalize_output"]
    z = heads["projector"](backbone(torch.randn(4, 3, 32, 32)))
    assert z.shape == (4, 64)
    steps = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]  # config: config.json
    assert [r["step"] for r in steps] == list(range(1, 5))
    assert all(0 <= r["nscl/gap_tau1"] <= 0.6 for r in steps)  # Thm. 1 on every training batch


def test_resume_is_exact(run_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): same reduction order, bitwise equality
    try:
        sn.main([*TINY, "--output-dir", str(tmp_path), "--resume", str(run_dir / "ckpt_epoch0001.pt")])
    finally:
        torch.set_num_threads(threads)
    a = common.load_checkpoint(run_dir / "ckpt_epoch0002.pt")["train_state"]
    b = common.load_checkpoint(tmp_path / "ckpt_epoch0002.pt")["train_state"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])


def test_eval_gap_and_gap_vs_classes(run_dir):
    sn.eval_gap([str(run_dir), "--subset", "100", "--batch-size", "50"])  # = `simclr_nscl.py eval-gap RUN ...`
    rows = list(csv.DictReader(open(run_dir / "losses.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2] and (run_dir / "fig2.png").stat().st_size > 0
    for r in rows:
        for split in ("train", "test"):
            assert 0 <= float(r[f"{split}_gap"]) <= float(r["bound"]) == pytest.approx(0.5994, abs=1e-4)
    sn.gap_vs_classes([str(run_dir / "ckpt_epoch0002.pt"), "--classes", "2", "5", "10", "--repeats", "2",
                       "--subset", "100", "--batch-size", "50"])
    rows = list(csv.DictReader(open(run_dir / "gap_vs_classes_ckpt_epoch0002.csv")))
    assert [int(r["C"]) for r in rows] == [2, 5, 10]
    assert all(0 <= float(r["gap_mean"]) <= float(r["bound"]) for r in rows)


def test_torchrun_two_ranks_gloo(tmp_path):
    out = run("--preset", "digits", "--epochs", "1", "--train-subset", "200", "--batch-size", "100",
              "--loss", "nscl", "--log-every", "1", "--output-dir", tmp_path, torchrun=True)
    assert "global batch 100 = 2 x 50 per rank (class-balanced)" in out
    assert (tmp_path / "ckpt_epoch0001.pt").is_file()
