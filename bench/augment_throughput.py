"""Images per second of the seed's augmentation chain on one device:

- `batched`: cifarlab.data.gpu_augment.BatchAugment, uint8 NHWC batch in, normalised out;
- `batched, compiled` (with --compile): the same with `apply` under torch.compile, which fuses
  its many small kernels (the parameter draws stay eager);
- `kornia`: kornia.augmentation's per-sample equivalent (when kornia is installed), on the
  float image in [0, 1] (kornia has no uint8 path);
- `torchvision`: the reference chain (cpu_augment.train_transform), one image at a time in
  this one process (CPU only; the training loader runs it in DataLoader workers).

With `--policies P [P ...]` (words of settings_rules.POLICIES, or `cutout`), each policy is timed
on top of the chain `--base` names (`seed`: the whole seed chain; `flip-crop`: the `fast`
preset's flip and pad-and-crop), batched (data/policies.py, every image its own op) and, on
the CPU, with torchvision's own transform one image at a time; `cutout` is a 16-pixel Cutout
alone. `none` is the base chain itself, the reference for the policies' cost.

Usage: python bench/augment_throughput.py [--device cuda] [--batch-sizes 256 512] [--runs 20]
                                         [--compile] [--skip-torchvision]
                                         [--policies none trivialaugment ...] [--base seed]
Each figure is the median of --runs timed calls after warm-up calls; the chains take turns,
so that a change in the machine's load affects them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from cifarlab.config import AugmentConfig
from cifarlab.data.cpu_augment import train_transform
from cifarlab.data.gpu_augment import BatchAugment
from cifarlab.settings_rules import POLICIES

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def kornia_chain(aug: AugmentConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    return torch.nn.Sequential(
        K.RandomHorizontalFlip(p=aug.hflip),
        K.RandomRotation(aug.rotate_degrees, resample="nearest", p=1.0),
        K.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue, p=1.0),
        K.RandomCrop((32, 32), padding=aug.crop_padding, p=1.0),
        K.RandomAffine(0.0, translate=(aug.translate, aug.translate), resample="nearest", p=1.0),
        K.Normalize(torch.tensor(MEAN), torch.tensor(STD)),
        K.RandomErasing(aug.erase_scale, aug.erase_ratio, value=0.0, p=aug.erase_p),
    )


def median_seconds(
    chains: dict[str, Callable[[], object]], device: torch.device, runs: int
) -> dict[str, float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in chains.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in chains}
    for _ in range(runs):
        for name, fn in chains.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(apply)")
    parser.add_argument("--skip-torchvision", action="store_true",
                        help="leave out the slow one-image-at-a-time reference on the CPU")
    parser.add_argument("--policies", nargs="+", choices=[*POLICIES, "cutout"],
                        help="time these policies on top of --base instead of the seed chain")
    parser.add_argument("--base", choices=["seed", "flip-crop"], default="seed")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.policies:
        return time_policies(args, device)
    aug = AugmentConfig()
    batched = BatchAugment(aug, MEAN, STD, device)
    kornia = kornia_chain(aug)
    reference = train_transform(aug, MEAN, STD)
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, (max(args.batch_sizes), 32, 32, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)

    compiled = torch.compile(batched.apply, dynamic=False) if args.compile else None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:  # other processes on the machine slow the figures down: say how busy it was
        threads = torch.get_num_threads()
        name = f"CPU, {threads} thread{'s' * (threads != 1)}, load {os.getloadavg()[0]:.1f}"
    versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    if kornia is not None:
        versions += f", kornia {importlib.metadata.version('kornia')}"
    print(f"{name}; {versions}; {datetime.date.today()}")
    print(f"| chain | batch | ms per batch (median of {args.runs}) | images/s |")
    print("|---|---:|---:|---:|")
    for batch_size in args.batch_sizes:
        batch = images[:batch_size]
        chains: dict[str, Callable[[], object]] = {
            "batched": lambda b=batch: batched(b, generator)}
        if compiled is not None:
            chains["batched, compiled"] = \
                lambda b=batch: compiled(b, batched.draw(len(b), (32, 32), generator))
        if kornia is not None:
            chains["kornia"] = lambda b=batch: kornia(b.permute(0, 3, 1, 2).float().div(255))
        if device.type == "cpu" and not args.skip_torchvision:
            chains["torchvision"] = lambda b=batch: [reference(im) for im in b.permute(0, 3, 1, 2)]
        for chain, seconds in median_seconds(chains, device, args.runs).items():
            print(f"| {chain} | {batch_size} | {seconds * 1e3:.2f} | {batch_size / seconds:,.0f} |")


def time_policies(args: argparse.Namespace, device: torch.device) -> None:
    base = AugmentConfig()
    if args.base == "flip-crop":
        base = dataclasses.replace(AugmentConfig.off(), hflip=0.5, crop_padding=4)
    images = torch.randint(0, 256, (max(args.batch_sizes), 32, 32, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    generator = torch.Generator(device).manual_seed(0)
    threads = torch.get_num_threads()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"CPU, {threads} thread{'s' * (threads != 1)}, load {os.getloadavg()[0]:.1f}")
    print(f"{where}; torch {torch.__version__}, torchvision {torchvision.__version__}; "
          f"{datetime.date.today()}; base chain: {args.base}")
    print(f"| policy | batch | batched: ms per batch (median of {args.runs}) | images/s "
          "| torchvision, per image: ms per batch | images/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for batch_size in args.batch_sizes:
        batch = images[:batch_size]
        chains: dict[str, Callable[[], object]] = {}
        for policy in args.policies:
            aug = (dataclasses.replace(base, cutout=16) if policy == "cutout"
                   else dataclasses.replace(base, policy=policy))
            batched = BatchAugment(aug, MEAN, STD, device)
            chains[f"{policy} batched"] = lambda b=batch, f=batched: f(b, generator)
            if device.type == "cpu" and not args.skip_torchvision:
                reference = train_transform(aug, MEAN, STD)
                chains[f"{policy} torchvision"] = \
                    lambda b=batch, f=reference: [f(im) for im in b.permute(0, 3, 1, 2)]
        seconds = median_seconds(chains, device, args.runs)
        for policy in args.policies:
            cells = []
            for kind in ("batched", "torchvision"):
                t = seconds.get(f"{policy} {kind}")
                cells += ["-", "-"] if t is None else [f"{t * 1e3:.1f}",
                                                       f"{batch_size / t:,.0f}"]
            print(f"| {policy} | {batch_size} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
