"""Named starting points: each returns a full Config; flags and YAML override it."""

from __future__ import annotations

from collections.abc import Callable

from cifarlab.config import AugmentConfig, Config, EmaConfig, ModelConfig, OptimConfig
from cifarlab.errors import UserError
from cifarlab.settings_rules import PRESET_NAMES


def seed() -> Config:
    """The seed lab report's recipe (see SEED_RECIPE.md); the Config defaults are exactly it."""
    return Config(preset="seed")


def baseline() -> Config:
    """The seed's starting point: normalisation only, plain cross-entropy, constant lr.

    Same model, split, optimizer and epoch budget as `seed`, so the two compare fairly.
    """
    config = Config(preset="baseline")
    config.data.augment = AugmentConfig.off()
    config.optim = OptimConfig(label_smoothing=0.0, schedule="constant", warmup_epochs=0.0)
    return config


def fast() -> Config:
    """Time to accuracy on one GPU: the seed's model, split and normalisation, trained for
    fewer epochs at batch 512 with what helps a short schedule (BENCHMARKS.md; its GPU time
    and accuracy are not measured yet).

    - augmentation: flip and pad-and-crop only (with the seed's whole chain the same recipe
      learned 9.6 points less in a short validation-split run, and ran 40 % slower on a CPU);
    - learning rate 0.2 (the seed's 0.1 scaled linearly with the batch), Nesterov momentum,
      2 warm-up epochs, then cosine to zero; label smoothing 0.2;
    - no early stopping (the schedule is short); validation and test score each image with
      its mirror image (tta_flip).
    """
    config = Config(preset="fast", epochs=20, batch_size=512, patience=0, tta_flip=True)
    config.data.augment = AugmentConfig(
        hflip=0.5, rotate_degrees=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
        crop_padding=4, translate=0.0, erase_p=0.0,
    )
    config.optim = OptimConfig(lr=0.2, nesterov=True, label_smoothing=0.2, warmup_epochs=2.0)
    return config


def best() -> Config:
    """Accuracy per GPU-hour with the seed's ResNet-18: the parts with published gains that
    cost next to nothing per step. No GPU accuracy of this preset has been measured.

    - augmentation: pad-and-crop and flip, then TrivialAugmentWide drawn per image, then a
      16x16 Cutout square (zero after normalisation, i.e. the mean colour; its centre
      anywhere in the image, clipped at the border). DeVries and Taylor (2017) report
      ResNet-18 on CIFAR-10 at 4.72 % test error with crop and flip and 3.99 % with a 16x16
      Cutout added, over 200 epochs; Müller and Hutter (2021) add TrivialAugmentWide on top
      of crop, flip and Cutout as a policy with no parameters to tune, and report it as
      good as or better than the searched policies (AutoAugment, RandAugment) on CIFAR-10
      Wide ResNets. The seed's colour jitter, rotation, translation and erasing are left
      out: the policy covers such ops, one per image;
    - SGD with Nesterov momentum 0.9 (Sutskever et al., 2013), lr 0.1 at batch 256, weight
      decay 5e-4, as in the Cutout paper's CIFAR ResNets;
    - 5 epochs of linear warm-up (Goyal et al., 2017), then cosine decay to zero (Loshchilov
      and Hutter, 2017), over 200 epochs, the budget of the published numbers above; the
      epoch count scales the schedule, so `--epochs` trades accuracy for time;
    - label smoothing 0.1 (Szegedy et al., 2016; Müller, Kornblith and Hinton, 2019);
    - an exponential moving average of the weights (decay 0.999 per step, about 6 epochs'
      horizon at 176 steps an epoch; Polyak averaging, as timm's model EMA), evaluated every
      epoch; the best checkpoint is chosen on it. Averaged weights score higher than the
      last step's while the learning rate is large, and so make the choice of the best
      epoch less noisy; at the end of a cosine schedule the two converge;
    - no early stopping (the cosine schedule is meant to be run to its end); validation and
      test score each image with its mirror image (tta_flip), which costs evaluation time
      only;
    - mixup and CutMix stay off: they are one setting away (`mix.cutmix_alpha=1`) and are
      usually paired with longer schedules than this budget.
    """
    config = Config(preset="best", epochs=200, patience=0, tta_flip=True)
    config.data.augment = AugmentConfig(
        hflip=0.5, rotate_degrees=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
        crop_padding=4, translate=0.0, erase_p=0.0, policy="trivialaugment", cutout=16,
    )
    config.optim = OptimConfig(lr=0.1, nesterov=True, weight_decay=5e-4, label_smoothing=0.1,
                               schedule="cosine", warmup_epochs=5.0)
    config.ema = EmaConfig(enabled=True, decay=0.999, select="ema")
    return config


# airbench's learning rate per example of a batch: Jordan (2024) sums the loss over the batch
# and sets lr 11.5 / (1024 * (1 + 1 / (1 - momentum))) with momentum 0.85; with the mean loss
# used here that is this much times the batch size. Its weight decay shrinks the weights by
# 0.0153 * batch / (1024 * (1 + 1 / (1 - momentum))) a step (lr * weight_decay in PyTorch's
# SGD); at lr = AIRBENCH_LR_PER_EXAMPLE * batch that is weight_decay 0.0153 / 11.5, whatever
# the batch.
AIRBENCH_LR_PER_EXAMPLE = 11.5 / (1024 * (1 + 1 / (1 - 0.85)))
AIRBENCH_WEIGHT_DECAY = 0.0153 / 11.5
AIRBENCH_BATCH = 500  # smaller than the paper's 1024, for the caches of small CPUs


def airbench() -> Config:
    """Time to accuracy: the airbench network (models/airbench.py) and the recipe Jordan
    (2024) measured to reach 94 % on CIFAR-10 in 10 epochs, each part a setting.

    - batch 500 (on a 2-core Intel VM the paper's 1024 and more ran out of cache; on a
      2-core AMD EPYC 250-1000 ran at about the same speed, BENCHMARKS.md) with the
      paper's learning rate per example (AIRBENCH_LR_PER_EXAMPLE), Nesterov SGD with momentum
      0.85; biases at 64 times the learning rate with 1/64 of the weight decay; the whitening
      layer's bias trains for the first 3 epochs only;
    - a linear warm-up over the first 23 % of the steps, then a linear decay to zero;
    - label smoothing 0.2; no early stopping;
    - augmentation: alternating flip (every image mirrored in every other epoch, which the
      paper measured to beat random flips) and a random translation by up to 2 pixels with
      the border reflected; the resident loader does both as batched ops on any device;
    - test-time augmentation: each image with its mirror image and with copies shifted by
      one pixel (tta_flip, tta_translate);
    - the paper's lookahead is not used: `optim.lookahead_steps=5` turns it on with the
      paper's schedule, and on 2 seeds it did not beat the preset (BENCHMARKS.md).
    """
    config = Config(preset="airbench", epochs=10, batch_size=AIRBENCH_BATCH, patience=0,
                    tta_flip=True, tta_translate=True)
    config.model = ModelConfig(name="airbench", width=64)
    config.data.loader = "resident"
    config.data.augment = AugmentConfig(
        hflip=0.5, flip_mode="alternate", rotate_degrees=0.0, brightness=0.0, contrast=0.0,
        saturation=0.0, hue=0.0, crop_padding=2, crop_padding_mode="reflect", translate=0.0,
        erase_p=0.0,
    )
    config.optim = OptimConfig(
        lr=AIRBENCH_LR_PER_EXAMPLE * AIRBENCH_BATCH, momentum=0.85, nesterov=True,
        weight_decay=AIRBENCH_WEIGHT_DECAY, label_smoothing=0.2, schedule="onecycle",
        warmup_epochs=0.23 * 10, bias_lr_scale=64.0, whiten_bias_epochs=3.0,
    )
    return config


# Each preset by its name; the names are settings_rules.PRESET_NAMES, in the same order, which
# the `preset` setting is checked against without building a preset.
PRESETS: dict[str, Callable[[], Config]] = dict(
    zip(PRESET_NAMES, (seed, baseline, fast, best, airbench), strict=True))


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
