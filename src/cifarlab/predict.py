"""Class probabilities for image files, from a checkpoint.

The checkpoint carries what prediction needs: the model's arguments and weights, the class
names and the normalisation measured on its training data. An image of any size becomes
the model's 32x32 input the way torchvision's evaluation transforms do it: converted to RGB
(alpha dropped), its shorter side resized to 32 pixels (bicubic, antialiased when
shrinking), then the centre 32x32 cropped. A 32x32 image is used as it is.

A deployed file (cifarlab export / quantize: `.onnx`, an OpenVINO `.xml`, an ExecuTorch
`.pte`) is used with its runtime alone (choice.choose: the fastest installed one by default):
its metadata holds the class names, its graph the normalisation; torch is not imported then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cifarlab.data.sources.images import SIZE, decode_image, read_regular_file
from cifarlab.errors import UserError

if TYPE_CHECKING:  # torch is imported only for checkpoints: an .onnx file needs onnxruntime
    import torch

BATCH = 256  # images per forward pass


@dataclass
class ImagePrediction:
    image: str  # the path as given
    predictions: list[tuple[str, float]]  # (class, probability), most probable first


def to_model_input(name: str, data: bytes) -> np.ndarray:
    """An image file's bytes -> uint8 (32, 32, 3) RGB, as the module docstring describes."""
    from PIL import Image

    rgb = decode_image(name, data)
    width, height = rgb.size
    if (width, height) != (SIZE, SIZE):
        # The shorter side scaled to 32 and the centre cropped, in one resize of the centre
        # box: scaling the whole image first would allocate the scaled long side, which for a
        # 10-megapixel-wide strip is gigabytes. PIL widens the filter when shrinking.
        scale = SIZE / min(width, height)
        size = (max(SIZE, round(width * scale)), max(SIZE, round(height * scale)))
        left, top = (size[0] - SIZE) // 2, (size[1] - SIZE) // 2
        sx, sy = size[0] / width, size[1] / height  # the scales of the rounded size
        box = (left / sx, top / sy, (left + SIZE) / sx, (top + SIZE) / sy)
        rgb = rgb.resize((SIZE, SIZE), Image.BICUBIC, box=box)
    return np.asarray(rgb, dtype=np.uint8)


def model_inputs(paths: Sequence[str | Path]) -> np.ndarray:
    """Image files -> uint8 (n, 32, 32, 3), each as `to_model_input` makes it."""
    return np.stack([to_model_input(str(p), read_regular_file(p, "image file")) for p in paths])


def predict_files(
    checkpoint_path: str | Path,
    images: Sequence[str | Path],
    *,
    topk: int = 3,
    device: torch.device | None = None,
    runtime: str = "auto",
) -> list[ImagePrediction]:
    """Softmax probabilities of each image's `topk` most probable classes (`topk` larger than
    the number of classes gives them all), from a checkpoint or a deployed file (in
    `runtime`, choice.CHOICES). UserError for a bad checkpoint or image file."""
    if topk < 1:
        raise UserError(f"--topk {topk}: give a number of classes >= 1")
    from cifarlab.deploy import choice

    if choice.is_deployed(checkpoint_path):
        return predict_deployed(choice.choose(checkpoint_path, runtime).model, images, topk)
    import torch

    from cifarlab import checkpoint
    from cifarlab.data.cpu_augment import normalize
    from cifarlab.evaluate import logits_of

    ckpt = checkpoint.load(checkpoint_path)
    device = device or torch.device("cpu")
    model = checkpoint.build_model(ckpt, checkpoint_path).to(device)
    classes = list(ckpt["classes"])
    pixels = model_inputs(images)
    k = min(topk, len(classes))
    results = []
    with torch.no_grad():
        for start in range(0, len(pixels), BATCH):
            batch = torch.from_numpy(pixels[start : start + BATCH]).to(device)
            x = normalize(batch, ckpt["mean"], ckpt["std"])
            probs = logits_of(model, x, checkpoint.tta_flip(ckpt),
                              checkpoint.tta_translate(ckpt)).float().softmax(1)
            top_p, top_i = probs.topk(k, dim=1)
            for j, (p_row, i_row) in enumerate(zip(top_p.tolist(), top_i.tolist(),
                                                   strict=True)):
                results.append(ImagePrediction(
                    str(images[start + j]),
                    [(classes[i], p) for i, p in zip(i_row, p_row, strict=True)],
                ))
    return results


def predict_deployed(model: Any, images: Sequence[str | Path], topk: int
                     ) -> list[ImagePrediction]:
    """Predictions of a deployed file opened in its runtime (choice.choose)."""
    from cifarlab.deploy.runtime import predict_onnx

    pixels = model_inputs(images)
    return [ImagePrediction(str(image), predictions) for image, predictions
            in zip(images, predict_onnx(model, pixels, topk), strict=True)]
