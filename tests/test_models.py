"""The model zoo: parameter counts, CIFAR stems, initialisation, one training step and a
checkpoint round trip for every registered model, and the commands for one per family."""

import dataclasses
import hashlib
import io
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from cifarlab import checkpoint
from cifarlab.cli import main
from cifarlab.config import Config
from cifarlab.data.sources import load_source
from cifarlab.devices import ONEDNN_MAX_BLOCK
from cifarlab.errors import UserError
from cifarlab.models import MODELS, create_model, model_args
from cifarlab.rundir import load_resume_state, weights_payload

# name: (parameters with 10 classes, with 100 classes, the classifier's inputs), at the
# published width (model.width 64). The CIFAR ResNets use option A (parameter-free)
# shortcuts, so theirs are the published 0.27M, 0.46M, 0.66M, 0.85M and 1.7M.
PARAMS = {
    "resnet18": (11_173_962, 11_220_132, 512),
    "resnet34": (21_282_122, 21_328_292, 512),
    "resnet50": (23_520_842, 23_705_252, 2048),
    "preact_resnet18": (11_172_170, 11_218_340, 512),
    "resnet20": (269_722, 275_572, 64),
    "resnet32": (464_154, 470_004, 64),
    "resnet44": (658_586, 664_436, 64),
    "resnet56": (853_018, 858_868, 64),
    "resnet110": (1_727_962, 1_733_812, 64),
    "wrn_16_8": (10_961_370, 11_007_540, 512),
    "wrn_28_10": (36_479_194, 36_536_884, 640),
    "wrn_40_2": (2_243_546, 2_255_156, 128),
    "vgg11_bn": (9_231_114, 9_277_284, 512),
    "vgg16_bn": (14_728_266, 14_774_436, 512),
    "mobilenetv2": (2_236_682, 2_351_972, 1280),
    "densenet121": (6_956_298, 7_048_548, 1024),
    "airbench": (1_972_792, 1_995_832, 256),
}
TINY = 8  # model.width for the CPU tests: each family at 1/8 of its published width
# ... except where a family needs more: airbench's first group passes its 24 whitened
# channels on.
MIN_WIDTH = {"airbench": 24}


def tiny(name: str) -> int:
    return max(TINY, MIN_WIDTH.get(name, 1))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(name: str, classes: int = 10, width: int = 64) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(**model_args(name, classes, width))


@pytest.fixture
def nchw_only():
    """Fail any 1x1 strided convolution on the CPU that receives other than contiguous NCHW
    input (oneDNN corrupts weight gradients of 1x1 stride-2 convolutions with channels-last
    input and few input channels)."""
    def check(module, inputs):
        if (isinstance(module, torch.nn.Conv2d) and inputs[0].device.type == "cpu"
                and module.kernel_size == (1, 1) and max(module.stride) > 1
                and module.in_channels // module.groups < ONEDNN_MAX_BLOCK):
            assert inputs[0].is_contiguous(), f"{module}: input is not contiguous NCHW"

    handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
    yield
    handle.remove()


def test_every_registered_model_is_pinned():
    assert list(MODELS) == list(PARAMS)


@pytest.mark.parametrize("name", PARAMS)
def test_parameter_counts(name):
    count10, count100, fc_in = PARAMS[name]
    model = on_meta(name, 10)
    assert n_params(model) == count10
    assert n_params(on_meta(name, 100)) == count100
    assert model.fc.in_features == fc_in
    bias = model.fc.bias is not None  # only the classifier grows
    assert count100 == count10 + (100 - 10) * (fc_in + bias)
    # model.width 64 is the factory's own default: the published width.
    with torch.device("meta"):
        assert n_params(create_model(name, num_classes=10)) == count10


def test_cifar_resnets_have_the_published_sizes_with_option_a_shortcuts():
    published = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85,
                 "resnet110": 1.7}
    for name, millions in published.items():
        assert round(PARAMS[name][0] / 1e6, 2 if millions < 1 else 1) == millions
        model = on_meta(name)
        assert not any(m.kernel_size == (1, 1) for m in model.modules()
                       if isinstance(m, torch.nn.Conv2d))
        assert [s[0].conv1.out_channels for s in (model.layer1, model.layer2, model.layer3)] \
            == [16, 32, 64]


def test_resnet18_is_the_seeds_own():
    """Same parameters, state-dict keys and, for a seed, the same weights as the seed's
    ResNet-18 before the zoo: sha256 over keys and values as that code produced them."""
    assert n_params(create_model("resnet18", num_classes=10, width=64)) == 11_173_962
    expected = {8: "5798cd0c446a7f1734434d0ea130dc8f211256ffed292cd45b0637ccc1ed0afc",
                64: "42ce2d4ec06caac4c24662d852c9a10c4499d85ca4980f78527b88b07645f42d"}
    for width, digest in expected.items():
        torch.manual_seed(0)
        state = create_model(**model_args("resnet18", 10, width)).state_dict()
        h = hashlib.sha256()
        for key, value in state.items():
            h.update(key.encode())
            h.update(value.contiguous().numpy().tobytes())
        assert h.hexdigest() == digest, width
    assert model_args("resnet18", 10, 64) == {"name": "resnet18", "num_classes": 10,
                                              "width": 64}  # what checkpoints always held


def test_resnet18_architecture_for_32x32():
    model = create_model("resnet18", num_classes=10, width=64)
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(s) for s in stages] == [2, 2, 2, 2]
    assert [s[0].conv1.stride[0] for s in stages] == [1, 2, 2, 2]
    assert [s[0].conv2.out_channels for s in stages] == [64, 128, 256, 512]
    assert isinstance(model.layer1[0].shortcut, torch.nn.Identity)
    assert isinstance(model.layer2[0].shortcut, torch.nn.Sequential)
    with torch.device("meta"):
        same = create_model("resnet18", channels=(64, 128, 256, 512))
    assert [(k, v.shape) for k, v in same.state_dict().items()] == \
        [(k, v.shape) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("name", [n for n in PARAMS if n != "airbench"])
def test_cifar_stem_and_output_shape(name):
    model = on_meta(name, classes=7)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d))]
    first = layers[0]
    assert isinstance(first, torch.nn.Conv2d)
    assert (first.kernel_size, first.stride) == ((3, 3), (1, 1))
    if not name.startswith("vgg"):  # VGG pools after each block, never in the stem
        assert not any(isinstance(m, torch.nn.MaxPool2d) for m in layers)
    assert model(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 7)


def test_width_setting_scales_each_family():
    def arch(name, width):
        return {k: v for k, v in model_args(name, 10, width).items()
                if k not in ("name", "num_classes")}

    assert arch("resnet18", 16) == {"width": 16}
    assert arch("resnet50", 64) == {"width": 64}
    assert arch("resnet20", 64) == {"channels": [16, 32, 64]}
    assert arch("resnet56", 32) == {"channels": [8, 16, 32]}
    assert arch("wrn_28_10", 64) == {"channels": [16, 160, 320, 640]}
    assert arch("wrn_40_2", 32) == {"channels": [8, 16, 32, 64]}
    assert arch("vgg11_bn", 32) == {"channels": [32, 64, 128, 128, 256, 256, 256, 256]}
    assert arch("mobilenetv2", 32) == {"width_mult": 0.5}
    assert arch("densenet121", 16) == {"growth_rate": 8}
    assert arch("airbench", 32) == {"channels": [32, 128, 128]}
    for name in MODELS:  # narrower with a smaller width, and never a zero-channel layer
        assert n_params(on_meta(name, width=tiny(name))) < n_params(on_meta(name))


@pytest.mark.parametrize("name", PARAMS)
def test_one_training_step_and_a_checkpoint_round_trip(name, tmp_path, nchw_only):
    torch.manual_seed(0)
    config = Config()
    config.model = dataclasses.replace(config.model, name=name, width=tiny(name))
    model = create_model(**model_args(name, 3, tiny(name)))
    # Kaiming (fan_out, ReLU) convolutions, BatchNorm as the identity, as the seed's
    # (airbench's own initialisation is tested in test_airbench.py).
    for m in model.modules():
        if name == "airbench":
            break
        if isinstance(m, torch.nn.Conv2d) and m.weight.numel() >= 2000:
            fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            assert abs(m.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.25, m
        if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            assert not m.bias.any()
        if isinstance(m, torch.nn.BatchNorm2d):
            assert bool((m.weight == 1).all()) and not m.bias.any()

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        if p.requires_grad:  # airbench's whitening filters and BatchNorm scales are frozen
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), pname
    optimizer.step()
    assert not torch.equal(before["fc.weight"], model.state_dict()["fc.weight"])

    splits = SimpleNamespace(classes=["a", "b", "c"], mean=(0.5,) * 3, std=(0.25,) * 3)
    path = tmp_path / "best.pt"
    checkpoint.save_atomic(weights_payload(model, config, splits, 1, 50.0), path)
    ckpt = checkpoint.load(path)
    assert ckpt["model_args"] == model_args(name, 3, tiny(name))
    rebuilt = checkpoint.build_model(ckpt, path)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_model_args_that_do_not_fit_are_one_line_errors(tmp_path):
    payload = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "model": {},
               "model_args": {"name": "resnet20", "num_classes": 2, "width": 8},
               "classes": ["a", "b"], "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(UserError, match="cannot build resnet20 from its model arguments"):
        checkpoint.build_model(payload, "x.pt")
    payload["model_args"] = {"name": "resnet9", "num_classes": 2}
    with pytest.raises(UserError, match="unknown model 'resnet9'"):
        checkpoint.build_model(payload, "x.pt")


def test_unknown_model_names_the_nearest(capsys):
    with pytest.raises(UserError, match="unknown model 'resnet19': did you mean 'resnet18'"):
        create_model("resnet19")
    with pytest.raises(UserError, match="did you mean 'wrn_28_10'"):
        model_args("wrn28_10", 10)
    assert main(["train", "--model", "mobilenet_v2", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "e.g. --set model.name=mobilenetv2" in err


def test_models_command(capsys):
    assert main(["models", "--json", "--classes", "100"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["model"] for m in listed] == list(PARAMS)
    assert {m["model"]: m["params"] for m in listed} == {k: v[1] for k, v in PARAMS.items()}
    macs = {m["model"]: m["macs"] for m in listed}
    assert 0.55e9 < macs["resnet18"] < 0.56e9 and 5.2e9 < macs["wrn_28_10"] < 5.3e9


def test_train_with_the_model_flag(tmp_path):
    args = ["train", "--model", "resnet20", "--data", "synthetic:100", "--epochs", "1",
            "--workers", "0", "--set", "model.width=32", "--batch-size", "32",
            "--out", str(tmp_path), "--name", "r20"]
    assert main(args) == 0
    ckpt = checkpoint.load(tmp_path / "r20" / "last.pt")
    assert ckpt["model_args"] == {"name": "resnet20", "num_classes": 10,
                                  "channels": [8, 16, 32]}
    assert ckpt["config"]["model"] == {"name": "resnet20", "width": 32}
    config = Config(epochs=2)
    config.model = dataclasses.replace(config.model, name="resnet20", width=16)
    with pytest.raises(UserError, match=r"holds resnet20 channels \[8, 16, 32\], the config "
                                        r"asks for resnet20 channels \[4, 8, 16\]"):
        load_resume_state(tmp_path / "r20", config)


@pytest.fixture(scope="module")
def synthetic():
    return load_source("synthetic:100")


@pytest.mark.parametrize("name", list(MODELS))
def test_evaluate_predict_and_summary_commands(name, synthetic, tmp_path, capsys, nchw_only):
    torch.manual_seed(0)
    config = Config()
    config.model = dataclasses.replace(config.model, name=name, width=tiny(name))
    model = create_model(**model_args(name, 10, tiny(name)))
    splits = SimpleNamespace(classes=synthetic.train.classes, mean=(0.5,) * 3, std=(0.25,) * 3)
    path = tmp_path / "best.pt"
    checkpoint.save_atomic(weights_payload(model, config, splits, 1, 10.0), path)

    assert main(["evaluate", str(path), "--data", "synthetic:100", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == len(synthetic.test.labels) and 0 <= result["acc"] <= 100

    image = tmp_path / "x.png"
    buffer = io.BytesIO()
    Image.fromarray(synthetic.test.images[0]).save(buffer, "PNG")
    image.write_bytes(buffer.getvalue())
    assert main(["predict", str(path), str(image), "--json"]) == 0
    (prediction,) = json.loads(capsys.readouterr().out)
    assert len(prediction["predictions"]) == 3

    assert main(["summary", "--model", name, "--width", str(tiny(name)), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["params"] == n_params(model) and summary["macs"] > 0
