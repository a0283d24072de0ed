"""The method papers' analyses as subcommands: `python excb.py analyze RUN_DIR` (App. A Fig. 5 cluster sizes,
App. C Fig. 7 t-SNE) and `python resa.py analyze RUN_DIR` (Fig. 3 silhouette / ARI per layer), end to end on the
run directory of random-init ExCB-style checkpoints that tests/test_monitor_cli.py builds (digits, convnet)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import excb  # noqa: E402
import resa  # noqa: E402
from test_monitor_cli import make_run, read  # noqa: E402  (the same fake run as monitor.py's tests)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "fake_digits")


def analyze(script, run, *argv):
    proc = subprocess.run([sys.executable, script, "analyze", str(run), *argv], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_excb_analyze_writes_sizes_and_tsne(run_dir, tmp_path):
    analyze("excb.py", run_dir, "--samples", "300", "--tsne-classes", "4", "--tsne-per-class", "15",
            "--out-dir", tmp_path)
    rows = read(tmp_path / "excb.csv")
    assert list(rows[0]) == ["checkpoint", "epoch", "K", "N", "empty", "empty_frac", "max_rel_size",
                             "median_rel_size", "q10_rel_size", "q90_rel_size"]
    assert [int(r["epoch"]) for r in rows] == [0, 2, 4]
    assert all(int(r["K"]) == 16 and int(r["N"]) == 300 and 0 <= int(r["empty"]) < 16 for r in rows)
    for name in ("monitor_excb_sizes.png", "monitor_excb_tsne.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


def test_excb_batch_statistics_and_summary(run_dir, tmp_path):
    excb.analyze([str(run_dir / "ckpt_epoch0004.pt"), "--samples", "300", "--bn", "batch", "--tsne-classes", "3",
                  "--tsne-per-class", "10", "--out-dir", str(tmp_path)])
    assert [int(r["N"]) for r in read(tmp_path / "excb.csv")] == [300]
    rel, s = excb.cluster_size_summary(torch.tensor([6, 2, 0, 0]))  # K = 4, N = 8: balanced size 2
    assert rel.tolist() == [3.0, 1.0, 0.0, 0.0] and rel.sum() == 4  # relative sizes sum to K
    assert (s["empty"], s["empty_frac"], s["max_rel_size"], s["median_rel_size"]) == (2, 0.5, 3.0, 0.0)


def test_excb_analyze_needs_centroids(tmp_path):
    run = make_run(tmp_path / "r", epochs=(0,), centroids=False)
    with pytest.raises(common.UsageError, match="centroids"):
        excb.analyze([str(run)])


def test_resa_analyze_writes_layers_and_figure(run_dir, tmp_path):
    analyze("resa.py", run_dir, "--samples", "150", "--n-init", "1", "--out-dir", tmp_path)
    rows = read(tmp_path / "resa.csv")
    assert list(rows[0]) == ["checkpoint", "epoch", "layer", "granularity", "split", "n", "sc_mean", "sc_std",
                             "ari"]
    assert {r["layer"] for r in rows} == {"encoder", "proj_hidden0", "proj_hidden1", "embedding"}
    assert len(rows) == 3 * 4
    assert {(r["granularity"], r["split"], r["n"]) for r in rows} == {("fine", "test", "150")}
    assert (tmp_path / "monitor_resa.png").stat().st_size > 1000


def test_resa_train_split_coarse_labels(run_dir, tmp_path, monkeypatch):
    eval_loader = common.eval_loader

    def with_coarse(*a, **kw):  # digits with CIFAR-100-style superclasses: even / odd
        loader = eval_loader(*a, **kw)
        loader.dataset.coarse_targets = loader.dataset.targets % 2
        return loader

    monkeypatch.setattr(common, "eval_loader", with_coarse)
    resa.analyze([str(run_dir / "ckpt_epoch0000.pt"), "--split", "train", "--samples", "200", "--metric",
                  "euclidean", "--out-dir", str(tmp_path)])
    rows = read(tmp_path / "resa.csv")
    assert {(r["granularity"], r["split"]) for r in rows} == {("fine", "train"), ("coarse", "train")}
    assert all(-1 <= float(r["sc_mean"]) <= 1 and float(r["sc_std"]) >= 0 for r in rows)


def test_resa_layer_properties_equal_sklearn():
    from sklearn.metrics import silhouette_score

    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = 6.0 * torch.randn(3, 8, generator=g)[y] + torch.randn(300, 8, generator=g)  # 3 separated blobs
    for metric in ("cosine", "euclidean"):
        out = resa.layer_properties(x, y, metric)
        assert out["sc_mean"] == pytest.approx(silhouette_score(x.numpy(), y.numpy(), metric=metric), abs=1e-6)
    assert out["ari"] == pytest.approx(1.0) and out["sc_mean"] > 0.5 and 0 < out["sc_std"] < 0.2
    assert np.isfinite(resa.layer_properties(torch.randn(60, 4), torch.arange(60) % 2)["ari"])
