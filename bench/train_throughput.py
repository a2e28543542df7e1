"""Train-step throughput (images/s) of the ResNet-18 recipe through each data path, in one
run so that the figures compare:

- `random`: batches already on the device (randn), no data path at all: the ceiling;
- `resident`: the project's GPU-resident loader (data set on the device, seed augmentation
  per batch there);
- `torchvision`: the seed's way, torchvision transforms per image in DataLoader workers.

The step is train.py's own (step.TrainStep, with its per-step flags): channels-last on CUDA,
autocast (bf16, or fp16 with a GradScaler), fused SGD on CUDA, label smoothing, optionally
torch.compile; no host synchronisation inside the timed steps.

Usage: python bench/train_throughput.py [--device cuda] [--data SPEC] [--batch-sizes 256 512]
           [--steps 100] [--amp bf16] [--workers 16] [--paths random resident torchvision]
           [--compile off reduce-overhead ...] [--blocking-flags]
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
from torch import nn

from cifarlab.config import AugmentConfig
from cifarlab.data.cpu_augment import train_transform
from cifarlab.data.loader import build_train_loader
from cifarlab.data.resident import build_resident_loader
from cifarlab.data.sources import load_source
from cifarlab.data.splits import channel_stats
from cifarlab.devices import compiled, memory_format
from cifarlab.models import create_model
from cifarlab.settings_rules import COMPILE_MODES
from cifarlab.step import FLAG_LAG, StepFlags, TrainStep


def batches(path, data, mean, std, batch_size, device, workers):
    """An endless iterator of (x, y) on the device for one data path."""
    if path == "random":
        x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(
            memory_format=memory_format(device))
        y = torch.randint(0, 10, (batch_size,), device=device)
        while True:
            yield x, y
    if path == "resident":
        loader = build_resident_loader(data.images, data.labels, AugmentConfig(), mean, std,
                                       batch_size=batch_size, seed=0, device=device)
        sampler = loader
    else:
        loader, sampler = build_train_loader(
            torch.from_numpy(data.images), torch.from_numpy(data.labels),
            train_transform(AugmentConfig(), mean, std), batch_size=batch_size, seed=0,
            workers=workers, pin_memory=device.type == "cuda")
    epoch = 0
    while True:
        epoch += 1
        sampler.set_epoch(epoch)
        for x, y in loader:
            yield (x.to(device, non_blocking=True, memory_format=memory_format(device)),
                   y.to(device, non_blocking=True))


def throughput(path, data, mean, std, batch_size, device, amp, steps, workers, compile_mode,
               blocking_flags=False) -> float:
    """Images/s of train.py's step (TrainStep and its per-step StepFlags) on one data path.
    `blocking_flags` reads each step's flags at once instead, to measure what that costs."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10)
    model = model.to(device, memory_format=memory_format(device, model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                                fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    train_step = TrainStep(compiled(model, compile_mode, device),
                           nn.CrossEntropyLoss(label_smoothing=0.1), optimizer, scaler, scheduler,
                           amp)
    flags = StepFlags(device, lag=0 if blocking_flags else FLAG_LAG)
    source = batches(path, data, mean, std, batch_size, device, workers)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def step(i: int) -> None:
        nonlocal loss_sum
        x, y = next(source)
        loss, _ = train_step(x, y)
        loss_sum += loss.double()
        flags.ready()
        flags.record(i, loss, False)

    # Warm-up: compilation, cuDNN autotuning, workers starting.
    for i in range(max(3, steps // 10) + (20 if compile_mode != "off" else 0)):
        step(i)
    flags.drain()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    flags.drain()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default="synthetic:50000")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--amp", choices=["bf16", "fp16", "off"], default="bf16")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--paths", nargs="+", default=["random", "resident", "torchvision"])
    parser.add_argument("--compile", nargs="+", default=["off"], choices=COMPILE_MODES,
                        help="torch.compile modes to measure (the torchvision path: off only)")
    parser.add_argument("--blocking-flags", action="store_true",
                        help="also measure the resident path with a blocking flag read per step")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    data = load_source(args.data, args.data_root).train
    mean, std = channel_stats(data.images)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, {datetime.date.today()}, amp {args.amp}, "
          f"{args.steps} timed steps, data {args.data}")
    print("| batch | path | compile | images/s | vs random | vs torchvision |")
    print("|---:|---|---|---:|---:|---:|")
    runs = [(path, mode, False) for mode in args.compile for path in args.paths
            if path != "torchvision" or mode == "off"]
    if args.blocking_flags:
        runs.append(("resident", args.compile[0], True))
    for batch_size in args.batch_sizes:
        rates: dict[tuple[str, str], float] = {}
        for path, mode, blocking in runs:
            rate = throughput(path, data, mean, std, batch_size, device, amp, args.steps,
                              args.workers, mode, blocking)
            if not blocking:
                rates[path, mode] = rate
            ceiling, reference = rates.get(("random", mode)), rates.get(("torchvision", "off"))
            vs_random = f"{rate / ceiling:.2f}" if ceiling and path != "random" else "-"
            vs_tv = f"{rate / reference:.2f}" if reference and path != "torchvision" else "-"
            label = f"{path} (blocking flag read)" if blocking else path
            print(f"| {batch_size} | {label} | {mode} | {rate:,.0f} | {vs_random} | {vs_tv} |",
                  flush=True)


if __name__ == "__main__":
    main()
