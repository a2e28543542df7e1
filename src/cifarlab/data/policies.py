"""Automatic augmentation policies, drawn per image and applied to whole batches on any device:
TrivialAugmentWide, RandAugment, AutoAugment (its CIFAR-10 policy), and Cutout.

torchvision's versions draw one op and one magnitude per call, so a batch passed to them gets
one transform. Here every image draws its own op, magnitude bin and sign, and a batch is
augmented at once: all images go through every op of a stage (one affine resampling serves
the five geometric ops, one blend serves Brightness, Color and Contrast) and each keeps the
result of its own op (masked selection). There is no loop over images and no host
synchronisation, so the policies run where the data set lives (data/resident.py).

Each op reproduces torchvision's functional op as the policies' `_apply_op` calls it
(torchvision.transforms.v2.functional: affine with its shear about the top-left corner and
integer translations, rotate, adjust_*, posterize, solarize, autocontrast, equalize,
invert; nearest neighbour, fill 0), with the magnitude bins of each policy's
`_AUGMENTATION_SPACE`, exactly on uint8 images on the CPU (tests/test_policies.py). Images
are float32 tensors holding the uint8 values 0..255, as in gpu_augment.py; each op floors to
whole values as torchvision does when it returns uint8.

Ops are split as in gpu_augment.py: `Policy.draw` draws a batch's ops and magnitudes from a
`torch.Generator`, `apply_op` applies given ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cifarlab.data.image_ops import _per_image, blend, gray, warp
from cifarlab.settings_rules import POLICIES

NUM_BINS = 31  # TrivialAugmentWide's and RandAugment's magnitude bins (torchvision's default)
AUTOAUGMENT_BINS = 10

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
       "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
       "Invert")
(IDENTITY, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE, BRIGHTNESS, COLOR, CONTRAST,
 SHARPNESS, POSTERIZE, SOLARIZE, AUTOCONTRAST, EQUALIZE, INVERT) = range(len(OPS))
# TrivialAugmentWide and RandAugment pick uniformly among these (all but Invert).
SEARCHED_OPS = 14
# Ops whose magnitude gets a random sign (torchvision's `signed`).
SIGNED = frozenset(range(SHEAR_X, SHARPNESS + 1))

# torchvision's AutoAugmentPolicy.CIFAR10: 25 sub-policies of two (op, probability, bin).
AUTOAUGMENT_CIFAR10 = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)


def magnitudes(policy: str, size: tuple[int, int]) -> torch.Tensor:
    """(len(OPS), bins) float32: each op's magnitude per bin, as the policy's
    `_AUGMENTATION_SPACE` in torchvision lists them for images of `size` (H, W); 0 for the
    ops without a magnitude. TrivialAugmentWide has the wider ranges."""
    h, w = size
    bins = AUTOAUGMENT_BINS if policy == "autoaugment" else NUM_BINS
    wide = policy == "trivialaugment"

    def linspace(start: float, end: float) -> torch.Tensor:
        return torch.linspace(start, end, bins)

    table = torch.zeros(len(OPS), bins)
    table[SHEAR_X] = table[SHEAR_Y] = linspace(0.0, 0.99 if wide else 0.3)
    table[TRANSLATE_X] = linspace(0.0, 32.0 if wide else 150.0 / 331.0 * w)
    table[TRANSLATE_Y] = linspace(0.0, 32.0 if wide else 150.0 / 331.0 * h)
    table[ROTATE] = linspace(0.0, 135.0 if wide else 30.0)
    for op in (BRIGHTNESS, COLOR, CONTRAST, SHARPNESS):
        table[op] = linspace(0.0, 0.99 if wide else 0.9)
    span = 6 if wide else 4
    table[POSTERIZE] = (8 - (torch.arange(bins) / ((bins - 1) / span))).round().int().float()
    table[SOLARIZE] = linspace(1.0, 0.0)
    return table


@dataclass
class PolicyParams:
    """One batch's draws: stage s applies op `ops[s, i]` with `magnitudes[s, i]` to image i."""

    ops: torch.Tensor  # (S, N) int64 op ids (IDENTITY where a sub-policy's op is skipped)
    magnitudes: torch.Tensor  # (S, N) float32, signed; 0 for ops without a magnitude


class Policy:
    """A policy ("trivialaugment", "randaugment" or "autoaugment") for batches on `device`.

    - trivialaugment: one op per image, uniform over the 14 ops, a uniform bin of 31;
    - randaugment: `num_ops` ops in a row, each uniform over the 14 ops, at bin `magnitude`
      of 31;
    - autoaugment: one of the 25 CIFAR-10 sub-policies; each of its two ops with its own
      probability, at its bin of 10.
    Signed magnitudes are negated with probability 1/2, independently per op and image.
    """

    def __init__(self, policy: str, num_ops: int = 2, magnitude: int = 9,
                 device: torch.device | str = "cpu") -> None:
        if policy not in POLICIES[1:]:
            raise ValueError(f"unknown policy {policy!r}")
        self.policy, self.num_ops, self.magnitude = policy, num_ops, magnitude
        self.device = torch.device(device)
        self.signed = torch.tensor([op in SIGNED for op in range(len(OPS))], device=device)
        sub = [[(OPS.index(name), p, b or 0) for name, p, b in pair]
               for pair in AUTOAUGMENT_CIFAR10]
        self.sub_ops = torch.tensor([[o for o, _, _ in s] for s in sub], device=device)
        self.sub_p = torch.tensor([[p for _, p, _ in s] for s in sub], device=device)
        self.sub_bins = torch.tensor([[b for _, _, b in s] for s in sub], device=device)
        self._tables: dict[tuple[int, int], torch.Tensor] = {}

    def table(self, size: tuple[int, int]) -> torch.Tensor:
        """`magnitudes` for this policy, on the device (built once per image size)."""
        if size not in self._tables:
            self._tables[size] = magnitudes(self.policy, size).to(self.device)
        return self._tables[size]

    def draw(self, n: int, size: tuple[int, int], generator: torch.Generator) -> PolicyParams:
        """Ops and magnitudes for `n` images of `size` (H, W), on the generator's device."""
        dev = generator.device
        table = self.table(size)
        if self.policy == "autoaugment":
            chosen = torch.randint(0, len(AUTOAUGMENT_CIFAR10), (n,), generator=generator,
                                   device=dev)
            ops, bins = self.sub_ops[chosen].T, self.sub_bins[chosen].T
            # torchvision applies an op when rand() <= p.
            applied = torch.rand((2, n), generator=generator, device=dev) <= self.sub_p[chosen].T
        else:
            stages = 1 if self.policy == "trivialaugment" else self.num_ops
            ops = torch.randint(0, SEARCHED_OPS, (stages, n), generator=generator, device=dev)
            if self.policy == "trivialaugment":
                bins = torch.randint(0, table.shape[1], (stages, n), generator=generator,
                                     device=dev)
            else:
                bins = torch.full_like(ops, self.magnitude)
            applied = None
        negate = torch.rand(ops.shape, generator=generator, device=dev) <= 0.5
        values = table[ops, bins]
        values = torch.where(negate & self.signed[ops], -values, values)
        if applied is not None:
            ops = torch.where(applied, ops, IDENTITY)
            values = torch.where(applied, values, 0.0)
        return PolicyParams(ops, values)

    def apply(self, x: torch.Tensor, params: PolicyParams) -> torch.Tensor:
        """Float images (N, C, H, W) holding 0..255 -> the same, each image through its ops."""
        for ops, values in zip(params.ops, params.magnitudes, strict=True):
            x = apply_op(x, ops, values)
        return x


# --- the ops ----------------------------------------------------------------------------------

def affine_matrix(op: torch.Tensor, magnitude: torch.Tensor, size: tuple[int, int]
                  ) -> torch.Tensor:
    """(N, 2, 3) float32: the inverse affine matrix torchvision samples each image with for
    its geometric op (the identity for the other ops), computed as its
    `_get_inverse_affine_matrix` does, in float64, in the same order of operations.

    ShearX/ShearY: `affine(shear=degrees(atan(m)), center=[0, 0])`, about the top-left corner;
    TranslateX/Y: `affine(translate=int(m))`; Rotate: `rotate(m)`, i.e. the matrix of -(m % 360).
    """
    h, w = size
    m = magnitude.double()
    zero = torch.zeros_like(m)
    angle = torch.where(op == ROTATE, torch.remainder(m, 360.0).neg(), zero)
    shear = torch.atan(m) * (180.0 / math.pi)  # math.degrees
    shear_x, shear_y = torch.where(op == SHEAR_X, shear, zero), torch.where(op == SHEAR_Y, shear,
                                                                           zero)
    shift = torch.trunc(m)
    tx, ty = torch.where(op == TRANSLATE_X, shift, zero), torch.where(op == TRANSLATE_Y, shift,
                                                                      zero)
    sheared = (op == SHEAR_X) | (op == SHEAR_Y)
    cx, cy = torch.where(sheared, -0.5 * w, zero), torch.where(sheared, -0.5 * h, zero)

    rot, sx, sy = (v * (math.pi / 180.0) for v in (angle, shear_x, shear_y))  # math.radians
    cos_sy, tan_sx, rot_minus_sy = sy.cos(), sx.tan(), rot - sy
    cx_plus_tx, cy_plus_ty = cx + tx, cy + ty
    a = rot_minus_sy.cos() / cos_sy
    b = -(a * tan_sx + rot.sin())
    c = rot_minus_sy.sin() / cos_sy
    d = rot.cos() - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * cx_plus_tx - m1 * cy_plus_ty
    m5 = cy - m3 * cx_plus_tx - m4 * cy_plus_ty
    return torch.stack([m0, m1, m2, m3, m4, m5], 1).view(-1, 2, 3).float()


def sharpen(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's `adjust_sharpness`, one float64 factor per image: the inner pixels blend
    with a 3x3 blur (weights 1, centre 5, over 13, rounded), the border pixels stay."""
    inner = x[..., 1:-1, 1:-1]
    # torchvision convolves with float32 weights 1/13 and 5/13, then rounds. The weighted sum
    # of whole values is a whole number S, and S / 13 is never within 1/26 of a half, far
    # beyond float32's error there: so round(S / 13), from an exact 3x3 sum, is the same.
    rows = x[..., :, :-2] + x[..., :, 1:-1] + x[..., :, 2:]
    total = (rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]).add_(inner, alpha=4.0)
    blurred = total.div_(13.0).round_()
    # torchvision: inner.add_(blurred - inner, alpha=1 - factor), alpha rounded to float32,
    # with a fused multiply-add; float64 keeps its single rounding.
    alpha = _per_image((1.0 - factor).float().double())
    mixed = torch.addcmul(inner.double(), blurred.sub(inner).double(), alpha).float()
    out = x.clone()
    out[..., 1:-1, 1:-1] = mixed.clamp_(0, 255).floor_()
    return out


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` (0..8, per image) of each uint8 value."""
    mask = torch.bitwise_left_shift(255, 8 - bits.clamp(0, 8).long()).bitwise_and_(255)
    return x.to(torch.uint8).bitwise_and_(_per_image(mask).to(torch.uint8)).float()


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """255 - x where x >= threshold (torchvision compares in float32)."""
    return torch.where(x >= _per_image(threshold.float()), 255.0 - x, x)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to 0..255 (a flat channel stays), in float32."""
    low = x.amin((2, 3), keepdim=True)
    high = x.amax((2, 3), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, 1.0, (high - low).mul_(1.0 / 255))
    return (x - torch.where(flat, 0.0, low)).div_(inv_scale).clamp_(0, 255).floor_()


def equalize(x: torch.Tensor) -> torch.Tensor:
    """torchvision's `equalize` (PIL's lookup table) of each channel of each image.

    The histograms of all channels of all images are one scatter_add into (N * C, 256)
    counts; the tables come from their cumulative sums, and one gather applies them. A
    channel whose values are all one value but for less than 255 pixels stays as it is."""
    n, c, h, w = x.shape
    values = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, values, torch.ones_like(values))
    cum = hist.cumsum(1)
    # The last non-empty bin: the first where the cumulative count reaches its maximum.
    last = cum.argmax(1, keepdim=True)
    step = (h * w - hist.gather(1, last)).div(255, rounding_mode="floor")
    lut = (cum[:, :-1] + step // 2).div(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], 1)
    out = torch.where(step != 0, lut.gather(1, values), values)
    return out.view(n, c, h, w).float()


def apply_op(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Apply op `op[i]` (an index into OPS) with `magnitude[i]` to image i, for float images
    (N, C, H, W) holding 0..255; the result holds whole values 0..255 too."""
    h, w = x.shape[2:]
    m = magnitude.double()
    factor = 1.0 + m
    op4 = _per_image(op)
    luma = gray(x)
    is_blend = (op == BRIGHTNESS) | (op == COLOR) | (op == CONTRAST)
    # torchvision's blends: x * float32(f) + ref * float32(1 - f), f = 1 + magnitude in
    # float64; brightness blends with black, Color with the grey image, Contrast with its mean.
    ref = torch.where(op4 == COLOR, luma,
                      torch.where(op4 == CONTRAST, luma.mean((1, 2, 3), keepdim=True), 0.0))
    one = torch.ones_like(factor)
    blended = blend(x, torch.where(is_blend, factor, one).float(), ref,
                    torch.where(is_blend, 1.0 - factor, 1.0 - one).float())

    out = warp(x, affine_matrix(op, magnitude, (h, w)))  # Identity and the geometric ops
    out = torch.where(_per_image(is_blend), blended, out)
    out = torch.where(op4 == SHARPNESS, sharpen(x, torch.where(op == SHARPNESS, factor, one)),
                      out)
    out = torch.where(op4 == POSTERIZE, posterize(x, m), out)
    out = torch.where(op4 == SOLARIZE, solarize(x, 255.0 * m), out)
    out = torch.where(op4 == AUTOCONTRAST, autocontrast(x), out)
    out = torch.where(op4 == EQUALIZE, equalize(x), out)
    return torch.where(op4 == INVERT, 255.0 - x, out)


# --- Cutout -----------------------------------------------------------------------------------

def draw_cutout(n: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(N, 2) int64 (row, column) centres, uniform over the image's pixels."""
    h, w = size
    rows = torch.randint(0, h, (n,), generator=generator, device=generator.device)
    cols = torch.randint(0, w, (n,), generator=generator, device=generator.device)
    return torch.stack([rows, cols], 1)


def cutout(x: torch.Tensor, centres: torch.Tensor, length: int) -> torch.Tensor:
    """Zero a `length` x `length` square of each image (N, C, H, W) at its centre (rows
    and columns centre - length // 2 onwards), clipped at the image's edges (DeVries &
    Taylor, 2017)."""
    _, _, h, w = x.shape
    first = centres - length // 2
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_r = (rows >= first[:, :1]) & (rows < first[:, :1] + length)
    in_c = (cols >= first[:, 1:]) & (cols < first[:, 1:] + length)
    return torch.where(in_r[:, None, :, None] & in_c[:, None, None, :], 0.0, x)
