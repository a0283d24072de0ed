"""The CIFAR-10 study pipeline of docs/results.md (docs/study.sh) end to end on a tiny synthetic ImageFolder, so
the commands there keep working. Slow (every script, probe and monitor run once): `pytest -m slow`."""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _tiny_imagefolder(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):  # class-dependent colour + noise: learnable, but not trivially
                base = np.array([25 * c, 255 - 25 * c, 128], dtype=np.float32)
                img = np.clip(base + rng.normal(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.jpg")


@pytest.mark.slow
def test_study_pipeline_on_a_tiny_slice(tmp_path):
    _tiny_imagefolder(tmp_path / "data")
    out = tmp_path / "study"
    env = dict(os.environ, DATA=str(tmp_path / "data"), OUT=str(out), SUBSET="200", EPOCHS="1", SAVE="1",
               SHOTS="1 5 10", TEST="80", K="16", BATCH="60", WORKERS="0", OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", "docs/study.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=3000)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for run in ("resa", "excb", "simclr", "nscl"):
        assert (out / run / "probe.csv").is_file() and (out / run / "monitor.csv").is_file()
        assert len(list((out / run).glob("ckpt_epoch*.pt"))) == 2
    assert (out / "simclr" / "losses.csv").is_file() and (out / "fig2_bottom.png").is_file()
    assert any((out / "excb" / "analysis").glob("*.png"))
    tables = (out / "tables.md").read_text()  # docs/study_tables.py: the tables of docs/results.md
    for title in ("Probes at every checkpoint", "Correlation with linear-probe accuracy", "CL-vs-NSCL gap",
                  "ExCB cluster sizes", "Pretraining throughput"):
        assert title in tables
    assert tables.count("| NSCL | ") >= 2 + 1  # epochs 0 and 1 in the full probe table + throughput


@pytest.mark.slow
def test_overhead_benchmark_prints_one_row_per_method(tmp_path):
    _tiny_imagefolder(tmp_path / "data")
    env = dict(os.environ, DATA=str(tmp_path / "data"), OUT=str(tmp_path / "overhead"), BACKBONES="convnet",
               BATCH="60", STEPS="3", LOG="1", WORKERS="0", K="32", OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", "docs/overhead.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| convnet |")]
    assert len(rows) == 5, res.stdout[-2000:]
    for row in rows:  # images/s, and the rate without the loader wait can only be higher
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert 0 < float(cells[2]) <= float(cells[5])
