#!/usr/bin/env bash
# CPU deployment figures of one trained run, side by side in one `cifarlab bench` call:
# eager PyTorch float32 (the checkpoint), onnxruntime float32 (`cifarlab export`),
# onnxruntime int8 with onnxruntime's default types (QDQ S8S8, per-channel weights; written
# with --max-drop 100 as a reference whatever its accuracy) and `cifarlab quantize`'s own
# choice for this CPU. Accuracy is on the run's own validation split (the archive has no
# test split). The load average is printed before and after: other work on the machine
# slows every figure.
# Usage: bench/deploy_cpu.sh RUN_DIR [ARCHIVE] [THREADS]
#   e.g. after: cifarlab train --data ARCHIVE --limit 5000 --epochs 8 --lr 0.05 \
#               --set optim.warmup_epochs=1 --device cpu --name r18-jpeg5k-e8
set -euo pipefail
run=${1:?usage: bench/deploy_cpu.sh RUN_DIR [ARCHIVE] [THREADS]}
archive=${2:-../shared/data/cifar10-jpeg-train.tar.gz}
threads=${3:-$(nproc)}
cifarlab=${CIFARLAB:-.venv/bin/cifarlab}
echo "== $(date -u '+%Y-%m-%d %H:%M UTC'); uptime: $(uptime)"
grep -m1 'model name' /proc/cpuinfo
$cifarlab export "$run" -o "$run/best.onnx" --data "$archive"
$cifarlab quantize "$run" --data "$archive" --threads "$threads" -o "$run/best.int8.onnx"
$cifarlab quantize "$run" --data "$archive" --threads "$threads" --int8-format qdq-s8s8 \
  --max-drop 100 -o "$run/best.s8s8.onnx"
echo "== before bench: $(uptime)"
$cifarlab bench "$run" "$run/best.onnx" "$run/best.s8s8.onnx" "$run/best.int8.onnx" \
  --data "$archive" --threads "$threads" --json -o "$run/bench.png" > "$run/bench.json"
echo "== after bench: $(uptime)"
"$(dirname "$cifarlab")/python" - "$run/bench.json" <<'PY'
import json, sys
from cifarlab.deploy.bench import BenchResult, Header, Row
d = json.load(open(sys.argv[1]))
result = BenchResult(Header(**d["header"]), [Row(**r) for r in d["rows"]])
print(result.table())
eager, fp32, s8s8, int8 = result.rows
print(f"int8 / eager: batch 64 {int8.throughput / eager.throughput:.2f}x, "
      f"batch 1 {eager.latency_ms / int8.latency_ms:.2f}x; int8 / default S8S8: batch 64 "
      f"{int8.throughput / s8s8.throughput:.2f}x; onnx fp32 / eager: batch 64 "
      f"{fp32.throughput / eager.throughput:.2f}x; int8 - fp32 accuracy "
      f"{int8.acc - fp32.acc:+.2f} points")
PY
