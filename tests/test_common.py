"""common.py: datasets, views, loaders, backbones, checkpoints, argument parsing, schedules, logging."""
import dataclasses
import errno
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common

# ---------------------------------------------------------------------------------------------- data


def test_digits_dataset_is_fixed_and_balanced():
    train, test = common.build_dataset("digits", "train"), common.build_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360) and train.num_classes == 10
    image, label = train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and 0 <= label < 10
    assert torch.bincount(test.targets).min() >= 35  # stratified split
    again = common.build_dataset("digits", "train")
    assert torch.equal(train.targets, again.targets)  # documented, fixed split
    sub = common.build_dataset("digits", "train", subset=200, seed=1)
    assert len(sub) == 200 and torch.bincount(sub.targets).min() >= 19
    assert torch.equal(sub.targets, train.targets[sub.indices])


def _write_fake_cifar(root: Path, n=20, hundred=False):
    rng = np.random.default_rng(0)
    if hundred:
        base = root / "cifar-100-python"
        base.mkdir(parents=True)
        for split in ("train", "test"):
            d = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                 "fine_labels": list(range(n)), "coarse_labels": [i // 5 for i in range(n)]}
            pickle.dump(d, open(base / split, "wb"))
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, open(base / "meta", "wb"))
    else:
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True)
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            d = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
            pickle.dump(d, open(base / name, "wb"))
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, open(base / "batches.meta", "wb"))


def test_cifar_paths_on_files_the_test_writes(tmp_path, monkeypatch):
    import torchvision

    # torchvision checks the official archives' md5 sums; our fake files cannot match them
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    _write_fake_cifar(tmp_path / "c10")
    ds = common.build_dataset("cifar10", "train", data_dir=tmp_path / "c10")
    assert len(ds) == 100 and ds.num_classes == 10 and isinstance(ds[0][0], Image.Image)
    _write_fake_cifar(tmp_path / "c100", hundred=True)
    ds = common.build_dataset("cifar100", "test", data_dir=tmp_path / "c100")
    assert ds.num_classes == 100 and len(ds.coarse_classes) == 20
    assert ds.coarse_targets.tolist() == [i // 5 for i in range(20)]


def test_missing_data_errors_say_where_and_how(tmp_path):
    with pytest.raises(common.DatasetNotFoundError) as e:
        common.build_dataset("cifar10", "train", data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "--download" in msg
    with pytest.raises(common.DatasetNotFoundError) as e:
        common.build_dataset("stl10", "unlabeled", data_dir=tmp_path)
    assert "stl10_binary" in str(e.value)
    with pytest.raises(common.DatasetNotFoundError) as e:
        common.build_dataset("imagefolder", "test", data_dir=tmp_path)
    assert "train/<class>" in str(e.value) and "cifar10-jpeg.tar.gz" in str(e.value)


def test_imagefolder_train_and_test_splits(tmp_path):
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (32, 32), (i * 40, 10, 200)).save(tmp_path / split / c / f"{i}.jpg")
    info = common.dataset_info("imagefolder", 32)
    assert info.mean == common.dataset_info("cifar10").mean  # small images take CIFAR statistics
    tf = common.eval_transform(info.image_size, info.mean, info.std)
    train = common.build_dataset("imagefolder", "train", tf, data_dir=tmp_path)
    test = common.build_dataset("imagefolder", "test", tf, data_dir=tmp_path)
    assert train.classes == ["cat", "dog"] and len(train) == len(test) == 6
    assert train[0][0].shape == (3, 32, 32) and train[0][0].dtype == torch.float32


# --------------------------------------------------------------------------------------------- views


@pytest.mark.parametrize("kwargs", [
    dict(),  # SimCLR
    dict(scale=(0.2, 1.0), jitter_p=0.0, gray_p=0.0),  # ReSA weak
    dict(scale=(0.2, 1.0), interpolation="bicubic", jitter=(0.4, 0.4, 0.2, 0.1), solarize_p=0.2),  # ReSA strong
    dict(size=16, scale=(0.05, 0.26), blur_p=0.5),  # a local crop with blur
])
def test_view_recipes_shapes_and_ranges(kwargs):
    info = common.dataset_info("digits")
    size = kwargs.pop("size", 32)
    aug = common.Augment(size, mean=info.mean, std=info.std, **kwargs)
    image = common.build_dataset("digits", "train")[0][0]
    torch.manual_seed(0)
    v = aug(image)
    assert v.shape == (3, size, size) and v.dtype == torch.float32
    lo = (0 - max(info.mean)) / min(info.std)
    hi = (1 - min(info.mean)) / min(info.std)
    assert lo - 1e-4 <= v.min() and v.max() <= hi + 1e-4
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    assert aug(pil).shape == v.shape  # PIL input too


def test_multiview_multicrop_and_schedule():
    info = common.dataset_info("digits")
    g = [common.Augment(32, mean=info.mean, std=info.std) for _ in range(2)]
    local = common.Augment(12, mean=info.mean, std=info.std)
    mc = common.MultiCrop(g, local, n_local=3, global_min_scale=lambda e: 0.26 - 0.01 * e)
    image = common.build_dataset("digits", "train")[0][0]
    views = mc(image)
    assert [v.shape[-1] for v in views] == [32, 32, 12, 12, 12]
    mc.set_epoch(6)
    assert g[0].crop.scale == pytest.approx((0.20, 1.0)) and local.crop.scale == pytest.approx((0.05, 0.20))
    assert len(common.MultiView([g[0], g[1]])(image)) == 2
    ev = common.eval_transform(224, resize=256)(Image.new("RGB", (300, 260)))
    assert ev.shape == (3, 224, 224)


def test_loader_views_are_a_function_of_seed_epoch_index():
    info = common.dataset_info("digits")
    aug = common.Augment(32, mean=info.mean, std=info.std)
    ds = common.build_dataset("digits", "train", common.MultiView([aug, aug]), subset=64)
    dist = common.DistInfo()

    def first_batch(workers, epoch):
        loader = common.build_loader(ds, 16, dist, workers=workers, seed=5)
        loader.set_epoch(epoch)
        return next(iter(loader))

    torch.manual_seed(123)
    before = torch.rand(1)
    a = first_batch(0, 1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the loader leaves the caller's RNG alone
    b = first_batch(2, 1)  # two worker processes
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0][0], a[0][1])  # the two views differ
    c = first_batch(0, 2)
    assert not torch.equal(a[1], c[1])  # a new epoch reshuffles
    with pytest.raises(ValueError, match="lower --batch-size"):
        common.build_loader(ds, 128, dist)


# ----------------------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("name,size,kwargs,dim", [
    ("convnet", 32, {}, 128),
    ("resnet18", 32, {}, 512),
    ("resnet18", 96, {"zero_init_residual": True}, 512),
    ("resnet50", 64, {}, 2048),
    ("resnet50", 32, {"width": 2}, 4096),
    ("vit_small", 32, {}, 384),
])
def test_backbone_feature_dims(name, size, kwargs, dim):
    model, d = common.build_backbone(name, size, **kwargs)
    assert d == dim == model.feature_dim
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, dim)


def test_backbone_stems_and_switches():
    cifar, _ = common.build_backbone("resnet18", 32)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    imagenet, _ = common.build_backbone("resnet18", 224)
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, nn.MaxPool2d)
    zero, _ = common.build_backbone("resnet50", 224, zero_init_residual=True)
    assert zero.layer1[0].bn3.weight.abs().sum() == 0
    wide, _ = common.build_backbone("resnet50", 32, width=2, zero_init_residual=True)
    assert wide.layer1[0].conv2.out_channels == 128 and wide.layer4[0].bn3.weight.abs().sum() == 0
    with pytest.raises(ValueError, match="unknown backbone"):
        common.build_backbone("resnet7", 32)


# --------------------------------------------------------------------------------------- checkpoints


def _checkpoint(epoch=3):
    model, _ = common.build_backbone("convnet", 32)
    projector = nn.Sequential(nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16),
                              nn.BatchNorm1d(16, affine=False))
    info = common.dataset_info("digits")
    return common.make_checkpoint(
        "resa", epoch, 10 * epoch, {"lr": 0.1, "data_dir": None, "views": (1, 2)},
        common.backbone_spec("convnet", 32), model, "momentum", info,
        {"model": model.state_dict(), "step": 10 * epoch},
        heads={"projector": projector, "normalize_output": True, "centroids": torch.randn(5, 16)}), model, projector


def test_checkpoint_round_trip(tmp_path):
    ckpt, model, projector = _checkpoint()
    path = common.save_checkpoint(tmp_path / "ckpt_epoch0003.pt", ckpt)
    loaded, meta = common.load_backbone(path)
    assert meta["method"] == "resa" and meta["epoch"] == 3 and meta["eval_encoder"] == "momentum"
    assert meta["backbone"]["feature_dim"] == 128 and meta["data"]["dataset"] == "digits"
    assert meta["heads"] == ["centroids", "normalize_output", "projector"]
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x))
    heads = common.load_heads(path)
    projector.eval()
    h = torch.randn(4, 128)
    torch.testing.assert_close(heads["projector"](h), projector(h))
    assert heads["normalize_output"] is True and heads["centroids"].shape == (5, 16)
    assert common.load_checkpoint(path, method="resa")["train_state"]["step"] == 30
    with pytest.raises(common.CheckpointError, match="resume it with resa.py"):
        common.load_checkpoint(path, method="excb")


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_epoch0001.pt"
    common.save_checkpoint(path, _checkpoint(1)[0])
    good = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes part of the file, then the process "dies"
        f.write(b"partial garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, _checkpoint(2)[0])
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert common.load_checkpoint(path)["epoch"] == 1


def test_a_failed_atomic_write_keeps_the_previous_file_and_names_the_path(tmp_path, monkeypatch):
    path = common.save_checkpoint(tmp_path / "ckpt_epoch0001.pt", {"x": 1})
    good = path.read_bytes()

    def full_disk(fd):  # fsync reports ENOSPC without a file name, as a failed write() does
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common.os, "fsync", full_disk)
    with pytest.raises(OSError) as e:
        common.save_checkpoint(path, {"x": 2})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    monkeypatch.undo()

    def interrupted(tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.write_atomic(path, interrupted)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_checkpoint_files_in_training_order(tmp_path):
    assert common._checkpoint_files(tmp_path / "not_yet") == []
    for name in ("ckpt_epoch0011.pt", "ckpt_epoch0010_step004321.pt", "ckpt_epoch0010.pt", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in common._checkpoint_files(tmp_path)] == [
        "ckpt_epoch0010.pt", "ckpt_epoch0010_step004321.pt", "ckpt_epoch0011.pt"]
    assert common.list_checkpoints(tmp_path) == common._checkpoint_files(tmp_path)
    with pytest.raises(common.CheckpointError, match="no such checkpoint file or run directory"):
        common.list_checkpoints(tmp_path / "not_yet")


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(common.CheckpointError, match="no such checkpoint"):
        common.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "damaged.pt").write_bytes(b"\x80\x02not a zip")
    with pytest.raises(common.CheckpointError, match="damaged or not ours"):
        common.load_checkpoint(tmp_path / "damaged.pt")
    (tmp_path / "empty.pt").write_bytes(b"")  # torch.load raises EOFError('') on it: the message must not fail
    with pytest.raises(common.CheckpointError, match=rf"{tmp_path / 'empty.pt'} cannot be read .*\(EOFError\); "):
        common.load_checkpoint(tmp_path / "empty.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(common.CheckpointError, match="not an ssl-clustering checkpoint"):
        common.load_checkpoint(tmp_path / "foreign.pt")
    ckpt = _checkpoint()[0]
    ckpt["backbone"]["name"] = "resnet18"  # weights of a convnet labelled as a ResNet
    common.save_checkpoint(tmp_path / "mislabelled.pt", ckpt)
    with pytest.raises(common.CheckpointError, match="do not fit a resnet18"):
        common.load_backbone(tmp_path / "mislabelled.pt")
    with pytest.raises(common.CheckpointError, match="no checkpoints"):
        common.list_checkpoints(tmp_path / "empty_dir_that_exists" if (tmp_path / "e").mkdir() else tmp_path / "e")


def test_list_checkpoints_in_epoch_order(tmp_path):
    for e in (10, 0, 2):
        common.save_checkpoint(tmp_path / f"ckpt_epoch{e:04d}.pt", {"x": e})
    assert [p.name for p in common.list_checkpoints(tmp_path)] == [
        "ckpt_epoch0000.pt", "ckpt_epoch0002.pt", "ckpt_epoch0010.pt"]
    assert common.list_checkpoints(tmp_path / "ckpt_epoch0002.pt") == [tmp_path / "ckpt_epoch0002.pt"]


def test_extract_features_and_eval_loader(tmp_path):
    ckpt, model, _ = _checkpoint()
    path = common.save_checkpoint(tmp_path / "c.pt", ckpt)
    net, meta = common.load_backbone(path)
    loader = common.eval_loader(meta, "test", batch_size=100)
    x, y = common.extract_features(net, loader)
    assert x.shape == (360, 128) and x.dtype == torch.float32 and y.tolist() == loader.dataset.targets.tolist()


# ----------------------------------------------------------------------------------------- utilities


@dataclasses.dataclass
class _Args:
    dataset: str = dataclasses.field(default="digits", metadata={"help": "dataset name"})
    batch_size: int = 256
    lr: float = 0.3
    scale: tuple[float, float] = (0.08, 1.0)
    shots: tuple[int, ...] = (1, 5)
    compile: bool = False
    resume: str | None = None
    preset: str = ""


def test_parse_args_presets_and_overrides(capsys):
    presets = {"tiny": {"batch_size": 8, "lr": 0.01}}
    a = common.parse_args(_Args, presets, ["--preset", "tiny", "--lr", "0.5", "--scale", "0.2", "1",
                                           "--shots", "1", "2", "3", "--compile"])
    assert (a.batch_size, a.lr, a.scale, a.shots, a.compile, a.resume, a.preset) == (
        8, 0.5, (0.2, 1.0), (1, 2, 3), True, None, "tiny")
    assert common.parse_args(_Args, presets, []).batch_size == 256
    with pytest.raises(SystemExit):
        common.parse_args(_Args, presets, ["--help"])
    out = capsys.readouterr().out
    assert "--batch-size" in out and "tiny: batch_size=8" in out and "dataset name" in out
    with pytest.raises(SystemExit):
        common.parse_args(_Args, presets, ["--preset", "huge"])


def test_cosine_schedule_values():
    assert common.cosine_schedule(0, 100, 1.0, 0.1, warmup_steps=10) == 0.0
    assert common.cosine_schedule(5, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.5)
    assert common.cosine_schedule(10, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(1.0)
    assert common.cosine_schedule(55, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.55)
    assert common.cosine_schedule(100, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.1)
    assert common.cosine_schedule(50, 100, 0.996, 1.0) == pytest.approx(0.998)


def test_run_logger_writes_jsonl_and_console(tmp_path, capsys):
    log = common.RunLogger(tmp_path, common.DistInfo(), total_steps=100)
    rec = log.step_line(0, 10, torch.tensor(1.5), 0.1, images_per_step=256, extra={"excb/empty": torch.tensor(3)})
    line = capsys.readouterr().out
    assert "loss 1.5000" in line and "img/s" in line and "eta" in line and "mem" in line
    stored = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert stored["loss"] == 1.5 and stored["excb/empty"] == 3 and stored["perf/images_per_s"] > 0
    assert math.isclose(rec["perf/eta_s"], 90 * rec["perf/step_time_s"])


def test_run_logger_measures_time_blocked_on_the_loader(tmp_path, monkeypatch):
    # A fake clock: each batch takes 3 s to arrive and each step 1 s to compute -> data_frac = 3/4.
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    def slow_loader():
        for i in range(4):
            clock[0] += 3.0
            yield i

    log = common.RunLogger(tmp_path, common.DistInfo(), total_steps=4)
    batches = []
    for b in log.timed(slow_loader()):
        batches.append(b)
        clock[0] += 1.0
    rec = log.step_line(0, 4, 0.0, 0.1, images_per_step=8)
    assert batches == [0, 1, 2, 3]
    assert rec["perf/data_frac"] == pytest.approx(0.75) and rec["perf/step_time_s"] == pytest.approx(4.0)
    clock[0] += 2.0
    assert log.step_line(0, 5, 0.0, 0.1, images_per_step=8)["perf/data_frac"] == 0.0  # window reset


def test_synced_batchnorm_heads_are_stored_as_batchnorm(tmp_path):
    ckpt, model, _ = _checkpoint()
    head = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Linear(128, 8), nn.BatchNorm1d(8)))
    with torch.no_grad():
        head[1].running_mean.fill_(0.5)
    ckpt["heads"] = common.make_checkpoint("resa", 0, 0, {}, common.backbone_spec("convnet", 32), model,
                                           "online", common.dataset_info("digits"), {},
                                           heads={"projector": head})["heads"]
    path = common.save_checkpoint(tmp_path / "c.pt", ckpt)
    loaded = common.load_heads(path)["projector"]
    assert isinstance(loaded[1], nn.BatchNorm1d) and torch.equal(loaded[1].running_mean, torch.full((8,), 0.5))
