#!/usr/bin/env bash
# Same results on both data paths (docs/results.md, "The two data paths"): every method's digits preset on the
# device path and on the loader path, and SimCLR on a CIFAR-10 JPEG slice on both paths with two seeds each (the
# paths draw different random views, so the seeds show how far two runs of ONE path already differ); then the
# k-NN and linear probes of each run's last checkpoint, and one table.
#
#   mkdir -p data/cifar10-jpeg && tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C data/cifar10-jpeg
#   bash docs/compare_paths.sh                       # ~40 min on 2 CPU cores (most of it the loader path)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/cifar10-jpeg}   # holds train/<class>/*.jpg and test/<class>/*.jpg
OUT=${OUT:-runs/compare_paths}
SUBSET=${SUBSET:-5000}            # CIFAR-10 training images (500 per class)
EPOCHS=${EPOCHS:-6}
TEST=${TEST:-2000}                # CIFAR-10 test images for the probes
SEEDS=${SEEDS:-"0 1"}
WORKERS=${WORKERS:-2}             # loader path: worker processes; device path: decode threads
PY=${PY:-python3}
PATHS=${PATHS:-"device loader"}   # PATHS=device reruns one path only (e.g. after a change to it)

for path in $PATHS; do
    $PY resa.py --preset digits --data-path $path --output-dir "$OUT/digits_resa_$path"
    $PY excb.py --preset digits --data-path $path --output-dir "$OUT/digits_excb_$path"
    $PY simclr_nscl.py --preset digits --data-path $path --output-dir "$OUT/digits_simclr_$path"
    $PY simclr_nscl.py --preset digits --loss nscl --data-path $path --output-dir "$OUT/digits_nscl_$path"
    for seed in $SEEDS; do
        $PY simclr_nscl.py --preset cifar10 --dataset imagefolder --data-dir "$DATA" --image-size 32 \
            --train-subset "$SUBSET" --backbone convnet --width 1 --epochs "$EPOCHS" --batch-size 120 \
            --warmup-epochs 1 --workers "$WORKERS" --seed "$seed" --save-every "$EPOCHS" --data-path $path \
            --output-dir "$OUT/c10_simclr_${path}_seed$seed"
    done
done

for run in "$OUT"/*/; do
    last=$(ls "$run"ckpt_epoch*.pt | sort | tail -n 1)
    case "$run" in *c10_*) limits="--max-train $SUBSET --max-test $TEST" ;; *) limits="" ;; esac
    $PY probe.py "$last" --probes knn,linear $limits --no-plots --out-dir "$run"
done

$PY - "$OUT" <<'EOF'
import csv, json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | data path | epochs | k-NN cos k=20 | linear top-1 | images/s | data wait |")
print("|---|---|---|---|---|---|---|")
for run in sorted(p for p in out.iterdir() if p.is_dir()):
    rows = {(r["probe"], r["metric"]): float(r["value"]) for r in csv.DictReader(open(run / "probe.csv"))}
    perf = [json.loads(l) for l in open(run / "log.jsonl")]
    perf = [r for r in perf if "perf/images_per_s" in r][1:] or [r for r in perf if "perf/images_per_s" in r]
    med = lambda k: statistics.median(r[k] for r in perf)  # noqa: E731
    name, path = run.name.rsplit("_", 1) if "seed" not in run.name else (run.name, run.name.split("_")[2])
    epochs = int(sorted(run.glob("ckpt_epoch*.pt"))[-1].stem[len("ckpt_epoch"):])
    print(f"| {name} | {path} | {epochs} | {rows[('knn', 'top1_cosine_k20')]:.1f} | "
          f"{rows[('linear', 'top1')]:.1f} | {med('perf/images_per_s'):.0f} | {100 * med('perf/data_frac'):.0f} % |")
EOF
