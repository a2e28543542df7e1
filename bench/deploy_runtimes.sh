#!/usr/bin/env bash
# Every CPU runtime and format of one trained run side by side in one `cifarlab bench` call:
# eager PyTorch float32 (the checkpoint); the float32 ONNX file in onnxruntime and in OpenVINO;
# the OpenVINO IR; onnxruntime's int8 (`cifarlab quantize -o *.onnx`: its fastest format
# within --max-drop) in both runtimes; NNCF's OpenVINO int8 IR (`quantize -o *.xml`); the
# ExecuTorch programs, float32 and int8, lowered to XNNPACK (where executorch is installed).
# Accuracy is on the run's own validation split (the archive has no test split). Then what
# `--runtime auto` picks for the float32 and int8 ONNX files, measured on the machine.
# Usage: bench/deploy_runtimes.sh RUN_DIR [ARCHIVE] [THREADS]
#   e.g. after: cifarlab train --model resnet18 --set model.width=16 --epochs 8 --limit 5000 \
#               --data ARCHIVE --name bench-r18w16-e8
set -euo pipefail
run=${1:?usage: bench/deploy_runtimes.sh RUN_DIR [ARCHIVE] [THREADS]}
archive=${2:-../shared/data/cifar10-jpeg-train.tar.gz}
threads=${3:-$(nproc)}
cifarlab=${CIFARLAB:-.venv/bin/cifarlab}
python=$(dirname "$cifarlab")/python
echo "== $(date -u '+%Y-%m-%d %H:%M UTC'); uptime: $(uptime)"
lscpu | grep -E '^(Model name|Thread|Core|Socket)'
echo "x86 flags that decide int8 and bf16 speed: $(lscpu | grep -oE \
  '\b(avx2|avx512f|avx512bw|avx512_vnni|avx_vnni|avx512_bf16|amx_bf16|amx_int8)\b' | sort -u \
  | tr '\n' ' ')"
$cifarlab export "$run" -o "$run/best.onnx" --data "$archive"
$cifarlab export "$run" -o "$run/best.xml" --format openvino --data "$archive"
$cifarlab quantize "$run" --data "$archive" --threads "$threads" -o "$run/best.int8.onnx"
$cifarlab quantize "$run" --data "$archive" --threads "$threads" -o "$run/best.int8.xml"
models=("$run" "$run/best.onnx" "$run/best.xml" "$run/best.int8.onnx" "$run/best.int8.xml")
if "$python" -c 'import executorch.runtime' 2>/dev/null; then
  $cifarlab export "$run" -o "$run/best.pte" --format executorch --data "$archive"
  $cifarlab export "$run" -o "$run/best.int8.pte" --format executorch --int8 --data "$archive"
  models+=("$run/best.pte" "$run/best.int8.pte")
fi
echo "== before bench: $(uptime)"
$cifarlab bench "${models[@]}" --runtime all --data "$archive" --threads "$threads" --json \
  > "$run/bench_runtimes.json"
echo "== after bench: $(uptime)"
"$python" - "$run/bench_runtimes.json" <<'PY'
import json, sys
from cifarlab.deploy.bench import BenchResult, Header, Row
d = json.load(open(sys.argv[1]))
result = BenchResult(Header(**d["header"]), [Row(**r) for r in d["rows"]])
print(result.table())
name = lambda r: f"{r.model.rsplit('/', 1)[-1]} in {r.runtime}"
print("ranking at batch 1 (ms): " + ", ".join(
    f"{name(r)} {r.latency_ms:.3f}" for r in sorted(result.rows, key=lambda r: r.latency_ms)))
print("ranking at batch 64 (img/s): " + ", ".join(
    f"{name(r)} {r.throughput:,.0f}" for r in sorted(result.rows, key=lambda r: -r.throughput)))
PY
"$python" - "$run" <<'PY'
import sys
from cifarlab.deploy import choice
for name in ("best.onnx", "best.int8.onnx"):  # what --runtime auto picks, measured now
    for metric, command in (("latency", "predict"), ("throughput", "evaluate")):
        chosen = choice.choose(f"{sys.argv[1]}/{name}", "auto", metric)
        print(f"{name}, {command}: {chosen.describe()}")
PY
