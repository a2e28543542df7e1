"""Knowledge distillation (Hinton et al., 2015): a student learns from a trained teacher's
softened outputs as well as from the labels.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + (1 - alpha) * the run's own loss

The KL term is averaged over the batch (`batchmean`, the true mean KL divergence); the T^2
keeps its gradients on the scale of the run's own loss as T changes (the soft targets'
gradients shrink as 1 / T^2). The run's own loss is the one training/mixing.py builds:
cross-entropy with label smoothing, or soft-target cross-entropy under mixup/CutMix, whose
mixed images the teacher sees too.

The teacher is a cifarlab checkpoint (any model of the zoo, pruned ones included, since
its architecture is in its model_args). It is frozen (requires_grad False, eval mode, run
under torch.no_grad) and is never wrapped in DDP nor saved in the student's checkpoints:
last.pt records only who it was (`identity`), so that a resumed run can be checked to
distil from the same teacher. It must predict the student's classes, in the same order,
and have been trained with the student's normalisation: the mean and std are measured on
the training split, so they agree when both runs drew the same split of the same data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab import checkpoint
from cifarlab.data.splits import Splits
from cifarlab.devices import memory_format
from cifarlab.errors import UserError

# The mean and std measured on the same split agree to float rounding; those of another
# subset or split of the same images differ by far more.
NORMALISATION_TOLERANCE = 1e-5
# The data settings that decide the training split, hence the normalisation.
SPLIT_SETTINGS = ("source", "limit", "val_fraction", "split_seed", "label_set", "resize")


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
            ) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch, in
    float32 whatever the autocast dtype of the logits."""
    t = temperature
    student = F.log_softmax(logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * (t * t)


class DistillLoss(nn.Module):
    """`alpha * kd_loss + (1 - alpha) * criterion(logits, targets)`; called with
    (logits, teacher_logits, targets), the targets being what `criterion` takes (labels,
    or soft targets under mixup/CutMix)."""

    def __init__(self, criterion: nn.Module, temperature: float, alpha: float) -> None:
        super().__init__()
        self.criterion, self.temperature, self.alpha = criterion, temperature, alpha

    def forward(self, logits: torch.Tensor, teacher_logits: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        own = self.criterion(logits, targets)
        if self.alpha == 0:
            return own
        soft = kd_loss(logits, teacher_logits, self.temperature)
        return self.alpha * soft + (1 - self.alpha) * own


@dataclass
class Teacher:
    """A frozen teacher on the student's device, and who it is."""

    model: nn.Module
    identity: dict[str, Any]  # path, run_id, sha256, model, model_args, epoch, val_acc
    split_val_acc: float | None = None  # percent, on the student's validation split

    def summary(self) -> dict[str, Any]:
        """What result.json says about the teacher."""
        return {**self.identity, "val_acc_on_student_split": self.split_val_acc}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_teacher(given: str, splits: Splits, data_settings: dict[str, Any],
                 device: torch.device) -> Teacher:
    """The teacher of `given` (a checkpoint, or a run folder's best.pt), checked against
    the student's data: the same classes in the same order, the same normalisation.
    `data_settings` are the student's config.data, named in the message when they differ
    from the teacher's. UserError otherwise, before anything is written."""
    where = f"--teacher {given}"
    try:
        path = checkpoint.in_run_folder(given)
        ckpt = checkpoint.load(path)
        model = checkpoint.build_model(ckpt, path)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if list(ckpt["classes"]) != list(splits.classes):
        same_set = sorted(ckpt["classes"]) == sorted(splits.classes)
        raise UserError(
            f"{where}: the teacher predicts the classes {ckpt['classes']}, the student's data "
            f"has {splits.classes}{' (the same names in another order)' if same_set else ''}; "
            "distil from a teacher trained on the student's data")
    check_normalisation(where, ckpt, splits, data_settings)
    model = model.to(device, memory_format=memory_format(device, model)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    identity = {
        "path": str(path),
        "run_id": ckpt.get("run_id"),
        "sha256": file_sha256(path),
        "model": ckpt["model_args"]["name"],
        "model_args": ckpt["model_args"],
        "epoch": ckpt.get("epoch"),
        "val_acc": ckpt.get("val_acc"),
    }
    return Teacher(model, identity)


def check_normalisation(where: str, ckpt: dict[str, Any], splits: Splits,
                        data_settings: dict[str, Any]) -> None:
    """Refuse a teacher whose normalisation differs from the student's measured one: it
    was trained on other images (another source, limit or split), and would see the
    student's batches shifted; name the data settings that differ."""
    theirs = [*ckpt["mean"], *ckpt["std"]]
    ours = [*splits.mean, *splits.std]
    if len(theirs) == len(ours) and all(
            abs(a - b) <= NORMALISATION_TOLERANCE for a, b in zip(theirs, ours, strict=True)):
        return
    teacher_data = (ckpt.get("config") or {}).get("data") or {}
    differing = [f"data.{k}={teacher_data[k]!r} (this run: {data_settings.get(k)!r})"
                 for k in SPLIT_SETTINGS
                 if k in teacher_data and teacher_data[k] != data_settings.get(k)]
    fix = ("train the student with the teacher's data settings: " + ", ".join(differing)
           if differing else "train the student on the teacher's data and split")
    shown = ", ".join(f"{v:.4f}" for v in ckpt["mean"])
    measured = ", ".join(f"{v:.4f}" for v in splits.mean)
    raise UserError(f"{where}: the teacher was trained on other images (its normalisation "
                    f"mean {shown}, this run's training split {measured}); {fix}")


def check_same_teacher(run_dir: str | Path, given: str) -> None:
    """Refuse to resume the distilled run `run_dir` with another teacher than the one it
    started with (the file at `given` changed since). Missing files are left to the checks
    that follow, which name them."""
    last, path = Path(run_dir) / "last.pt", Path(given)
    if not last.is_file() or not path.exists():
        return
    saved = checkpoint.load(last).get("train_state", {}).get("teacher")
    path = checkpoint.in_run_folder(path)
    if saved is None:
        raise UserError(f"--resume {run_dir}: the run trained without a teacher; add "
                        "--allow-changes to distil from now on")
    now = file_sha256(path)
    if saved["sha256"] != now:
        raise UserError(f"--resume {run_dir}: the teacher changed (the run started with "
                        f"{saved['path']}, sha256 {saved['sha256'][:12]}; {path} now has "
                        f"sha256 {now[:12]}); put the run's teacher back, or add "
                        "--allow-changes to go on with this one")


def describe(teacher: Teacher) -> str:
    """One line about the teacher, for the log."""
    identity, split_val_acc = teacher.identity, teacher.split_val_acc
    own = identity.get("val_acc")
    own_text = f"{own:.2f}% on its own validation split, " if own is not None else ""
    return (f"teacher {identity['path']}: {identity['model']} (run {identity['run_id']}, "
            f"epoch {identity['epoch']}); {own_text}{split_val_acc:.2f}% on this run's "
            "validation split")
