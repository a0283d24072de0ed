#!/usr/bin/env bash
# CPU-sized real-data study (docs/results.md, "Results on CIFAR-10"): pretrain ExCB, ReSA, SimCLR (NT-Xent) and NSCL
# on a class-stratified subset of the CIFAR-10 JPEG copy with the same backbone, batch and views (2 views:
# ExCB without multi-crop), then probe every checkpoint with labels and monitor it without labels.
#
#   mkdir -p data/cifar10-jpeg && tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C data/cifar10-jpeg
#   bash docs/study.sh                                   # the defaults: docs/results.md's study, ~1.5 h on 2 cores
#   SUBSET=200 EPOCHS=1 TEST=200 K=16 SHOTS="1 5 10" bash docs/study.sh  # the smoke version the tests run
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/cifar10-jpeg}   # holds train/<class>/*.jpg and test/<class>/*.jpg
OUT=${OUT:-runs/study}
SUBSET=${SUBSET:-5000}            # training images (500 per class)
EPOCHS=${EPOCHS:-16}
SAVE=${SAVE:-2}                   # checkpoint every SAVE epochs (+ epoch 0, before training)
TEST=${TEST:-2000}                # test images for the probes
BATCH=${BATCH:-120}               # divisible by the 10 classes (NSCL's class-balanced batches)
K=${K:-256}                       # ExCB clusters (~20 training images per cluster)
SHOTS=${SHOTS:-"1 5 10 20 50 100"} # few-shot N per class (at most the smallest class of the SUBSET)
WORKERS=${WORKERS:-2}
PY=${PY:-python3}
SHARED="--dataset imagefolder --data-dir $DATA --image-size 32 --train-subset $SUBSET --backbone convnet
        --epochs $EPOCHS --save-every $SAVE --batch-size $BATCH --workers $WORKERS --seed 0"

# 1. pretrain (the cifar10 presets, resized to the CPU budget; each line prints img/s, step time, memory)
$PY resa.py --preset cifar10 $SHARED --output-dir "$OUT/resa"
$PY excb.py --preset cifar10 $SHARED --lr 0.07 --n-local 0 --num-clusters "$K" --kmeans-samples "$SUBSET" \
    --warmup-epochs 1 --save-epoch0 --output-dir "$OUT/excb"
$PY simclr_nscl.py --preset cifar10 $SHARED --width 1 --warmup-epochs 1 --loss ntxent --output-dir "$OUT/simclr"
$PY simclr_nscl.py --preset cifar10 $SHARED --width 1 --warmup-epochs 1 --loss nscl --output-dir "$OUT/nscl"

# 2. probe every checkpoint (k-NN, linear, few-shot + the CDNV bound), then the label-free monitor
for run in resa excb simclr nscl; do
    $PY probe.py "$OUT/$run" --max-train "$SUBSET" --max-test "$TEST" --shots $SHOTS --repeats 3
    $PY monitor.py "$OUT/$run" --max-samples "$SUBSET" --test-samples "$TEST"
done

# 3. the papers' own analyses: the CL-vs-NSCL gap (NSCL paper, Fig. 2) and ExCB's cluster sizes (Fig. 5)
$PY simclr_nscl.py eval-gap "$OUT/simclr" "$OUT/nscl" --subset "$TEST" --compare "$OUT/fig2_bottom.png"
$PY excb.py analyze "$OUT/excb" --out-dir "$OUT/excb/analysis"

# 4. the tables of docs/results.md and the README's summary table, from the files above (also in $OUT/tables.md)
$PY docs/study_tables.py "$OUT" | tee "$OUT/tables.md"
