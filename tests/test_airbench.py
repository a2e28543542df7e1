"""The airbench network and preset: whitening from data, Dirac and frozen parts, parameter
groups, alternating flips, reflected translation, test-time translation, the CPU precision
choice and the long-run warning; and the preset end to end on a tiny synthetic run."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from cifarlab import checkpoint, devices
from cifarlab.cli import main
from cifarlab.config import AugmentConfig, OptimConfig
from cifarlab.data.gpu_augment import crop_translate
from cifarlab.data.resident import build_resident_loader
from cifarlab.errors import UserError
from cifarlab.evaluate import logits_of
from cifarlab.models import create_model, initialise_from_data, model_args
from cifarlab.models.airbench import HEAD_SCALE, WHITEN_CHANNELS, FrozenScaleBatchNorm
from cifarlab.presets import airbench
from cifarlab.training import pace
from cifarlab.training.optim import build_optimizer, group_schedules

WIDTH = 24  # the narrowest airbench: its first group as wide as the whitening layer


def small(classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(**model_args("airbench", classes, WIDTH))


def correlated_images(n: int = 300) -> np.ndarray:
    """uint8 NHWC images whose channels and neighbouring pixels are correlated."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(n, 17, 17, 1))
    smooth = np.kron(base, np.ones((1, 2, 2, 1)))[:, :32, :32]  # neighbours correlated
    colour = smooth * np.array([1.0, 0.8, 0.5]) + 0.3 * rng.normal(size=(n, 32, 32, 3))
    return np.clip(128 + 40 * colour, 0, 255).astype(np.uint8)


def test_whitening_filters_whiten_the_training_patches():
    model = small()
    images = correlated_images()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    initialise_from_data(model, images, mean, std)
    weight = model.whiten.weight
    assert weight.shape == (WHITEN_CHANNELS, 3, 2, 2) and not weight.requires_grad
    torch.testing.assert_close(weight[12:], -weight[:12])  # the filters and their negatives
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255 - 0.5) / 0.25
    out = F.conv2d(x, weight[:12].double())  # the positive half, without the bias
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = torch.cov(flat.T)
    # Whitened: unit variance in each direction (less the eps added to the eigenvalues,
    # which only shows in directions of tiny variance), no correlation between them.
    off_diagonal = covariance - torch.diag(torch.diag(covariance))
    assert off_diagonal.abs().max() < 0.02
    assert ((torch.diag(covariance) > 0.5) & (torch.diag(covariance) < 1.01)).all()
    assert (torch.diag(covariance) > 0.95).sum() >= 9


def test_dirac_frozen_scale_batchnorm_and_the_scaled_head():
    model = small()
    conv = model.layer1.conv1
    x = torch.randn(2, WHITEN_CHANNELS, 8, 8)
    with torch.no_grad():  # the first filters pass their input channels on
        torch.testing.assert_close(conv(x)[:, :WHITEN_CHANNELS], x)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6 and all(isinstance(m, FrozenScaleBatchNorm) for m in norms)
    assert all(not m.weight.requires_grad and m.bias.requires_grad and m.momentum == 0.4
               for m in norms)
    assert model.fc.bias is None
    model.eval()
    features = {}
    model.pool.register_forward_hook(lambda m, i, o: features.update(x=o.flatten(1)))
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 32, 32))
    torch.testing.assert_close(logits, model.fc(features["x"]) * HEAD_SCALE)
    assert features["x"].shape == (3, 96)  # one pixel left after the last max-pool


def test_a_width_too_small_for_the_whitening_layer_is_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="fewer than the 24 of its whitening layer"):
        create_model(**model_args("airbench", 10, 16))
    args = ["train", "--preset", "airbench", "--data", "synthetic:40", "--set",
            "model.width=16", "--out", str(tmp_path / "runs")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--set model.width=24" in err
    assert not (tmp_path / "runs").exists()


def test_parameter_groups_of_the_preset():
    model = small()
    optim = airbench().optim
    opt = build_optimizer(model, optim, torch.device("cpu"))
    groups = opt.param_groups
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    assert id(model.whiten.weight) not in trainable
    filters, whiten_bias, biases = groups
    assert filters["lr"] == optim.lr and filters["weight_decay"] == optim.weight_decay
    assert any(p is model.fc.weight for p in filters["params"])  # head_lr_scale 1
    assert biases["lr"] == pytest.approx(64 * optim.lr)
    assert biases["weight_decay"] == pytest.approx(optim.weight_decay / 64)
    assert len(whiten_bias["params"]) == 1 and whiten_bias["params"][0] is model.whiten.bias
    assert whiten_bias["stop_epoch"] == 3
    # The whitening bias learns for 3 epochs of 10 steps, then its learning rate is 0.
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, group_schedules(opt, lambda s: 1.0, 10))
    for _ in range(29):
        opt.step()  # no gradients: nothing moves, the schedule goes on
        scheduler.step()
    assert [g["lr"] > 0 for g in groups] == [True, True, True]
    opt.step()
    scheduler.step()
    assert [g["lr"] > 0 for g in groups] == [True, False, True]
    # A model and recipe without such parts keep a single group (old runs resume).
    resnet = create_model(**model_args("resnet18", 10, 8))
    assert len(build_optimizer(resnet, OptimConfig(), torch.device("cpu")).param_groups) == 1
    head = build_optimizer(resnet, OptimConfig(head_lr_scale=0.5), torch.device("cpu"))
    assert [len(g["params"]) for g in head.param_groups] == [
        len(list(resnet.parameters())) - 2, 2]  # fc.weight and fc.bias, at half the lr
    assert head.param_groups[1]["lr"] == pytest.approx(0.05)


def test_alternating_flips_mirror_each_image_in_every_other_epoch():
    n = 64
    images = torch.zeros(n, 32, 32, 3, dtype=torch.uint8)
    images[:, :, :16] = 255  # left half white: a mirrored image has it on the right
    aug = AugmentConfig.off()
    aug.hflip, aug.flip_mode = 0.5, "alternate"

    def flipped(epoch: int, seed: int = 3) -> dict[int, bool]:
        loader = build_resident_loader(images, torch.arange(n), aug, (0.5,) * 3, (0.5,) * 3,
                                       batch_size=16, seed=seed, device="cpu")
        loader.set_epoch(epoch)
        return {int(i): bool(x[0, 0, 31] > 0) for xs, ys in loader
                for x, i in zip(xs, ys, strict=True)}

    one, two, three = flipped(1), flipped(2), flipped(3)
    assert set(one) == set(range(n))
    assert all(one[i] != two[i] for i in range(n)) and one == three
    assert 16 < sum(one.values()) < 48  # each image's start is a coin flip
    assert flipped(1) == one and flipped(1, seed=4) != one  # a function of the seed


def test_reflect_padding_crop_matches_torchvision():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32)).float()
    crop = torch.randint(0, 5, (6, 2))
    out = crop_translate(x, crop, None, 2, reflect=True)
    for i in range(6):
        padded = TF.pad(x[i], [2], padding_mode="reflect")
        top, left = crop[i].tolist()
        torch.testing.assert_close(out[i], padded[:, top : top + 32, left : left + 32])


def test_test_time_translation_weighs_the_views():
    model = small().eval()
    x = torch.randn(2, 3, 32, 32)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[:, :, :32, :32], padded[:, :, 2:, 2:]
    with torch.no_grad():
        def mirrored(v):
            return (model(v) + model(v.flip(3))) / 2

        expected = mirrored(x) / 2 + (mirrored(up_left) + mirrored(down_right)) / 4
        torch.testing.assert_close(logits_of(model, x, flip=True, translate=True), expected)
        plain = model(x) / 2 + (model(up_left) + model(down_right)) / 4
        torch.testing.assert_close(logits_of(model, x, translate=True), plain)


def test_bf16_on_a_cpu_without_native_kernels_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(devices, "native_cpu_bf16", lambda: False)
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="no native bfloat16"):
        devices.check_amp("bf16", cpu)
    choice = devices.choose("auto", cpu, small(), 8, torch.contiguous_format, 10)
    assert choice.dtype is None and "no native bfloat16" in choice.reason
    args = ["train", "--data", "synthetic:40", "--amp", "bf16", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--amp auto or --amp off" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("fp32, bf16, chosen", [(1.0, 0.5, torch.bfloat16), (1.0, 0.95, None)])
def test_auto_takes_bf16_only_where_it_measures_faster(monkeypatch, tmp_path, fp32, bf16,
                                                        chosen):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # measured here, not kept from before
    monkeypatch.setattr(devices, "native_cpu_bf16", lambda: True)
    seconds = {None: fp32, torch.bfloat16: bf16}
    monkeypatch.setattr(devices, "step_seconds", lambda *a: seconds[a[-1]])
    choice = devices.choose("auto", torch.device("cpu"), small(), 64,
                              torch.channels_last, 10)
    assert choice.dtype is chosen
    assert f"{fp32 / bf16:.2f}x" in choice.reason


@pytest.mark.parametrize("name", ["airbench", "resnet18"])
def test_bf16_autocast_step_tracks_float32(name):
    """The bfloat16 path the CPU choice can take, for airbench and the seed's ResNet-18:
    one step's loss and gradients against float32 (emulated on CPUs without native
    bfloat16, so only the numerics are checked)."""
    torch.manual_seed(0)
    model = create_model(**model_args(name, 10, WIDTH if name == "airbench" else 16))
    initialise_from_data(model, correlated_images(50), (0.5,) * 3, (0.25,) * 3)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    grads = {}
    for dtype in (None, torch.bfloat16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads[dtype] = (loss.item(), model.layer2[0].conv1.weight.grad.clone()
                        if name == "resnet18" else model.layer2.conv1.weight.grad.clone())
    (l32, g32), (l16, g16) = grads[None], grads[torch.bfloat16]
    assert abs(l16 - l32) < 0.02 * l32
    assert F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.9


def test_a_long_cpu_run_says_so_after_its_first_steps(monkeypatch, caplog):
    clock = iter(range(0, 1000, 10))  # every step takes 10 s
    monkeypatch.setattr(pace.time, "perf_counter", lambda: float(next(clock)))
    log = logging.getLogger("test-pace")
    with caplog.at_level(logging.WARNING, "test-pace"):
        p = pace.Pace(1000, "cpu", "seed", log)
        for _ in range(20):
            p.step()
    (record,) = caplog.records
    assert "about 2.8 h" in record.message and "--preset airbench" in record.message
    caplog.clear()
    with caplog.at_level(logging.WARNING, "test-pace"):  # short runs and GPUs: no word
        for p in (pace.Pace(100, "cpu", "seed", log), pace.Pace(10**6, "cuda", "seed", log)):
            for _ in range(20):
                p.step()
    assert not caplog.records


def test_the_preset_trains_end_to_end_and_reports_its_precision(tmp_path, capsys):
    import onnxruntime

    args = ["train", "--preset", "airbench", "--data", "synthetic:120", "--epochs", "1",
            "--set", "model.width=24", "--batch-size", "30", "--out", str(tmp_path),
            "--name", "ab"]
    assert main(args) == 0
    run = tmp_path / "ab"
    result = json.loads((run / "result.json").read_text())
    assert result["precision"] == "float32" or devices.native_cpu_bf16()
    assert result["threads"] == torch.get_num_threads() and result["precision_reason"]
    assert "trained in" in (run / "report.md").read_text()
    best = checkpoint.load(run / "best.pt")
    assert best["config"]["tta_translate"] and best["model_args"]["channels"] == [24, 96, 96]
    # The whitening filters are in the checkpoint and rebuild the same network.
    model = checkpoint.build_model(best, run / "best.pt").eval()
    assert model.whiten.weight.abs().sum() > 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", "synthetic:120", "--json"]) == 0
    score = json.loads(capsys.readouterr().out)
    assert score["images"] > 0
    # Exported, the file scores as the run did: mirror and shifted copies.
    assert main(["export", str(run)]) == 0  # checked against PyTorch before it is written
    session = onnxruntime.InferenceSession(str(run / "best.onnx"))
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["tta_translate"]) and json.loads(meta["tta_flip"])
    # The same seed gives the same model.
    assert main([*args[:-1], "ab2"]) == 0
    again = checkpoint.load(tmp_path / "ab2" / "best.pt")
    assert all(torch.equal(best["model"][k], again["model"][k]) for k in best["model"])


def test_pruning_keeps_the_whitening_layer_and_the_frozen_scales():
    from cifarlab.compress import prune

    model = small().eval()
    initialise_from_data(model, correlated_images(50), (0.5,) * 3, (0.25,) * 3)
    args = model_args("airbench", 10, WIDTH)
    pruned = prune.prune_model(model, args, "ratio", 0.5, round_to=8)
    assert torch.equal(pruned.model.whiten.weight, model.whiten.weight)
    assert "whiten" not in pruned.model_args["layers"]
    rebuilt = create_model(**pruned.model_args)
    rebuilt.load_state_dict(pruned.model.state_dict())
    norms = [m for m in rebuilt.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(isinstance(m, FrozenScaleBatchNorm) and not m.weight.requires_grad
               for m in norms)
    assert rebuilt.layer2.conv1.out_channels < model.layer2.conv1.out_channels


def test_threads_setting_is_used_and_recorded(tmp_path):
    before = torch.get_num_threads()
    args = ["train", "--data", "synthetic:60", "--epochs", "1", "--workers", "0", "--set",
            "model.width=4", "--set", "optim.warmup_epochs=0", "--threads", "1",
            "--out", str(tmp_path), "--name", "t1"]
    assert main(args) == 0
    result = json.loads((tmp_path / "t1" / "result.json").read_text())
    assert result["threads"] == 1 and torch.get_num_threads() == before
    assert "with 1 thread:" in (tmp_path / "t1" / "report.md").read_text()
