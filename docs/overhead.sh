#!/usr/bin/env bash
# Computational overhead of the methods in one run (docs/results.md, "Computational overhead"; the form of ReSA's
# Table 4): each method trains STEPS steps on the CIFAR-10 JPEG copy with the same backbone, global batch and
# views (2 views of 32 px; ExCB also once with its official 2 + 6 multi-crop), one method after the other on
# the same machine. Each method keeps its own heads (ExCB: K prototypes; ReSA, SimCLR, NSCL: their projectors).
# The table is the median over the log windows after the first (which holds worker start-up and the epoch-0
# checkpoint) of each run's perf/* records in log.jsonl.
#
#   bash docs/overhead.sh                                  # ~10 min on 2 CPU cores; seconds on a GPU
#   BACKBONES=resnet18 BATCH=256 STEPS=40 WORKERS=16 bash docs/overhead.sh   # a GPU, the papers' batch
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/cifar10-jpeg}       # holds train/<class>/*.jpg
OUT=${OUT:-runs/overhead}
BACKBONES=${BACKBONES:-convnet resnet18}
BATCH=${BATCH:-120}                   # divisible by the 10 classes (NSCL's class-balanced batches)
STEPS=${STEPS:-12}                    # timed steps per method (one epoch of BATCH * STEPS images)
LOG=${LOG:-2}                         # steps per log window
WORKERS=${WORKERS:-2}
DATA_PATH=${DATA_PATH:-auto}          # auto | device | loader (docs/common.md, "Data on the training device")
K=${K:-2048}                          # ExCB clusters (the CIFAR preset's)
PY=${PY:-python3}
N=$((BATCH * STEPS))

for bb in $BACKBONES; do
    SHARED="--dataset imagefolder --data-dir $DATA --image-size 32 --train-subset $N --backbone $bb --epochs 1
            --batch-size $BATCH --workers $WORKERS --seed 0 --log-every $LOG --save-every 1 --data-path $DATA_PATH"
    $PY resa.py --preset cifar10 $SHARED --output-dir "$OUT/$bb/resa"
    # the one-off k-means initialisation is not a per-step cost (and K may exceed N here): random centroids
    $PY excb.py --preset cifar10 $SHARED --num-clusters "$K" --no-kmeans-init --n-local 0 --output-dir "$OUT/$bb/excb"
    $PY excb.py --preset cifar10 $SHARED --num-clusters "$K" --no-kmeans-init --output-dir "$OUT/$bb/excb_mc"
    $PY simclr_nscl.py --preset cifar10 $SHARED --width 1 --loss ntxent --output-dir "$OUT/$bb/simclr"
    $PY simclr_nscl.py --preset cifar10 $SHARED --width 1 --loss nscl --output-dir "$OUT/$bb/nscl"
done

# The table: images/s, step time, the share of it blocked on the loader, the rate without that wait (the
# method's own cost: exact with WORKERS=0, where loading and compute take turns in one process), time per full
# CIFAR-10 epoch (50,000 images at the measured end-to-end rate), and peak memory (CUDA: allocated by tensors;
# CPU: resident set of the main process, ~0.8 GB of which is the Python + torch runtime).
$PY - "$OUT" $BACKBONES <<'EOF'
import json, statistics, sys
from pathlib import Path
out, backbones = Path(sys.argv[1]), sys.argv[2:]
names = {"excb": "ExCB (2 views)", "excb_mc": "ExCB (2 + 6 multi-crop)", "resa": "ReSA",
         "simclr": "SimCLR (NT-Xent)", "nscl": "NSCL"}
print("| backbone | method | images/s | step time | data wait | images/s without it | min / CIFAR-10 epoch "
      "| peak memory |")
print("|---|---|---|---|---|---|---|---|")
for bb in backbones:
    for run in ("excb", "excb_mc", "resa", "simclr", "nscl"):
        recs = [json.loads(line) for line in open(out / bb / run / "log.jsonl")]
        recs = [r for r in recs if "perf/images_per_s" in r][1:] or [r for r in recs if "perf/images_per_s" in r]
        med = lambda key: statistics.median(r[key] for r in recs)  # noqa: E731
        ips, wait = med("perf/images_per_s"), med("perf/data_frac")
        rate = lambda x: f"{x:.1f}" if x < 100 else f"{x:.0f}"  # noqa: E731
        print(f"| {bb} | {names[run]} | {rate(ips)} | {med('perf/step_time_s') * 1000:.0f} ms | "
              f"{100 * wait:.0f} % | {rate(ips / max(1 - wait, 1e-3))} | {50_000 / ips / 60:.1f} | "
              f"{max(r['perf/peak_mem_gb'] for r in recs):.2f} GB |")
EOF
