"""excb.py end to end on CPU, as docs/excb.md runs it: a short digits run whose checkpoints load through
common.py, exact --resume, and a 2-process torchrun (gloo). About 60 s on 2 cores."""
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

# digits preset, shrunk: 256 images, global batch 64 -> 4 steps per epoch, 1 local crop of 8 px, k-means on
# 128 teacher projections (the augmentation of every view, ~3 ms each, dominates on CPU)
TINY = ["--preset", "digits", "--train-subset", "256", "--batch-size", "64", "--num-clusters", "16",
        "--n-local", "1", "--kmeans-samples", "128", "--proj-hidden", "64", "--log-every", "2", "--workers", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(args, cmd=(sys.executable, "excb.py"), timeout=300):
    proc = subprocess.run([*cmd, *TINY, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("excb") / "straight"
    log = run(["--epochs", "2", "--save-every", "1", "--output-dir", str(out)])
    return out, log


def test_digits_run_writes_loadable_checkpoints(two_epochs):
    out, log = two_epochs
    assert "k-means init: K=16" in log and "epoch 1/2" in log
    assert [p.name for p in common.list_checkpoints(out)] == ["ckpt_epoch0001.pt", "ckpt_epoch0002.pt"]
    backbone, meta = common.load_backbone(out / "ckpt_epoch0001.pt")
    assert meta["method"] == "excb" and meta["eval_encoder"] == "teacher" and meta["epoch"] == 1
    assert meta["data"]["num_classes"] == 10 and meta["backbone"]["image_size"] == 16
    heads = common.load_heads(out / "ckpt_epoch0001.pt")
    feats = backbone(torch.randn(3, 3, 16, 16))
    z = torch.nn.functional.normalize(heads["projector"](feats), dim=1) @ heads["centroids"].T
    assert z.shape == (3, 16) and heads["normalize_output"] is True
    torch.testing.assert_close(heads["centroids"].norm(dim=1), torch.ones(16))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epoch_rec = [r for r in records if "excb/size_max" in r]
    assert len(epoch_rec) == 2
    for key in ("excb/size_min", "excb/empty_clusters", "excb/purity", "excb/c_avg_epoch", "excb/a_avg_epoch"):
        assert key in epoch_rec[-1]
    assert any("perf/images_per_s" in r and "excb/s_max" in r for r in records)


def test_resume_is_exact(two_epochs, tmp_path):
    out, _ = two_epochs
    run(["--epochs", "2", "--save-every", "1", "--resume", str(out / "ckpt_epoch0001.pt"),
         "--output-dir", str(tmp_path)])
    a = common.load_checkpoint(out / "ckpt_epoch0002.pt")
    b = common.load_checkpoint(tmp_path / "ckpt_epoch0002.pt")
    assert a["step"] == b["step"] == 8
    for part in ("student", "teacher"):
        for k, v in a["train_state"][part].items():
            assert torch.equal(v, b["train_state"][part][k]), f"{part}.{k} differs after resume"
    assert torch.equal(a["train_state"]["s"], b["train_state"]["s"])


def test_torchrun_two_gloo_ranks(tmp_path):
    log = run(["--epochs", "1", "--output-dir", str(tmp_path)],
              cmd=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "excb.py"))
    assert "global batch 64 = 2 ranks x 32" in log
    ckpt = common.load_checkpoint(tmp_path / "ckpt_epoch0001.pt", method="excb")
    s = ckpt["train_state"]["s"]
    assert ckpt["step"] == 4 and abs(float(s.sum()) - 1) < 1e-5



@pytest.mark.slow
def test_probe_and_monitor_read_the_checkpoints(two_epochs, tmp_path):
    """docs/excb.md's follow-up commands on the run: probe.py's k-NN and `excb.py analyze` (Fig. 5)."""
    out, _ = two_epochs
    for cmd in (["probe.py", str(out), "--probes", "knn", "--out-dir", str(tmp_path / "probe"), "--no-plots"],
                ["excb.py", "analyze", str(out), "--out-dir", str(tmp_path / "mon")]):
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "probe" / "probe.csv").is_file() and (tmp_path / "mon" / "excb.csv").is_file()
