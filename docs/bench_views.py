"""The two data paths side by side, in one run (issue 13's CPU benchmark; a benchmark, not a test):

1. views/s of the SimCLR, ReSA and ExCB (2 global + 6 local crops) recipes of the cifar10 presets (32 px), made
   by the device path (common.DeviceLoader: the batch at once) and by the DataLoader path (common.EpochLoader:
   image by image in worker processes), at one core and at all cores (device path: torch threads; loader path:
   worker processes). Images: the CIFAR-10 JPEG copy with --data-dir (the loader path then decodes a JPEG per
   view, as a training run does; the device path decodes once, timed apart), else synthetic uint8 images.
2. each method's training images/s end to end on CPU with the convnet (the digits presets; plus a CIFAR-10 JPEG
   slice at 32 px with --data-dir) on both paths, with the share of each step spent waiting for data
   (perf/data_frac of the scripts' own log.jsonl: median over the log windows after the first).

    python3 docs/bench_views.py --quick                         # a smoke run, ~2 min on 2 cores
    python3 docs/bench_views.py                                 # the figures, ~10 min on 2 idle cores
    python3 docs/bench_views.py --data-dir data/cifar10-jpeg    # real images (train/<class>/*.jpg)

With --old-common FILE (e.g. `git show main:common.py > /tmp/old_common.py`), also times that version's device
path against this one in the same run, on the same images and batches, and counts the aten ops one step runs
(torch.profiler on CPU; on CUDA each is about one kernel launch):

    git show <commit>:common.py > /tmp/old_common.py
    python3 docs/bench_views.py --old-common /tmp/old_common.py --skip-loader --skip-train

Prints markdown tables and writes JSON (--out). Timings are only meaningful on an otherwise idle machine.
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import common  # noqa: E402
import excb  # noqa: E402
import resa  # noqa: E402
import simclr_nscl  # noqa: E402


def recipes(info):
    """name -> (view transform of the method's cifar10 preset, views per image)."""
    sn = simclr_nscl.Args(**simclr_nscl.PRESETS["cifar10"])
    ra = resa.Args(**resa.PRESETS["cifar10"])
    ea = excb.Args(**excb.PRESETS["cifar10"])
    return {"SimCLR (2 views)": (simclr_nscl.train_views(sn, info), 2),
            "ReSA (weak + strong)": (resa.build_views(ra, info), 2),
            "ExCB (2 + 6 crops)": (excb.build_views(ea, info), 2 + ea.n_local)}


def synthetic_images(n, size=32, seed=0):
    """Smooth random colour images with noise (uint8), so every colour op has work to do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.randint(0, 256, (n, 3, 6, 6), generator=g).float(), size=size,
                                        mode="bilinear", align_corners=False)
    return (x + torch.randint(-12, 13, x.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def dataset(args, transform):
    if args.data_dir:
        return common.build_dataset("imagefolder", "train", transform, args.data_dir, subset=args.images)
    images = synthetic_images(args.images)
    targets = torch.arange(args.images) % 10
    return common.ImageDataset(list(zip(images, targets.tolist())), targets, range(10), transform)


def views_per_s(loader, views, batches, batch_size):
    """Iterate `batches` batches after one warm-up batch (worker start-up, first allocations) -> views/s."""
    loader.set_epoch(0)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size * views / (time.perf_counter() - t0)


def load_old_common(path):
    """Another version of common.py as a module; its device path made to read this version's view classes (the
    recipes are built from them, and section 2's Augment / MultiView / MultiCrop keep the same attributes)."""
    spec = importlib.util.spec_from_file_location("old_common", path)
    old = sys.modules["old_common"] = importlib.util.module_from_spec(spec)  # dataclasses look the module up
    spec.loader.exec_module(old)
    old.Augment, old.MultiView, old.MultiCrop = common.Augment, common.MultiView, common.MultiCrop
    return old


# aten ops that only make a view or do nothing here (no kernel on a GPU); the others each launch one
NO_KERNEL = {"aten::view", "aten::select", "aten::unsqueeze", "aten::expand", "aten::expand_as", "aten::transpose",
             "aten::reshape", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::slice", "aten::t",
             "aten::as_strided", "aten::permute", "aten::squeeze", "aten::alias", "aten::to", "aten::_unsafe_view",
             "aten::detach", "aten::lift_fresh", "aten::chunk", "aten::narrow"}


def ops_per_step(module, loader):
    """Kernel-launching aten ops (top-level ones, NO_KERNEL left out) that one batch's module.render_views calls
    run, by torch.profiler on CPU: the device side of a step (the parameter draws run on the host)."""
    render = module.render_views

    def marked(*a):
        with torch.profiler.record_function("device:render"):
            return render(*a)

    loader.set_epoch(0)
    it = iter(loader)
    next(it)
    module.render_views = marked
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            next(it)
    finally:
        module.render_views = render
    return sum(1 for e in prof.events() if e.cpu_parent is not None and e.cpu_parent.name == "device:render"
               and e.name.startswith("aten::") and e.name not in NO_KERNEL)


def bench_old_new(args, cores, old):
    """views/s and ops per step of the old and this device path, same images, same recipes, same run."""
    info, dist, rows = common.dataset_info("cifar10"), common.DistInfo(), []
    for name, (transform, views) in recipes(info).items():
        ds = dataset(args, transform)
        new = common.build_train_loader(ds, args.batch_size, dist, "device", workers=cores, seed=0)
        before = old.DeviceLoader(new.images, new.labels, transform, args.batch_size, dist, seed=0)
        for n in sorted({1, cores}):
            torch.set_num_threads(n)
            rate_old = rate_new = 0.0
            for _ in range(args.repeats):  # alternating, best of each: other jobs only ever slow a repeat down
                rate_old = max(rate_old, views_per_s(before, views, args.batches, args.batch_size))
                rate_new = max(rate_new, views_per_s(new, views, args.batches, args.batch_size))
            ops_old, ops_new = ops_per_step(old, before), ops_per_step(common, new)
            rows.append({"recipe": name, "cores": n, "old_views_per_s": rate_old, "new_views_per_s": rate_new,
                         "old_ops": ops_old, "new_ops": ops_new})
            print(f"  {name}, {n} core(s): old {rate_old:.0f} views/s ({ops_old} ops per step), "
                  f"new {rate_new:.0f} views/s ({ops_new})", flush=True)
    torch.set_num_threads(cores)
    return rows


def bench_views(args, cores):
    info = common.dataset_info("cifar10")
    rows, dist = [], common.DistInfo()
    for name, (transform, views) in recipes(info).items():
        ds = dataset(args, transform)
        t0 = time.perf_counter()
        device = common.build_train_loader(ds, args.batch_size, dist, "device", workers=cores, seed=0)
        prepare = time.perf_counter() - t0
        for n in sorted({1, cores}):
            torch.set_num_threads(n)
            rate_d = views_per_s(device, views, args.batches, args.batch_size)
            torch.set_num_threads(1)  # the loader path's main process only collates; its workers do the work
            rate_l = float("nan")
            if not args.skip_loader:
                loader = common.EpochLoader(ds, args.batch_size, dist, workers=n if n > 1 else 0, seed=0)
                rate_l = views_per_s(loader, views, args.batches, args.batch_size)
                del loader
            rows.append({"recipe": name, "cores": n, "device_views_per_s": rate_d, "loader_views_per_s": rate_l,
                         "speedup": rate_d / rate_l, "device_prepare_s": prepare})
            print(f"  {name}, {n} core(s): device {rate_d:.0f} views/s, loader {rate_l:.0f} views/s "
                  f"({rate_d / rate_l:.1f}x)", flush=True)
    torch.set_num_threads(cores)
    return rows


def train_runs(args, cores):
    """Each method end to end on CPU (convnet) on both paths -> rows of median images/s and data share."""
    short = ["--epochs", "1", "--log-every", "2"] if args.quick else ["--log-every", "5"]  # several log windows
    jobs = [("digits", "SimCLR", ["simclr_nscl.py", "--preset", "digits", *short]),
            ("digits", "NSCL", ["simclr_nscl.py", "--preset", "digits", "--loss", "nscl", *short]),
            ("digits", "ReSA", ["resa.py", "--preset", "digits", *short]),
            ("digits", "ExCB (2 + 2)", ["excb.py", "--preset", "digits", *short])]
    if args.data_dir:  # a CIFAR-10 JPEG slice at 32 px, convnet, the loader with a worker per core
        n = 1280 if args.quick else 5120
        shared = ["--dataset", "imagefolder", "--data-dir", args.data_dir, "--image-size", "32", "--train-subset",
                  str(n), "--backbone", "convnet", "--epochs", "1", "--batch-size", "128", "--workers", str(cores),
                  "--log-every", "2", "--save-every", "1"]
        jobs += [("cifar10-jpeg", "SimCLR", ["simclr_nscl.py", "--preset", "cifar10", "--width", "1", *shared]),
                 ("cifar10-jpeg", "ReSA", ["resa.py", "--preset", "cifar10", *shared]),
                 ("cifar10-jpeg", "ExCB (2 + 6)", ["excb.py", "--preset", "cifar10", "--num-clusters", "128",
                                                   "--no-kmeans-init", *shared])]
    rows = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for data, method, cmd in jobs:
        for path in ("device", "loader"):
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, *cmd, "--data-path", path, "--output-dir", out], cwd=ROOT,
                                      env=env, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"{' '.join(cmd)} --data-path {path} failed:\n{proc.stderr[-3000:]}")
                recs = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
                recs = [r for r in recs if "perf/images_per_s" in r]
                recs = recs[1:] or recs  # the first window holds start-up and the epoch-0 checkpoint
                med = lambda k: statistics.median(r[k] for r in recs)  # noqa: E731
                rows.append({"data": data, "method": method, "path": path, "images_per_s": med("perf/images_per_s"),
                             "step_time_s": med("perf/step_time_s"), "data_frac": med("perf/data_frac"),
                             "wall_s": time.perf_counter() - t0})
                r = rows[-1]
                print(f"  {data} {method} {path}: {r['images_per_s']:.0f} img/s, data {100 * r['data_frac']:.0f} %",
                      flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data-dir", default="", help="CIFAR-10 JPEG copy (holds train/); default: synthetic images")
    p.add_argument("--images", type=int, default=4096, help="images in the views benchmark's set")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (one rank)")
    p.add_argument("--batches", type=int, default=8, help="timed batches per measurement (after one warm-up)")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="all cores: torch threads / loader workers")
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer images and batches, 1-epoch runs")
    p.add_argument("--skip-train", action="store_true", help="views/s only")
    p.add_argument("--skip-loader", action="store_true", help="no loader-path views/s (the slow part)")
    p.add_argument("--repeats", type=int, default=3, help="--old-common: alternating repeats, best of each")
    p.add_argument("--old-common", default="", help="another common.py whose device path to time beside this one")
    p.add_argument("--out", default="runs/bench_views.json", help="JSON results")
    args = p.parse_args()
    if args.quick:
        args.images, args.batches = min(args.images, 1024), min(args.batches, 2)
    common.seed_everything(0)
    print(f"# views/s ({'CIFAR-10 JPEG' if args.data_dir else 'synthetic uint8'} images, 32 px, batch "
          f"{args.batch_size}, {args.cores} core(s))", flush=True)
    views = [] if args.skip_loader and args.old_common else bench_views(args, args.cores)
    old_new = bench_old_new(args, args.cores, load_old_common(args.old_common)) if args.old_common else []
    train = [] if args.skip_train else train_runs(args, args.cores)

    print("\n| recipe | cores | device path views/s | loader path views/s | device / loader |")
    print("|---|---|---|---|---|")
    for r in views:
        print(f"| {r['recipe']} | {r['cores']} | {r['device_views_per_s']:.0f} | {r['loader_views_per_s']:.0f} | "
              f"{r['speedup']:.1f}x |")
    if old_new:
        print("\n| recipe | cores | old device path views/s | new views/s | new / old | device ops per step, "
              "old -> new |")
        print("|---|---|---|---|---|---|")
        for r in old_new:
            print(f"| {r['recipe']} | {r['cores']} | {r['old_views_per_s']:.0f} | {r['new_views_per_s']:.0f} | "
                  f"{r['new_views_per_s'] / r['old_views_per_s']:.2f}x | {r['old_ops']} -> {r['new_ops']} |")
    if train:
        print("\n| data | method | path | images/s | step time | waiting for data |")
        print("|---|---|---|---|---|---|")
        for r in train:
            print(f"| {r['data']} | {r['method']} | {r['path']} | {r['images_per_s']:.0f} | "
                  f"{1000 * r['step_time_s']:.0f} ms | {100 * r['data_frac']:.0f} % |")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "cores": args.cores, "torch": torch.__version__, "args": vars(args), "views": views, "old_new": old_new,
              "train": train}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
