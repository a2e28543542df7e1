#!/usr/bin/env bash
# The airbench preset at full scale on the CPU: the whole JPEG archive's 45,000 / 5,000
# split, one run per seed, then the machine (CPU model and flags), each run's training time
# and validation accuracy, and the ratio of its step to a plain eager float32 step of the
# same network at the paper's batch 2000 (bench/cpu_step.py), measured in the same script.
# Usage: bench/cpu_airbench.sh [ARCHIVE] [OUT] [SEED ...]   (default seeds: 0 1 2)
set -euo pipefail
archive=${1:-../shared/data/cifar10-jpeg-train.tar.gz}
out=${2:-runs/bench-airbench}
shift $(( $# > 2 ? 2 : $# ))
seeds=${*:-0 1 2}
mkdir -p "$out"
{ lscpu | grep -E '^(Model name|Flags)'; .venv/bin/python -c \
  'import torch; print("torch", torch.__version__, torch.backends.cpu.get_cpu_capability(),
  "threads", torch.get_num_threads())'; } > "$out/machine.txt"
for seed in $seeds; do
  .venv/bin/cifarlab train --preset airbench --data "$archive" --device cpu --seed "$seed" \
    --out "$out" --name "airbench-seed$seed"
done
.venv/bin/python bench/cpu_step.py --json "$out/steps.json"
.venv/bin/python - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = [json.loads(p.read_text()) for p in sorted(out.glob("airbench-seed*/result.json"))]
acc = [r["best_val_acc"] for r in runs]
secs = [r["train_seconds"] for r in runs]
print((out / "machine.txt").read_text(), end="")
for r in runs:
    print(f"{r['run_dir']}: {r['best_val_acc']:.2f} % validation, {r['train_seconds']:.0f} s, "
          f"{r['precision']}, {r['threads']} threads")
if len(acc) > 1:
    print(f"mean {statistics.mean(acc):.2f} sd {statistics.stdev(acc):.2f} % over {len(acc)} "
          f"seeds; time {statistics.mean(secs):.0f} s mean")
print(json.dumps(json.loads((out / "steps.json").read_text()), indent=1))
PY
