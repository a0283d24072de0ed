"""The README's CIFAR-10 study pipeline (docs/study.sh) end to end on a tiny synthetic ImageFolder, so the
commands in the README keep working. Slow (every script, probe and monitor run once): `pytest -m slow`."""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_study_pipeline_on_a_tiny_slice(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for c in range(10):
            folder = tmp_path / "data" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):  # class-dependent colour + noise: learnable, but not trivially
                base = np.array([25 * c, 255 - 25 * c, 128], dtype=np.float32)
                img = np.clip(base + rng.normal(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.jpg")
    out = tmp_path / "study"
    env = dict(os.environ, DATA=str(tmp_path / "data"), OUT=str(out), SUBSET="200", EPOCHS="1", SAVE="1",
               TEST="80", K="16", BATCH="60", WORKERS="0", OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", "docs/study.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=3000)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for run in ("resa", "excb", "simclr", "nscl"):
        assert (out / run / "probe.csv").is_file() and (out / run / "monitor.csv").is_file()
        assert len(list((out / run).glob("ckpt_epoch*.pt"))) == 2
    assert (out / "simclr" / "losses.csv").is_file() and (out / "fig2_bottom.png").is_file()
    assert any((out / "excb" / "analysis").glob("*.png"))
