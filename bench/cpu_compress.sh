#!/usr/bin/env bash
# Making a model small, measured on the CPU, on the real JPEG CIFAR-10 training archive
# (validation split only: the archive has no test split). Every run: a class-balanced
# 5,000-image subset (4,500 train / 500 validation), the `fast` recipe at batch 256 and
# lr 0.1 with one warm-up epoch (as bench/cpu_real_data.sh), 15 epochs.
#
# 1. parent: a ResNet-18 at width 32 (2.8 M parameters);
# 2. pruned: the parent pruned to 50 % of its MACs (cifarlab prune, magnitude importance,
#    channels in multiples of 8), fine-tuned 10 epochs with the parent's recipe; the same
#    fine-tuned with the parent as its teacher; and, as the control, the parent fine-tuned
#    the same way with nothing removed (--ratio 0.01: 99 % of each layer's channels, rounded
#    to a multiple of 8, is all of them), which tells what the 10 more epochs alone give;
# 3. students: resnet20 (0.27 M parameters) trained alone and distilled (T = 4,
#    alpha = 0.9), 3 seeds each, from two teachers: the parent, and a ResNet-18 at width 32
#    trained 30 epochs without label smoothing (a stronger teacher, whose outputs keep the
#    similarities between classes that label smoothing erases: Muller, Kornblith and
#    Hinton, 2019);
# 4. the parent and the pruned model exported to ONNX, the pruned one quantized to int8;
# 5. the accuracy-cost table of them all (cifarlab compare --variants) on a quiet machine,
#    every runtime on the same threads, and the students' mean, sd and Welch's test.
# A run whose folder holds result.json is kept, so the script continues where it stopped.
# Usage: bench/cpu_compress.sh [ARCHIVE] [OUT] [THREADS]
set -euo pipefail
archive=${1:-../shared/data/cifar10-jpeg-train.tar.gz}
out=${2:-runs/bench-compress}
threads=${3:-$(nproc)}
cifarlab=${CIFARLAB:-.venv/bin/cifarlab}
common=(--data "$archive" --limit 5000 --device cpu --epochs 15 --preset fast
        --batch-size 256 --lr 0.1 --set optim.warmup_epochs=1 --out "$out")
parent=$out/parent-resnet18-w32

done_run() { [ -f "$out/$1/result.json" ] && echo "have $1"; }
train() {  # NAME ARGS...
  local name=$1; shift
  done_run "$name" && return
  rm -rf "${out:?}/$name"
  $cifarlab train "${common[@]}" "$@" --name "$name"
}
prune() {  # NAME ARGS...
  local name=$1; shift
  done_run "$name" && return
  rm -rf "${out:?}/$name"
  $cifarlab prune "$parent" --epochs 10 --out "$out" --name "$name" "$@"
}

echo "== $(date -u '+%Y-%m-%d %H:%M UTC'); $(grep -m1 'model name' /proc/cpuinfo)"
train parent-resnet18-w32 --set model.width=32
for s in 0 1 2; do train "student-resnet20-alone-s$s" --model resnet20 --seed "$s"; done
for s in 0 1 2; do
  train "student-resnet20-distilled-s$s" --model resnet20 --seed "$s" --teacher "$parent"
done
teacher=$out/teacher-resnet18-w32-e30-nols
train teacher-resnet18-w32-e30-nols --set model.width=32 --epochs 30 \
  --set optim.label_smoothing=0
for s in 0 1 2; do
  train "student-resnet20-kd30-s$s" --model resnet20 --seed "$s" --teacher "$teacher"
done
prune pruned50-resnet18-w32 --target-macs 0.5
prune pruned50-kd-resnet18-w32 --target-macs 0.5 --teacher "$parent"
prune finetuned-resnet18-w32 --ratio 0.01
pruned=$out/pruned50-resnet18-w32
[ -f "$parent/best.onnx" ] || $cifarlab export "$parent" -o "$parent/best.onnx" --data "$archive"
[ -f "$pruned/best.onnx" ] || $cifarlab export "$pruned" -o "$pruned/best.onnx" --data "$archive"
[ -f "$pruned/best.int8.onnx" ] ||
  $cifarlab quantize "$pruned" --data "$archive" --threads "$threads" -o "$pruned/best.int8.onnx"

echo "== before the table: $(uptime)"
$cifarlab compare --variants "$parent" "$out/finetuned-resnet18-w32" "$pruned" \
  "$out/pruned50-kd-resnet18-w32" "$parent/best.onnx" "$pruned/best.onnx" \
  "$pruned/best.int8.onnx" "$out/student-resnet20-alone-s0" "$out/student-resnet20-kd30-s0" \
  --data "$archive" --threads "$threads" --markdown \
  --report "$out/variants"
echo "== after the table: $(uptime)"
"$(dirname "$cifarlab")/python" - "$out" <<'PY'
import json, sys
from pathlib import Path
from cifarlab.studies import stats

out = Path(sys.argv[1])
def best(name):
    return json.loads((out / name / "result.json").read_text())["best_val_acc"]
for name in ("parent-resnet18-w32", "teacher-resnet18-w32-e30-nols"):
    print(f"{name}: {best(name):.1f}")
groups = {how: [best(f"student-resnet20-{how}-s{s}") for s in range(3)]
          for how in ("alone", "distilled", "kd30")}
for how, accs in groups.items():
    s = stats.summarize(accs)
    print(f"resnet20 {how}: {', '.join(f'{a:.1f}' for a in accs)}; mean {s.mean:.2f}, "
          f"sd {s.sd:.2f}, 95 % CI [{s.ci_low:.2f}, {s.ci_high:.2f}]")
for how in ("distilled", "kd30"):
    diff = stats.mean(groups[how]) - stats.mean(groups["alone"])
    print(f"{how} - alone: {diff:+.2f} points, Welch p = "
          f"{stats.welch_p(groups[how], groups['alone']):.3g}")
for name in ("pruned50-resnet18-w32", "pruned50-kd-resnet18-w32", "finetuned-resnet18-w32"):
    p = json.loads((out / name / "prune.json").read_text())
    print(name, json.dumps({k: p[k] for k in p if k not in ("channels", "model_args")}))
PY
