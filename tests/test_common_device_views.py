"""common.py section 2b: the device path. Each batched float op against torchvision.transforms.v2.functional on
the same float images in [0, 1] with the same parameters (the roi_align crop within its stated deviation, the
others within float rounding); the sampled parameters against torchvision's own draws
(two-sample Kolmogorov-Smirnov); views as a pure function of (seed, epoch, step, rank), mid-epoch resume, the same
images per step as the DataLoader path, two gloo ranks, and build_train_loader's choice of path."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import v2

import common
import simclr_nscl
from _dist import spawn

pytestmark = pytest.mark.usefixtures("one_thread")


def _colour_images(n=96, size=32, seed=0):
    """Smooth random colour images with some noise: every hue, saturated and grey pixels, flat and busy areas."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 3, 6, 6), generator=g).float()
    x = torch.nn.functional.interpolate(base, size=size, mode="bilinear", align_corners=False)
    x = x + torch.randint(-12, 13, x.shape, generator=g)
    x[: n // 8] = x[: n // 8, :1]  # some grey images (hue and saturation leave them alone)
    return x.round().clamp(0, 255).to(torch.uint8)


def _floats(n=96, size=32, seed=0):
    """The same images as floats in [0, 1], as ToDtype(float32, scale=True) makes them."""
    return TF.to_dtype(_colour_images(n, size, seed), torch.float32, scale=True)


def _torchvision_params(t, hw=(32, 32)):
    """A v2 transform's random parameters for an image of size hw, as torchvision draws them (make_params;
    _get_params before torchvision 0.21)."""
    return (getattr(t, "make_params", None) or t._get_params)([torch.zeros(3, *hw, dtype=torch.uint8)])


# ----------------------------------------------------------------------------------------------- ops
# Tolerance of the colour, blur and normalise ops: 1e-5 on [0, 1] values (measured <= 1e-6), i.e. float32 rounding
# only: ours computes the same formulas as torchvision's float kernels in another order (the blur as two 1-D
# passes of the 2-D kernel's factors, hue in closed form rather than through p, q, t), so results differ by a few
# ulps of 1, never by a rounding step (there is none in float). Well under one uint8 level (1 / 255 = 4e-3).
TOL = 1e-5


def _with_flipped(x):
    return torch.cat([x, x.flip(-1)])  # what DeviceLoader.batch hands render_views: the rois read both


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [32, 12, 48])  # same size, shrinking crops, enlarging crops
def test_resized_crop_and_flip_against_torchvision(interpolation, size):
    """The crop (roi_align, bilinear with a box filter when shrinking: common's DEVIATION) against torchvision's
    antialiased resize. Tolerance: mean |error| < 0.01, max < 0.15 on [0, 1] (measured on these busy images, +-12
    levels of noise: mean 0.001-0.006, max 0.05-0.11, the max at crop edges, where roi_align's taps may read the
    pixel outside the crop and torchvision's are clamped to it); the geometry is exact (below)."""
    x = _floats()
    aug = common.Augment(size, scale=(0.08, 1.0), interpolation=interpolation)
    p = common.sample_view_params(aug, len(x), (32, 32), torch.Generator().manual_seed(size))
    ours = common.batch_resized_crop(_with_flipped(x), p["rois"], size)
    ref = []
    for image, box, flip in zip(x, p["box"].tolist(), p["flip"]):
        v = TF.resized_crop(image, *box, [size, size], interpolation=common._INTERP[interpolation], antialias=True)
        ref.append((TF.horizontal_flip(v) if flip else v).clamp(0, 1))
    error = (ours - torch.stack(ref)).abs()
    assert error.mean() < 0.01 and error.max() < 0.15, (error.mean(), error.max())
    whole = torch.tensor([[i, 0, 0, 32, 32] for i in range(len(x))], dtype=torch.float32)  # image, x1, y1, x2, y2
    if size == 32:  # a crop of the output size is copied exactly
        assert torch.equal(common.batch_resized_crop(x, whole, 32), x)
    if size == 48:  # enlarging the whole image: torchvision's bilinear (no edge to cross)
        ref = TF.resize(x, [48, 48], interpolation=common._INTERP["bilinear"], antialias=True)
        torch.testing.assert_close(common.batch_resized_crop(x, whole, 48), ref, rtol=0, atol=TOL)
    if size == 12:  # halving it: the mean of each 2 x 2 block (the box filter)
        ref = torch.nn.functional.avg_pool2d(x, 2)
        torch.testing.assert_close(common.batch_resized_crop(x, whole, 16), ref, rtol=0, atol=TOL)


def _blend_as(kind):  # batch_blend as one of ColorJitter's three blend ops
    return lambda x, f: common.batch_blend(x, f, torch.full_like(f, float(kind == "contrast")),
                                           torch.full_like(f, float(kind == "saturation")))


@pytest.mark.parametrize("name,ours,theirs,low,high,identity", [
    ("brightness", _blend_as("brightness"), TF.adjust_brightness, 0.0, 2.0, 1.0),
    ("contrast", _blend_as("contrast"), TF.adjust_contrast, 0.0, 2.0, 1.0),
    ("saturation", _blend_as("saturation"), TF.adjust_saturation, 0.0, 2.0, 1.0),
    ("hue", common.batch_hue, TF.adjust_hue, -0.5, 0.5, 0.0),
])
def test_colour_ops_equal_torchvision(name, ours, theirs, low, high, identity):
    x = _floats(seed=1)
    x[-8:] = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(9))  # not multiples of 1 / 255
    f = low + (high - low) * torch.rand(len(x), generator=torch.Generator().manual_seed(2))
    ref = torch.stack([theirs(image, float(v)) for image, v in zip(x, f)])
    torch.testing.assert_close(ours(x, f), ref, rtol=0, atol=TOL)
    # the identity factor leaves images as they are (how an image skips an op on the device path)
    torch.testing.assert_close(ours(x, torch.full_like(f, identity)), x, rtol=0, atol=TOL)


@pytest.mark.parametrize("kernel", [3, 9])
def test_grayscale_blur_solarize_normalize_equal_torchvision(kernel):
    images = _colour_images(seed=3)
    x = TF.to_dtype(images, torch.float32, scale=True)
    gray = torch.stack([TF.rgb_to_grayscale(i, 1) for i in x])
    torch.testing.assert_close(common._gray(x), gray, rtol=0, atol=TOL)
    solar = TF.to_dtype(torch.stack([TF.solarize(i, 128) for i in images]), torch.float32, scale=True)
    torch.testing.assert_close(common.batch_solarize(x), solar, rtol=0, atol=1e-6)  # 128 on uint8
    assert torch.equal(common.batch_solarize(x), torch.stack([TF.solarize(i, 128 / 255) for i in x]))
    sigma = 0.1 + 1.9 * torch.rand(len(x), generator=torch.Generator().manual_seed(4))
    blur = torch.stack([TF.gaussian_blur(i, [kernel, kernel], [float(s), float(s)]) for i, s in zip(x, sigma)])
    torch.testing.assert_close(common.batch_gaussian_blur(x, kernel, sigma), blur, rtol=0, atol=TOL)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    ref = torch.stack([TF.normalize(i, list(mean), list(std)) for i in x])
    torch.testing.assert_close(common.batch_normalize(x, mean, std), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("jitter", [(0.4, 0.4, 0.2, 0.1), (0.4, 0.0, 0.4, 0.0)])  # all 4 ops; contrast, hue off
def test_whole_recipe_follows_augment_order(jitter):
    """render_views = its crop, then torchvision's functional float ops in Augment's order, with each image's own
    colour-jitter order (96 images: most of the 24 orders) and its own coins (about half the images per op); two
    Augments in one batch, the second with the ops off."""
    n = 96
    images = _floats(n=n, seed=5)
    aug = common.Augment(24, scale=(0.2, 1.0), interpolation="bicubic", jitter=jitter, jitter_p=0.8, gray_p=0.5,
                         blur_p=0.5, blur_kernel=3, solarize_p=0.5)
    plain = common.Augment(24, jitter_p=0.0, gray_p=0.0, blur_kernel=3)
    p = common.sample_view_params([aug, plain], n, (32, 32), torch.Generator().manual_seed(6))
    assert 0 < p["jitter"][:n].sum() < n and 0 < p["gray"][:n].sum() < n and 0 < p["blur"][:n].sum() < n
    ours = common.render_views(_with_flipped(images), p, [aug, plain])
    crops = common.batch_resized_crop(_with_flipped(images), p["rois"], 24)
    t = v2.ColorJitter(*jitter)
    active = [r is not None for r in (t.brightness, t.contrast, t.saturation, t.hue)]
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i, v in enumerate(crops):
        for op in p["order"][i].tolist() if p["jitter"][i] else ():
            if active[op]:
                v = adjust[op](v, float(p["factors"][i, op]))
        v = TF.rgb_to_grayscale(v, 3) if p["gray"][i] else v
        v = TF.gaussian_blur(v, [3, 3], [float(p["sigma"][i])] * 2) if p["blur"][i] else v
        v = TF.solarize(v, 128 / 255) if p["solarize"][i] else v
        ref = TF.normalize(v, list(aug.mean), list(aug.std))
        # TOL on [0, 1] is TOL / std after normalising; a value within TOL of 128 / 255 may solarize on one side
        # only: allow it on a handful of pixels
        bad = ((ours[i] - ref).abs() > 4 * TOL / min(aug.std)).float().mean()
        assert bad < 1e-3, (i, bad)
    assert not p["jitter"][n:].any() and not p["gray"][n:].any() and not p["blur"][n:].any()


# --------------------------------------------------------------------------------------- distributions
def _ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic D = sup |F_a - F_b| and its critical value at alpha = 0.001,
    1.949 sqrt((n + m) / (n m)) (conservative for discrete samples, where ties make D smaller)."""
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    grid = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b))
    return d.max(), 1.949 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


N_DRAWS = 3000


@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 1.0), (0.3, 3.0))])
def test_crop_boxes_follow_torchvision(scale, ratio):
    aug = common.Augment(32, scale=scale, ratio=ratio)
    ours = common.sample_view_params(aug, N_DRAWS, (32, 32), torch.Generator().manual_seed(0))["box"].double()
    torch.manual_seed(0)
    crop = v2.RandomResizedCrop(32, scale=scale, ratio=ratio)
    theirs = torch.tensor([[d["top"], d["left"], d["height"], d["width"]] for d in
                           (_torchvision_params(crop) for _ in range(N_DRAWS))], dtype=torch.float64)
    for name, f in [("area", lambda b: b[:, 2] * b[:, 3]), ("log aspect", lambda b: (b[:, 3] / b[:, 2]).log()),
                    ("top", lambda b: b[:, 0] / (33 - b[:, 2])), ("left", lambda b: b[:, 1] / (33 - b[:, 3]))]:
        d, crit = _ks(f(ours), f(theirs))
        assert d < crit, (name, d, crit)


def test_crop_fallback_is_torchvisions_centre_crop():
    """No try can fit a 10 x 40 image at half its area or more: the centre crop clamped to the ratio range."""
    aug = common.Augment(8, scale=(0.5, 1.0))
    box = common.sample_view_params(aug, 20, (10, 40), torch.Generator().manual_seed(0))["box"]
    d = _torchvision_params(aug.crop, (10, 40))
    assert (d["height"], d["width"]) == (10, 13)  # the test's premise: torchvision fell back too
    assert box.tolist() == [[d["top"], d["left"], d["height"], d["width"]]] * 20


def test_views_made_together_keep_their_own_recipe():
    """Views that share a size and colour ranges are drawn and made as one batch (ExCB's two global crops), each
    row still under its own Augment: here one never flips and crops near the whole image, the other always flips
    and crops small."""
    a = common.Augment(16, scale=(0.9, 1.0), flip_p=0.0, blur_p=0.0, blur_kernel=3, solarize_p=1.0)
    b = common.Augment(16, scale=(0.05, 0.1), flip_p=1.0, blur_p=1.0, blur_kernel=3, solarize_p=0.0)
    assert common._view_groups(common.MultiView([a, b])) == [[a, b]]
    assert len(common._view_groups(common.MultiView([a, common.Augment(8)]))) == 2  # another size: two batches
    p = common.sample_view_params([a, b], 200, (32, 32), torch.Generator().manual_seed(0))
    area = p["box"][:, 2] * p["box"][:, 3] / 32**2
    assert area[:200].min() > 0.8 and area[200:].max() < 0.15
    assert not p["flip"][:200].any() and p["flip"][200:].all()
    assert not p["blur"][:200].any() and p["blur"][200:].all()
    assert p["solarize"][:200].all() and not p["solarize"][200:].any()


def test_colour_factors_order_and_sigma_follow_torchvision():
    aug = common.Augment(32, jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.5, blur_sigma=(0.1, 2.0))
    p = common.sample_view_params(aug, N_DRAWS, (32, 32), torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    jitter, blur = v2.ColorJitter(0.4, 0.4, 0.2, 0.1), v2.GaussianBlur(3, sigma=(0.1, 2.0))
    draws = [_torchvision_params(jitter) for _ in range(N_DRAWS)]
    names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
    for c, name in enumerate(names):
        d, crit = _ks(p["factors"][:, c], [r[name] for r in draws])
        assert d < crit, (name, d, crit)
    perm_id = lambda o: (o * torch.tensor([64, 16, 4, 1])).sum(1)  # noqa: E731 (one number per order)
    d, crit = _ks(perm_id(p["order"]), perm_id(torch.stack([r["fn_idx"] for r in draws])))
    assert d < crit, ("order", d, crit)
    d, crit = _ks(p["sigma"], [_torchvision_params(blur)["sigma"][0] for _ in range(N_DRAWS)])
    assert d < crit, ("sigma", d, crit)


def test_application_rates_follow_torchvision():
    """flip 0.5, jitter 0.8, grayscale 0.2, blur 0.3, solarize 0.1: our coins against torchvision's transforms
    applied to images on which each op is visible."""
    aug = common.Augment(32, flip_p=0.5, jitter_p=0.8, gray_p=0.2, blur_p=0.3, solarize_p=0.1)
    ours = common.sample_view_params(aug, N_DRAWS, (32, 32), torch.Generator().manual_seed(2))
    torch.manual_seed(2)
    ramp = torch.arange(4, dtype=torch.uint8).view(1, 1, 4).expand(3, 4, 4).contiguous()
    colour = torch.tensor([200, 30, 90], dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 4).contiguous()
    impulse = torch.zeros(3, 5, 5, dtype=torch.uint8)
    impulse[:, 2, 2] = 255
    checks = {  # op -> (torchvision's transform, an image it visibly changes)
        "flip": (v2.RandomHorizontalFlip(0.5), ramp),
        "jitter": (v2.RandomApply([v2.ColorJitter(brightness=(0.5, 0.6))], p=0.8), colour),
        "gray": (v2.RandomGrayscale(0.2), colour),
        "blur": (v2.RandomApply([v2.GaussianBlur(3, sigma=(0.5, 1.0))], p=0.3), impulse),
        "solarize": (v2.RandomSolarize(128, p=0.1), colour),
    }
    for name, (t, image) in checks.items():
        theirs = [not torch.equal(t(image), image) for _ in range(N_DRAWS)]
        d, crit = _ks(ours[name].float(), theirs)
        assert d < crit, (name, d, crit)


# ------------------------------------------------------------------------------------------- loaders
def _tensor_dataset(n=64, size=16, transform=None, targets=None):
    """An ImageDataset over uint8 tensors whose label is the image's index (so labels name the images)."""
    images = _colour_images(n, size, seed=7)
    targets = torch.arange(n) if targets is None else targets
    return common.ImageDataset(list(zip(images, targets.tolist())), targets, range(int(targets.max()) + 1),
                               transform)


def _excb_like(size=16):
    g = [common.Augment(size, interpolation="bicubic", blur_p=p, blur_kernel=3, solarize_p=s)
         for p, s in ((0.0, 0.0), (0.9, 0.2))]
    return common.MultiCrop(g, common.Augment(8, interpolation="bicubic"), n_local=2,
                            global_min_scale=lambda e: 0.26 - 0.02 * e)


def test_views_are_a_pure_function_of_seed_epoch_step_rank():
    ds = _tensor_dataset(transform=_excb_like())
    loader = common.build_train_loader(ds, 16, common.DistInfo(), "device", seed=5)
    assert loader.path == "device" and len(loader) == 4
    torch.manual_seed(123)
    before = torch.rand(1)
    a = loader.batch(1, 2, list(range(16)))
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG is left alone
    b = loader.batch(1, 2, list(range(16)))
    assert [v.shape for v in a[0]] == [(16, 3, 16, 16)] * 2 + [(16, 3, 8, 8)] * 2
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[1], b[1])
    assert a[1].tolist() == list(range(16))
    for other in (loader.batch(1, 3, list(range(16))), loader.batch(2, 2, list(range(16)))):
        assert not torch.equal(a[0][0], other[0][0])
    assert not torch.equal(a[0][2], a[0][3])  # the local crops are independent draws
    other_rank = common.build_train_loader(ds, 16, common.DistInfo(rank=1, world_size=2), "device", seed=5)
    assert not torch.equal(a[0][0], other_rank.batch(1, 2, list(range(16)))[0][0])


def test_mid_epoch_resume_gives_the_uninterrupted_views():
    ds = _tensor_dataset(transform=_excb_like())
    loader = common.build_train_loader(ds, 16, common.DistInfo(), "device", seed=1)
    loader.set_epoch(3)
    whole = list(loader)
    assert ds.transform.global_views[0].scale == pytest.approx((0.20, 1.0))  # set_epoch reached MultiCrop
    fresh = common.build_train_loader(ds, 16, common.DistInfo(), "device", seed=1)
    fresh.set_epoch(3, start_batch=2)
    assert len(fresh) == 4
    tail = list(fresh)
    assert len(tail) == 2
    for (va, ya), (vb, yb) in zip(whole[2:], tail):
        assert torch.equal(ya, yb) and all(torch.equal(x, y) for x, y in zip(va, vb))


@pytest.mark.parametrize("balanced", [False, True])
def test_device_path_takes_the_loader_paths_images(balanced):
    """Step by step the same images (here named by their labels) as EpochLoader, with DistributedSampler's
    permutation or NSCL's class-balanced batch sampler."""
    aug = common.Augment(16)
    targets = torch.arange(60) % 6 if balanced else None
    ds = _tensor_dataset(60, transform=common.MultiView([aug, aug]), targets=targets)
    make = (lambda: simclr_nscl.ClassBalancedBatchSampler(ds.targets, 12, common.DistInfo(), seed=4)) if balanced \
        else (lambda: None)
    device = common.build_train_loader(ds, 12, common.DistInfo(), "device", seed=4, batch_sampler=make())
    loader = common.build_train_loader(ds, 12, common.DistInfo(), "loader", seed=4, batch_sampler=make())
    assert (device.path, loader.path) == ("device", "loader")
    for epoch in (0, 1):
        device.set_epoch(epoch)
        loader.set_epoch(epoch)
        ours, theirs = list(device), list(loader)
        assert len(ours) == len(theirs) == 5
        for (views, y), (_, y_ref) in zip(ours, theirs):
            assert torch.equal(y, y_ref) and [v.shape for v in views] == [(12, 3, 16, 16)] * 2
            assert views[0].dtype == torch.float32 and y.dtype == torch.long


def _rank_labels(rank, world):
    aug = common.Augment(16)
    ds = _tensor_dataset(64, transform=common.MultiView([aug, aug]))
    loader = common.build_train_loader(ds, 8, common.setup_distributed(), "device", seed=3)
    loader.set_epoch(2)
    return [(y.tolist(), views[0][0]) for views, y in loader]


def test_two_gloo_ranks_take_disjoint_shards_covering_the_epoch():
    per_rank = spawn(_rank_labels, 2)
    assert len(per_rank[0]) == len(per_rank[1]) == 4
    seen = []
    for (y0, v0), (y1, v1) in zip(*per_rank):
        assert not set(y0) & set(y1) and not torch.equal(v0, v1)
        seen += y0 + y1
    assert sorted(seen) == list(range(64))  # every image exactly once


def test_device_and_loader_views_agree_in_distribution():
    """The two paths make different draws of the same recipe: per-channel means and stds over 3 epochs agree with
    the loader path run on float images (torchvision's float kernels, the device path's maths), within 0.03 (the
    draws' noise is ~0.01 here). Bilinear: roi_align's crop is bilinear (the DEVIATION; against bicubic its
    smoother views have a ~0.025 lower std). On uint8 images the loader path's views are darker by ~1 level
    (0.005 on [0, 1]): its uint8 kernels truncate after each colour op. Solarize is off: v2's RandomSolarize(128)
    takes uint8 images only."""
    info = common.dataset_info("digits")
    aug = common.Augment(16, scale=(0.2, 1.0), interpolation="bilinear", jitter=(0.4, 0.4, 0.2, 0.1),
                         mean=info.mean, std=info.std)
    ds = _tensor_dataset(256, transform=common.MultiView([aug, aug]))
    as_float = common.ImageDataset([(TF.to_dtype(x, torch.float32, scale=True), y) for x, y in ds.source],
                                   ds.targets, ds.classes, ds.transform)
    stats = []
    for path, data in (("device", ds), ("loader", as_float)):
        loader, x = common.build_train_loader(data, 64, common.DistInfo(), path, seed=0), []
        for epoch in range(3):
            loader.set_epoch(epoch)
            x += [torch.cat(views) for views, _ in loader]
        x = torch.cat(x)
        stats.append(torch.stack([x.mean((0, 2, 3)), x.std((0, 2, 3))]))
    torch.testing.assert_close(stats[0], stats[1], rtol=0, atol=0.03)


# ------------------------------------------------------------------------------------ choosing a path
def test_auto_picks_the_device_for_digits_and_the_loader_otherwise(monkeypatch, capsys):
    info = common.dataset_info("digits")
    aug = common.Augment(16, mean=info.mean, std=info.std)
    digits = common.build_dataset("digits", "train", common.MultiView([aug, aug]), subset=200, image_size=16)
    loader = common.build_train_loader(digits, 32, common.DistInfo())
    assert loader.path == "device" and loader.images.shape == (200, 3, 16, 16)
    assert torch.equal(loader.images, digits.source.images[digits.indices])
    assert torch.equal(loader.labels, digits.targets)
    assert capsys.readouterr().out.startswith("data path: device (auto): 200 images of 3x16x16")
    assert common.build_train_loader(digits, 32, common.DistInfo(), "loader").path == "loader"
    monkeypatch.setattr(common, "DEVICE_MAX_BYTES", 1000)  # a budget the images exceed
    assert common.build_train_loader(digits, 32, common.DistInfo()).path == "loader"
    assert "over the device path's" in capsys.readouterr().out
    with pytest.raises(common.UsageError, match="--data-path device is impossible here: 200 images take"):
        common.build_train_loader(digits, 32, common.DistInfo(), "device")
    with pytest.raises(common.UsageError, match="takes auto, device or loader"):
        common.build_train_loader(digits, 32, common.DistInfo(), "gpu")
    plain = common.build_dataset("digits", "train", common.eval_transform(16), subset=200, image_size=16)
    assert common.build_train_loader(plain, 32, common.DistInfo()).path == "loader"
    with pytest.raises(common.UsageError, match="not built from common.Augment"):
        common.build_train_loader(plain, 32, common.DistInfo(), "device")


def _write_folder(root, sizes, bad=()):
    for i, (w, h) in enumerate(sizes):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        if i in bad:
            (folder / f"{i:02d}.jpg").write_text("not a jpeg")
        else:
            Image.new("RGB", (w, h), (10 * i, 255 - 10 * i, 7 * i)).save(folder / f"{i:02d}.png")


def test_imagefolder_is_decoded_once_and_unfit_folders_keep_the_loader(tmp_path, capsys):
    aug = common.Augment(8)
    _write_folder(tmp_path / "small", [(12, 10)] * 9, bad=(4,))
    ds = common.build_dataset("imagefolder", "train", common.MultiView([aug, aug]), tmp_path / "small",
                              skip_bad=True)
    loader = common.build_train_loader(ds, 4, common.DistInfo(), workers=2)
    assert loader.path == "device" and loader.skipped_images == 1 and loader.images.shape == (9, 3, 10, 12)
    for i in range(len(ds)):  # exactly what the loader path reads, the skipped file's replacement included
        image, label, _ = ds.load(i)
        assert torch.equal(loader.images[i], TF.pil_to_tensor(image)) and int(loader.labels[i]) == label
    with pytest.raises(common.BadImageError):  # without --skip-bad-images the bad file stops the run early
        common.build_train_loader(common.build_dataset("imagefolder", "train", aug, tmp_path / "small"), 4,
                                  common.DistInfo())
    _write_folder(tmp_path / "mixed", [(12, 10)] * 5 + [(10, 12)])
    ds = common.build_dataset("imagefolder", "train", aug, tmp_path / "mixed")
    assert common.build_train_loader(ds, 2, common.DistInfo()).path == "loader"
    assert "the images differ in size" in capsys.readouterr().out
    _write_folder(tmp_path / "large", [(120, 100)] * 2)
    ds = common.build_dataset("imagefolder", "train", aug, tmp_path / "large")
    assert common.build_train_loader(ds, 2, common.DistInfo()).path == "loader"
    assert "exceed 96 px" in capsys.readouterr().out
