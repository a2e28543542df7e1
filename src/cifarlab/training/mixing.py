"""mixup and CutMix on whole batches (as timm's data/mixup.py), with soft targets.

Each batch is mixed with itself in reverse order, with one lambda for the batch:
- mixup (Zhang et al., 2018): images lambda * x + (1 - lambda) * x[::-1];
- CutMix (Yun et al., 2019): a box of about (1 - lambda) of the area, centred anywhere and
  clipped at the borders, is pasted from x[::-1]; lambda is then corrected to the share of
  the image that was not pasted over.
The targets are mixed alike, after label smoothing: each one-hot target is smoothed first
(1 - s + s / classes on the label, s / classes elsewhere), then mixed. Both are affine maps
whose weights sum to 1, so the order does not change the targets; smoothing first is timm's.

Every random draw (apply or not, mixup or CutMix, lambda, the box) is made on the host from
a generator seeded by (seed, epoch, step, rank): nothing is read back from the device, and a
resumed run draws exactly what the uninterrupted run drew at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.config import MixConfig

Box = tuple[int, int, int, int]  # top, bottom, left, right (rows top:bottom, cols left:right)


@dataclass(frozen=True)
class Draw:
    """One batch's random choices."""

    lam: float  # weight of the batch itself (1: unmixed); corrected for CutMix's clipped box
    box: Box | None  # CutMix's pasted box; None for mixup or no mixing


def soft_targets(labels: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing, (batch, classes) float32. A scatter, not
    F.one_hot, which checks the labels' range by reading them back."""
    off = smoothing / classes
    targets = torch.full((len(labels), classes), off, device=labels.device)
    return targets.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against target distributions (batch, classes), averaged over the batch."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def cutmix_box(lam: float, height: int, width: int, rng: np.random.Generator) -> Box:
    """A box of about (1 - lam) of the image's area, its centre uniform over the image,
    clipped at the borders (so it can be smaller)."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return int(top), int(bottom), int(left), int(right)


class Mixer:
    """mixup and/or CutMix: `mixer(x, y, epoch, step)` -> (mixed images, soft targets,
    dominant labels). The dominant label of an image is the one with the larger weight
    (its own when lambda >= 0.5); training accuracy is counted against it."""

    def __init__(self, mix: MixConfig, classes: int, label_smoothing: float, seed: int,
                 rank: int = 0) -> None:
        self.mix, self.classes, self.smoothing = mix, classes, label_smoothing
        self.seed, self.rank = seed, rank

    def draw(self, epoch: int, step: int, height: int, width: int) -> Draw:
        """The choices for the batch of `step` (0-based) in `epoch`: a pure function of
        (seed, epoch, step, rank)."""
        rng = np.random.default_rng([self.seed, epoch, step, self.rank])
        mixup, cutmix = self.mix.mixup_alpha > 0, self.mix.cutmix_alpha > 0
        if rng.random() >= self.mix.prob or not (mixup or cutmix):
            return Draw(1.0, None)
        use_cutmix = cutmix and (not mixup or rng.random() < self.mix.switch_prob)
        alpha = self.mix.cutmix_alpha if use_cutmix else self.mix.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not use_cutmix:
            return Draw(lam, None)
        box = cutmix_box(lam, height, width, rng)
        top, bottom, left, right = box
        return Draw(1.0 - (bottom - top) * (right - left) / (height * width), box)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        draw = self.draw(epoch, step, x.shape[-2], x.shape[-1])
        targets = soft_targets(y, self.classes, self.smoothing)
        if draw.lam == 1.0:
            return x, targets, y
        partner = x.flip(0)
        if draw.box is None:
            x = x * draw.lam + partner * (1.0 - draw.lam)
        else:
            top, bottom, left, right = draw.box
            x = x.clone()
            x[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        targets = targets * draw.lam + targets.flip(0) * (1.0 - draw.lam)
        return x, targets, y if draw.lam >= 0.5 else y.flip(0)


def no_mixing(x: torch.Tensor, y: torch.Tensor, epoch: int, step: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch as it is: images, the labels as targets, and the labels."""
    return x, y, y


def build_mixer(mix: MixConfig, classes: int, label_smoothing: float, seed: int, rank: int
                ) -> tuple[Mixer | None, nn.Module]:
    """The mixer (None when mixup and CutMix are off) and the training loss that goes with
    it: soft-target cross-entropy when mixing, else cross-entropy with label smoothing."""
    if (mix.mixup_alpha == 0 and mix.cutmix_alpha == 0) or mix.prob == 0:
        return None, nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    return Mixer(mix, classes, label_smoothing, seed, rank), SoftTargetCrossEntropy()
