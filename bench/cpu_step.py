"""Training-step throughput (images/s) of a model on the CPU in each layout, precision,
batch size and compile mode, through train.py's own step (step.TrainStep) with the
airbench preset's optimizer groups; the median of `--steps` steps after two warm-up steps.

The reference is the paper's setting ported as it is: eager, float32, batch 2000, NCHW.
With `--profile`, torch.profiler's table of the operators that take the most CPU time in
a few steps at the first batch size (channels-last, float32, eager): what bounds the step.
Usage: python bench/cpu_step.py [--model airbench] [--batch-sizes 2000 500 250]
           [--steps 5] [--compile] [--profile] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn

from cifarlab.devices import compiled, cpu_capability, native_cpu_bf16
from cifarlab.models import create_model, model_args
from cifarlab.presets import airbench
from cifarlab.step import TrainStep
from cifarlab.training.optim import build_optimizer


def build_step(name: str, batch: int, layout: torch.memory_format, dtype: torch.dtype | None,
               compile_mode: str):
    torch.manual_seed(0)
    config = airbench()
    model = create_model(**model_args(name, 10, 64)).to(memory_format=layout)
    optimizer = build_optimizer(model, config.optim, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step = TrainStep(compiled(model, compile_mode, "cpu"), nn.CrossEntropyLoss(
        label_smoothing=0.2), optimizer, torch.amp.GradScaler("cpu", enabled=False),
        scheduler, dtype)
    step.cpu_layout = layout  # the layout under test, whatever memory_format would pick
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,))
    return lambda: step(x, y)


def images_per_second(name: str, batch: int, layout: torch.memory_format,
                      dtype: torch.dtype | None, compile_mode: str, steps: int) -> float:
    step = build_step(name, batch, layout, dtype, compile_mode)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return batch / sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="airbench")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2000, 500, 250])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (default)")
    parser.add_argument("--profile", action="store_true", help="only the operator profile")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if args.profile:
        step = build_step(args.model, args.batch_sizes[0], torch.channels_last, None, "off")
        step()
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return
    dtypes = [None] + ([torch.bfloat16] if native_cpu_bf16() else [])
    layouts = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    rows = [{"batch": 2000, "layout": "nchw", "dtype": "float32", "compile": "off",
             "note": "reference: the paper's step as it is"}]
    for batch in args.batch_sizes:
        for dtype in dtypes:
            for compile_mode in ["off"] + (["default"] if args.compile else []):
                rows.append({"batch": batch, "layout": "channels_last",
                             "dtype": "bfloat16" if dtype else "float32",
                             "compile": compile_mode})
    for row in rows:
        dtype = torch.bfloat16 if row["dtype"] == "bfloat16" else None
        row["images_per_s"] = round(images_per_second(
            args.model, row["batch"], layouts[row["layout"]], dtype, row["compile"],
            args.steps), 1)
        row["ratio_to_reference"] = round(row["images_per_s"] / rows[0]["images_per_s"], 2)
        print(json.dumps(row), flush=True)
    result = {"cpu": platform.processor() or platform.machine(), "capability": cpu_capability(),
              "native_bf16": native_cpu_bf16(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "model": args.model, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
