#!/usr/bin/env bash
# Learning check on the real JPEG CIFAR-10 training archive, on the CPU: a class-balanced
# 5,000-image subset (4,500 train / 500 validation), a narrow ResNet-18 (width 16), 15
# epochs, one warm-up epoch, the preset otherwise. `fast` runs at the seed's batch 256 and
# lr 0.1 here (at batch 512 the small subset gives too few steps), with and without its
# flip test-time augmentation and with the seed's augmentation instead of its own.
# `best` runs with its own recipe shortened the same way, and without TrivialAugmentWide,
# without Cutout and without its EMA, to see what each part does in a short run.
# Usage: bench/cpu_real_data.sh [ARCHIVE] [OUT] [RUN ...]   (RUN: seed baseline fast
#        fast-noflip fast-seedaug best best-nopolicy best-nocutout best-noema; default the
#        first five)
set -euo pipefail
archive=${1:-../shared/data/cifar10-jpeg-train.tar.gz}
out=${2:-runs/bench-cpu}
shift $(( $# > 2 ? 2 : $# ))
runs=${*:-seed baseline fast fast-noflip fast-seedaug}
common=(--data "$archive" --limit 5000 --device cpu --epochs 15 --set model.width=16
        --set optim.warmup_epochs=1 --out "$out")
small_batch=(--batch-size 256 --lr 0.1)
seed_augment=(--set data.augment.rotate_degrees=15 --set data.augment.brightness=0.3
              --set data.augment.contrast=0.3 --set data.augment.saturation=0.3
              --set data.augment.hue=0.1 --set data.augment.translate=0.1
              --set data.augment.erase_p=0.3)
for run in $runs; do
  case $run in
    seed|baseline) extra=(--preset "$run") ;;
    fast) extra=(--preset fast "${small_batch[@]}") ;;
    fast-noflip) extra=(--preset fast "${small_batch[@]}" --set tta_flip=false) ;;
    fast-seedaug) extra=(--preset fast "${small_batch[@]}" "${seed_augment[@]}") ;;
    best) extra=(--preset best) ;;
    best-nopolicy) extra=(--preset best --set data.augment.policy=none) ;;
    best-nocutout) extra=(--preset best --set data.augment.cutout=0) ;;
    best-noema) extra=(--preset best --set ema.enabled=false --set ema.select=model) ;;
    *) echo "unknown run $run" >&2; exit 2 ;;
  esac
  .venv/bin/cifarlab train "${common[@]}" "${extra[@]}" --name "$run-limit5000-w16"
done
