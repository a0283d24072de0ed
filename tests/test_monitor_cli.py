"""monitor.py end to end on a run directory of random-init checkpoints (digits, convnet), and its errors."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import monitor  # noqa: E402

# small enough for a 2-core CPU: 300 train / 150 test digits, LiDAR on 40 images x 2 views, one k-means restart
FAST = ["--max-samples", "300", "--test-samples", "150", "--lidar-images", "40", "--lidar-views", "2",
        "--kmeans-n-init", "1", "--silhouette-samples", "300"]


def make_run(run_dir, epochs=(0, 2, 4), K=16, centroids=True, seed=0):
    """Checkpoints in the repository's format around a random-init convnet whose weights drift a little per
    epoch, with a projector MLP and K random unit centroids (the heads of an ExCB checkpoint)."""
    torch.manual_seed(seed)
    backbone, dim = common.build_backbone("convnet", 32)
    proj = nn.Sequential(nn.Linear(dim, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64),
                         nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32))
    info = common.dataset_info("digits")
    for e in epochs:
        with torch.no_grad():
            for p in list(backbone.parameters()) + list(proj.parameters()):
                p.add_(0.05 * torch.randn_like(p))
        heads = {"projector": proj, "normalize_output": True}
        if centroids:
            heads["centroids"] = nn.functional.normalize(torch.randn(K, 32), dim=1)
        ck = common.make_checkpoint("fake", e, 10 * e, {"dataset": "digits", "train_subset": 0},
                                    common.backbone_spec("convnet", 32), backbone, "online", info, {}, heads=heads)
        common.save_checkpoint(Path(run_dir) / f"ckpt_epoch{e:04d}.pt", ck)
    return Path(run_dir)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "fake_digits")


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_end_to_end_all_outputs(run_dir, tmp_path):
    out = tmp_path / "out"
    monitor.main([str(run_dir), *FAST, "--features", "all", "--out-dir", str(out)])
    rows = read(out / "monitor.csv")
    assert list(rows[0]) == ["checkpoint", "epoch", "method", "features", "precision", "metric", "value", "unit",
                             "note"]
    units = {r["metric"]: r["unit"] for r in rows}  # pandas reads it as it is: one unit per metric
    assert units["entropy_gaussian"] == units["entropy_knn"] == "nats" and units["probe_acc"] == "%"
    assert {units[m] for m in ("silhouette", "agreement", "rankme", "alpha_req", "lidar", "ami_gt")} == {""}
    assert {r["precision"] for r in rows} == {"fp32"}  # float32 features unless --precision bf16
    assert sorted({int(r["epoch"]) for r in rows}) == [0, 2, 4]
    for fs in ("backbone", "projector"):
        got = {r["metric"] for r in rows if r["features"] == fs}
        assert set(monitor.MONITORED) <= got, set(monitor.MONITORED) - got
    agreement = [r for r in rows if r["metric"] == "agreement"]
    assert all("pairing=views" in r["note"] for r in agreement)
    assert all(0 < float(r["value"]) < 64 for r in rows if r["metric"] == "intrinsic_dimension")
    probe = {int(r["epoch"]): float(r["value"]) for r in rows if r["metric"] == "probe_acc"}
    assert len(probe) == 3 and all(0 <= p <= 100 for p in probe.values())
    assert all("common.knn_accuracy" in r["note"] for r in rows if r["metric"] == "probe_acc")  # auto -> knn
    # the k-NN probe is common.knn_accuracy on the same features (no second k-NN in monitor.py)
    args = monitor.parse([str(run_dir), *FAST])
    backbone, heads, meta = monitor.load_checkpoint(sorted(run_dir.glob("*.pt"))[-1], torch.device("cpu"))
    data = monitor.Data(meta, args)
    (tr, y), (te, ty) = (monitor.embed(backbone, heads, data.loader(split, n), torch.device("cpu"), ["backbone"])
                         for split, n in (("train", 300), ("test", 150)))
    assert probe[4] == pytest.approx(common.knn_accuracy(tr["backbone"], y, te["backbone"], ty), abs=1e-9)
    corr = read(out / "monitor_correlations.csv")
    assert {(r["features"], r["metric"], r["skip_early"]) for r in corr} >= {
        ("backbone", "rankme", "0"), ("projector", "lidar", "1"), ("backbone", "intrinsic_dimension", "0")}
    for name in ("monitor_epoch_backbone.png", "monitor_probe_backbone.png", "monitor_epoch_projector.png",
                 "monitor_probe_projector.png", "monitor_config.json"):
        assert (out / name).stat().st_size > 1000, name
    assert not list(out.glob("*resa*")) + list(out.glob("*excb*"))  # the paper analyses: resa.py / excb.py analyze


def test_probe_csv_and_seeds_pairing(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    acc = {0: 20.0, 2: 35.5, 4: 41.0}
    with open(run / "probe.csv", "w", newline="") as f:  # probe.py's format
        w = csv.writer(f)
        w.writerow(["checkpoint", "epoch", "method", "features", "dataset", "probe", "metric", "shots", "value",
                    "std"])
        for e, a in acc.items():
            ck = f"ckpt_epoch{e:04d}.pt"
            w.writerow([ck, e, "fake", "backbone", "digits", "knn", "top1_cosine_k20", "", a, ""])
            w.writerow([ck, e, "fake", "backbone", "digits", "knn", "top1_euclidean_k5", "", 99.0, ""])
            w.writerow([ck, e, "fake", "projector", "digits", "knn", "top1_cosine_k20", "", 1.0, ""])
            w.writerow([ck, e, "fake", "backbone", "cifar10", "knn", "top1_cosine_k20", "", 2.0, ""])
    monitor.main([str(run), *FAST, "--pairing", "seeds", "--features", "projector", "--lidar-images", "0",
                  "--entropy", "gaussian", "--skip-early", "0"])
    rows = read(run / "monitor.csv")
    got = {int(r["epoch"]): float(r["value"]) for r in rows if r["metric"] == "probe_acc"}
    assert got == acc
    assert all("probe.csv knn top1_cosine_k20" == r["note"] for r in rows if r["metric"] == "probe_acc")
    assert all("pairing=seeds" in r["note"] for r in rows if r["metric"] == "agreement")
    assert {r["features"] for r in rows} == {"projector", "backbone"}  # backbone only for the probe row
    assert not any(r["metric"] in ("lidar", "entropy_knn") for r in rows)
    (run / "probe.csv").unlink()
    with pytest.raises(common.UsageError, match="probe.py"):  # --probe csv without probe.csv
        monitor.main([str(run), *FAST, "--probe", "csv"])


@pytest.mark.parametrize("argv, names", [
    (["--analysis", "excb"], "excb.py analyze"), (["--analysis=resa"], "resa.py analyze"),
    (["--excb-bn", "batch"], "excb.py analyze"), (["--resa-split", "train"], "resa.py analyze"),
    (["--probe", "ridge"], "--probe knn"), (["--ridge-lambda", "0.1"], "--probe knn")])
def test_removed_flags_are_refused_with_their_replacement(tmp_path, argv, names):
    with pytest.raises(common.UsageError, match=names.replace(".", r"\.")):
        monitor.main([str(tmp_path), *argv])


def test_usage_errors_are_one_line_exit_2(tmp_path, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "monitor.py", str(tmp_path), "--analysis", "resa", "excb"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)  # common.run: UsageError -> exit 2
    assert proc.returncode == 2 and proc.stderr.startswith("error: argument --analysis"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for argv in (["--features", "head"], ["--lidar-views", "1"], ["--view-scale", "0", "1"]):  # the Args checks
        with pytest.raises(SystemExit) as e:
            monitor.main([str(tmp_path), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: argument {argv[0]}") and err.count("\n") == 1, err


def test_help_reads_whole(capsys):
    with pytest.raises(SystemExit) as e:
        monitor.main(["--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert e.value.code == 0 and description.startswith("monitor.py: label-free monitoring")
    assert description.rstrip().endswith(".") and "intrinsic" in description  # not cut mid-sentence
    assert "{auto,csv,knn,none}" in out and "ridge" not in out


def test_views_are_identical_across_passes_cached_or_not(run_dir):
    backbone, heads, meta = monitor.load_checkpoint(sorted(run_dir.glob("*.pt"))[0], torch.device("cpu"))
    feats = []
    for cache_gb in (2.0, 0.0):  # views drawn once and kept, or redrawn on every pass from the same seed
        data = monitor.Data(meta, monitor.parse([str(run_dir), "--cache-gb", str(cache_gb)]))
        loader = data.loader("train", 64, "aug", n_views=2, n_images=16, seed=3)
        assert isinstance(loader.dataset, torch.utils.data.TensorDataset) == (cache_gb > 0)
        for _ in range(2):
            out, y = monitor.embed(backbone, heads, loader, torch.device("cpu"), ["backbone"], seed=3)
            feats.append(out["backbone"])
    assert len(y) == 32 and all(torch.equal(feats[0], f) for f in feats[1:])
    assert not torch.allclose(feats[0][0::2], feats[0][1::2])  # the two views of an image differ


def test_run_dir_without_checkpoints(tmp_path):
    with pytest.raises(common.CheckpointError, match="no checkpoints"):
        monitor.main([str(tmp_path)])


def test_damaged_checkpoint_clear_error_and_skip(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    bad = run / "ckpt_epoch0002.pt"
    bad.write_bytes(bad.read_bytes()[:1000])  # a truncated copy
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "monitor.py", str(run)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # a run-time failure (issue 21): exit 1, before anything is written
    assert "error:" in proc.stderr and "ckpt_epoch0002.pt" in proc.stderr and "damaged" in proc.stderr
    assert "--skip-damaged" in proc.stderr and not (run / "monitor.csv").exists()
    assert "Traceback" not in proc.stderr
    monitor.main([str(run), *FAST, "--skip-damaged", "--pairing", "seeds", "--lidar-images", "0", "--entropy",
                  "gaussian", "--probe", "none"])
    assert sorted({int(r["epoch"]) for r in read(run / "monitor.csv")}) == [0, 4]
