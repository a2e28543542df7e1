"""What contiguous NCHW batches cost on the CPU, against channels-last (NHWC) ones.

On the CPU cifarlab trains a model in contiguous NCHW where oneDNN's faulty channels-last
weight gradient of 1x1 stride-2 convolutions could reach it, and in channels-last elsewhere
(devices.memory_format, devices.channels_last_is_safe). This measures what NCHW costs, at widths
where both layouts give correct gradients (the shortcuts have 16 or more input channels): a
float32 training step and a forward pass in eval mode, each on the same random batch, median
of several runs. Run it once as it is and once under ONEDNN_MAX_CPU_ISA=AVX2 to see both
kernel families.

    python bench/cpu_layout.py [--widths 16 64] [--batch-size 128] [--runs 7]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
from torch import nn

from cifarlab.deploy.runtime import cpu_info
from cifarlab.models import create_model

LAYOUTS = {"NCHW": torch.contiguous_format,
           "channels-last": torch.channels_last}


def median_seconds(fn, runs: int) -> float:
    fn()  # warm-up: oneDNN builds its kernels on the first call
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(width: int, batch_size: int, layout: torch.memory_format, runs: int
            ) -> tuple[float, float]:
    """(training images/s, eval images/s) of a ResNet-18 of `width`, model and batch in
    `layout`. The step is written out here: step.TrainStep would turn the batch NCHW."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, width=width).to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch_size,))

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    train = median_seconds(train_step, runs)
    model.eval()
    with torch.no_grad():
        infer = median_seconds(lambda: model(x), runs)
    return batch_size / train, batch_size / infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    print(f"{cpu_info().describe()}, {torch.get_num_threads()} threads, oneDNN ISA {isa}; "
          f"torch {torch.__version__}; {datetime.date.today()}")
    print(f"| width | layout | train step, images/s | eval, images/s |  (batch {args.batch_size}, "
          f"median of {args.runs})")
    print("|---:|---|---:|---:|")
    for width in args.widths:
        for name, layout in LAYOUTS.items():
            train, infer = measure(width, args.batch_size, layout, args.runs)
            print(f"| {width} | {name} | {train:,.0f} | {infer:,.0f} |")


if __name__ == "__main__":
    main()
