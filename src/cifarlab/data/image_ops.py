"""The image primitives both batch augmentation chains build on, the seed's chain
(gpu_augment.py) and the automatic policies (policies.py): on float32 images (N, C, H, W)
holding the uint8 values 0..255, torchvision's luma (`gray`), its uint8 `_blend` (`blend`)
and nearest-neighbour sampling at per-image inverse affine matrices with its `_affine_grid`
arithmetic (`warp`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def gray(x: torch.Tensor) -> torch.Tensor:
    """torchvision's luma of a uint8 image, floored: (N, 1, H, W)."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def blend(
    x: torch.Tensor, factor: torch.Tensor, ref: torch.Tensor, rest: torch.Tensor | None = None
) -> torch.Tensor:
    """torchvision's `_blend` on uint8 images: floor(clamp(x * f + ref * (1 - f))).

    `rest`: the float32 weight of `ref` when torchvision's `1 - f` is computed in float64
    from a factor that float32 cannot hold (then it differs from float32's 1 - f)."""
    f = _per_image(factor)
    rest = 1 - f if rest is None else _per_image(rest)
    # torchvision adds ref * (1 - f) with a fused multiply-add (one rounding, on CPU vector
    # units and CUDA); float64 keeps that single rounding, so floor() agrees bit for bit.
    mixed = torch.addcmul(x.mul(f).double(), ref.double(), rest.double()).float()
    return mixed.clamp_(0, 255).floor_()


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Sample each image (N, C, H, W) at its own inverse affine matrix `theta` (N, 2, 3),
    float32, in torchvision's pixel units about the centre (its `_get_inverse_affine_matrix`),
    with torchvision's `_affine_grid` arithmetic: nearest neighbour, zeros outside."""
    n, _, h, w = x.shape
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=x.device)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=x.device)
    one = torch.ones((), device=x.device)
    base = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None], one), -1)  # (H, W, 3)
    theta_t = theta.transpose(1, 2)
    scaled = torch.stack([theta_t[..., 0] / (0.5 * w), theta_t[..., 1] / (0.5 * h)], -1)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(scaled).view(n, h, w, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
