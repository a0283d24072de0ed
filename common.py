"""common.py: the plumbing shared by excb.py, resa.py, simclr_nscl.py, probe.py and monitor.py (docs/common.md).

The ONLY module the method files import from the repository; it holds no method (no loss, no balancing, no
Sinkhorn, no projector): copy a method file plus this one and you have the method. Sections, in order:
1 distributed (torchrun, rank-0 printing, gathers, precision); 2 data (datasets, view recipes, seeded loaders);
2b the training set on the device, its views made there in batches; 3 backbones (ResNet, ViT-S/16, a convnet);
4 checkpoints (docs/common.md#checkpoint-format; atomic writes, strict loading, --resume auto); 5 features;
6 utilities (argparse, schedules, run log); 7 survival (divergence, preemption, per-step seeding, run())."""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import errno
import functools
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import resource
import signal
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.distributed.nn  # noqa: F401  (tdist.nn.functional.all_gather: gather_with_grad)
import torch.nn as nn
import torchvision
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler
from torchvision.ops import roi_align, stochastic_depth
from torchvision.transforms import v2

# ================================================================================================
# 1. DISTRIBUTED
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def setup_distributed() -> DistInfo:
    """Set up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); plain `python` = 1 process.

    NCCL on GPUs (one per process, chosen by LOCAL_RANK), gloo on CPU. The same code runs 1 GPU, N GPUs
    and N nodes: torchrun sets the variables, we only read them.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=select_device())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not tdist.is_initialized():
            tdist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        # Several CPU processes on one machine must share its cores, or they thrash.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        if not tdist.is_initialized():
            tdist.init_process_group("gloo")
    return DistInfo(rank, world, local_rank, device, True)


def cleanup_distributed() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def get_rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (never patched into builtins: other ranks' prints stay visible)."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch with seed + rank.

    Build every network with rank=0 (the same seed on all ranks): DDP broadcasts only the wrapped
    model's parameters, so a teacher/momentum copy built after a rank-offset seed would differ between
    ranks. Re-seed with the rank afterwards if ranks need different noise streams."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (W*B, ...) in rank order, differentiable; B must match on all ranks (drop_last=True loaders
    guarantee it). Identity at world size 1.

    Forward: x_r on each rank r -> X = cat(x_0, ..., x_{W-1}) on every rank. Backward: rank r' holds
    dL_{r'}/dX for its own loss L_{r'}; the gradient of the total loss sum_{r'} L_{r'} with respect to x_r is
    sum_{r'} dL_{r'}/dX[slice r], which is what torch.distributed.nn's all_gather returns (a reduce-scatter of
    the incoming gradients, summed). (The official NSCL GatherLayer returns the local slice without the sum but
    computes the WHOLE global loss on every process, so nothing is dropped there: after DDP's average its
    parameter gradient is the right direction scaled by 1/W.) With DDP averaging parameter gradients over W
    ranks, a loss that is the mean over LOCAL anchors against GATHERED candidates then has exactly the gradient
    of the global-batch mean loss (tests/test_common_distributed.py)."""
    return x if get_world_size() == 1 else torch.cat(tdist.nn.functional.all_gather(x))


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (W*B, ...) in rank order, without gradient (momentum features, labels)."""
    return gather_with_grad(x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; returns a new tensor (the input is not modified: torch.distributed.nn's all_reduce reduces
    a copy). Identity at world size 1."""
    return x if get_world_size() == 1 else tdist.nn.functional.all_reduce(x.detach())


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks; returns a new tensor. Identity at world size 1."""
    return x if get_world_size() == 1 else all_reduce_sum(x) / get_world_size()


def ddp_wrap(model: nn.Module, dist: DistInfo, **ddp_kwargs) -> nn.Module:
    """SyncBatchNorm + DistributedDataParallel when world_size > 1; the model unchanged otherwise.

    SyncBatchNorm only on CUDA: PyTorch's SyncBN has no CPU kernel, so CPU (gloo) runs, used for tests,
    keep per-rank BatchNorm statistics.
    """
    if dist.world_size == 1:
        return model
    if dist.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank], **ddp_kwargs)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


# --- precision: --precision auto|bf16|fp16|fp32 on every training script; evaluation extracts in fp32 -----------
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision -> bf16 | fp16 | fp32. auto: bf16 on a GPU that runs it natively (Ampere, Hopper and newer),
    fp16 with a GradScaler on older GPUs (V100, T4, RTX 20xx emulate bf16 slowly; the official ExCB and ReSA
    ImageNet codes use fp16 + GradScaler), fp32 on CPU. An explicit value is taken as it is (bf16 and fp16
    autocast also run on CPU, which is how the tests check the float32 islands)."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision takes {' | '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def autocast(device: torch.device, precision: str):
    """Autocast context of a RESOLVED precision (bf16 / fp16 mixed precision; fp32: none). The float32 islands
    (cosine similarities, Sinkhorn, losses, ExCB's centroid layer) switch autocast off themselves."""
    dtype = _AUTOCAST_DTYPE[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class MixedPrecision:
    """A training loop's precision: its autocast context and the GradScaler that fp16 needs.

    fp16 has a 5-bit exponent, so small gradients underflow to 0: the loop's `scaler.scale(loss).backward()`
    multiplies the loss by a large factor, `scaler.unscale_(opt)` undoes it before clipping, `scaler.step(opt)`
    skips steps whose gradients overflowed and `scaler.update()` adapts the factor. bf16 has fp32's exponent
    range and needs none of it: the scaler is then disabled and each of those calls is a plain backward / step /
    no-op. Its state goes into checkpoints for exact resume."""

    def __init__(self, precision: str, device: torch.device):
        self.name, self.device = resolve_precision(precision, device), device
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.name == "fp16")

    def autocast(self):
        return autocast(self.device, self.name)

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors (CUDA) or the process's peak resident memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ================================================================================================
# 2. DATA
# ================================================================================================

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# name: (num_classes, native image size, mean, std). Statistics from the official code bases (ReSA CIFAR).
_DATASETS = {
    "digits": (10, 32, (0.3053,) * 3, (0.3236,) * 3),  # computed on the 32 px upscaled images
    "cifar10": (10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": (10, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagefolder": (0, 224, IMAGENET_MEAN, IMAGENET_STD),
}
DATASETS = tuple(_DATASETS)


class UsageError(ValueError):
    """A bad command line (e.g. a batch that does not divide over the ranks, an impossible K): the scripts
    print its one-line message instead of a traceback (see run())."""


class DatasetNotFoundError(FileNotFoundError):
    """The data is not where --data-dir points. The message says where we looked and how to get it."""


class BadImageError(RuntimeError):
    """An image file that cannot be decoded (truncated, or not an image at all). The message names the file, the
    folder scanned and the flag that skips such files (--skip-bad-images)."""

    def __init__(self, message, path=""):  # path: for the --skip-bad-images warning, in the process that skips
        super().__init__(message)
        self.path = path


def _read_rgb(folder, path):
    """ImageFolder's loader: PIL image in RGB, or a BadImageError naming the file and the folder scanned. PIL
    decodes lazily, so convert() is where a truncated JPEG or a text file named .jpg fails."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        why = "not an image file PIL recognises" if isinstance(e, UnidentifiedImageError) else str(e)[:120]
        raise BadImageError(f"cannot read image {path} ({why}) while scanning {folder}; delete or replace "
                            f"the file, or pass --skip-bad-images to skip unreadable files (they are counted in "
                            f"the log as data/skipped_images)", path=str(path)) from None


def split_batch(batch_size: int, world_size: int) -> int:
    """GLOBAL --batch-size -> the per-rank batch, or a one-line UsageError (every method script calls this)."""
    b, w = batch_size, world_size
    if b < 1 or b % w:  # b < w included: every rank needs at least one image
        raise UsageError(f"--batch-size {b} must be a positive multiple of the {w} ranks (it is the GLOBAL batch; "
                         f"e.g. --batch-size {max(b // w, 1) * w})")
    return b // w


@dataclasses.dataclass(frozen=True)
class DataInfo:
    name: str
    num_classes: int  # 0 = read from the folder tree (imagefolder)
    image_size: int
    mean: tuple
    std: tuple


def dataset_info(name: str, image_size: int | None = None) -> DataInfo:
    """Class count, image size and normalisation for a dataset name. imagefolder takes ImageNet
    statistics at >= 64 px and CIFAR-10's below (the small ImageFolder we use is the CIFAR-10 JPEG copy)."""
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    n, size, mean, std = _DATASETS[name]
    size = image_size or size
    if name == "imagefolder" and size < 64:
        mean, std = _DATASETS["cifar10"][2:]
    return DataInfo(name, n, size, tuple(mean), tuple(std))


class ImageDataset(Dataset):
    """(transform(image), label) pairs over any indexable source of (image, label), optionally over an index
    subset, with the labels as a tensor (`targets`) for samplers and probes."""

    def __init__(self, source, targets, classes, transform=None, indices=None, name="", skip_bad=False):
        self.source, self.transform, self.name, self.skip_bad = source, transform, name, skip_bad
        self.indices = None if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.targets, self.classes = self.select(targets), list(classes)
        self.num_classes = len(self.classes)

    def select(self, labels) -> torch.Tensor:
        """Labels of every image of the source -> those of this dataset's images (as targets)."""
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        return labels if self.indices is None else labels[self.indices]

    def __len__(self):
        return len(self.targets)

    def load(self, i):
        """-> (image, label, skipped): the untransformed image. With skip_bad, an unreadable file is replaced by
        the next readable image of the dataset (with that image's label), and `skipped` counts the files passed
        over; the replacement is a pure function of i, so views and resume stay exact."""
        for k in range(len(self) if self.skip_bad else 1):
            n = (int(i) + k) % len(self)
            try:
                image, _ = self.source[int(self.indices[n]) if self.indices is not None else n]
            except BadImageError as e:
                if not self.skip_bad:
                    raise
                print(f"warning: skipped {e.path} (unreadable image)", file=sys.stderr, flush=True)
                continue
            return image, int(self.targets[n]), k
        raise BadImageError(f"no readable image in the {self.name} dataset", path="")

    def __getitem__(self, i):
        image, label, _ = self.load(i)
        return (self.transform(image) if self.transform is not None else image), label


class _DigitsSource(torch.utils.data.TensorDataset):
    """scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10 classes), upscaled to 32x32
    RGB uint8 so every backbone and augmentation treats them as tiny natural images. Fixed split:
    stratified 80/20 with random_state=0 -> 1,437 train / 360 test."""

    def __init__(self, split: str, size: int = 32):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        idx = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target,
                               random_state=0)[0 if split == "train" else 1]
        x = torch.tensor(d.images[idx], dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
        x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        super().__init__((x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous(),
                         torch.tensor(d.target[idx], dtype=torch.long))
        self.images, self.targets = self.tensors


# torchvision's datasets: name -> (folder under --data-dir, torchvision class, label attribute, name in messages)
_TORCHVISION = {"cifar10": ("cifar-10-batches-py", "CIFAR10", "targets", "CIFAR-10"),
                "cifar100": ("cifar-100-python", "CIFAR100", "targets", "CIFAR-100"),
                "stl10": ("stl10_binary", "STL10", "labels", "STL-10")}


def build_dataset(name: str, split: str, transform=None, data_dir: str | None = None,
                  download: bool = False, subset: int = 0, seed: int = 0,
                  image_size: int | None = None, skip_bad: bool = False) -> ImageDataset:
    """Dataset of (transform(image), label) with .targets, .classes, .num_classes (CIFAR-100 also
    .coarse_targets/.coarse_classes, its 20 superclasses). split: "train" | "test" (STL-10 also "unlabeled",
    "train+unlabeled"; their unlabeled images have label -1). subset=n keeps a class-stratified
    random subset of n images, fixed by `seed`. An unreadable ImageFolder file raises BadImageError, or with
    skip_bad is replaced by the next readable image and counted (ImageDataset.load)."""
    if split not in ("train", "test", "unlabeled", "train+unlabeled"):
        raise ValueError(f"unknown split {split!r}")
    dataset_info(name)  # an unknown name fails here
    root = Path(data_dir or "data").expanduser()
    if name == "digits":
        source = _DigitsSource("train" if split == "train" else "test", image_size or 32)
        targets, classes = source.targets, [str(c) for c in range(10)]
    elif name in _TORCHVISION:
        folder, cls, label_attr, title = _TORCHVISION[name]
        if not (root / folder).is_dir() and not download:
            raise DatasetNotFoundError(
                f"{title} not found: looked for {root / folder}. Download it into --data-dir with --download "
                f"(e.g. `python resa.py --dataset {name} --data-dir {root} --download`), or pass the "
                f"--data-dir that holds it.")
        how = {"split": split} if name == "stl10" else {"train": split == "train"}
        source = getattr(torchvision.datasets, cls)(str(root), download=download, **how)
        targets, classes = getattr(source, label_attr), source.classes
    else:  # imagefolder
        folder = root / "train" if split == "train" else next(
            (root / s for s in ("val", "test") if (root / s).is_dir()), root / "val")
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"ImageFolder split {split!r} not found: looked for {folder} (expected the layout "
                f"{root}/train/<class>/*.jpg and {root}/val/<class>/* or {root}/test/<class>/*). For the "
                f"CIFAR-10 JPEG copy: `mkdir -p data/cifar10-jpeg && tar -xzf ../shared/data/cifar10-jpeg.tar.gz "
                f"-C data/cifar10-jpeg` and pass --data-dir data/cifar10-jpeg --image-size 32.")
        try:
            source = torchvision.datasets.ImageFolder(str(folder), loader=functools.partial(_read_rgb, folder))
        except FileNotFoundError as e:  # no class folder, or a class folder without any image file
            raise DatasetNotFoundError(
                f"ImageFolder {folder} holds no usable images: {e} Expected {folder}/<class>/<image> with one "
                f"non-empty folder per class; remove empty class folders or add their images.") from None
        targets, classes = source.targets, source.classes
    indices = None
    if subset and subset < len(targets):
        from sklearn.model_selection import train_test_split

        t = np.asarray(targets)
        strat = t if (t >= 0).all() and np.bincount(t).min() >= 2 else None
        indices = np.sort(train_test_split(np.arange(len(t)), train_size=subset, stratify=strat,
                                           random_state=seed)[0])
    ds = ImageDataset(source, targets, classes, transform, indices, name, skip_bad)
    if name == "cifar100":  # superclasses, from the pickles torchvision reads (it keeps the fine labels only)
        labels, meta = (pickle.loads((root / folder / f).read_bytes(), encoding="latin1")
                        for f in ("train" if split == "train" else "test", "meta"))
        ds.coarse_targets, ds.coarse_classes = ds.select(labels["coarse_labels"]), meta["coarse_label_names"]
    return ds


_INTERP = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


def _hw(size) -> tuple[int, int]:
    """An image size as torchvision takes it (int, or (h, w)) -> (h, w)."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))


class Augment:
    """One augmented view, parametrised so each method file states its recipe (torchvision v2).

    Order: random resized crop -> flip -> colour jitter -> grayscale -> Gaussian blur -> solarize ->
    float in [0, 1] -> normalise. Works on PIL images and uint8 CHW tensors; solarize uses the PIL
    threshold 128 on uint8. `blur_kernel=None` picks an odd kernel of ~10% of the crop (SimCLR's rule).
    The arguments stay readable as attributes, from which DeviceLoader (section 2b) makes the same views for a
    whole batch at once; `scale` is the crop's own (set_scale moves it).
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear",
                 flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.0,
                 blur_sigma=(0.1, 2.0), blur_kernel=None, solarize_p=0.0, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        self.size, self.ratio, self.interpolation = size, tuple(ratio), interpolation
        self.flip_p, self.jitter, self.jitter_p, self.gray_p = flip_p, jitter, jitter_p, gray_p
        self.blur_p, self.blur_sigma, self.solarize_p = blur_p, tuple(blur_sigma), solarize_p
        self.blur_kernel = blur_kernel or (int(0.1 * min(_hw(size))) // 2 * 2 + 1)
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop = v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio),
                                         interpolation=_INTERP[interpolation], antialias=True)
        ops = [v2.ToImage(), self.crop]
        if flip_p > 0:
            ops.append(v2.RandomHorizontalFlip(flip_p))
        if jitter_p > 0 and jitter is not None:
            ops.append(v2.RandomApply([v2.ColorJitter(*jitter)], p=jitter_p))
        if gray_p > 0:
            ops.append(v2.RandomGrayscale(gray_p))
        if blur_p > 0:
            ops.append(v2.RandomApply([v2.GaussianBlur(self.blur_kernel, sigma=tuple(blur_sigma))], p=blur_p))
        if solarize_p > 0:
            ops.append(v2.RandomSolarize(threshold=128, p=solarize_p))
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        self.transform = v2.Compose(ops)

    @property
    def scale(self) -> tuple:
        return tuple(self.crop.scale)

    def set_scale(self, scale) -> None:
        self.crop.scale = tuple(scale)

    def __call__(self, image):
        return self.transform(image)


def eval_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize: int | None = None):
    """Un-augmented view: Resize(resize) + CenterCrop(size). resize defaults to the ImageNet rule, size x 8/7
    (256 -> 224) at >= 128 px; below that the image is only resized to `size` (a no-op at the native size of
    the small datasets)."""
    resize = resize or (round(size * 8 / 7) if size >= 128 else None)
    ops = [v2.ToImage(), v2.Resize(resize or size, antialias=True)]
    if resize:
        ops.append(v2.CenterCrop(size))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


class MultiCrop:
    """Global views plus n_local local crops: [g1, g2, ..., l1, ..., lL] (SwAV/DINO multi-crop).

    With `global_min_scale` (a function epoch -> m, e.g. ExCB's cosine 0.26 -> 0.14), global crops use scale
    (m, 1) and local crops (local_min_scale, m), so the two ranges stay complementary as m moves. The loader
    calls set_epoch inside each worker before every sample, so the schedule reaches persistent workers too."""

    def __init__(self, global_views, local_view=None, n_local=0, global_min_scale=None,
                 local_min_scale=0.05):
        self.global_views, self.local_view, self.n_local = list(global_views), local_view, n_local
        self.global_min_scale, self.local_min_scale = global_min_scale, local_min_scale

    def set_epoch(self, epoch: int) -> None:
        if self.global_min_scale is None:
            return
        m = float(self.global_min_scale(epoch))
        for g in self.global_views:
            g.set_scale((m, 1.0))
        if self.local_view is not None:
            self.local_view.set_scale((self.local_min_scale, m))

    def __call__(self, image):
        views = [g(image) for g in self.global_views]
        return views + [self.local_view(image) for _ in range(self.n_local)]


class MultiView(MultiCrop):
    """Each transform on the same image: [t1(x), t2(x), ...] (SimCLR's symmetric pair is MultiView([t, t]);
    ReSA's asymmetric pair is MultiView([weak, strong])): a MultiCrop of global views only."""

    def __init__(self, transforms):
        super().__init__(transforms)


class _SeededViews(Dataset):
    """Index (epoch, i) -> (views, label, skipped) of dataset[i] with augmentation randomness that is a pure
    function of (seed, epoch, i). Views then do not depend on the number of workers, and a resumed run sees
    exactly the views the uninterrupted run would have seen. `skipped` counts unreadable files passed over
    (ImageDataset.load); EpochLoader strips it and keeps the total, since workers are other processes."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        getattr(getattr(self.dataset, "transform", None), "set_epoch", lambda epoch: None)(epoch)  # MultiCrop
        # The caller's RNG stays untouched, and the many tiny per-image ops run on one thread (in the main
        # process, workers=0, 5x faster than letting each spin up the intra-op pool; a worker has one already).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):  # the CPU generator only: CUDA's bookkeeping costs 250x more
                seed = np.random.SeedSequence([self.seed, epoch, int(i)]).generate_state(1)[0]
                torch.random.default_generator.manual_seed(int(seed))
                if not hasattr(self.dataset, "load"):  # e.g. a torch Subset of an ImageDataset (probe.py)
                    return (*self.dataset[i], 0)
                image, label, skipped = self.dataset.load(i)
                t = self.dataset.transform
                return (t(image) if t is not None else image), label, skipped
        finally:
            torch.set_num_threads(threads)


class _EpochBatches:
    """Wrap a batch sampler so that it yields [(epoch, i), ...] (read by _SeededViews), from batch `start` on."""

    def __init__(self, batch_sampler):
        self.batch_sampler, self.epoch, self.start = batch_sampler, 0, 0

    def __len__(self):
        return len(self.batch_sampler) - self.start

    def __iter__(self):  # skipped batches cost their indices only: no image is loaded
        return ([(self.epoch, i) for i in b] for b in itertools.islice(self.batch_sampler, self.start, None))


class EpochLoader:
    """DataLoader over ranks: DistributedSampler (or a given batch sampler), per-rank batch size,
    epoch-seeded augmentation, pinned memory on CUDA, persistent workers. Call set_epoch(e) first;
    set_epoch(e, start_batch=k) resumes epoch e at its k-th batch with exactly the views an uninterrupted run
    sees there. Yields (views, labels); `skipped_images` counts unreadable files passed over (--skip-bad-images).
    """

    path = "loader"  # build_train_loader's other choice is DeviceLoader (section 2b), path "device"

    def __init__(self, dataset, batch_size, dist: DistInfo, workers=0, shuffle=True, drop_last=True,
                 seed=0, batch_sampler=None):
        if batch_sampler is None:
            self.sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank,
                                              shuffle=shuffle, seed=seed, drop_last=drop_last)
            batch_sampler = BatchSampler(self.sampler, batch_size, drop_last=drop_last)
        else:
            self.sampler = batch_sampler
        self.batches, self.skipped_images = _EpochBatches(batch_sampler), 0
        if len(self.batches) == 0:
            raise UsageError(f"the loader yields no batch: {len(dataset)} images per epoch cannot fill a "
                             f"batch of {batch_size} per rank x {dist.world_size} ranks; lower --batch-size")
        self.loader = DataLoader(_SeededViews(dataset, seed), batch_sampler=self.batches,
                                 num_workers=workers, pin_memory=dist.device.type == "cuda",
                                 persistent_workers=workers > 0, prefetch_factor=4 if workers else None)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.batches.epoch, self.batches.start = epoch, start_batch

    def __len__(self):
        """Batches in a whole epoch (whatever start_batch is)."""
        return len(self.batches.batch_sampler)

    def __iter__(self):
        for views, labels, skipped in self.loader:
            self.skipped_images += int(skipped.sum())  # a CPU tensor from the collate: no device sync
            yield views, labels


build_loader = EpochLoader  # the scripts' name for it; `batch_size` is PER RANK (split_batch gives it)


# ================================================================================================
# 2b. DATA ON THE DEVICE: the training set decoded once, views made in batches
# ================================================================================================
# Small datasets (digits, CIFAR-10/100, STL-10, a small ImageFolder) fit on the training device as one uint8
# tensor (N, 3, H, W); each step makes the per-rank batch's views there in float on [0, 1] (torchvision's draws
# and float maths, Augment's order). Crop + resize + flip: one torchvision.ops.roi_align per view size over the
# batch and its mirror image. DEVIATION: roi_align is bilinear, averaging ceil(box / out)^2 samples per output
# pixel when shrinking (a box filter) where resize(antialias=True) uses the triangle (bilinear) or Keys cubic
# (bicubic: ExCB's official recipe) filter: mean error <= 0.006 on [0, 1] (tests/test_common_device_views.py).
# Every other op runs on the images that draw it only (colour jitter: at each position of the random orders, a
# blend or hue on the images whose op it is): index lists drawn with the parameters on the CPU, from a generator
# seeded by (seed, epoch, step, rank) (views are a pure function of those: --resume is exact, mid-epoch too),
# shipped in one copy per step: no host-device sync.

# the crop (rois (n, 5): image index, x1, y1, x2, y2 in pixels) resized to an (h, w) output: the header's DEVIATION
batch_resized_crop = functools.partial(roi_align, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


@functools.lru_cache(maxsize=None)
def _const(values: tuple, device: torch.device) -> torch.Tensor:  # made each step: a pageable copy (CUDA waits)
    return torch.tensor(values, dtype=torch.float32).to(device)


def _gray(x):  # (n, 3, H, W) -> (n, 1, H, W) luma with torchvision's weights, as one matrix product
    return torch.matmul(_const((0.2989, 0.587, 0.114), x.device), x.flatten(2)).view(len(x), 1, *x.shape[2:])


def batch_blend(x, f, to_mean, to_gray):
    """ColorJitter's brightness, contrast or saturation per image, f (n,): torchvision's clamp(f x + (1 - f) base,
    0, 1), base black, the mean luma (to_mean (n,) = 1.0) or the luma (to_gray (n,) = 1.0)."""
    luma, f, to_mean, to_gray = _gray(x), f.view(-1, 1, 1, 1), to_mean.view(-1, 1, 1, 1), to_gray.view(-1, 1, 1, 1)
    return torch.lerp(torch.addcmul(to_mean * luma.mean((2, 3), keepdim=True), to_gray, luma), x, f).clamp_(0, 1)


def batch_hue(x, f):
    """adjust_hue per image, f (n,): RGB -> HSV (torchvision's model), h <- (h + f) mod 1, back. With v = max,
    c = max - min = v s and h6 = 6 h, each channel is v - c g(h6), g = clamp(2 - d, 0, 1) with d the distance
    around the hue circle from h6 to 3 (R), 5 (G), 1 (B): torchvision's v, p, q, t in closed form."""
    v = x.amax(1, keepdim=True)                                                        # (n, 1, H, W)
    c = v - x.amin(1, keepdim=True)     # 0 for grey pixels, which keep their value
    rc, gc, bc = ((v - x) / c.clamp(min=1e-12)).unbind(1)                              # (n, H, W) each
    e_r = (x[:, 0] == v[:, 0]).float()                                                 # ties: R, then G, then B
    e_g = (x[:, 1] == v[:, 0]).float() * (1.0 - e_r)
    h6 = e_r * (bc - gc) + e_g * (rc + 2.0 - bc) + (1.0 - e_r - e_g) * (gc + 4.0 - rc)  # in [-1, 5]
    h6 = torch.remainder(h6 + 6.0 * f.view(-1, 1, 1), 6.0)[:, None]                    # (n, 1, H, W)
    d = (h6 - _const((3.0, 5.0, 1.0), x.device).view(1, 3, 1, 1)).abs_()  # R, G, B lose most at 6 h = 3, 5, 1
    return (v - c * (2.0 - torch.minimum(d, 6.0 - d)).clamp_(0.0, 1.0)).clamp_(0.0, 1.0)


def batch_gaussian_blur(x, kernel_size: int, sigma):
    """gaussian_blur per image, sigma (n,): taps exp(-d^2 / (2 sigma^2)) normalised, reflect padding, as
    torchvision; its 2-D kernel is the 1-D one's outer product: two grouped 1-D convolutions."""
    (n, C, H, W), pad = x.shape, kernel_size // 2
    d = torch.arange(kernel_size, device=x.device, dtype=torch.float32) - pad
    k = torch.softmax(-0.5 * (d / sigma[:, None]) ** 2, 1).repeat_interleave(C, 0)   # (n C, k), rows sum to 1
    y = nn.functional.pad(x.reshape(1, n * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = nn.functional.conv2d(y, k.view(n * C, 1, 1, -1), groups=n * C)                # along W, then along H
    return nn.functional.conv2d(y, k.view(n * C, 1, -1, 1), groups=n * C).view(n, C, H, W)


def batch_solarize(x, threshold: float = 128 / 255):  # on [0, 1] floats; 128 / 255 is PIL's 128 on uint8
    return torch.where(x >= threshold, 1.0 - x, x)


def batch_normalize(x, mean, std):  # Normalize: (x - mean) / std per channel
    return (x - _const(tuple(mean), x.device).view(1, -1, 1, 1)) / _const(tuple(std), x.device).view(1, -1, 1, 1)


def sample_view_params(augs, n: int, image_hw, g: torch.Generator) -> dict:
    """Random parameters of n images of size image_hw = (H, W) under each Augment of augs (one or a list: rows
    [k n, (k + 1) n) under augs[k]) from the CPU generator g, with torchvision's distributions: box (top, left,
    height, width); flip, jitter, gray, blur, solarize (bool); order (V n, 4) of the colour ops (0 brightness, 1
    contrast, 2 saturation, 3 hue), their factors (V n, 4); sigma. Plus render_views' inputs: rois (V n, 5) into
    the n images, then the mirrored ones; the rows that turn gray, blur, solarize, and at each position k of the
    colour orders blend (blend{k}, by batch_blend's f{k}, to_mean{k}, to_gray{k}) or shift hue (hue{k})."""
    augs = [augs] if isinstance(augs, Augment) else list(augs)
    (H, W), N = image_hw, len(augs) * n
    per_row = lambda values, dtype=torch.float64: torch.tensor(values, dtype=dtype).repeat_interleave(n, 0)  # noqa

    def uniform(ranges, k=1):  # U(lo, hi) of shape (V n, k), each Augment's (lo, hi) (or its k pairs as 2 rows)
        lo, hi = per_row(ranges).view(N, 2, -1).unbind(1)
        return lo + (hi - lo) * torch.rand(N, k, generator=g, dtype=torch.float64)

    # RandomResizedCrop: up to 10 tries of area ~ U(scale) H W and log aspect ~ U(log ratio); the first integer
    # box (round half to even, as Python's round) that fits wins; top and left uniform over the places
    area = H * W * uniform([a.scale for a in augs], 10)                                # (V n, 10)
    aspect = torch.exp(uniform([[math.log(r) for r in a.ratio] for a in augs], 10))
    w, h = torch.round(torch.sqrt(area * aspect)).long(), torch.round(torch.sqrt(area / aspect)).long()
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.long().argmax(1, keepdim=True)  # argmax returns the first of equal maxima: the first fitting try
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    u = torch.rand(N, 2, generator=g, dtype=torch.float64)
    top, left = (u * torch.stack([H - h + 1, W - w + 1], 1)).floor().long().unbind(1)
    # no try fits: the whole image, cut to the nearest aspect ratio in range, centred (torchvision's fallback)
    fall = [(min(H, round(W / min(a.ratio))), min(W, round(H * max(a.ratio)))) for a in augs]
    fall = per_row([((H - fh) // 2, (W - fw) // 2, fh, fw) for fh, fw in fall], torch.long)
    box = torch.where(fits.any(1, keepdim=True), torch.stack([top, left, h, w], 1), fall)
    # the other ops: coins as torchvision's RandomApply (applied when U < p), factors ~ U(range), a uniform order
    coin = lambda p: torch.rand(N, generator=g) < per_row(p, torch.float32)  # noqa: E731
    flip, jitter = coin([a.flip_p for a in augs]), coin([a.jitter_p if a.jitter is not None else 0 for a in augs])
    order = torch.rand(N, 4, generator=g).argsort(1)  # a uniformly random permutation per image, as randperm(4)
    # ColorJitter's own ranges (a number v: (max(0, 1 - v), 1 + v), for hue (-v, v)); an op that is off: identity
    jitters = [v2.ColorJitter(*(a.jitter or ())) for a in augs]
    factors = uniform([list(zip(t.brightness or (1, 1), t.contrast or (1, 1), t.saturation or (1, 1),
                                t.hue or (0, 0))) for t in jitters], 4).float()
    gray, blur = coin([a.gray_p for a in augs]), coin([a.blur_p for a in augs])
    sigma, solarize = uniform([a.blur_sigma for a in augs])[:, 0].float(), coin([a.solarize_p for a in augs])
    # render_views' inputs: a flipped crop is the mirrored box's crop of the mirror image (row n + i)
    rows, (top, left, h, w) = torch.arange(N), box.unbind(1)
    left = torch.where(flip, W - left - w, left)
    plan = {"rois": torch.stack([rows % n + n * flip, left, top, left + w, top + h], 1).float(), "gray_rows":
            rows[gray], "blur_rows": rows[blur], "blur_sigma": sigma[blur], "solarize_rows": rows[solarize]}
    for k, op in enumerate(order.T):                                                   # (V n,) ops at position k
        fk = factors.gather(1, op[:, None])[:, 0]
        blend, hue = rows[jitter & (op < 3) & (fk != 1.0)], rows[jitter & (op == 3) & (fk != 0.0)]
        plan |= {f"blend{k}": blend, f"f{k}": fk[blend], f"to_mean{k}": (op[blend] == 1).float(),
                 f"to_gray{k}": (op[blend] == 2).float(), f"hue{k}": hue, f"shift{k}": fk[hue]}
    return plan | {"box": box, "flip": flip, "jitter": jitter, "order": order, "factors": factors, "gray": gray,
                   "blur": blur, "sigma": sigma, "solarize": solarize}


def render_views(images, plan: dict, group) -> torch.Tensor:
    """The views of images (2 n, 3, H, W) float on [0, 1] (n images, then mirrored) -> (V n, 3, h, w) normalised,
    under a _view_groups group with sample_view_params' plan (on the images' device), in Augment's order."""
    def _on(x, idx, op, *args):  # op on the images x[idx] only (idx on the device, its length known on the host)
        return x.index_copy_(0, idx, op(x.index_select(0, idx), *args)) if len(idx) else x

    x = batch_resized_crop(images, plan["rois"], _hw(group[0].size))
    for k in range(4):  # colour jitter, each image in its own order
        x = _on(x, plan[f"blend{k}"], batch_blend, plan[f"f{k}"], plan[f"to_mean{k}"], plan[f"to_gray{k}"])
        x = _on(x, plan[f"hue{k}"], batch_hue, plan[f"shift{k}"])
    x = _on(x, plan["gray_rows"], lambda y: _gray(y).expand_as(y))
    x = _on(x, plan["blur_rows"], batch_gaussian_blur, group[0].blur_kernel, plan["blur_sigma"])
    return batch_normalize(_on(x, plan["solarize_rows"], batch_solarize), group[0].mean, group[0].std)


def _view_groups(t):
    """A view transform built from Augment -> its views in output order, in groups of consecutive views of one
    size, blur kernel and normalisation, made in one batch (e.g. ExCB's 2 global crops); else None."""
    views = [t] if isinstance(t, Augment) else [*t.global_views, *[t.local_view] * t.n_local] if isinstance(
        t, MultiCrop) else [None]  # a MultiView is a MultiCrop without local crops
    if views and all(isinstance(v, Augment) for v in views):
        return [list(g) for _, g in itertools.groupby(views, lambda a: (_hw(a.size), a.blur_kernel, a.mean, a.std))]


class DeviceLoader(EpochLoader):
    """EpochLoader (its batches, set_epoch(e, start_batch=k)) over images held on the device as uint8 (N, 3, H, W),
    views made there (the header). Yields (views, labels): views a list of float (B, 3, h, w) normalised tensors
    on the device (channels_last on CUDA; one tensor for a bare Augment), labels (B,) long on the device."""
    path = "device"

    def __init__(self, images, labels, transform, batch_size: int, dist: DistInfo, seed: int = 0,
                 batch_sampler=None, shuffle: bool = True, drop_last: bool = True, skipped_images: int = 0):
        self.groups = _view_groups(transform)  # not None: build_train_loader checked
        for a in (a for gr in self.groups for a in gr if a.blur_p > 0 and a.blur_kernel // 2 >= min(_hw(a.size))):
            raise UsageError(f"a {a.blur_kernel}-tap blur cannot reflect-pad a {a.size} px view; "
                             f"lower the blur kernel or the blur probability")
        super().__init__(range(len(labels)), batch_size, dist, 0, shuffle, drop_last, seed, batch_sampler)
        self.images, self.labels, self.transform, self.seed, self.rank = images, labels, transform, seed, dist.rank
        self.skipped_images = skipped_images

    def __iter__(self):  # self.batches: [(epoch, i), ...] from batch `start` on, the skipped ones cost nothing
        getattr(self.transform, "set_epoch", lambda e: None)(self.batches.epoch)  # MultiCrop's scale schedule
        for step, batch in enumerate(self.batches, self.batches.start):
            yield self.batch(self.batches.epoch, step, [i for _, i in batch])

    def batch(self, epoch: int, step: int, indices) -> tuple:
        """(views, labels) of the images `indices` at (epoch, step) on this rank: a pure function of those."""
        seed = np.random.SeedSequence([self.seed, epoch, step, self.rank]).generate_state(1, np.uint64)[0]
        g, B, hw = torch.Generator().manual_seed(int(seed)), len(indices), self.images.shape[-2:]
        plans = [{"idx": torch.as_tensor(indices, dtype=torch.long)}, *(sample_view_params(gr, B, hw, g)
                                                                        for gr in self.groups)]
        # one copy, float32 (exact for indices < 2^24), pinned and non_blocking on CUDA: the host never waits
        flat = torch.cat([v.float().flatten() for p in plans for v in p.values()])
        flat = (flat.pin_memory() if self.images.is_cuda else flat).to(self.images.device, non_blocking=True)
        parts = iter(flat.split([v.numel() for p in plans for v in p.values()]))
        plans = [{k: next(parts).view(v.shape).to(v.dtype) for k, v in p.items()} for p in plans]
        x = self.images.index_select(0, plans[0]["idx"]).float().mul_(1.0 / 255)       # ToDtype(scale=True)
        x, views = torch.cat([x, x.flip(-1)]), []                                         # for the plan's rois
        for group, plan in zip(self.groups, plans[1:]):
            v = render_views(x, plan, group)                                               # (V B, 3, h, w)
            views += (v.contiguous(memory_format=torch.channels_last) if v.is_cuda else v).split(B)
        return (views[0] if isinstance(self.transform, Augment) else views), self.labels[plans[0]["idx"]]


# --- which path: the device path when the training set fits, the DataLoader otherwise -------------------------
DEVICE_MAX_SIDE = 96         # px: larger images (ImageNet) keep the DataLoader path
DEVICE_MAX_BYTES = 8 << 30   # the device path never holds more than 8 GiB of images


def build_train_loader(dataset, batch_size: int, dist: DistInfo, data_path: str = "auto", workers: int = 0,
                       seed: int = 0, batch_sampler=None):
    """The training loader, `batch_size` PER RANK: DeviceLoader (views made on the device in batches) or
    EpochLoader (DataLoader workers), the same images per step. data_path "loader" or "device" forces one (a
    UsageError says why the device path cannot be); "auto" takes the device path when the views are built from
    Augment and the images are RGB, of one size, at most DEVICE_MAX_SIDE px a side, within 1/8 of the device's
    memory as uint8 (on CPU per rank; at most 8 GiB; CIFAR-10: 147 MiB). Prints one line: which path, why."""
    if data_path not in ("auto", "device", "loader"):
        raise UsageError(f"--data-path takes auto, device or loader (got {data_path!r})")
    t0, device = time.perf_counter(), dist.device  # the budget: 1/8 of its memory (on CPU: the machine's ranks')
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else
             os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    budget = min(total // 8, DEVICE_MAX_BYTES)

    def device_images():  # the training set as (uint8 (N, 3, H, W), labels, files skipped) on the CPU, or why not
        if _view_groups(dataset.transform) is None:
            return f"the view transform ({type(dataset.transform).__name__}) is not built from common.Augment"
        if len(dataset) == 0:
            return "the dataset is empty"
        src = dataset.source  # the digits and torchvision's in-memory sets (CIFAR10: CIFAR-100 too, a subclass)
        as_image = lambda image: v2.functional.to_image(image).as_subclass(torch.Tensor)  # noqa: E731 (uint8 CHW)
        array = (src.images if isinstance(src, _DigitsSource) else torch.from_numpy(src.data).permute(0, 3, 1, 2)
                 if isinstance(src, torchvision.datasets.CIFAR10) else torch.from_numpy(src.data)
                 if isinstance(src, torchvision.datasets.STL10) else None)
        array = array[dataset.indices] if array is not None and dataset.indices is not None else array
        first = array[0] if array is not None else as_image(dataset.load(0)[0])
        if first.shape[0] != 3:
            return f"the images have {first.shape[0]} channels, not 3"
        if max(first.shape[1:]) > DEVICE_MAX_SIDE:
            return f"images of {first.shape[2]}x{first.shape[1]} px exceed {DEVICE_MAX_SIDE} px"
        if (need := len(dataset) * first.numel()) > budget:
            return (f"{len(dataset):,} images take {need / 2**30:.1f} GiB as uint8, over the device path's "
                    f"{budget / 2**30:.1f} GiB budget on {device}")
        if array is not None:
            return array.contiguous(), dataset.targets, 0
        with ThreadPoolExecutor(max(1, workers)) as pool:
            images, labels, skipped = zip(*pool.map(dataset.load, range(len(dataset))))
        images = [as_image(image) for image in images]
        for i in (i for i, image in enumerate(images) if image.shape != first.shape):
            return (f"the images differ in size (image 0 is {tuple(first.shape)}, image {i} "
                    f"{tuple(images[i].shape)}); the DataLoader path crops each on its own")
        return torch.stack(images), torch.tensor(labels, dtype=torch.long), sum(skipped)

    got = "--data-path loader" if data_path == "loader" else device_images()
    if isinstance(got, str):
        if data_path == "device":
            raise UsageError(f"--data-path device is impossible here: {got}; use --data-path loader or auto")
        print0(f"data path: loader (DataLoader, views made image by image in {workers} worker(s)): {got}")
        return EpochLoader(dataset, batch_size, dist, workers, seed=seed, batch_sampler=batch_sampler)
    images, labels, skipped = got
    loader = DeviceLoader(images.to(device), labels.to(device), dataset.transform, batch_size, dist, seed,
                          batch_sampler, skipped_images=skipped)
    print0(f"data path: device ({data_path}): {len(images):,} images of {'x'.join(map(str, images.shape[1:]))} "
           f"held on {device} as uint8 ({images.numel() / 2**20:.1f} MiB of a {budget / 2**30:.1f} GiB budget; "
           f"ready in {time.perf_counter() - t0:.1f} s), views made there in batches")
    return loader


# ================================================================================================
# 3. BACKBONES
# ================================================================================================

BACKBONES = ("resnet18", "resnet50", "vit_small", "convnet")


def _widen_resnet(m: torchvision.models.ResNet, width: int, zero_init_residual: bool) -> None:
    """Multiply every channel count of a torchvision ResNet by `width` (SimCLR's ResNet-50 (x2): stem,
    bottleneck and projection convs all widened; 4096-d output), then redo torchvision's init."""
    block = type(m.layer1[0])
    m.inplanes, m.dilation = 64 * width, 1
    m.conv1, m.bn1 = nn.Conv2d(3, 64 * width, 7, 2, 3, bias=False), nn.BatchNorm2d(64 * width)
    for i, planes in enumerate((64, 128, 256, 512), start=1):  # torchvision's stage widths, each x width
        depth = len(getattr(m, f"layer{i}"))
        setattr(m, f"layer{i}", m._make_layer(block, planes * width, depth, stride=1 if i == 1 else 2))
    m.fc = nn.Linear(512 * width * block.expansion, 1000)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
    if zero_init_residual:  # each block's last BN: bn3 of a Bottleneck, bn2 of a BasicBlock
        for mod in m.modules():
            if isinstance(mod, block):
                nn.init.zeros_(mod.bn3.weight if hasattr(mod, "bn3") else mod.bn2.weight)


# --- ViT-S/16 as the SSL papers train it -------------------------------------------------------------
# The DINO layout (Caron et al. 2021, vision_transformer.py), which ExCB's official ViT reuses as is
# (architectures/backbones/vit.py): a stride-p conv cuts the image into p x p patches, a learned class token is
# prepended, a learned position embedding is added, then pre-norm blocks (LayerNorm eps 1e-6; multi-head
# attention with a biased qkv projection; MLP of ratio 4 with GELU) and a final LayerNorm; the class token's
# output is the feature; Linear weights, position embedding and class token trunc-normal(0.02), biases 0.
# (ReSA's deleted src/vision_transformer.py has the same blocks but MoCo v3's init: a fixed 2-D sin-cos
# position embedding, a frozen random patch embedding, xavier-uniform Linears; see resa.py's vit_small preset.)
# Two details make it an SSL backbone:
# - Multi-crop: the position embedding is stored for the training grid (224 / 16 = 14 x 14) and resampled
#   bicubically to the grid of each input, so ONE network takes the 224 px global and 96 px (6 x 6) local
#   crops. At the training grid it is used as is.
# - Stochastic depth (drop-path; Huang et al. 2016): in training, each residual branch of block i is dropped
#   for a random subset of the samples with probability r_i = i / (depth - 1) x drop_path (linear over depth:
#   0 for the first block, drop_path for the last), and kept branches are scaled by 1 / (1 - r_i) so the
#   expected output is unchanged; in eval mode it is the identity. The EMA teacher / momentum encoder is a
#   deepcopy of the student that runs in train mode, so it must carry rate 0 (disable_drop_path).


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + drop_path(attention(LN(x))), then x + drop_path(MLP(LN(x))). drop_path is
    torchvision's stochastic_depth in "row" mode: each sample's branch is zeroed with probability r_i and kept
    branches are multiplied by 1 / (1 - r_i); the identity at rate 0 or in eval mode. Parameters are named as in
    timm's (and DINO's) VisionTransformer: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.heads, self.drop_path = heads, drop_path  # this block's rate r_i (a float, not a module)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        # qkv with bias (DINO's vit_small: qkv_bias=True); ModuleDicts only to give timm's parameter names
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim)})
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(collections.OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(),
                                                         fc2=nn.Linear(hidden, dim)))

    def attention(self, x):
        B, N, D = x.shape
        qkv = self.attn["qkv"](x).view(B, N, 3, self.heads, D // self.heads)
        y = nn.functional.scaled_dot_product_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0))  # (B, h, N, d)
        return self.attn["proj"](y.transpose(1, 2).reshape(B, N, D))  # softmax(q k^T / sqrt(d)) v, heads concat

    def forward(self, x):  # x (B, N, D): N = 1 class token + h * w patch tokens
        x = x + stochastic_depth(self.attention(self.norm1(x)), self.drop_path, "row", self.training)
        return x + stochastic_depth(self.mlp(self.norm2(x)), self.drop_path, "row", self.training)


class ViT(nn.Module):
    """Vision Transformer (B, 3, H, W) -> class-token feature (B, dim), for any H, W that are multiples of
    patch_size. Defaults: ViT-S/16 (384-d, 12 blocks, 6 heads; 21.7 M parameters at 224 px). `image_size`
    only sets the grid the position embedding is stored at (the training resolution)."""

    def __init__(self, image_size: int = 224, patch_size: int = 16, dim: int = 384, depth: int = 12,
                 heads: int = 6, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise UsageError(f"the ViT needs an image size divisible by its patch size {patch_size}; "
                             f"got {image_size}")
        if not 0.0 <= drop_path < 1.0:
            raise UsageError(f"drop-path rate must be in [0, 1); got {drop_path}")
        self.patch_size, self.grid, self.feature_dim = patch_size, image_size // patch_size, dim
        # PyTorch's default init, as DINO; patch_embed.proj is timm's name for it
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, dim, patch_size, stride=patch_size)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))  # class token + grid x grid
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp_ratio, drop_path * i / max(depth - 1, 1))
                                      for i in range(depth)])  # linear rule over depth
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():  # LayerNorms keep PyTorch's init (weight 1, bias 0), as DINO sets them
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """Position embedding for an h x w patch grid, (1, 1 + h w, dim): the stored one at the training grid,
        else its patch part resampled bicubically (the class token's entry is kept as is).
        DEVIATION: DINO and ExCB pass scale_factor = (h + 0.1) / grid, which samples the stored grid up to
        ~0.2 patch away from the exact positions; we pass the target size (as DINOv2 does)."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        g, D = self.grid, self.pos_embed.shape[-1]
        patches = self.pos_embed[:, 1:].reshape(1, g, g, D).permute(0, 3, 1, 2)               # (1, D, g, g)
        patches = nn.functional.interpolate(patches, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)  # (1, 1 + hw, D)

    def forward(self, x):
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"ViT input {H}x{W} px is not a multiple of the patch size {p}")
        t = self.patch_embed["proj"](x).flatten(2).transpose(1, 2)                        # (B, hw, D)
        t = torch.cat([self.cls_token.expand(B, -1, -1), t], dim=1) + self.pos_embed_for(H // p, W // p)
        return self.norm(self.blocks(t)[:, 0])  # class token (B, D); LayerNorm acts per token


def disable_drop_path(model: nn.Module) -> nn.Module:
    """Set the drop-path rate of every ViT block in `model` to 0, in place, and return it: for the EMA
    teacher / momentum encoder, a deepcopy of the student that runs in train mode (OFFICIAL ExCB: the
    teacher ViT is built with drop_path_rate 0). A no-op for networks without ViT blocks."""
    for m in model.modules():
        if isinstance(m, ViTBlock):
            m.drop_path = 0.0
    return model


def _vit_patch(image_size: int) -> int:
    return 16 if image_size >= 128 else 4  # /16 at ImageNet sizes; /4 keeps an 8 x 8 grid at 32 px


def build_backbone(name: str, image_size: int, zero_init_residual: bool = False, width: int = 1,
                   drop_path: float = 0.0, patch_size: int | None = None) -> tuple[nn.Module, int]:
    """Encoder (B, 3, H, W) -> pooled features (B, feature_dim), classifier removed.

    resnet18 / resnet50: torchvision's, random init. At image_size <= 64 a CIFAR stem replaces the 7x7
      stride-2 conv + max-pool by a 3x3 stride-1 conv, the standard for 32 px images (the swapped conv
      keeps PyTorch's default init, as in the ReSA and NSCL official code). zero_init_residual zeroes
      the last BN gamma of each block (ReSA ImageNet and ExCB: on; ReSA CIFAR: off). width multiplies
      all channels (2 = the NSCL paper's ResNet-50 x2, 4096-d).
    vit_small: ViT-S (ViT above: 12 blocks, 6 heads, 384-d class token), patch_size (default: 16 at >= 128
      px, else 4); it takes inputs of any multiple of the patch size (multi-crop). drop_path: stochastic
      depth rate of its last block (official ExCB student: 0.1); ViT only.
    convnet: 4 conv-BN-ReLU layers, 128-d, for CPU demos and tests.
    """
    if drop_path and name != "vit_small":
        raise UsageError(f"drop-path (stochastic depth over transformer blocks) needs --backbone vit_small, "
                         f"not {name}")
    if name in ("resnet18", "resnet50"):
        m = getattr(torchvision.models, name)(weights=None, zero_init_residual=zero_init_residual)
        if width != 1:
            _widen_resnet(m, width, zero_init_residual)
        if image_size <= 64:  # the CIFAR stem
            m.conv1 = nn.Conv2d(3, m.bn1.num_features, 3, 1, 1, bias=False)
            m.maxpool = nn.Identity()
        dim = m.fc.in_features
        m.fc = nn.Identity()
    elif name == "vit_small":
        m = ViT(image_size, patch_size or _vit_patch(image_size), dim=384, depth=12, heads=6,
                drop_path=drop_path)
        dim = 384
    elif name == "convnet":
        layers, c_in = [], 3
        for c_out, stride in ((32, 1), (64, 2), (128, 2), (128, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c_in = c_out
        m, dim = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 128
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    m.feature_dim = dim
    return m, dim


def backbone_spec(name: str, image_size: int, **kwargs) -> dict:
    """What a checkpoint records to rebuild the backbone: build_backbone(name, image_size, **kwargs).

    Drop-path is a training-time regulariser that the evaluation encoder never uses: the spec stores rate 0
    (vit_small) or drops the argument. A ViT's patch size is recorded explicitly, so loading a checkpoint
    does not depend on the size rule of build_backbone."""
    kwargs = dict(kwargs)
    kwargs.pop("drop_path", None)
    if name == "vit_small":
        kwargs.update(patch_size=kwargs.get("patch_size") or _vit_patch(image_size), drop_path=0.0)
    return {"name": name, "image_size": int(image_size), "kwargs": kwargs}


# Checkpoints written before the ViT took timm's names (blocks.N.qkv, ...): the five renames that make them load.
_LEGACY_VIT = (("patch_embed.", "patch_embed.proj."), (".qkv.", ".attn.qkv."), (".proj.", ".attn.proj."),
               (".mlp.0.", ".mlp.fc1."), (".mlp.2.", ".mlp.fc2."))


def timm_names(state: dict) -> dict:
    """A ViT state_dict with the old names -> timm's names (an old checkpoint loads strictly, nothing silently
    left random); a state_dict that already has them is returned as it is."""
    if not any(k.startswith("blocks.") and ".qkv." in k and ".attn." not in k for k in state):
        return state
    def rename(k):
        for old, new in _LEGACY_VIT:
            if old in k and not (old == ".proj." and ".patch_embed" in "." + k):
                k = k.replace(old, new, 1)
        return k
    return {rename(k): v for k, v in state.items()}


# ================================================================================================
# 4. CHECKPOINTS
# ================================================================================================

FORMAT = "ssl-clustering/1"  # the format: docs/common.md#checkpoint-format


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, foreign, of another method, or does not fit the model."""


def _why(e: BaseException) -> str:
    """'Type: first line of the message' for a one-line error, also for an empty message (torch.load of a
    zero-byte file raises EOFError(''))."""
    lines = str(e).strip().splitlines()
    return type(e).__name__ + (f": {lines[0][:200]}" if lines else "")


# the torch.nn layers a stored head may hold, with the constructor arguments its spec lists, in order
_HEAD_LAYERS = {"Linear": ("in_features", "out_features", "bias"),
                "BatchNorm1d": ("num_features", "eps", "momentum", "affine"),
                "LayerNorm": ("normalized_shape", "eps", "elementwise_affine"),
                "ReLU": (), "GELU": (), "Identity": ()}


def _layer_spec(module: nn.Module) -> list:
    """A head (nn.Sequential of torch.nn layers) as a plain list [kind, *constructor arguments], e.g.
    ["Linear", 512, 128, True], so it loads without the method file. SyncBatchNorm (multi-GPU runs) is stored as
    the BatchNorm1d it is at evaluation: same state keys."""
    kind = "BatchNorm1d" if isinstance(module, nn.SyncBatchNorm) else type(module).__name__
    if kind == "Sequential":
        return [kind, [_layer_spec(c) for c in module]]
    if kind not in _HEAD_LAYERS:
        raise TypeError(f"cannot store head layer {kind}: heads must be built from "
                        f"{sorted(_HEAD_LAYERS) + ['Sequential']}")
    # Linear's bias Parameter -> whether there is one; LayerNorm's shape tuple -> a list (_plain)
    return [kind, *_plain([getattr(module, a) is not None if a == "bias" else getattr(module, a)
                           for a in _HEAD_LAYERS[kind]])]


def _build_layer(spec: list) -> nn.Module:
    kind, *a = spec
    if kind == "Sequential":
        return nn.Sequential(*[_build_layer(s) for s in a[0]])
    if kind not in _HEAD_LAYERS:
        raise CheckpointError(f"a stored head holds layer {kind!r}, not one of {sorted(_HEAD_LAYERS)}")
    return getattr(nn, kind)(*a)


def _plain(x):
    """Configuration -> only types torch.load(weights_only=True) accepts."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


def make_checkpoint(method: str, epoch: int, step: int, args, backbone_spec: dict, eval_backbone: nn.Module,
                    eval_encoder: str, data_info: DataInfo, train_state: dict, heads: dict | None = None,
                    data_dir: str | None = None, subset: int = 0, precision: str = "fp32") -> dict:
    """Assemble a checkpoint in the format of docs/common.md#checkpoint-format. heads: a module is stored as its
    layer spec + state, a tensor on the CPU, anything else as plain configuration."""
    eval_backbone, a = unwrap(eval_backbone), _plain(args)
    heads = {key: unwrap(v) for key, v in (heads or {}).items()}  # unwrap passes tensors and values through
    return {
        "format": FORMAT, "method": method, "epoch": int(epoch), "step": int(step), "args": a,
        "backbone": _plain({"feature_dim": int(getattr(eval_backbone, "feature_dim", 0)), **backbone_spec}),
        "eval_encoder": eval_encoder, "eval_backbone": eval_backbone.state_dict(),
        "heads": {key: {"spec": _layer_spec(v), "state": v.state_dict()} if isinstance(v, nn.Module)
                  else v.detach().cpu().clone() if isinstance(v, torch.Tensor) else _plain(v)
                  for key, v in heads.items()},
        "data": {"dataset": data_info.name, "data_dir": data_dir if data_dir is not None else a.get("data_dir"),
                 "image_size": data_info.image_size, "mean": list(data_info.mean),
                 "std": list(data_info.std), "num_classes": data_info.num_classes,
                 "subset": int(subset or a.get("train_subset", 0) or 0)},
        "train_state": train_state, "precision": precision, "torch_version": str(torch.__version__),
        "provenance": provenance(),
    }


def write_atomic(path, write) -> Path:
    """write(tmp) into a temporary file beside `path`, then os.replace(tmp, path): readers see the old file or the
    new one, never half of one (the temporary name is not *.pt, so run directories never list it). On failure (a
    full disk, Ctrl-C) the temporary is removed and the previous file stays; an OSError names `path` (run() prints
    it as one line). write_csv, config.json and the evaluation scripts' outputs use it; checkpoints add an
    fsync (save_checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # a failed write() names no file, open() the temporary: name `path`
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    return path


def save_checkpoint(path, state: dict) -> Path:
    """Write atomically (write_atomic: a temporary file in the same folder, then os.replace) with an fsync before
    the replace. A crash or kill mid-write leaves the previous file at `path` intact. Serialised in memory first:
    torch.save's zip writer reports a full disk as an opaque RuntimeError, a plain write as the OSError (ENOSPC,
    with the path) that run() turns into one line."""
    buffer = io.BytesIO()
    torch.save(state, buffer)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
    return write_atomic(path, write)


def load_checkpoint(path, method: str | None = None) -> dict:
    """Load and validate one of our checkpoints (on CPU). `method` checks which script wrote it."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p} is a directory; pass one checkpoint file (*.pt)" if p.is_dir()
                              else f"{p}: no such checkpoint file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated copies, zero-byte files, foreign pickles, random bytes
        raise CheckpointError(f"{p} cannot be read as a PyTorch checkpoint ({_why(e)}); the file is damaged "
                              f"or not ours. Use another checkpoint of the run.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{p} is not an ssl-clustering checkpoint (expected format {FORMAT!r}; "
                              f"found {keys}). Checkpoints of the official ExCB/ReSA/NSCL code must be "
                              f"converted first.")
    if method is not None and ckpt["method"] != method:
        raise CheckpointError(f"{p} was written by {ckpt['method']}.py (method {ckpt['method']!r}), not "
                              f"{method}.py; resume it with {ckpt['method']}.py")
    return ckpt


def checkpoint_meta(ckpt: dict, path=None) -> dict:
    """Everything about a checkpoint except its tensors."""
    meta = {k: v for k, v in ckpt.items() if k not in ("eval_backbone", "heads", "train_state")}
    return {**meta, "heads": sorted(ckpt.get("heads", {})), "path": str(path) if path is not None else None}


def load_backbone(path_or_ckpt) -> tuple[nn.Module, dict]:
    """Rebuild the evaluation encoder from a checkpoint alone -> (module on CPU in eval mode, meta)."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt)
    path = None if isinstance(path_or_ckpt, dict) else path_or_ckpt
    spec = ckpt["backbone"]
    model, _ = build_backbone(spec["name"], spec["image_size"], **spec.get("kwargs", {}))
    try:
        model.load_state_dict(timm_names(ckpt["eval_backbone"]) if spec["name"] == "vit_small"
                              else ckpt["eval_backbone"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path or 'checkpoint'}: its weights do not fit a {spec['name']} built from "
                              f"its own spec {spec} ({_why(e)})") from None
    return model.eval(), checkpoint_meta(ckpt, path)


def load_heads(path_or_ckpt) -> dict:
    """Evaluation heads of a checkpoint: {"projector": nn.Sequential (eval mode), "centroids": tensor,
    "normalize_output": bool, ...}; only the keys that were stored."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt)
    heads = dict(ckpt.get("heads", {}))
    for key, value in heads.items():
        if isinstance(value, dict) and "spec" in value:  # a module: its layer spec + state
            heads[key] = _build_layer(value["spec"]).eval()
            heads[key].load_state_dict(value["state"], strict=True)
    return heads


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """ckpt_epoch0010.pt after 10 whole epochs; ckpt_epoch0010_step004321.pt for a run stopped (preempted) in
    epoch 11 after global step 4321: epoch always counts COMPLETED epochs."""
    return f"ckpt_epoch{epoch:04d}.pt" if step is None else f"ckpt_epoch{epoch:04d}_step{step:06d}.pt"


def _checkpoint_files(folder) -> list[Path]:
    """A folder's *.pt files in training order ([] when it does not exist yet): by the numbers in each name, so
    ckpt_epoch0010.pt (10) < a mid-epoch ckpt_epoch0010_step004321.pt (10, 4321) < ckpt_epoch0011.pt (11)."""
    return sorted(Path(folder).glob("*.pt"), key=lambda f: (list(map(int, re.findall(r"\d+", f.stem))), f.name))


def list_checkpoints(path) -> list[Path]:
    """A checkpoint file -> [it]; a run directory -> its *.pt files in training order (ckpt_epoch0010.pt, then a
    mid-epoch ckpt_epoch0010_step004321.pt, then ckpt_epoch0011.pt)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not (files := _checkpoint_files(p)):  # [] also when p does not exist
        raise CheckpointError(f"no checkpoints (*.pt) in {p}; train into it first, e.g. `python resa.py --preset "
                              f"digits --output-dir {p}`" if p.is_dir()
                              else f"{p}: no such checkpoint file or run directory")
    return files


# Flags that may change when a run is continued: where things are, how fast, how chatty. Everything else defines
# the run, and --resume auto refuses a run directory whose checkpoint says otherwise.
RESUME_MAY_DIFFER = {"resume", "output_dir", "data_dir", "download", "workers", "compile", "log_every",
                     "save_every", "save_epoch0", "data_path", "skip_bad_images"}


def config_diff(saved: dict, args) -> list[str]:
    """'--name: saved -> now' for every run-defining field that differs between a checkpoint and this command."""
    now = _plain(args)
    return [f"--{k.replace('_', '-')}: {saved[k]!r} in the run, {now[k]!r} now" for k in sorted(now)
            if k in saved and k not in RESUME_MAY_DIFFER and saved[k] != now[k]]


def resume_checkpoint(args, method: str) -> dict | None:
    """--resume -> the checkpoint to continue from, or None for a fresh start (every method script calls this).
    "": a fresh start, refused if --output-dir already holds checkpoints (rerunning a command must not overwrite a
    run). auto: the newest readable checkpoint of this method in --output-dir (damaged files are skipped with a
    note) or a fresh start, so a job script can resubmit the same command line; a checkpoint configured otherwise
    is refused, naming what differs (RESUME_MAY_DIFFER may change). PATH: that checkpoint; differences are
    printed but allowed (a deliberate change, e.g. a lower lr). Manual: docs/common.md#runs-that-survive.
    """
    run_dir = Path(args.output_dir)
    existing = _checkpoint_files(run_dir)  # [] when it does not exist yet
    if not args.resume:
        if existing:
            raise UsageError(f"{run_dir} already holds checkpoints (newest: {existing[-1].name}); pass --resume auto "
                             f"to continue that run, or choose another --output-dir to start a new one")
        return None
    if args.resume != "auto":
        ckpt = load_checkpoint(args.resume, method=method)
        if diff := config_diff(ckpt["args"], args):
            print0(f"note: resuming {args.resume} with a changed configuration: " + "; ".join(diff))
        return {**ckpt, "path": str(args.resume)}
    for path in reversed(existing):
        try:
            ckpt = load_checkpoint(path, method=method)
        except CheckpointError as e:
            if "was written by" in str(e):  # another method's run directory: stop, do not skip
                raise
            print0(f"note: skipping {path.name}: {e}")
            continue
        if diff := config_diff(ckpt["args"], args):
            raise UsageError(f"--resume auto: {path} belongs to a run configured differently: " + "; ".join(diff)
                             + ". Rerun with the run's own flags, or choose another --output-dir")
        print0(f"--resume auto: continuing from {path} (epoch {ckpt['epoch']}, step {ckpt['step']})"
               + (f"; the run already finished its {args.epochs} epochs" if ckpt["epoch"] >= args.epochs else ""))
        return {**ckpt, "path": str(path)}
    print0(f"--resume auto: no checkpoint in {run_dir}, starting fresh")
    return None


def load_train_state(ckpt: dict, args, **parts) -> dict:
    """Load train_state[name] into each part (module, optimizer, MixedPrecision) strictly: a checkpoint that does
    not fit the model this command builds (another --image-size, --backbone, head width, ...) is a CheckpointError
    naming the file, the part and the flags that differ, not a state_dict traceback. -> ckpt["train_state"]."""
    state = ckpt["train_state"]
    for name, part in parts.items():
        try:
            part.load_state_dict(state.get(name, {}) if name == "scaler" else state[name])
        except (RuntimeError, ValueError, KeyError) as e:
            diff = "; ".join(config_diff(ckpt["args"], args)) or "no flag differs"
            raise CheckpointError(f"{ckpt.get('path', 'the checkpoint')}: its {name} does not fit the model this "
                                  f"command builds ({_why(e)[:160]}); flags that differ from the run: {diff}. Resume "
                                  f"with the run's own flags") from None
    return state


def prune_interrupted(run_dir, step: int) -> None:
    """Rank 0, after writing a checkpoint at `step`: delete mid-epoch (preemption) checkpoints of earlier steps,
    which that newer checkpoint supersedes, so a finished run directory holds the same files as a run that was
    never interrupted."""
    for f in Path(run_dir).glob("ckpt_epoch*_step*.pt"):
        if (m := re.search(r"_step(\d+)$", f.stem)) and int(m.group(1)) < step:
            f.unlink(missing_ok=True)


# ================================================================================================
# 5. FEATURES
# ================================================================================================


def eval_loader(meta_or_data: dict, split: str, data_dir: str | None = None, batch_size: int = 256,
                workers: int = 0, subset: int = 0, dataset: str | None = None) -> DataLoader:
    """Un-augmented (x, y) batches of a checkpoint's dataset (or of `dataset`, for transfer), at the
    checkpoint's image size (eval_transform). Normalisation: the checkpoint's own for its dataset, the target's
    for transfer."""
    data = meta_or_data.get("data", meta_or_data)
    name = dataset or data["dataset"]
    size = int(data["image_size"])
    norm = data if name == data["dataset"] else vars(dataset_info(name, size))  # its mean and std
    ds = build_dataset(name, split, eval_transform(size, norm["mean"], norm["std"]),
                       data_dir if data_dir is not None else data.get("data_dir"), subset=subset,
                       image_size=size if name == "digits" else None)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


def extract_features(model: nn.Module, loader, device: torch.device | None = None, precision: str = "fp32",
                     what: str = "features"):
    """-> (features float32 (N, D) on CPU, labels long (N,)), in eval mode under inference_mode. Features stay on
    the device until the end: one transfer, no per-batch sync. A progress line with an ETA every few seconds
    (Progress), named by `what`.

    float32 by default on every device: rounding features to bf16 (8-bit mantissa) changes exactly what the
    label-free metrics measure (on a rank-16 embedding it moves alpha-ReQ from 0.16 to 2.88 and RankMe from 15.1
    to 16.5), and casting back with .float() cannot undo it. precision="bf16" is the faster opt-in (probe.py /
    monitor.py --precision bf16, recorded in their outputs and cache names)."""
    device = device or next(model.parameters()).device
    model.eval()
    feats, labels = [], []
    progress = Progress(what, len(getattr(loader, "dataset", ())) or None, "images")
    with torch.inference_mode(), autocast(device, precision):
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            feats.append(model(x).float())
            labels.append(torch.as_tensor(y))
            progress.update(len(labels[-1]))
    return torch.cat(feats).cpu(), torch.cat(labels).long().cpu()


class Progress:
    """A console line for a long step (feature extraction, probes, metric sets): at most one every `every`
    seconds, with the rate and an ETA when the total is known, and nothing at all for a step that ends within
    the first interval. Host-side counts only: no device sync."""

    def __init__(self, what: str, total: int | None = None, unit: str = "items", every: float = 5.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last, rate = now, self.done / max(now - self.start, 1e-9)
        line = f"  {self.what}: {self.done:,}"
        if self.total:
            eta = int((self.total - self.done) / max(rate, 1e-9))
            line += (f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f} %), "
                     f"eta {eta // 60}:{eta % 60:02d}")
        print0(f"{line}, {rate:,.0f} {self.unit}/s")


BACKBONE_FORMAT = "ssl-clustering-backbone/1"


def export_backbone(ckpt_path, out_path=None) -> Path:
    """A checkpoint's evaluation encoder alone, for other code (`python common.py export CKPT [OUT]`) -> a small
    file loadable with torch.load(weights_only=True): `state_dict` in the ecosystem's names (ResNets:
    torchvision's resnet18 / resnet50 without `fc`; the ViT: timm's VisionTransformer), `arch` and `kwargs`
    (build_backbone's arguments), `cifar_stem` (ResNets: the 3x3 stride-1 stem without max-pool), `image_size`,
    `feature_dim`, normalisation `mean` / `std`, `method`, `epoch`, `eval_encoder` and `provenance` (the
    checkpoint's and the export's). README.md#using-a-backbone-elsewhere shows the few lines that load it."""
    model, meta = load_backbone(ckpt_path)
    spec, data = meta["backbone"], meta["data"]
    out = Path(out_path) if out_path else Path(ckpt_path).with_name(Path(ckpt_path).stem + "_backbone.pt")
    blob = {"format": BACKBONE_FORMAT, "arch": spec["name"], "kwargs": spec.get("kwargs", {}),
            "cifar_stem": spec["name"].startswith("resnet") and model.conv1.stride == (1, 1),
            "image_size": spec["image_size"], "feature_dim": spec.get("feature_dim"), "mean": data["mean"],
            "std": data["std"], "method": meta["method"], "epoch": meta["epoch"],
            "eval_encoder": meta["eval_encoder"], "state_dict": model.state_dict(),
            "provenance": {"checkpoint": str(ckpt_path), "trained": meta.get("provenance", {}),
                           "exported": provenance()}}
    save_checkpoint(out, blob)  # its atomic write (the file is not a training checkpoint)
    return out


# --- the evaluation scripts' shared pieces: k-NN, thread limits, the run-directory argument, CSV files ---------


def knn_predict(train_x, train_y, test_x, k=20, temperature=0.07, metric="cosine", num_classes=None,
                chunk_elems=2 ** 25):
    """k-NN class scores for each test row: (M, C) float.

    cosine (DINO, Wu et al. 2018): L2-normalised features, vote of each neighbour = exp(sim / T).
    euclidean (ReSA CIFAR): raw features, k nearest by L2 distance, one vote each; ties between classes
    go to the smallest label because argmax returns the first maximum.
    The test set is processed in chunks so that a chunk of the (M, N) similarity matrix holds at most
    chunk_elems entries (2^25 floats = 128 MB)."""
    C = num_classes or int(train_y.max()) + 1
    cosine = metric == "cosine"
    if cosine:
        train_x, test_x = nn.functional.normalize(train_x, dim=1), nn.functional.normalize(test_x, dim=1)
    elif metric == "euclidean":
        train_sq = (train_x * train_x).sum(1)  # (N,)
    else:
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    k, step = min(k, len(train_x)), max(1, chunk_elems // len(train_x))
    scores = []
    for s in range(0, len(test_x), step):
        q = test_x[s:s + step]
        # cosine: the k largest of the (m, N) similarities; euclidean: the k smallest ||q - x||^2 = ||q||^2 - 2 q.x
        # + ||x||^2, where ||q||^2 does not change the ranking of a row
        sim = q @ train_x.T if cosine else train_sq[None, :] - 2 * q @ train_x.T
        val, idx = sim.topk(k, dim=1, largest=cosine)
        w = (val / temperature).exp() if cosine else torch.ones_like(val)  # (m, k)
        scores.append(w.new_zeros(len(q), C).scatter_add_(1, train_y[idx], w))  # (m, C)
    return torch.cat(scores)


def knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.07, metric="cosine", num_classes=None):
    """Top-1 k-NN accuracy in percent. Defaults: DINO's weighted 20-NN; ReSA CIFAR: metric="euclidean", k=5."""
    scores = knn_predict(train_x, train_y, test_x, k, temperature, metric, num_classes)
    return 100.0 * (scores.argmax(1) == test_y.to(scores.device)).float().mean().item()


@contextlib.contextmanager
def cpu_threads(n: int):
    """torch's intra-op pool and the BLAS / OpenMP pools scikit-learn uses limited to n threads, restored on exit
    (tests call the scripts' main() in-process); n <= 0 leaves them. Evaluation takes thousands of small steps
    (a probe's (1000, 512) x (512, C) matmuls, k-means iterations), where OpenMP barriers on a busy machine cost
    more than a second core saves: 3.3 ms per linear-probe step on 1 thread, 30+ ms on 2 (2-core VM)."""
    with contextlib.ExitStack() as restore:  # on exit: threadpoolctl's limits, then torch's thread count
        if n > 0:
            from threadpoolctl import threadpool_limits

            restore.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(n)
            restore.enter_context(threadpool_limits(limits=n))
        yield


def path_first(argv, flag: str) -> list:
    """probe.py / monitor.py take the checkpoint or run directory first, without a flag: [PATH, ...] ->
    [flag, PATH, ...]."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return [flag] + argv if argv and not argv[0].startswith("-") else argv


def run_dir_of(path) -> Path:
    """A run directory itself, or the directory holding a checkpoint file."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def write_csv(path, rows, columns) -> Path:
    """rows (dicts) -> a CSV with exactly `columns` (missing values empty), written atomically (write_atomic)."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)  # csv writes None as an empty field, restval="" fills missing keys
    return write_atomic(path, write)


# ================================================================================================
# 6. UTILITIES
# ================================================================================================


def _arg_type(tp):
    """Field annotation -> (argparse type, nargs); X | None (Optional) reads as X."""
    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    if origin in (tuple, list):
        fixed = origin is tuple and targs and targs[-1] is not Ellipsis
        return (targs[0] if targs else str), len(targs) if fixed else "+"
    if targs:  # a Union: its first type other than None
        return _arg_type(next(a for a in targs if a is not type(None)))
    return tp, None


def ranged(typ, interval: str):
    """An argparse type that also checks an interval written as in mathematics: "[1, inf)", "(0, inf)",
    "[0, 1]". A value outside it (nan and inf included, unless an end is a closed inf) is a usage error."""
    lo, hi = (float(v) for v in interval[1:-1].split(","))

    def parse(text):
        v = typ(text)
        if not ((lo <= v if interval[0] == "[" else lo < v) and (v <= hi if interval[-1] == "]" else v < hi)):
            raise argparse.ArgumentTypeError(f"{text} is not in {interval}")
        return v
    parse.__name__ = typ.__name__  # argparse names the type in its own messages
    return parse


class ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors are ONE line, `error: argument --lr: ...`, with exit status 2 (argparse's
    convention; without the usage block, which lists ~50 flags)."""

    def error(self, message):
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def _groups(cls) -> dict:
    """field name -> the comment heading it stands under in the dataclass source (`# --- views ---`), so --help
    shows the flags in the groups the Args class is written in."""
    import inspect

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    title, out = None, {}
    for text in map(str.strip, lines[1:]):
        if text.startswith("#"):
            title = text.strip("#- ").split(" (")[0] or title
        elif ":" in text and text.split(":")[0].isidentifier():
            out[text.split(":")[0]] = title
    return out


def parse_args(cls, presets: dict, argv=None, usage: str | None = None):
    """Dataclass -> command line. Every field becomes --field-name with its default and metadata["help"]; bools
    get --x/--no-x. Validation happens here, before any work: metadata["choices"] (a tuple: argparse's choices,
    for each element of a tuple field) and metadata["range"] (an interval string, see ranged). `--preset NAME`
    is applied first and later flags override it. --help groups the flags by the Args class's comments and
    lists every preset's values."""
    hints, titles, prog = typing.get_type_hints(cls), _groups(cls), Path(sys.argv[0]).name
    pre = ArgParser(prog=prog, add_help=False, allow_abbrev=False)  # --p must not be read as --preset
    if presets:
        pre.add_argument("--preset", choices=list(presets), help="hyperparameter preset (see below)")
    preset = vars(pre.parse_known_args(argv)[0]).get("preset")  # read first: its values become the defaults
    epilog = "presets (later flags override them):\n" + "\n".join(
        f"  {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()) for name, values in presets.items())
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
    usage = usage or f"python {prog}" + (" [--preset NAME]" if presets else "") + " [--flag VALUE ...]"
    parser = ArgParser(prog=prog, usage=usage, description=doc, epilog=epilog if presets else None,
                       parents=[pre], allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {title: parser.add_argument_group(title) for title in dict.fromkeys(titles.values()) if title}
    for f in dataclasses.fields(cls):
        if f.name == "preset":  # the --preset flag above
            continue
        typ, nargs = _arg_type(hints[f.name])
        kind = {"action": argparse.BooleanOptionalAction} if hints[f.name] is bool else {
            "type": ranged(typ, f.metadata["range"]) if "range" in f.metadata else typ, "nargs": nargs,
            "choices": f.metadata.get("choices")}
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "") + " (default: %(default)s)"  # argparse fills in the default
        groups.get(titles.get(f.name), parser).add_argument("--" + f.name.replace("_", "-"), dest=f.name,
                                                            default=default, help=help_text, **kind)
    parser.set_defaults(**presets.get(preset, {}))  # after the flags: --help shows the preset's values
    ns = {**vars(parser.parse_args(argv)), "preset": preset or ""}
    # nargs gives lists; keep the dataclass's tuple types; the field preset only where the Args class has one
    return cls(**{k: tuple(v) if isinstance(v, list) and typing.get_origin(hints[k]) is tuple else v
                  for k, v in ns.items() if k != "preset" or k in hints})


def cosine_schedule(step: int, total_steps: int, base: float, final: float = 0.0, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> float:
    """Linear warm-up from warmup_start to base over warmup_steps, then a half cosine from base to final
    over the remaining steps (a pure function of the global step, so resuming needs no scheduler state)."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(step - warmup_steps, span) / span
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


def _item(v):
    return v.item() if isinstance(v, torch.Tensor) else v


def check_writable(path) -> Path:
    """Prove, BEFORE any work and without creating anything, that files can be written at `path` (a directory,
    made later by whoever writes there): the nearest existing folder on the way takes a test file. A regular file
    in the path, a read-only or full disk then fail here with one line naming `path` (run()), not after an epoch."""
    p = Path(path)
    there = next(q for q in (p, *p.parents) if q.exists())  # the root always exists
    if not there.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(p))
    test = there / f".write_test.{os.getpid()}"
    try:
        test.write_bytes(b"0")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(p)) from None
    finally:
        test.unlink(missing_ok=True)
    return p


@functools.lru_cache(maxsize=None)
def _code_version() -> dict:
    """The git commit of the code this file belongs to, and whether the working tree had changes; {} outside a git
    checkout (a copied file) or without git. Asked once per process."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *a], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    try:
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def provenance() -> dict:
    """What produced a file: UTC creation time (ISO 8601), the code's git commit (and a dirty flag) when run from
    a git checkout, the torch / torchvision versions and the world size. Stored in every checkpoint and in
    config.json."""
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **_code_version(),
            "torch_version": str(torch.__version__), "torchvision_version": str(torchvision.__version__),
            "world_size": get_world_size()}


class RunLogger:
    """RUN_DIR/log.jsonl (one JSON object per line) plus one console line per log step, rank 0 only.

    step_line() is the only place that turns tensors into Python numbers (.item() = a host-device sync),
    so call it at log steps only. Rates are measured over the window since the previous call. Iterating the
    loader through timed() also logs perf/data_frac, the share of the window the training loop spent blocked
    on the loader: near 1 the run is input-bound (add --workers or cores), near 0 it is compute-bound. On
    CUDA it is host time, so a GPU that is still busy while the host waits counts as waiting; read it as an
    upper bound there.
    """

    def __init__(self, run_dir, dist: DistInfo, total_steps: int, start_step: int = 0):
        self.path = Path(run_dir) / "log.jsonl"
        self.dist, self.total = dist, total_steps
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.data_time = 0.0  # seconds blocked in the loader since the last step_line (timed())
        if dist.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def timed(self, loader):
        """Yield loader's batches, adding the time spent waiting for each one to the current log window."""
        it = iter(loader)
        t = time.perf_counter()
        for batch in it:
            self.data_time += time.perf_counter() - t
            yield batch
            t = time.perf_counter()  # the caller's step is done: waiting for the next batch starts

    def write_config(self, config: dict) -> None:
        """RUN_DIR/config.json (rank 0, atomically): the run's configuration and provenance, written at every
        start and resume, so log.jsonl holds only step records (pandas.read_json(lines=True) reads it as is)."""
        if self.dist.is_main:
            text = json.dumps({**_plain(config), **provenance()}, indent=1) + "\n"
            write_atomic(self.path.with_name("config.json"), lambda tmp: tmp.write_text(text))

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            record = {k: _item(v) for k, v in record.items()}
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            except OSError as e:  # a full disk fails in write(), which names no file
                raise OSError(e.errno, e.strerror, str(self.path)) from None

    def step_line(self, epoch: int, step: int, loss, lr: float, images_per_step: int,
                  extra: dict | None = None) -> dict:
        """images_per_step: images (not views) per optimizer step over all ranks (the global batch)."""
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        now = time.perf_counter()
        window, self.last_time = now - self.last_time, now
        step_time = window / max(step - self.last_step, 1)
        data_frac, self.last_step, self.data_time = min(self.data_time / max(window, 1e-9), 1.0), step, 0.0
        rec = {"epoch": epoch, "step": step, "loss": _item(loss), "sched/lr": lr,
               "perf/images_per_s": images_per_step / step_time, "perf/step_time_s": step_time,
               "perf/data_frac": data_frac, "perf/peak_mem_gb": peak_memory_gb(self.dist.device),
               "perf/eta_s": (self.total - step) * step_time,
               **{k: _item(v) for k, v in (extra or {}).items()}}
        self.log(rec)
        if self.dist.is_main:  # the extra values by their short name; a data/ counter only once it is not 0
            extras = " ".join(f"{k.split('/')[-1]} {rec[k]:.4g}" for k in (extra or {}) if isinstance(
                rec[k], (int, float)) and not (k.startswith("data/") and rec[k] == 0))
            h, m = divmod(int(rec["perf/eta_s"]) // 60, 60)
            print(f"ep {epoch} step {step}/{self.total} loss {rec['loss']:.4f} lr {lr:.3g} "
                  f"{rec['perf/images_per_s']:.0f} img/s {step_time * 1000:.0f} ms/step "
                  f"data {100 * data_frac:.0f}% mem {rec['perf/peak_mem_gb']:.2f} GB "
                  f"eta {h}:{m:02d}:{int(rec['perf/eta_s']) % 60:02d} {extras}".rstrip(), flush=True)
        return rec


# ================================================================================================
# 7. RUNS THAT SURVIVE: divergence, preemption, per-step seeding, the scripts' entry point
# ================================================================================================


class DivergenceError(RuntimeError):
    """The loss became nan/inf: the run stops (exit status 3) before writing anything of the diverged state."""


class DivergenceGuard:
    """Stops a run at the first non-finite loss, before any checkpoint of the diverged state is written.

    update() runs every step and only compares on the device (no host sync): it keeps the first step whose loss
    was nan/inf. check() is the one sync: every rank calls it at log steps and before every save (all ranks reach
    those at the same step), and it raises DivergenceError naming the step, epoch, lr, the last good checkpoint
    and what to try. Between a divergence and the next check the run computes garbage, but writes none of it.
    """

    def __init__(self, device: torch.device, steps_per_epoch: int, total_steps: int, lr_at, run_dir):
        self.first = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step; -1: none yet
        self.value = torch.zeros((), device=device)                        # the loss at that step
        self.steps_per_epoch, self.total, self.lr_at, self.run_dir = steps_per_epoch, total_steps, lr_at, run_dir

    def update(self, loss: torch.Tensor, step: int) -> None:
        """step: the number of this optimizer step as the log shows it (1 = the first step of the run)."""
        loss = loss.detach().float()
        new = ~torch.isfinite(loss) & (self.first < 0)
        self.first = torch.where(new, step, self.first)
        self.value = torch.where(new, loss, self.value)

    def check(self) -> None:
        never = torch.iinfo(torch.long).max
        first = torch.where(self.first < 0, never, self.first)
        if get_world_size() > 1:  # the earliest divergence over ranks; all ranks then raise together
            tdist.all_reduce(first, op=tdist.ReduceOp.MIN)  # `first` is torch.where's new tensor
        step = int(first.item())
        if step == never:
            return
        value = f"{float(self.value):g}" if int(self.first) == step else "non-finite"
        good = _checkpoint_files(self.run_dir)
        epoch = (step - 1) // self.steps_per_epoch
        where = (f"the last good checkpoint is {good[-1]}; continue from it with --resume {good[-1]}" if good
                 else "no checkpoint had been written yet")
        raise DivergenceError(
            f"the loss became {value} at step {step}/{self.total} (ep {epoch}, lr {self.lr_at(step - 1):.4g}); the "
            f"run stopped without writing a checkpoint of the diverged state: {where}. Try a lower --lr (e.g. 10x "
            f"lower), a longer --warmup-epochs or gradient clipping, or --precision fp32 if fp16 overflowed.")


class StopSignal:
    """Preemption: SIGTERM (what SLURM, Kubernetes and torchrun send before a kill), SIGUSR1 (SLURM's
    `--signal=USR1@120`) or SIGINT (Ctrl-C; a second one interrupts at once) asks the run to stop. Every rank
    finishes its step, rank 0 writes a resumable checkpoint, and the processes exit with status 0 (130 after a
    SIGINT, see run()); the same command line with --resume auto then continues exactly where the run stopped.

    Ranks receive the signal at slightly different moments, so they agree through a collective: every step each
    rank starts a non-blocking all-reduce (MAX) of its flag on a CPU (gloo) group and reads the result of the
    previous step's all-reduce, which has long arrived. All ranks therefore stop after the same step (one step
    after the first rank got the signal), and no GPU stream ever waits for it."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    received = None  # the first signal's name ("SIGTERM", ...) in this process, on the class: run() reads it

    def __init__(self, dist: DistInfo):
        StopSignal.received, self.world = None, dist.world_size
        self.previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        self.group = tdist.new_group(backend="gloo") if dist.world_size > 1 else None  # collective: all ranks
        self.work, self.flag, self.stopping = None, torch.zeros(1), False

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if StopSignal.received == name == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without a checkpoint
        if StopSignal.received is None:
            print(f"received {name}: finishing this step, then saving a checkpoint", file=sys.stderr, flush=True)
            StopSignal.received = name

    def __call__(self) -> bool:
        """Call once per step on every rank: True (and .stopping from then on) when the run must stop now."""
        if self.world == 1:
            self.stopping = self.received is not None
            return self.stopping
        if self.work is not None:
            self.work.wait()
            self.stopping = bool(self.flag.item() > 0)  # a CPU tensor: no device sync
        self.flag = torch.tensor([0.0 if self.received is None else 1.0])
        self.work = tdist.all_reduce(self.flag, op=tdist.ReduceOp.MAX, group=self.group, async_op=True)
        return self.stopping

    def close(self) -> None:
        """Wait for the last all-reduce (every rank posted it) and restore the previous signal handlers."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed torch's generators from (seed, step, rank) at the start of every training step. Random ops inside
    a step (a ViT's drop-path) are then a pure function of the step, so a resumed run, even one stopped
    mid-epoch, draws exactly what the uninterrupted run drew, without saving generator states; ranks differ."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def _one_line(e: BaseException) -> str:
    """An exception -> one line for the user; never raises (an empty message gives the type's name).
    A file-system failure (no space, read-only, a file where a folder should be, no permission) -> one line
    naming the path and what to do. The previous checkpoint is intact: writes go to a temporary file first."""
    hint = {errno.ENOSPC: "the disk is full: free space there or choose another --output-dir / --out-dir",
            errno.EROFS: "the file system is read-only: choose a writable --output-dir / --out-dir",
            errno.EACCES: "no permission to write there: choose a writable --output-dir / --out-dir",
            errno.ENOTDIR: "a part of that path is a regular file, not a folder: choose another directory",
            errno.ENOENT: "no such file or folder: check the path (a moved dataset: pass its new --data-dir)"}
    if isinstance(e, OSError) and not isinstance(e, DatasetNotFoundError):  # a file-system failure
        return (f"{e.filename or 'the output location'}: {e.strerror or str(e) or type(e).__name__}; "
                + hint.get(e.errno, "check the path and the disk"))
    msg = str(e).strip() or type(e).__name__
    if "Original Traceback" in msg:  # raised in a DataLoader worker: our message is the traceback's last line
        msg = re.sub(r"^[\w.]*Error: ", "", msg.splitlines()[-1])
    return " ".join(msg.split())


def run(main) -> None:
    """Run a script's main() with argparse's exit statuses and one line instead of a traceback for what a user can
    fix: 2 for a usage error (a bad flag or combination, UsageError; argparse's own errors exit 2 before this),
    1 for a run-time failure (missing data, an unreadable image, a damaged checkpoint, a full or read-only disk:
    the line names the path and what to do), 3 for a diverged run, 130 for Ctrl-C (after StopSignal saved a
    checkpoint and printed how to continue, or at once on a second Ctrl-C). A run stopped by SIGTERM / SIGUSR1
    exits 0, so a job scheduler sees a clean exit. Anything else is a bug and keeps its traceback."""
    code = 0
    try:
        main()
    except (UsageError, DatasetNotFoundError, CheckpointError, BadImageError, DivergenceError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        code = 2 if isinstance(e, UsageError) else 3 if isinstance(e, DivergenceError) else 1
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C) before a checkpoint could be written; rerun the command with --resume "
              "auto to continue from the last checkpoint", file=sys.stderr, flush=True)
        code = 130
    if code or StopSignal.received == "SIGINT":
        sys.exit(code or 130)


if __name__ == "__main__":  # python common.py export CKPT [OUT]: the evaluation backbone alone (export_backbone)
    def _export():
        if sys.argv[1:2] != ["export"] or len(sys.argv) not in (3, 4):
            raise UsageError("usage: python common.py export CKPT [OUT]  (OUT defaults to CKPT's name + _backbone.pt)")
        print(f"wrote {export_backbone(*sys.argv[2:])}")
    run(_export)
