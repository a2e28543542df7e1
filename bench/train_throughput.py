"""Train-step throughput (images/s) of the ResNet-18 recipe through each data path, in one
run so that the figures compare:

- `random`: batches already on the device (randn), no data path at all: the ceiling;
- `resident`: the project's GPU-resident loader (data set on the device, seed augmentation
  per batch there);
- `torchvision`: the seed's way, torchvision transforms per image in DataLoader workers.

The step mirrors train.py's: channels_last, autocast (bf16, or fp16 with a GradScaler),
fused SGD on CUDA, label smoothing, no host synchronisation inside the timed steps.

Usage: python bench/train_throughput.py [--device cuda] [--data SPEC] [--batch-sizes 256 512]
           [--steps 100] [--amp bf16] [--workers 16] [--paths random resident torchvision]
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
from cifarlab.models import create_model


def batches(path, data, mean, std, batch_size, device, workers):
    """An endless iterator of (x, y) on the device for one data path."""
    if path == "random":
        x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(
            memory_format=torch.channels_last)
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
            yield (x.to(device, non_blocking=True, memory_format=torch.channels_last),
                   y.to(device, non_blocking=True))


def throughput(path, data, mean, std, batch_size, device, amp, steps, workers) -> float:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                                fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    source = batches(path, data, mean, std, batch_size, device, workers)

    def step() -> None:
        x, y = next(source)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(max(3, steps // 10)):  # warm-up: cuDNN autotuning, workers starting
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
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
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    data = load_source(args.data, args.data_root).train
    mean, std = channel_stats(data.images)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, {datetime.date.today()}, amp {args.amp}, "
          f"{args.steps} timed steps, data {args.data}")
    print("| batch | path | images/s | vs random |")
    print("|---:|---|---:|---:|")
    for batch_size in args.batch_sizes:
        ceiling = None
        for path in args.paths:
            rate = throughput(path, data, mean, std, batch_size, device, amp, args.steps,
                              args.workers)
            ceiling = ceiling or (rate if path == "random" else None)
            ratio = f"{rate / ceiling:.2f}" if ceiling else "-"
            print(f"| {batch_size} | {path} | {rate:,.0f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
