"""docs/gpu_check.sh --tiny: every part of the prepared GPU check (throughput grid on both data paths, a compiled
run, the real SimCLR run and its k-NN) on CPU, so the script cannot rot between the sessions that have a GPU."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_runs_every_part(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    out = subprocess.run(["bash", "docs/gpu_check.sh", "--tiny"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    rows = res["throughput"]
    assert {r["method"] for r in rows} == {"SimCLR", "NSCL", "ReSA", "ExCB (2 views)", "ExCB (2 + 6 crops)"}
    assert {(r["path"], r["compile"]) for r in rows} == {("device", "no"), ("loader", "no"), ("device", "yes")}
    assert all(r["images_per_s"] > 0 and 0 <= r["data_frac"] <= 1 for r in rows)
    assert res["precision"] == "fp32" and res["run"]["epochs"] >= 1 and res["run"]["knn_top1"].endswith("%")
    md = (tmp_path / "results.md").read_text()
    assert "| SimCLR | device | yes |" in md and "k-NN" in md and res["env"]["torch"] in md
