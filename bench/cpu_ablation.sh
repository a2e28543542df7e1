#!/usr/bin/env bash
# The seed's ablation on the CPU (cifarlab ablate): from the baseline preset, each of the
# seed's enhancements alone (augment, label-smoothing, warmup-cosine) and all of them
# together, 3 seeds each, on the real JPEG CIFAR-10 training archive: a class-balanced
# 5,000-image subset (4,500 train / 500 validation), a narrow ResNet-18 (width 16), 10
# epochs, one warm-up epoch for the variants with warm-up (the seed's 5 of 100 epochs, made
# one of 10), as bench/cpu_real_data.sh. The archive has no test split: the table holds
# validation accuracy only. Started again with the same arguments, the study continues.
# 15 runs; at about 8-11 s an epoch on a 2-core CPU (BENCHMARKS.md) some 25 minutes.
# Usage: bench/cpu_ablation.sh [ARCHIVE] [OUT]
#        (LIMIT, EPOCHS and SEEDS in the environment shrink it, e.g. for a quick check)
set -euo pipefail
archive=${1:-../shared/data/cifar10-jpeg-train.tar.gz}
out=${2:-runs/bench-cpu-ablation}
.venv/bin/cifarlab ablate --data "$archive" --limit "${LIMIT:-5000}" --device cpu \
  --epochs "${EPOCHS:-10}" --seeds "${SEEDS:-3}" --set model.name=resnet18 \
  --set model.width=16 --set optim.warmup_epochs=1 --out "$out"
