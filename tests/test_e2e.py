"""End to end, the way a user runs the repository: pretrain on digits with each method script (a real
subprocess, its own command line), then probe.py and monitor.py read the checkpoints it wrote."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parents[1]
# one epoch on a 256-image subset; every script also writes its checkpoint before training (epoch 0)
TINY = ["--preset", "digits", "--epochs", "1", "--train-subset", "256", "--save-every", "1"]
# The digits take the device path by default (--data-path auto), as in each script's own test file (test_excb_train,
# test_resa_run, test_simclr_nscl_e2e); here three scripts run the DataLoader path, so every script runs both.
METHODS = {
    "resa": ["resa.py", "--data-path", "loader"],
    "excb": ["excb.py", "--save-epoch0", "--kmeans-samples", "256", "--num-clusters", "16", "--data-path", "loader"],
    "simclr_nscl": ["simclr_nscl.py", "--data-path", "loader"],
    "nscl": ["simclr_nscl.py", "--loss", "nscl"],
}


def _run(args, tmp):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.parametrize("name", list(METHODS))
def test_pretrain_then_probe_then_monitor(name, tmp_path):
    import monitor
    import probe

    run_dir = tmp_path / name
    script, *extra = METHODS[name]
    out = _run([script, *TINY, *extra, "--output-dir", str(run_dir)], tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "img/s" in out.stdout and "eta" in out.stdout  # the per-step log line
    assert ("data path: loader" if "loader" in extra else "data path: device") in out.stdout
    ckpts = common.list_checkpoints(run_dir)
    assert [common.load_checkpoint(p)["epoch"] for p in ckpts] == [0, 1]
    assert (run_dir / "log.jsonl").stat().st_size > 0
    meta = common.load_backbone(ckpts[-1])[1]
    assert meta["method"] == ("simclr_nscl" if name == "nscl" else name)

    probe.main([str(run_dir), "--probes", "knn,linear", "--epochs", "30", "--no-plots"])
    rows = list(csv.DictReader(open(run_dir / "probe.csv")))
    knn = [float(r["value"]) for r in rows if r["probe"] == "knn"]
    assert len(knn) >= 2 and all(v > 50 for v in knn)  # chance is 10 %; even a random convnet does far better

    monitor.main([str(run_dir), "--max-samples", "300", "--test-samples", "200", "--lidar-images", "0",
                  "--silhouette-samples", "300"])
    rows = list(csv.DictReader(open(run_dir / "monitor.csv")))
    assert len(rows) >= 2 and any(p.suffix == ".png" for p in run_dir.iterdir())


@pytest.mark.slow  # in-process: tests/test_common.py and test_common_survival.py (another method's checkpoint)
def test_wrong_method_resume_is_refused(tmp_path):
    run_dir = tmp_path / "r"
    assert _run(["resa.py", *TINY, "--epochs", "0", "--output-dir", str(run_dir)], tmp_path).returncode == 0
    ckpt = common.list_checkpoints(run_dir)[0]
    out = _run(["excb.py", *TINY, "--output-dir", str(tmp_path / "e"), "--resume", str(ckpt)], tmp_path)
    assert out.returncode == 1 and "resume it with resa.py" in out.stderr


def test_bad_configuration_is_one_clear_line(tmp_path):
    out = _run(["excb.py", *TINY, "--num-clusters", "1000", "--kmeans-samples", "256",
                "--output-dir", str(tmp_path / "e")], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: k-means init: K=1000 clusters cannot all be non-empty")
