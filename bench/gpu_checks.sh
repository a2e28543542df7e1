#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one call on a lent GPU machine (which has torch,
# torchvision, numpy, pyyaml, tqdm and matplotlib, but not torchinfo: carry its wheel in
# .whl/). Needs the JPEG training archive at data/cifar10-jpeg-train.tar.gz (carried).
# Usage: bench/gpu_checks.sh [STEP ...]; steps: throughput augment tests seed-resident
#        fast fast-compiled airbench seed-torchvision (default: all but seed-torchvision,
#        whose 359 s SEED_RECIPE.md gives). Results go to $OUT (or ./bench-out).
set -uo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
python3 -c "import torchinfo" || { echo "torchinfo missing: carry its wheel in .whl/"; exit 2; }
archive=data/cifar10-jpeg-train.tar.gz
steps=${*:-throughput augment tests seed-resident fast fast-compiled airbench}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
for step in $steps; do
  echo "== $step"
  case $step in
    throughput) python3 bench/train_throughput.py --data "$archive" --steps 200 \
                  --compile off reduce-overhead --blocking-flags | tee "$out/throughput.md" ;;
    augment) python3 bench/augment_throughput.py --device cuda --compile \
               | tee "$out/augment.md"
             python3 bench/augment_throughput.py --device cuda --base flip-crop --policies \
               none trivialaugment randaugment autoaugment cutout | tee "$out/policies.md" ;;
    tests) python3 -m pytest -q tests/test_gpu_augment.py tests/test_policies.py \
             tests/test_resident.py tests/test_step.py 2>&1 \
             | tail -5 | tee "$out/tests.txt" ;;
    seed-resident|seed-torchvision)
      python3 -m cifarlab train --preset seed --data "$archive" --loader "${step#seed-}" \
        --out "$out/runs" --name "$step" 2>&1 | tee "$out/$step.log" | grep -v "^epoch" ;;
    fast|fast-compiled)
      mode=off; [ "$step" = fast-compiled ] && mode=reduce-overhead
      python3 -m cifarlab train --preset fast --data "$archive" --compile "$mode" \
        --out "$out/runs" --name "$step" 2>&1 | tee "$out/$step.log" | grep -v "^epoch" ;;
    airbench)  # the time-to-accuracy preset at the paper's batch 1024 (lr per example kept)
      python3 -m cifarlab train --preset airbench --data "$archive" --batch-size 1024 \
        --lr "$(python3 -c 'from cifarlab.presets import AIRBENCH_LR_PER_EXAMPLE as r; print(r * 1024)')" \
        --out "$out/runs" --name "$step" 2>&1 | tee "$out/$step.log" | grep -v "^epoch" ;;
    *) echo "unknown step $step; steps: throughput augment tests seed-resident fast" \
         "fast-compiled airbench seed-torchvision" >&2; exit 2 ;;
  esac
done
