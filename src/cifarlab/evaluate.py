"""Accuracy, loss and confusion matrix of a model on a set of images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab import distributed
from cifarlab.data.cpu_augment import normalize
from cifarlab.data.sources.images import ImageSet
from cifarlab.devices import memory_format
from cifarlab.distributed import World
from cifarlab.interrupt import heartbeat


@dataclass
class Evaluation:
    loss: float  # mean of `criterion` over the images
    acc: float  # percent
    confusion: np.ndarray  # (classes, classes): rows are true classes, columns predictions

    @property
    def per_class_acc(self) -> list[float]:
        """Percent correct for each true class (NaN for a class with no images)."""
        totals = self.confusion.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return list(100.0 * np.diag(self.confusion) / totals)


def logits_of(model: nn.Module, x: torch.Tensor, flip: bool = False,
              translate: bool = False) -> torch.Tensor:
    """The model's logits for the batch `x`, with test-time augmentation: `flip`, the mean of
    the logits of each image and of its mirror image; `translate`, half of that and a
    quarter each of the same for the image shifted by one pixel up-left and down-right
    (reflected border)."""
    def views(images: torch.Tensor) -> torch.Tensor:
        logits = model(images)
        return (logits + model(images.flip(3))) / 2 if flip else logits

    logits = views(x)
    if translate:
        h, w = x.shape[2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = views(padded[:, :, :h, :w]) + views(padded[:, :, 2:, 2:])
        logits = logits / 2 + shifted / 4
    return logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ImageSet,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    *,
    batch_size: int = 1024,
    amp_dtype: torch.dtype | None = None,
    criterion: nn.Module | None = None,
    world: World | None = None,
    flip: bool = False,
    translate: bool = False,
) -> Evaluation:
    """`flip`, `translate`: test-time augmentation (logits_of).
    Under DDP (`world`) each rank scores every world.size-th image and the sums are
    added up, so that every rank returns the same numbers for the whole set."""
    criterion = criterion or nn.CrossEntropyLoss()
    world = world or World()
    n_classes = len(data.classes)
    images = torch.from_numpy(data.images[world.rank :: world.size])
    labels = torch.from_numpy(data.labels[world.rank :: world.size])
    # Sums stay on the device: one host synchronisation per evaluation, not per batch.
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(n_classes * n_classes, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    # The model's own layout: a channels-last model fed NCHW batches runs oneDNN's slower
    # path (measured 1.9x slower training steps on a 2-core CPU, BENCHMARKS.md).
    layout = memory_format(device, model)
    for start in range(0, len(labels), batch_size):
        x = normalize(images[start : start + batch_size].to(device, non_blocking=True), mean, std)
        x = x.contiguous(memory_format=layout)
        y = labels[start : start + batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = logits_of(model, x, flip, translate)
        loss_sum += criterion(logits.float(), y) * len(y)
        confusion += torch.bincount(y * n_classes + logits.argmax(1), minlength=n_classes**2)
        heartbeat()
    model.train(was_training)
    distributed.all_reduce(loss_sum)
    distributed.all_reduce(confusion)
    matrix = confusion.view(n_classes, n_classes).cpu().numpy()
    n = max(1, len(data.labels))
    return Evaluation(float(loss_sum) / n, 100.0 * float(np.trace(matrix)) / n, matrix)
