#!/usr/bin/env bash
# Learning check on the real JPEG CIFAR-10 training archive, on the CPU: a class-balanced
# 5,000-image subset (4,500 train / 500 validation), a narrow ResNet-18 (width 16),
# the seed recipe otherwise. Usage: bench/cpu_real_data.sh [ARCHIVE] [OUT]
set -euo pipefail
archive=${1:-../shared/data/cifar10-jpeg-train.tar.gz}
out=${2:-runs/bench-cpu}
for preset in seed baseline; do
  .venv/bin/cifarlab train --preset "$preset" --data "$archive" --limit 5000 --device cpu \
    --epochs 15 --set model.width=16 --set optim.warmup_epochs=1 \
    --out "$out" --name "$preset-limit5000-w16"
done
