#!/usr/bin/env bash
# The prepared GPU check (what it measures and how: docs/gpu_check.py). From the repository root:
#   mkdir -p data && cp ../shared/data/cifar10-jpeg.tar.gz data/   # here: data/ is git-ignored, so carry it
#   bash docs/gpu_check.sh                                         # on one H100 / H200: about 8 minutes
#   bash docs/gpu_check.sh --tiny                                  # every part on CPU in about 2 minutes
# Results: $OUT/results.md and $OUT/results.json (OUT defaults to docs/gpu_check; the device tool sets OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 docs/gpu_check.py --data "${DATA:-data/cifar10-jpeg.tar.gz}" --out "${OUT:-docs/gpu_check}" "$@"
