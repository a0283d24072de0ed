"""probe.py end to end on digits checkpoints made here: a random-init convnet (epoch 0) and the same convnet
after 2 epochs of supervised training (epoch 2), saved with common.make_checkpoint/save_checkpoint.
The cross-script test on checkpoints of excb.py / resa.py / simclr_nscl.py lives with the lead's tests."""
import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import probe  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 16  # digits at 16 px: 4x cheaper feature extraction than 32 px, same pipeline


def _save(path, model, epoch, data_info=None, heads=None):
    info = data_info or common.dataset_info("digits", SIZE)
    ck = common.make_checkpoint("test", epoch, epoch * 10, {"dataset": info.name, "image_size": SIZE},
                                common.backbone_spec("convnet", SIZE), model, "online", info, {}, heads=heads)
    common.save_checkpoint(path, ck)
    return path


def _projector(dim):
    return nn.Sequential(nn.Linear(dim, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32))


def _supervised_convnet(epochs=2):
    """A trained digits feature extractor: convnet + linear head, Adam, un-augmented images."""
    torch.manual_seed(0)
    model, dim = common.build_backbone("convnet", SIZE)
    info = common.dataset_info("digits", SIZE)
    ds = common.build_dataset("digits", "train", common.eval_transform(SIZE, info.mean, info.std),
                              image_size=SIZE)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    head = nn.Linear(dim, 10)
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=3e-3)
    model.train()
    with common.cpu_threads(1):  # small steps: one thread avoids OpenMP contention on shared cores
        _fit(model, head, opt, x, ds.targets, epochs)
    return model.eval()


def _fit(model, head, opt, x, y, epochs):
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for s in range(0, len(x), 64):
            b = perm[s:s + 64]
            loss = F.cross_entropy(head(model(x[b])), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # One thread for the whole module (module fixtures run before the autouse one), restored at teardown.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("probe_run")
    torch.manual_seed(1)
    random_net, dim = common.build_backbone("convnet", SIZE)
    heads = {"projector": _projector(dim), "normalize_output": True}
    _save(d / "ckpt_epoch0000.pt", random_net, 0, heads=heads)
    _save(d / "ckpt_epoch0002.pt", _supervised_convnet(), 2,
          heads={"projector": _projector(dim), "normalize_output": True})
    yield d
    torch.set_num_threads(threads)


def _rows(d):
    with open(Path(d) / "probe.csv") as f:
        return list(csv.DictReader(f))


def _value(rows, ckpt, probe_name, metric, shots=""):
    hit = [r for r in rows if r["checkpoint"] == ckpt and r["probe"] == probe_name and r["metric"] == metric
           and r["shots"] == str(shots)]
    assert len(hit) == 1, (ckpt, probe_name, metric, shots, len(hit))
    return float(hit[0]["value"])


def _main(argv):
    """probe.py's command line in this process (what `python probe.py ...` runs, minus the interpreter
    start): common.run turns our input errors into one line and exit status 2 (usage) or 1 (run time)."""
    common.run(lambda: probe.main([str(a) for a in argv]))


SUB = ["--max-train", "300"]  # linear-aug / finetune: a class-stratified 300-image train subset


@pytest.fixture(scope="module")
def probed(run_dir):
    """The docs/probe.md command on a run directory with two checkpoints."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _main([run_dir, "--probes", "knn,linear,fewshot,cdnv", "--shots", "1", "5", "20", "--repeats", "3",
               "--fewshot-epochs", "30"])
    return run_dir, out.getvalue()


def test_cli_run_dir_rows_table_plots_and_cache(probed):
    d, out = probed
    rows = _rows(d)
    assert {r["checkpoint"] for r in rows} == {"ckpt_epoch0000.pt", "ckpt_epoch0002.pt"}
    assert {r["probe"] for r in rows} == {"knn", "linear", "fewshot", "cdnv"}
    assert all(r["method"] == "test" and r["features"] == "backbone" and r["dataset"] == "digits" for r in rows)
    js = json.loads((d / "probe.json").read_text())
    assert len(js) == len(rows) and isinstance(js[0]["value"], float)
    # a trained digits encoder is far above chance (10%) with every probe
    for probe_name, metric in (("linear", "top1"), ("knn", "top1_cosine_k20"), ("knn", "top1_euclidean_k5")):
        assert _value(rows, "ckpt_epoch0002.pt", probe_name, metric) > 80
    assert _value(rows, "ckpt_epoch0002.pt", "fewshot", "nccc_test", 20) > 70
    assert _value(rows, "ckpt_epoch0002.pt", "fewshot", "bound_2way", 5) > 0
    trained = {m: _value(rows, "ckpt_epoch0002.pt", "cdnv", m)
               for m in ("cdnv_train", "dir_cdnv_train", "cdnv_test")}
    assert trained["dir_cdnv_train"] <= trained["cdnv_train"]
    # training shrinks the class-distance normalised variance
    assert trained["cdnv_test"] < _value(rows, "ckpt_epoch0000.pt", "cdnv", "cdnv_test")
    assert "checkpoint" in out and "few-shot" in out
    assert (d / "probe_epoch_backbone.png").is_file()
    assert (d / "probe_fewshot_ckpt_epoch0002_backbone.png").is_file()
    assert len(list((d / "features").glob("*.pt"))) == 4  # 2 checkpoints x train/test
    assert common.list_checkpoints(d) == [d / "ckpt_epoch0000.pt", d / "ckpt_epoch0002.pt"]  # cache not listed


def test_cli_single_checkpoint_reuses_cache_and_merges(probed, capsys):
    d, _ = probed
    before = _value(_rows(d), "ckpt_epoch0002.pt", "linear", "top1")
    _main([d / "ckpt_epoch0002.pt", "--probes", "knn", "--no-plots"])
    assert "cached" in capsys.readouterr().out
    rows = _rows(d)
    assert _value(rows, "ckpt_epoch0002.pt", "linear", "top1") == before  # other probes' rows are kept
    assert len([r for r in rows if r["probe"] == "knn"]) == 4


def test_cli_projector_features(probed):
    d, _ = probed
    _main([d / "ckpt_epoch0002.pt", "--features", "projector", "--probes", "fewshot,cdnv", "--shots", "5",
           "--repeats", "2", "--fewshot-epochs", "5", "--no-plots"])
    rows = [r for r in _rows(d) if r["features"] == "projector"]
    assert {r["probe"] for r in rows} == {"fewshot", "cdnv"}
    assert all(r["checkpoint"] == "ckpt_epoch0002.pt" for r in rows)
    assert {r["precision"] for r in rows} == {"fp32"}  # float32 extraction unless --precision bf16


def test_linear_probe_digits_features_matches_sklearn(probed):
    """ReSA's protocol on the trained checkpoint's cached 128-d features vs LogisticRegression."""
    from sklearn.linear_model import LogisticRegression

    d, _ = probed
    tr = torch.load(d / "features" / "ckpt_epoch0002_digits_train_backbone_fp32.pt", weights_only=True)
    te = torch.load(d / "features" / "ckpt_epoch0002_digits_test_backbone_fp32.pt", weights_only=True)
    ours = probe.linear_probe(tr["x"], tr["y"], te["x"], te["y"])
    with threadpool_limits(1):
        clf = LogisticRegression(max_iter=5000).fit(tr["x"].numpy(), tr["y"].numpy())
        ref = 100 * clf.score(te["x"].numpy(), te["y"].numpy())
    assert ref > 85 and ours["top1"] >= ref - 1, (ours, ref)


def test_foreign_and_missing_files_exit_with_a_clear_message(tmp_path, capsys):
    foreign = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    for bad, msg in ((foreign, "not an ssl-clustering checkpoint"), (text, "cannot be read"),
                     (tmp_path / "nothing.pt", "no such"), (tmp_path / "empty_dir", "no checkpoints")):
        if bad.name == "empty_dir":
            bad.mkdir()
        with pytest.raises(SystemExit) as e:
            _main([bad, "--probes", "knn"])
        assert e.value.code != 0
        assert msg in capsys.readouterr().err


def test_mode_linear_aug_on_frozen_backbone(probed):
    d, _ = probed
    ckpt = d / "ckpt_epoch0002.pt"
    frozen = torch.load(ckpt, weights_only=True)["eval_backbone"]
    _main([ckpt, "--mode", "linear-aug", "--epochs", "2", "--batch-size", "50", "--lr", "0.5",
           "--min-crop-scale", "0.6", "--no-plots", *SUB])
    assert _value(_rows(d), "ckpt_epoch0002.pt", "linear_aug", "top1") > 50
    after = torch.load(ckpt, weights_only=True)["eval_backbone"]
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # the checkpoint is untouched


def test_mode_finetune_fraction_and_split_file(probed, capsys):
    d, _ = probed
    ckpt = d / "ckpt_epoch0002.pt"
    _main([ckpt, "--mode", "finetune", "--label-fraction", "0.2", "--epochs", "3", "--batch-size", "20",
           "--lr", "0.1", "--lr-backbone", "0.01", "--no-plots", *SUB])
    assert "60 labelled images of 300" in capsys.readouterr().out  # round(0.2 * 30) per class
    assert _value(_rows(d), "ckpt_epoch0002.pt", "finetune_20pct", "top1") > 50
    split = d / "tiny_split.txt"
    split.write_text("\n".join(str(i) for i in range(0, 300, 10)) + "\n")  # SimCLR-style list, as indices
    _main([ckpt, "--mode", "finetune", "--split-file", split, "--epochs", "1", "--batch-size", "16",
           "--lr", "0.1", "--lr-backbone", "0.001", "--no-plots", *SUB])
    assert "30 labelled images" in capsys.readouterr().out
    assert 0 <= _value(_rows(d), "ckpt_epoch0002.pt", "finetune_tiny_split", "top1") <= 100


def test_label_subset_from_simclr_names_and_stratified():
    names = [f"/data/train/n0{c}/n0{c}_{i}.JPEG" for c in range(3) for i in range(10)]
    targets = torch.arange(3).repeat_interleave(10)
    split = Path(os.environ.get("TMPDIR", "/tmp")) / f"probe_split_{os.getpid()}.txt"
    split.write_text("n01_3.JPEG\nn02_9.JPEG\n\nn00_0.JPEG\n")
    try:
        assert probe.label_subset(targets, split_file=str(split), names=names).tolist() == [13, 29, 0]
        split.write_text("n05_1.JPEG\n")
        with pytest.raises(ValueError, match="not in the dataset"):
            probe.label_subset(targets, split_file=str(split), names=names)
    finally:
        split.unlink()
    idx = probe.label_subset(targets, fraction=0.2, seed=3)
    assert torch.bincount(targets[idx]).tolist() == [2, 2, 2]


def test_transfer_to_another_dataset(tmp_path):
    """A checkpoint pretrained on an ImageFolder set, probed on digits with --dataset (ReSA's transfer)."""
    torch.manual_seed(2)
    net, _ = common.build_backbone("convnet", SIZE)
    ckpt = _save(tmp_path / "ckpt_epoch0001.pt", net, 1, data_info=common.dataset_info("imagefolder", SIZE))
    _main([ckpt, "--dataset", "digits", "--probes", "knn", "--max-train", "500", "--max-test", "200",
           "--no-plots"])
    rows = _rows(tmp_path)
    assert {r["dataset"] for r in rows} == {"digits"} and len(rows) == 2
    assert (tmp_path / "features" / "ckpt_epoch0001_digits_train_backbone_fp32_n500.pt").is_file()
    te = torch.load(tmp_path / "features" / "ckpt_epoch0001_digits_test_backbone_fp32_n200.pt", weights_only=True)
    assert te["x"].shape == (200, 128)


@pytest.mark.parametrize("argv,flag", [
    (["--mode", "train"], "--mode"), (["--features", "z"], "--features"), (["--precision", "fp16"], "--precision"),
    (["--probes", "knn,foo"], "--probes"), (["--probes", ","], "--probes"), (["--lr-schedule", "linear"],
                                                                             "--lr-schedule"),
    (["--device", "tpu"], "--device"), (["--dataset", "mnist"], "--dataset"), (["--knn-k", "0"], "--knn-k"),
    (["--knn-temperature", "nan"], "--knn-temperature"), (["--epochs", "-1"], "--epochs"), (["--lr", "inf"], "--lr"),
    (["--shots", "1", "0"], "--shots"), (["--repeats", "0"], "--repeats"), (["--max-train", "-5"], "--max-train"),
    (["--max-test", "-1"], "--max-test"), (["--label-fraction", "0"], "--label-fraction"),
    (["--label-fraction", "1.5"], "--label-fraction"), (["--min-crop-scale", "0"], "--min-crop-scale"),
])
def test_bad_flags_are_one_line_usage_errors_before_any_work(tmp_path, capsys, argv, flag):
    """Checked from the Args metadata (common.parse_args) before the (missing) checkpoint is looked at: exit 2,
    one `error: argument --flag: ...` line, no traceback."""
    with pytest.raises(SystemExit) as e:
        _main([tmp_path / "missing.pt", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: argument {flag}"), err


def test_device_cuda_without_cuda_and_no_path_are_usage_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, text in (([tmp_path, "--device", "cuda"], "error: argument --device: cuda is not available"),
                       ([], "error: give a checkpoint file or run directory")):
        with pytest.raises(SystemExit) as e:
            _main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith(text), err


def test_probe_list_is_normalised():
    args = common.parse_args(probe.Args, {}, common.path_first(["run", "--probes", " knn,,linear "], "--path"))
    assert (args.path, args.probes) == ("run", "knn,linear")


def test_bench_times_every_probe(capsys):
    """--mode bench's code path on small synthetic features (the real run: 50,000 x 512, see docs/probe.md)."""
    args = common.parse_args(probe.Args, {}, ["--mode", "bench", "--epochs", "3", "--shots", "1", "5",
                                              "--repeats", "2", "--fewshot-epochs", "2"])
    probe.bench(args, torch.device("cpu"), n_train=600, n_test=200, dim=16, classes=4)
    out = capsys.readouterr().out
    for text in ("  knn ", "  linear ", "  cdnv ", "  fewshot ", "synthetic", "few-shot, synthetic",
                 "sklearn LogisticRegression"):
        assert text in out, text
