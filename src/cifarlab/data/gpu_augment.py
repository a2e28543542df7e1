"""The seed's augmentation chain on whole batches, on any device (CPU or CUDA).

Every image gets its own random parameters for every op, with no loop over images and no
host synchronisation (no `.item()`, no boolean-mask indexing): the data set can stay on the
GPU as uint8 and be augmented there per batch. Each op is split in two: `draw_*` draws a
batch's parameters from a `torch.Generator` (tensors on the generator's device), and the op
applies given per-image parameters. So the tests fix parameters and compare each op with
torchvision's functional op on each image (tests/test_gpu_augment.py), and compare the drawn
parameters with the distributions of torchvision's random transforms.

The ops follow torchvision's semantics on uint8 images (the reference chain in cpu_augment.py
runs rotation, colour jitter, crop and translation on uint8 tensors): they work on float32
tensors that hold the uint8 values 0..255, and floor and clamp after each op as torchvision
does when it returns uint8. Normalisation and erasing then work on the float image.

Why not kornia.augmentation (measured in bench/augment_cpu.md): it does not reproduce the
reference (its ColorJitter applies one order of the four ops to the whole batch, and it
never rounds to uint8), and it issues about six times as many tensor operations per call
(2,437 against our 415 at batch 512): twice our fixed cost per call on the CPU, and launches
are what bound a GPU on 32x32 images. On the CPU at batch 512 it computes about 10 % faster,
as it does less work. `torch.compile(BatchAugment.apply)` fuses our ops and gives the same
results on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cifarlab.config import AugmentConfig
from cifarlab.data.image_ops import _per_image, blend, gray, warp
from cifarlab.data.policies import Policy, PolicyParams, cutout, draw_cutout
from cifarlab.devices import compiled, memory_format

# torchvision's ColorJitter op ids: it applies them in a random permutation of these.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass
class JitterParams:
    order: torch.Tensor  # (N, 4) int64: each image's permutation of the four op ids
    factors: torch.Tensor | None  # (N, 3) brightness, contrast, saturation; None: all off
    hue: torch.Tensor | None  # (N,) hue shifts, in turns; None: hue is off


@dataclass
class AugmentParams:
    """One batch's parameters; None leaves an op out."""

    flip: torch.Tensor | None  # (N,) bool
    angle: torch.Tensor | None  # (N,) float32, degrees counter-clockwise
    jitter: JitterParams | None
    crop: torch.Tensor | None  # (N, 2) int64 (top, left) in the zero-padded image
    translate: torch.Tensor | None  # (N, 2) int64 (tx, ty) in pixels
    erase: torch.Tensor | None  # (N, 4) int64 (top, left, height, width); height 0: none
    policy: PolicyParams | None = None  # data/policies.py: each image's ops and magnitudes
    cutout: torch.Tensor | None = None  # (N, 2) int64 centres (row, column) of the squares


def _uniform(
    shape: int | tuple[int, ...], generator: torch.Generator, low: float = 0.0, high: float = 1.0
) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=generator.device)
    return u if (low, high) == (0.0, 1.0) else u * (high - low) + low


# --- horizontal flip ------------------------------------------------------------------------

def draw_flip(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return _uniform(n, generator) < p


def hflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip the images (N, C, H, W) where `flip` is true; exact."""
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


# --- rotation -------------------------------------------------------------------------------

def draw_angles(n: int, degrees: float, generator: torch.Generator) -> torch.Tensor:
    return _uniform(n, generator, -degrees, degrees)


def rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """torchvision's `rotate` (nearest, about the centre, same size, fill 0), one angle per
    image, on float images (N, C, H, W).

    The sampling grid is built with torchvision's arithmetic (the inverse matrix in float64
    from `angle % 360`, rounded to float32, then its `_affine_grid`), so the result is exact
    on the CPU. Elsewhere the matrix product may round differently in the last bit, which
    moves a pixel to its neighbour only where a sampling point lies on a pixel boundary.
    """
    rot = torch.remainder(angle.double(), 360.0).neg().mul(math.pi / 180)
    cos, sin, zero = rot.cos(), rot.sin(), torch.zeros_like(rot)
    return warp(x, torch.stack([cos, sin, zero, -sin, cos, zero], 1).view(-1, 2, 3).float())


# --- colour jitter --------------------------------------------------------------------------

def draw_jitter(
    n: int, brightness: float, contrast: float, saturation: float, hue: float,
    generator: torch.Generator,
) -> JitterParams:
    """Factors uniform in [max(0, 1 - s), 1 + s], hue shifts in [-hue, hue], and a uniformly
    random order of the four ops per image, as torchvision's ColorJitter draws them."""
    order = _uniform((n, 4), generator).argsort(1)
    strengths = (brightness, contrast, saturation)
    factors = None
    if max(strengths) > 0:
        factors = torch.stack(
            [_uniform(n, generator, max(0.0, 1 - s), 1 + s) for s in strengths], 1)
    shift = _uniform(n, generator, -hue, hue) if hue > 0 else None
    return JitterParams(order, factors, shift)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul(_per_image(factor)).clamp_(0, 255).floor_()


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, factor, gray(x).mean((1, 2, 3), keepdim=True))


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, factor, gray(x))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's `adjust_hue` on uint8 images: to [0, 1], through HSV with its float32
    arithmetic, and back with its `x * (256 - 1e-3)` truncated; exact."""
    image = x.mul(1.0 / 255)
    r, g, _ = image.unbind(1)
    minc, maxc = torch.aminmax(image, dim=1)
    # Grey pixels (max == min) would divide by zero; torchvision divides by one there instead.
    grey = maxc == minc
    spread = maxc - minc
    ones = torch.ones_like(maxc)
    s = spread / torch.where(grey, ones, maxc)
    rc, gc, bc = ((maxc.unsqueeze(1) - image) / torch.where(grey, ones, spread).unsqueeze(1)
                  ).unbind(1)
    # torchvision sums three masked terms; exactly one is non-zero, so a selection is equal.
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, rc + 2.0 - bc, gc + 4.0 - rc))
    h = h.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    h = h.add_(shift.view(-1, 1, 1)).remainder_(1.0)

    h6 = h * 6
    sector = torch.floor(h6)
    frac = h6 - sector
    sxf = s * frac
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(maxc).clamp_(0.0, 1.0)
    t = (sxf + one_minus_s).mul_(maxc).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(maxc).clamp_(0.0, 1.0)
    vpqt = torch.stack((maxc, p, q, t), 1)
    # torchvision picks each channel from (v, p, q, t) by hue sector (0..5; 6 counts as 0):
    #   R: 0 2 1 1 3 0   G: 3 0 0 2 1 1   B: 1 1 3 0 0 2
    # G and B are R's row read 2 and 4 sectors back. The (3, 7) table is computed on the
    # device from R's row packed at two bits per sector (856): no copy from the host.
    back = torch.arange(7, device=x.device) - torch.arange(0, 6, 2, device=x.device)[:, None]
    table = torch.bitwise_right_shift(856, 2 * back.remainder_(6)).bitwise_and_(3)
    channel = torch.arange(3, device=x.device).view(1, 3, 1, 1)
    pick = table[channel, sector.long().unsqueeze(1)]
    return vpqt.gather(1, pick).mul_(255 + 1.0 - 1e-3).floor_()


def _jitter_slot(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast or saturation, chosen per image by `op`; all three are blends
    (with black, the mean grey and the grey image), so one blend serves."""
    luma = gray(x)
    op = _per_image(op)
    ref = torch.where(op == SATURATION, luma,
                      torch.where(op == CONTRAST, luma.mean((1, 2, 3), keepdim=True), 0.0))
    return blend(x, factor, ref)


def color_jitter(x: torch.Tensor, params: JitterParams) -> torch.Tensor:
    """torchvision's ColorJitter with each image's own factors and order.

    Brightness, contrast and saturation run in three slots, in the image's order; hue runs
    once for all images. With hue on, the slots run twice, before and after it: each image
    keeps the slots its order puts before hue in the first pass and the others in the second,
    with factor 1 (exactly the identity) in the slots it skips.
    """
    if params.factors is None:
        return adjust_hue(x, params.hue) if params.hue is not None else x
    hue_pos = (params.order == HUE).long().argmax(1)
    slots = []
    for j in range(3):
        op = params.order.gather(1, (j + (hue_pos <= j).long())[:, None])
        slots.append((op.squeeze(1), params.factors.gather(1, op).squeeze(1), hue_pos > j))
    if params.hue is None:
        for op, factor, _ in slots:
            x = _jitter_slot(x, op, factor)
        return x
    for op, factor, before_hue in slots:
        x = _jitter_slot(x, op, torch.where(before_hue, factor, 1.0))
    x = adjust_hue(x, params.hue)
    for op, factor, before_hue in slots:
        x = _jitter_slot(x, op, torch.where(before_hue, 1.0, factor))
    return x


# --- crop after zero padding, translation ---------------------------------------------------

def draw_crop(n: int, padding: int, generator: torch.Generator) -> torch.Tensor:
    """(top, left) of a same-size crop of the image padded by `padding`: uniform integers in
    [0, 2 * padding], as RandomCrop(size, padding) draws them."""
    return torch.randint(0, 2 * padding + 1, (n, 2), generator=generator,
                         device=generator.device)


def draw_translate(
    n: int, fraction: float, size: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """(tx, ty): RandomAffine's round(uniform(-fraction * width, fraction * width)), and the
    same with the height; for 0.1 of 32 pixels, integers in [-3, 3]."""
    h, w = size
    limits = [float(fraction * w), float(fraction * h)]
    return torch.stack([_uniform(n, generator, -m, m) for m in limits], 1).round_().long()


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices past either border mirrored back inside, without repeating the border pixel
    (torchvision's padding_mode "reflect"); for paddings below `size`."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def crop_translate(
    x: torch.Tensor, crop: torch.Tensor | None, translate: torch.Tensor | None, padding: int,
    reflect: bool = False,
) -> torch.Tensor:
    """Pad by `padding` (zeros, or the mirrored border with `reflect`) and crop at `crop`
    (RandomCrop), then shift by `translate` with zero fill (RandomAffine's nearest-neighbour
    translation by whole pixels): both are integer shifts, so one gather does them; exact."""
    n, c, h, w = x.shape
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    src_r, src_c = rows.expand(n, h), cols.expand(n, w)
    ok_r = ok_c = torch.ones((), dtype=torch.bool, device=x.device)
    if crop is not None:
        src_r = src_r + (crop[:, :1] - padding)
        src_c = src_c + (crop[:, 1:] - padding)
        if reflect:
            src_r, src_c = _reflect(src_r, h), _reflect(src_c, w)
    if translate is not None:
        tx, ty = translate[:, :1], translate[:, 1:]
        src_r, src_c = src_r - ty, src_c - tx
        # Pixels shifted in from outside the cropped image are zero too.
        ok_r = (rows >= ty) & (rows < h + ty)
        ok_c = (cols >= tx) & (cols < w + tx)
    ok_r = ok_r & (src_r >= 0) & (src_r < h)
    ok_c = ok_c & (src_c >= 0) & (src_c < w)
    index = src_r.clamp(0, h - 1)[:, :, None] * w + src_c.clamp(0, w - 1)[:, None, :]
    out = x.flatten(2).gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)
    return out * (ok_r[:, None, :, None] & ok_c[:, None, None, :])


# --- normalisation, erasing -----------------------------------------------------------------

def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """ToDtype(float32, scale=True) and Normalize on images holding 0..255: the same float32
    operations, so exact. `mean` and `std` are (C,) tensors on the images' device."""
    return x.mul(1.0 / 255).sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def draw_erase(
    n: int, p: float, scale: tuple[float, float], ratio: tuple[float, float],
    size: tuple[int, int], generator: torch.Generator, attempts: int = 10,
) -> torch.Tensor:
    """RandomErasing's parameters: with probability p, the first of 10 attempts whose
    rectangle fits (area = uniform(scale) * H * W, aspect ratio log-uniform in `ratio`,
    height round(sqrt(area * ratio)) < H, width round(sqrt(area / ratio)) < W), at a uniform
    position; none fitting, or not drawn: height and width 0 (no erasing)."""
    h, w = size
    area = _uniform((n, attempts), generator, *scale).double() * (h * w)
    aspect = _uniform((n, attempts), generator, math.log(ratio[0]), math.log(ratio[1])).exp()
    aspect = aspect.double()
    eh = (area * aspect).sqrt().round().long()
    ew = (area / aspect).sqrt().round().long()
    fits = (eh < h) & (ew < w)
    first = fits.long().argmax(1, keepdim=True)  # the first attempt that fits (0 if none)
    eh, ew = eh.gather(1, first).squeeze(1), ew.gather(1, first).squeeze(1)
    erased = (_uniform(n, generator) < p) & fits.any(1)
    eh, ew = eh * erased, ew * erased
    top = (_uniform(n, generator) * (h - eh + 1)).long().clamp_(max=h - eh)
    left = (_uniform(n, generator) * (w - ew + 1)).long().clamp_(max=w - ew)
    return torch.stack([top, left, eh, ew], 1)


def erase(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Set each image's rectangle (top, left, height, width) to 0 (torchvision's `erase`
    with value 0); exact."""
    _, _, h, w = x.shape
    top, left, eh, ew = (v[:, None] for v in boxes.unbind(1))
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_r = (rows >= top) & (rows < top + eh)
    in_c = (cols >= left) & (cols < left + ew)
    return torch.where(in_r[:, None, :, None] & in_c[:, None, None, :], 0.0, x)


# --- the chain ------------------------------------------------------------------------------

class BatchAugment:
    """The seed's training augmentation (cpu_augment.train_transform) for whole batches:
    uint8 images (N, H, W, C), or (N, C, H, W) with C = 3, -> normalised float32
    (N, C, H, W) in the device's layout (devices.memory_format: channels-last memory on CUDA,
    contiguous NCHW on the CPU). Ops whose strength is 0 are left out."""

    def __init__(
        self, aug: AugmentConfig, mean: Sequence[float], std: Sequence[float],
        device: torch.device | str = "cpu", compile_mode: str = "off",
    ) -> None:
        self.aug = aug
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self.policy = None
        if aug.policy != "none":
            self.policy = Policy(aug.policy, aug.randaugment_n, aug.randaugment_m, device)
        # `compile_mode` (settings_rules.COMPILE_MODES) compiles `apply` for calls: its hundreds of
        # small ops become a few fused kernels. The draws stay eager, so the random streams
        # are the same either way.
        self._apply = compiled(self.apply, compile_mode, device)

    def draw(self, n: int, size: tuple[int, int], generator: torch.Generator) -> AugmentParams:
        """Parameters for `n` images of `size` (H, W), on the generator's device."""
        a = self.aug
        jitter = None
        if max(a.brightness, a.contrast, a.saturation, a.hue) > 0:
            jitter = draw_jitter(n, a.brightness, a.contrast, a.saturation, a.hue, generator)
        return AugmentParams(
            flip=draw_flip(n, a.hflip, generator) if a.hflip > 0 else None,
            angle=draw_angles(n, a.rotate_degrees, generator) if a.rotate_degrees > 0 else None,
            jitter=jitter,
            crop=draw_crop(n, a.crop_padding, generator) if a.crop_padding > 0 else None,
            translate=draw_translate(n, a.translate, size, generator) if a.translate > 0
            else None,
            erase=draw_erase(n, a.erase_p, a.erase_scale, a.erase_ratio, size, generator)
            if a.erase_p > 0 else None,
            # Drawn after the seed's ops, so that their draws do not depend on these settings.
            policy=self.policy.draw(n, size, generator) if self.policy is not None else None,
            cutout=draw_cutout(n, size, generator) if a.cutout > 0 else None,
        )

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        x = _nchw(images)
        if params.flip is not None:
            x = hflip(x, params.flip)
        x = x.float()
        if params.angle is not None:
            x = rotate(x, params.angle)
        if params.jitter is not None:
            x = color_jitter(x, params.jitter)
        if params.crop is not None or params.translate is not None:
            x = crop_translate(x, params.crop, params.translate, self.aug.crop_padding,
                               self.aug.crop_padding_mode == "reflect")
        if params.policy is not None:
            x = self.policy.apply(x, params.policy)
        x = normalize(x.contiguous(memory_format=memory_format(x.device)), self.mean, self.std)
        if params.erase is not None:
            x = erase(x, params.erase)
        return cutout(x, params.cutout, self.aug.cutout) if params.cutout is not None else x

    def __call__(self, images: torch.Tensor, generator: torch.Generator,
                 flip: torch.Tensor | None = None) -> torch.Tensor:
        """`flip`: which images to mirror, in place of random flips (alternating flips)."""
        params = self.draw(len(images), tuple(_nchw(images).shape[2:]), generator)
        if flip is not None:
            params.flip = flip
        return self._apply(images, params)


def _nchw(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with C = 3 as given; (N, H, W, C) as a channels-last view."""
    return images if images.shape[1] == 3 else images.permute(0, 3, 1, 2)
