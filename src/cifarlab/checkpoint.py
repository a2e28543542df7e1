"""Checkpoint format: atomic saves and safe loads.

A checkpoint is a plain dict of tensors and built-in types, so it loads with
`weights_only=True` (no code can run when it is read):
    format, version    "cifarlab-checkpoint", 1
    model              state dict of the unwrapped model
    model_args         {"name", "num_classes", **arch_args}: `create_model`'s arguments
                       (plain types; older checkpoints hold {"name", "num_classes",
                       "width"}, which are a ResNet-18's arguments still)
    classes, mean, std what prediction needs: class names and the normalisation
    config             the run's resolved config (Config.to_dict())
    epoch, val_acc     the epoch (1-based) it was taken after, and its validation accuracy
    train_state        last.pt only: optimizer, scheduler, scaler, early stopping, RNG states
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from cifarlab.errors import UserError
from cifarlab.models import create_model

FORMAT = "cifarlab-checkpoint"
VERSION = 1
TMP_SUFFIX = ".tmp"


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that `path` always holds either its old or its new contents:
    a temporary file in the same folder, flush and fsync, rename over, fsync the folder.
    On any error the temporary file is removed and the old file is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_atomic(payload: dict[str, Any], path: str | Path) -> None:
    write_atomic(path, lambda f: torch.save(payload, f))


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Delete temporary files that a killed process left behind; return them."""
    leftovers = sorted(Path(folder).glob(f".*{TMP_SUFFIX}"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def load(path: str | Path) -> dict[str, Any]:
    """Read a cifarlab checkpoint with weights_only=True; UserError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or damaged files
        raise UserError(
            f"checkpoint {path}: not a readable cifarlab checkpoint ({_reason(e)})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"checkpoint {path}: not a cifarlab checkpoint (no '{FORMAT}' marker)")
    missing = {"model", "model_args", "classes", "mean", "std"} - set(ckpt)
    if missing:
        raise UserError(f"checkpoint {path}: incomplete, missing {sorted(missing)}")
    for name, tensor in ckpt["model"].items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(
            torch.isfinite(tensor).all()
        ):
            raise UserError(f"checkpoint {path}: weight '{name}' holds NaN or infinite values")
    return ckpt


def _reason(error: Exception) -> str:
    """The informative line of torch.load's error: for a refused pickle, what it asked for."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip()[:200]
    return (lines[0] if lines else type(error).__name__)[:200]


def build_model(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> nn.Module:
    """The checkpoint's model with its weights, in eval mode, on the CPU."""
    args = ckpt["model_args"]
    if len(ckpt["classes"]) != args["num_classes"]:
        raise UserError(f"checkpoint {path}: {len(ckpt['classes'])} class names for "
                        f"{args['num_classes']} outputs")
    try:
        model = create_model(**args)
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint {path}: cannot build {args['name']} from its model "
                        f"arguments ({str(e).splitlines()[0]})") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"checkpoint {path}: weights do not fit {args['name']} ({first})") from None
    return model.eval()


def tta_flip(ckpt: dict[str, Any]) -> bool:
    """Whether the checkpoint's run scored images with their mirror images (config.tta_flip)."""
    return bool(ckpt.get("config", {}).get("tta_flip", False))
