"""The one prepared GPU check (issue 13): training throughput of every method on CIFAR-10 and a short real SimCLR run,
in one command that fits in about 8 minutes of one H100 / H200, written as results.md (tables) + results.json.

    python3 docs/gpu_check.py --data data/cifar10-jpeg.tar.gz --out docs/gpu_check     # a GPU (~8 min)
    python3 docs/gpu_check.py --tiny --out /tmp/gpu_check                              # every part on CPU (~2 min)

Part 1, throughput: SimCLR, NSCL, ReSA, ExCB (2 views) and ExCB (2 + 6 crops) train ResNet-18 on CIFAR-10 at
32 px, global batch 512, channels_last, --precision bf16 (the report says what ran), each as its own script
process for one epoch of --throughput-steps steps, on the device path (views made on the GPU) and the loader path
(--workers DataLoader processes), eagerly; SimCLR also with --compile. Each number is the median over the log
windows after the first two (warm-up: cudnn autotuning, compilation, worker start-up) of the script's own
perf/* records in log.jsonl: global images (not views) per second, ms per step, the share of the step spent
waiting for data, peak GPU memory.
Part 2, a real run: simclr_nscl.py --preset cifar10-r18 (ResNet-18, batch 512, LARS, 2 views) on all 50,000
training images for as many epochs as fit in the time left (--budget-s minus what part 1 took, at most
--run-s), then probe.py's k-NN (DINO weighted 20-NN, cosine) of its last checkpoint on the 10,000 test images.
References printed beside it: dkobak/simclr-cifar10 11.9 s/epoch on an A100 (batch 512, 90.3 % k-NN after
99 min), lightly 24.8 s/epoch on an A6000, and the FLOP floor of ResNet-18 at 32 px: ~0.34 s/epoch on an H100.

The data travels with the command: the CIFAR-10 JPEG tarball (../shared/data/cifar10-jpeg.tar.gz, 20 MB) is copied
into the git-ignored data/ folder of the checkout and named in the device tool's `carry`. --tiny makes a small
synthetic ImageFolder instead and shrinks every part (convnet, batch 32, a few steps, fp32 on CPU), so the
script itself is tested on CPU by tests/test_gpu_check.py (slow).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name: (script, flags), every run on top of the shared flags of part 1
METHODS = {
    "SimCLR": ["simclr_nscl.py", "--preset", "cifar10", "--loss", "ntxent", "--width", "1"],
    "NSCL": ["simclr_nscl.py", "--preset", "cifar10", "--loss", "nscl", "--width", "1"],
    "ReSA": ["resa.py", "--preset", "cifar10"],
    "ExCB (2 views)": ["excb.py", "--preset", "cifar10", "--n-local", "0", "--no-kmeans-init"],
    "ExCB (2 + 6 crops)": ["excb.py", "--preset", "cifar10", "--no-kmeans-init"],
}


def sh(cmd, log, timeout):
    """Run one script; its output goes to `log`. -> (exit status, seconds)."""
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            code = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return code, time.perf_counter() - t


def perf(run_dir, skip=2):
    """Median perf/* over the log windows after the first `skip` (fewer when the run had fewer)."""
    recs = [json.loads(line) for line in open(Path(run_dir) / "log.jsonl")]
    recs = [r for r in recs if "perf/images_per_s" in r]
    recs = recs[min(skip, len(recs) - 1):]
    med = lambda k: statistics.median(r[k] for r in recs)  # noqa: E731
    return {"images_per_s": med("perf/images_per_s"), "ms_per_step": 1000 * med("perf/step_time_s"),
            "data_frac": med("perf/data_frac"), "peak_mem_gb": max(r["perf/peak_mem_gb"] for r in recs),
            "windows": len(recs)}


def tiny_imagefolder(root, classes=10, per_class=24, size=32):
    """A synthetic CIFAR-sized ImageFolder (train/ and test/) for --tiny."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for c in range(classes):
            d = Path(root) / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 255, (1, 1, 3))  # one colour per class, so the k-NN has something to find
            for i in range(n):
                img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.jpg")
    return Path(root)


def environment():
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
           "cpu_cores": os.cpu_count()}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or os.environ.get("GIT_COMMIT", "?")
    except OSError:  # no git where it runs
        env["commit"] = os.environ.get("GIT_COMMIT", "?")
    return env


def markdown(res):
    e, lines = res["env"], []
    lines.append(f"GPU check: {e['device']}, torch {e['torch']}, commit `{e['commit']}`, {e['date']}; "
                 f"precision {res['precision']}, backbone {res['backbone']}, global batch {res['batch']}, 32 px, "
                 f"channels_last on CUDA; {res['throughput_steps']} steps per run, median of the windows after "
                 f"the first two.\n")
    lines.append("| method | data path | compile | images/s | ms/step | data wait | peak memory | s / CIFAR-10 epoch |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in res["throughput"]:
        if "images_per_s" not in r:
            lines.append(f"| {r['method']} | {r['path']} | {r['compile']} | failed ({r['status']}) | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['path']} | {r['compile']} | {r['images_per_s']:.0f} | "
                     f"{r['ms_per_step']:.1f} | {100 * r['data_frac']:.0f} % | {r['peak_mem_gb']:.2f} GB | "
                     f"{50_000 / r['images_per_s']:.1f} |")
    run = res.get("run")
    if run:
        lines.append("")
        lines.append(f"SimCLR `--preset {run['preset']}`, {run['images']} training images, {run['epochs']} epochs in "
                     f"{run['train_s']:.0f} s ({run['s_per_epoch']:.1f} s/epoch, wall, checkpoints and start-up "
                     f"included); k-NN (weighted 20-NN, cosine) of the last checkpoint on {run['test_images']} "
                     f"test images: **{run['knn_top1']}**. References: dkobak/simclr-cifar10 11.9 s/epoch on an "
                     f"A100 (90.3 % k-NN after 99 min); lightly 24.8 s/epoch on an A6000; ResNet-18 FLOP floor "
                     f"~0.34 s/epoch on an H100.")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/cifar10-jpeg.tar.gz", help="the CIFAR-10 JPEG tarball (or its folder)")
    p.add_argument("--out", default="docs/gpu_check", help="where results.md and results.json go")
    p.add_argument("--tiny", action="store_true", help="every part on CPU in about a minute (synthetic data)")
    p.add_argument("--budget-s", type=float, default=450, help="whole-script time budget in seconds")
    p.add_argument("--run-s", type=float, default=240, help="at most this long for part 2's training")
    p.add_argument("--throughput-steps", type=int, default=30, help="steps per throughput run (windows of 5)")
    p.add_argument("--workers", type=int, default=16, help="DataLoader workers of the loader path")
    p.add_argument("--compile", nargs="*", default=["SimCLR"], help="methods also timed with --compile")
    a = p.parse_args()
    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if a.tiny:
        data = tiny_imagefolder(work / "data")
        batch, backbone, precision, steps, log_every, workers = 32, "convnet", "fp32", 3, 1, 1
        extra = ["--proj-hidden", "64"]
        a.run_s = min(a.run_s, 5.0)  # part 2: one or two epochs of the tiny set
    else:
        data = Path(a.data)
        if data.is_file():  # unpack the tarball once (a few seconds)
            with tarfile.open(data) as tar:
                tar.extractall(work / "data", filter="data") if sys.version_info >= (3, 12) else \
                    tar.extractall(work / "data")
            data = work / "data"
        batch, backbone, precision, steps, log_every, workers = 512, "resnet18", "bf16", a.throughput_steps, 5, \
            a.workers
        extra = []
    res = {"env": environment(), "precision": precision, "backbone": backbone, "batch": batch,
           "throughput_steps": steps, "throughput": []}
    print(json.dumps(res["env"]), flush=True)

    # --- part 1: throughput --------------------------------------------------------------------------------------
    shared = ["--dataset", "imagefolder", "--data-dir", str(data), "--image-size", "32", "--backbone", backbone,
              "--batch-size", str(batch), "--epochs", "1", "--train-subset", str(batch * steps), "--log-every",
              str(log_every), "--save-every", "1000", "--precision", precision]
    grid = [(m, path, False) for m in METHODS for path in ("device", "loader")]
    grid += [(m, "device", True) for m in a.compile if m in METHODS]
    for i, (name, path, compiled) in enumerate(grid):
        cmd = [*METHODS[name], *shared, *extra, "--data-path", path, "--workers", str(workers if path == "loader"
                                                                                      else 0),
               "--output-dir", str(work / f"run{i}")] + (["--compile"] if compiled else [])
        if name.startswith("ExCB"):
            cmd += ["--num-clusters", "64" if a.tiny else "2048"]
        code, secs = sh(cmd, work / f"run{i}.log", timeout=300)
        row = {"method": name, "path": path, "compile": "yes" if compiled else "no", "status": code,
               "wall_s": round(secs, 1)}
        if code == 0:
            row.update(perf(work / f"run{i}"))
        else:
            print((work / f"run{i}.log").read_text()[-3000:], flush=True)
        res["throughput"].append(row)
        print(json.dumps(row), flush=True)

    # --- part 2: a real SimCLR run on the whole training set, then k-NN -----------------------------------------
    simclr = next((r for r in res["throughput"] if r["method"] == "SimCLR" and r["path"] == "device"
                   and r["compile"] == "no" and "images_per_s" in r), None)
    n_train = sum(1 for _ in (Path(data) / "train").rglob("*.jpg"))
    if simclr is not None:
        left = a.budget_s - (time.perf_counter() - t0) - (20 if a.tiny else 45)  # the k-NN and the write-up
        s_per_epoch = n_train / simclr["images_per_s"] * 1.15 + (0 if a.tiny else 0.5)  # + checkpoints, evals
        epochs = max(1, int(min(left - (5 if a.tiny else 25), a.run_s) / s_per_epoch))  # 25 s: start-up
        run_dir = work / "simclr_run"
        cmd = ["simclr_nscl.py", "--preset", "digits" if a.tiny else "cifar10-r18", "--dataset", "imagefolder",
               "--data-dir", str(data), "--image-size", "32", "--backbone", backbone, "--width", "1",
               "--batch-size", str(batch), "--epochs", str(epochs), "--precision", precision, "--data-path",
               "device", "--log-every", "20", "--save-every", str(epochs), "--output-dir", str(run_dir), *extra]
        code, secs = sh(cmd, work / "simclr_run.log", timeout=max(60, int(a.run_s * 1.5)))
        run = {"preset": cmd[2], "epochs": epochs, "images": n_train, "train_s": secs,
               "s_per_epoch": secs / epochs, "status": code}
        if code == 0:
            last = sorted(run_dir.glob("ckpt_epoch*.pt"))[-1]
            probe_dir = work / "probe"
            code, psecs = sh(["probe.py", str(last), "--probes", "knn", "--no-plots", "--out-dir", str(probe_dir)],
                             work / "probe.log", timeout=300)
            rows = json.loads((probe_dir / "probe.json").read_text()) if code == 0 else []
            knn = [r for r in rows if r["probe"] == "knn" and r["metric"] == "top1_cosine_k20"]
            run.update(knn_top1=f"{knn[0]['value']:.1f} %" if knn else f"probe failed ({code})",
                       test_images=sum(1 for _ in (Path(data) / "test").rglob("*.jpg")), probe_s=psecs)
        else:
            print((work / "simclr_run.log").read_text()[-3000:], flush=True)
            run.update(knn_top1="training failed", test_images=0)
        res["run"] = run
        print(json.dumps(run), flush=True)

    res["total_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))
    print(f"gpu_check: {res['total_s']:.0f} s; wrote {out / 'results.md'} and {out / 'results.json'}")
    failed = [r for r in res["throughput"] if r["status"] != 0] + \
        ([res["run"]] if res.get("run", {}).get("status", 0) != 0 else [])
    sys.exit(1 if failed or "run" not in res else 0)


if __name__ == "__main__":
    main()
