"""resa.py end to end, as docs/resa.md runs it (CPU): a tiny digits run writes checkpoints that common.py,
probe.py and monitor.py load; resuming from its epoch-1 checkpoint reproduces epoch 2 exactly; a 2-process
torchrun (gloo) trains, and with the EMA frozen (m = 1) its momentum net stays at the initialisation."""
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

# 160 images / batch 64 = 2 steps per epoch; 16 px (the digits preset's size); views made in batches on the
# device (what auto picks for the digits), so test_resume_is_exact covers that path's exact resume
TINY = ["--preset", "digits", "--epochs", "2", "--train-subset", "160", "--batch-size", "64", "--save-every", "1",
        "--log-every", "1", "--data-path", "device"]


def run(*args, script="resa.py", torchrun=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    out = subprocess.run(launcher + [script, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("resa") / "run"
    run(*TINY, "--output-dir", d)
    return d


def test_checkpoints_log_and_heads(run_dir):
    assert sorted(p.name for p in run_dir.glob("*.pt")) == [f"ckpt_epoch000{e}.pt" for e in range(3)]
    backbone, meta = common.load_backbone(run_dir / "ckpt_epoch0002.pt")
    heads = common.load_heads(run_dir / "ckpt_epoch0002.pt")
    assert meta["method"] == "resa" and meta["eval_encoder"] == "momentum" and meta["epoch"] == 2
    assert meta["step"] == 4 and meta["data"]["image_size"] == 16 and heads["normalize_output"] is True
    z = heads["projector"](backbone(torch.randn(4, 3, 16, 16)))
    assert z.shape == (4, 64)
    # the stored evaluation encoder is the MOMENTUM encoder of the training state
    state = common.load_checkpoint(run_dir / "ckpt_epoch0002.pt")["train_state"]
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, state["momentum"]["encoder." + k]), k
    config = json.loads((run_dir / "config.json").read_text())  # the configuration and provenance, beside the log
    assert config["precision"] == "fp32" and config["config"]["epochs"] == 2 and config["world_size"] == 1
    assert config["created"].endswith("Z") and config["torch_version"] == torch.__version__
    assert "git_commit" in config and isinstance(config["git_dirty"], bool)  # the tests run from a git checkout
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert all(isinstance(r["epoch"], int) and isinstance(r["step"], int) for r in records)  # pandas-ready
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"loss", "sched/lr", "sched/ema", "perf/images_per_s", "perf/peak_mem_gb", "perf/eta_s",
                "resa/a_entropy", "resa/a_self"} <= set(r)
        # CE(A, p) >= H(A) >= 0, and the loss starts near log N (uniform) for a random network
        assert r["resa/a_entropy"] <= r["loss"] <= 1.5 * torch.log(torch.tensor(64.0)).item()
    assert records[0]["sched/lr"] == 0.0 and records[0]["sched/ema"] == pytest.approx(0.99)


def test_resume_is_exact(run_dir, tmp_path):
    import resa
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # in-process (saves an interpreter start), same thread count as the fixture run
    try:
        resa.main([*TINY, "--output-dir", str(tmp_path), "--resume", str(run_dir / "ckpt_epoch0001.pt")])
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ckpt_epoch0002.pt"]
    a = common.load_checkpoint(run_dir / "ckpt_epoch0002.pt")["train_state"]
    b = common.load_checkpoint(tmp_path / "ckpt_epoch0002.pt")["train_state"]
    for net in ("online", "momentum"):
        for k, v in a[net].items():
            assert torch.equal(v, b[net][k]), (net, k)
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])


def test_probe_loads_the_run(run_dir, tmp_path):
    import probe
    probe.main([str(run_dir / "ckpt_epoch0002.pt"), "--probes", "knn", "--no-plots", "--out-dir", str(tmp_path)])
    assert "knn" in (tmp_path / "probe.csv").read_text()


@pytest.mark.slow
def test_monitor_loads_the_run(run_dir, tmp_path):
    run(run_dir, "--preset", "quick", "--max-samples", "300", "--features", "all", "--out-dir", tmp_path,
        script="monitor.py")
    assert (tmp_path / "monitor.csv").is_file()


def test_torchrun_two_ranks_gloo_and_frozen_ema(tmp_path):
    out = run("--preset", "digits", "--epochs", "1", "--train-subset", "160", "--batch-size", "64",
              "--ema-base", "1.0", "--log-every", "1", "--output-dir", tmp_path, torchrun=True)
    assert "global batch 64 = 2 ranks x 32" in out
    before = common.load_checkpoint(tmp_path / "ckpt_epoch0000.pt")["train_state"]
    after = common.load_checkpoint(tmp_path / "ckpt_epoch0001.pt")["train_state"]
    # m = 1: momentum PARAMETERS change only through the EMA, so not at all; its BN running statistics move
    # (train mode); the online net trains
    for k, v in before["momentum"].items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert not torch.equal(v, after["momentum"][k]), k
        else:
            assert torch.equal(v, after["momentum"][k]), k
    assert not torch.equal(before["online"]["projector.0.weight"], after["online"]["projector.0.weight"])
