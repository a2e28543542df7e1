"""Structured channel pruning with Torch-Pruning (DepGraph), then fine-tuning.

`prune_model` removes whole channels from a trained model: torch-pruning's dependency graph
finds the layers whose channels must go together (a residual stream, a concatenation), an
importance (magnitude: L2 norm of the group's weights; taylor: |weight x gradient| on a few
training batches; bn-scale: |BatchNorm gamma|) ranks them, and every layer but the final
classifier loses the same fraction of its channels, in `steps` rounds that re-rank in
between, each layer keeping a multiple of `round_to` channels (fast kernels). A target in
MACs or parameters (a fraction of the parent's, counted as `cifarlab summary` counts them)
is reached by bisection over that fraction, pruning a fresh copy each time, so the result
is at or just below the target.

`prune_run` is the command: it prunes a checkpoint, fine-tunes the result with `train.fit`
(an ordinary run folder: metrics, report, best.pt, last.pt, --resume) and writes
`prune.json` beside it: MACs, parameters, validation accuracy and measured CPU latency of
the parent and of the pruned model, the layers' channel counts and the settings. The
checkpoints hold the pruned architecture as data (models/registry.py, LAYERS).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarlab import checkpoint
from cifarlab.config import Config
from cifarlab.data.cpu_augment import normalize
from cifarlab.data.sources import named_source
from cifarlab.devices import memory_format
from cifarlab.errors import UserError, import_package
from cifarlab.models import LAYERS, MODELS, architecture
from cifarlab.profile import model_size

log = logging.getLogger("cifarlab")

IMPORTANCES = ("magnitude", "taylor", "bn-scale")
MEASURES = ("macs", "params")
MAX_STEPS = 100  # pruning rounds
NOISY_SPREAD = 1.5  # p90 / median of batch-1 latency above which a speed-up means nothing
MAX_ROUND_TO = 1024  # channels: no layer of the zoo is wider
PRUNE_JSON = "prune.json"
SEARCH_ROUNDS = 12  # bisection rounds: the fraction of channels to within 1 / 2^12
TAYLOR_BATCHES, TAYLOR_BATCH_SIZE = 4, 64  # training images that rank channels by taylor


@dataclass
class Pruned:
    model: nn.Module
    model_args: dict[str, Any]  # rebuilds it: the parent's base arguments plus LAYERS
    ratio: float  # fraction of each layer's channels removed
    macs: int
    params: int


def check_target(measure: str, fraction: float) -> None:
    if measure not in MEASURES and measure != "ratio":
        raise ValueError(f"unknown target measure {measure!r}")
    flag, meaning = {"macs": ("--target-macs", "of the parent's MACs to keep"),
                     "params": ("--target-params", "of the parent's parameters to keep"),
                     "ratio": ("--ratio", "of each layer's channels to remove")}[measure]
    if not 0.0 < fraction < 1.0:
        raise UserError(f"{flag} {fraction:g}: cannot be reached; give a fraction {meaning}, "
                        f"between 0 and 1 (e.g. {flag} 0.5)")


# He et al.'s CIFAR ResNets widen their residual stream by zero-padding (option A), which
# torch-pruning's dependency graph cannot follow: pruning in steps breaks the model.
UNSUPPORTED = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")


def supported() -> list[str]:
    return [name for name in MODELS if name not in UNSUPPORTED]


def check_architecture(model_args: dict[str, Any], path: str | Path) -> None:
    name = model_args.get("name")
    if name not in MODELS or name in UNSUPPORTED:
        kind = "zero-padding shortcuts cannot be pruned" if name in MODELS else "unknown"
        raise UserError(f"checkpoint {path}: architecture {name!r}: {kind}; prune supports "
                        f"{', '.join(supported())}")


def without_paths(saved: Config) -> Config:
    """The checkpoint's recorded settings as a fine-tuning recipe, less every path in them.
    A checkpoint may come from someone else: the folders and files it names (its run's
    `out`, data root, data and test data on disk, teacher) are where that run read and
    wrote, never places to read or write now. The defaults stand in for them; the user's
    flags name others. A data source on disk becomes the default too, which the caller
    refuses unless the user gives the data (`recorded_data_path`)."""
    defaults = Config()
    data = dataclasses.replace(
        saved.data, root=defaults.data.root,
        source=saved.data.source if named_source(saved.data.source) else defaults.data.source,
        test_source=(saved.data.test_source if named_source(saved.data.test_source)
                     else defaults.data.test_source))
    return dataclasses.replace(saved, out=defaults.out, data=data,
                               distill=dataclasses.replace(saved.distill, teacher=""))


def recorded_data_path(saved: Config) -> str | None:
    """The data path the checkpoint's run was trained on, if it was a path."""
    return None if named_source(saved.data.source) else saved.data.source


def classifier(model: nn.Module) -> nn.Module:
    """The final Linear layer, which keeps its outputs (one per class)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("the model has no Linear classifier; prune cannot keep its outputs")
    return linears[-1]


def _torch_pruning() -> Any:
    return import_package("torch_pruning", "torch-pruning", "prune",
                          "pip install 'cifarlab[compress]'")


def _importance(kind: str) -> Any:
    tp = _torch_pruning()

    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    if kind == "bn-scale":
        return tp.importance.BNScaleImportance()
    raise UserError(f"--importance {kind}: unknown; choose one of {', '.join(IMPORTANCES)}")


def _gradients(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Accumulate the loss gradient of `batches` in the weights (taylor importance). In eval
    mode, so BatchNorm's running statistics stay; in the layout training uses on the CPU
    (devices.memory_format: NCHW where oneDNN's channels-last gradient is wrong)."""
    layout = memory_format("cpu", model)
    model.eval().to(memory_format=layout)
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        nn.functional.cross_entropy(model(x.to(memory_format=layout)), y).backward()


def prune_copy(model: nn.Module, base_args: dict[str, Any], ratio: float, importance: str,
               steps: int, round_to: int,
               batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> Pruned:
    """A copy of `model` with a fraction `ratio` of each layer's channels removed."""
    tp = _torch_pruning()

    pruned = copy.deepcopy(model).cpu().eval()
    example = torch.randn(1, 3, 32, 32)
    head = classifier(pruned)
    # Frozen layers (airbench's whitening filters, set from data) keep their channels.
    frozen = [m for m in pruned.modules()
              if isinstance(m, nn.Conv2d) and not m.weight.requires_grad]
    ratios = {m: layer_ratio(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features,
                             ratio, round_to)
              for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
              and m is not head and m not in frozen}
    with warnings.catch_warnings():  # torch-pruning's notes on layers it leaves alone
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            pruned, example, importance=_importance(importance), pruning_ratio=ratio,
            pruning_ratio_dict=ratios, iterative_steps=steps, ignored_layers=[head, *frozen])
        for _ in range(steps):
            if importance == "taylor":
                _gradients(pruned, batches)
            pruner.step()
    pruned.zero_grad(set_to_none=True)
    pruned = pruned.to(memory_format=torch.contiguous_format).eval()
    args = architecture(pruned, base_args)
    size = model_size(args)
    return Pruned(pruned, args, ratio, size.macs, size.params)


def layer_ratio(channels: int, ratio: float, round_to: int) -> float:
    """The fraction of a layer's `channels` to remove so that it keeps the multiple of
    `round_to` nearest to (1 - ratio) x channels, at least `round_to`. (torch-pruning's own
    round_to rounds down, so that every layer of a CIFAR ResNet drops a whole multiple at
    once and a MAC target is missed by far.)"""
    keep = max(round_to, math.floor(channels * (1 - ratio) / round_to + 0.5) * round_to)
    # +0.5: torch-pruning keeps int(channels x (1 - fraction)) channels
    return 0.0 if keep >= channels else 1.0 - (keep + 0.5) / channels


def prune_model(model: nn.Module, model_args: dict[str, Any], measure: str, fraction: float,
                importance: str = "magnitude", steps: int = 1, round_to: int = 8,
                batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> Pruned:
    """Prune `model` (built from `model_args`) to `fraction` of its MACs or parameters
    (`measure` "macs" or "params", the largest model at or below it), or with `measure`
    "ratio" remove that fraction of each layer's channels. UserError when the target
    cannot be reached."""
    check_target(measure, fraction)
    check_architecture(model_args, "given")
    base_args = {k: v for k, v in model_args.items() if k != LAYERS}
    if measure == "ratio":
        return prune_copy(model, base_args, fraction, importance, steps, round_to, batches)
    before = model_size(model_args)
    goal = fraction * getattr(before, measure)

    def attempt(ratio: float) -> Pruned:
        return prune_copy(model, base_args, ratio, importance, steps, round_to, batches)

    best = attempt(1.0)  # every layer down to round_to channels
    if getattr(best, measure) > goal:
        smallest = getattr(best, measure) / getattr(before, measure)
        flag = "--target-macs" if measure == "macs" else "--target-params"
        raise UserError(f"{flag} {fraction:g}: cannot be reached; with channels in multiples "
                        f"of {round_to} the smallest pruned model keeps {smallest:.3f} of the "
                        f"parent's {measure}; give a larger {flag} or a smaller --round-to")
    low, high = 0.0, best.ratio
    for _ in range(SEARCH_ROUNDS):
        middle = (low + high) / 2
        candidate = attempt(middle)
        if getattr(candidate, measure) <= goal:
            best, high = candidate, middle
        else:
            low = middle
    return best


def taylor_batches(images: np.ndarray, labels: np.ndarray, mean: Sequence[float],
                   std: Sequence[float], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few normalised batches of training images, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    count = min(len(labels), TAYLOR_BATCHES * TAYLOR_BATCH_SIZE)
    picked = rng.permutation(len(labels))[:count]
    batches = []
    for start in range(0, count, TAYLOR_BATCH_SIZE):
        index = picked[start : start + TAYLOR_BATCH_SIZE]
        x = normalize(torch.from_numpy(images[index]), mean, std)
        batches.append((x, torch.from_numpy(labels[index])))
    return batches


def channels(model_args: dict[str, Any], parent_args: dict[str, Any]) -> dict[str, list[int]]:
    """Output channels of each convolution whose count changed: {layer: [before, after]}."""
    from cifarlab.models import create_model
    from cifarlab.models.registry import layer_shapes

    with torch.device("meta"):
        before = layer_shapes(create_model(**parent_args))
        after = layer_shapes(create_model(**model_args))
    return {name: [before[name][1], shape[1]] for name, shape in after.items()
            if len(shape) == 3 and shape[1] != before[name][1]}


def measure_latency(model: nn.Module) -> dict[str, Any]:
    """CPU latency (batch 1, median and p90, ms) and throughput (batch 64, images/s) of
    `model` in eager PyTorch, timed as `cifarlab bench` times a checkpoint, with the load
    average (1, 5, 15 minutes) just before."""
    from cifarlab.deploy.bench import time_module, timing_images

    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    return {**asdict(time_module(model.cpu().eval(), timing_images())), "load_average": load}


def noisy(latency: dict[str, Any]) -> bool:
    """Whether a batch-1 latency spread too widely to compare (p90 over NOISY_SPREAD times
    the median: other work took the CPU during the measurement)."""
    return latency["latency_p90_ms"] > NOISY_SPREAD * latency["latency_ms"]


def prune_run(path: str | Path, config: Config, measure: str, fraction: float,
              importance: str = "magnitude", steps: int = 1, round_to: int = 8) -> Path:
    """Prune the checkpoint at `path` and fine-tune it with `config` (the checkpoint's own
    settings with the caller's changes) into a new run folder; return its path."""
    from cifarlab.data.splits import prepare_splits
    from cifarlab.evaluate import evaluate
    from cifarlab.rundir import check_run_dir, run_dir_for
    from cifarlab.train import fit

    check_target(measure, fraction)
    _importance(importance)
    if not 1 <= steps <= MAX_STEPS:  # each round ranks and prunes the whole network again
        raise UserError(f"--steps {steps}: must be from 1 to {MAX_STEPS}; e.g. --steps 1")
    if not 1 <= round_to <= MAX_ROUND_TO:
        raise UserError(f"--round-to {round_to}: must be from 1 to {MAX_ROUND_TO}; e.g. "
                        "--round-to 8")
    ckpt = checkpoint.load(path)
    check_architecture(ckpt["model_args"], path)
    parent = checkpoint.build_model(ckpt, path)
    if ckpt["model_args"]["name"] != config.model.name:
        raise UserError(f"--set model.name={config.model.name}: the checkpoint is a "
                        f"{ckpt['model_args']['name']}; prune keeps its architecture")
    config = dataclasses.replace(config, name=run_dir_for(config).name)
    run_dir = run_dir_for(config)
    check_run_dir(run_dir)  # before any work: nothing is written for a used folder
    splits = prepare_splits(config.data)
    if splits.classes != ckpt["classes"]:
        raise UserError(f"--data {config.data.source}: classes {splits.classes} are not the "
                        f"checkpoint's {ckpt['classes']}; give data of the same classes")
    cpu = torch.device("cpu")
    tta = {"flip": checkpoint.tta_flip(ckpt), "translate": checkpoint.tta_translate(ckpt)}

    def val_acc(model: nn.Module) -> float:
        return evaluate(model, splits.val, ckpt["mean"], ckpt["std"], cpu, **tta).acc

    batches = (taylor_batches(splits.train.images, splits.train.labels, ckpt["mean"],
                              ckpt["std"], config.seed) if importance == "taylor" else ())
    before = model_size(ckpt["model_args"])
    pruned = prune_model(parent, ckpt["model_args"], measure, fraction, importance, steps,
                         round_to, batches)
    log.info(f"pruned {ckpt['model_args']['name']}: {pruned.ratio:.3f} of each layer's "
             f"channels removed; MACs {before.macs:,} -> {pruned.macs:,}, parameters "
             f"{before.params:,} -> {pruned.params:,}")
    summary = {
        "parent": str(path),
        "parent_run_id": ckpt.get("run_id"),
        "importance": importance,
        "steps": steps,
        "round_to": round_to,
        "target": {"measure": measure, "fraction": fraction},
        "channel_ratio": pruned.ratio,
        "achieved": {"macs": pruned.macs / before.macs, "params": pruned.params / before.params},
        "threads": torch.get_num_threads(),
        "before": {"macs": before.macs, "params": before.params, "val_acc": val_acc(parent),
                   **measure_latency(parent)},
        "after": {"macs": pruned.macs, "params": pruned.params,
                  "val_acc_before_finetune": val_acc(pruned.model),
                  **measure_latency(pruned.model)},
        "channels": channels(pruned.model_args, ckpt["model_args"]),
        "model_args": pruned.model_args,
    }
    summary["latency_noisy"] = noisy(summary["before"]) or noisy(summary["after"])
    if summary["latency_noisy"]:
        b, a = summary["before"], summary["after"]
        log.warning(f"the CPU latencies are noisy (p90 {b['latency_p90_ms']:.1f} ms against a "
                    f"{b['latency_ms']:.1f} ms median before pruning, {a['latency_p90_ms']:.1f} "
                    f"against {a['latency_ms']:.1f} after; load average "
                    f"{b['load_average'][0] if b['load_average'] else '?'}): their ratio says "
                    "little; measure again on an idle machine with cifarlab bench")

    def write() -> None:
        text = json.dumps(summary, indent=2) + "\n"
        checkpoint.write_atomic(run_dir / PRUNE_JSON, lambda f: f.write(text.encode()))

    # prune.json goes in after the first epoch (the run folder exists from then on), so the
    # run's report, written at its end or on --resume, has it.
    result = fit(config, initial={"model_args": pruned.model_args,
                                  "model": pruned.model.state_dict()},
                 on_epoch=lambda epoch, row: write() if epoch == 1 else None)
    summary["finetuned"] = {"best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch,
                            "test_acc": result.test_acc, "epochs": result.epochs_run}
    write()
    return run_dir
