import pytest
import torch

from cifarlab.errors import UserError
from cifarlab.models import MODELS, create_model


def test_resnet18_parameter_count_matches_the_seed_report():
    model = create_model("resnet18", num_classes=10, width=64)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


def test_resnet18_architecture_for_32x32():
    model = create_model("resnet18", num_classes=10, width=64)
    stem_conv = model.stem[0]
    assert (stem_conv.kernel_size, stem_conv.stride, stem_conv.bias) == ((3, 3), (1, 1), None)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(s) for s in stages] == [2, 2, 2, 2]
    assert [s[0].conv1.stride[0] for s in stages] == [1, 2, 2, 2]
    assert [s[0].conv2.out_channels for s in stages] == [64, 128, 256, 512]
    assert isinstance(model.layer1[0].shortcut, torch.nn.Identity)
    assert isinstance(model.layer2[0].shortcut, torch.nn.Sequential)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("classes, width", [(10, 8), (3, 4)])
def test_output_shape(name, classes, width):
    model = create_model(name, num_classes=classes, width=width).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, classes)


def test_kaiming_init_is_seeded():
    torch.manual_seed(1)
    a = create_model("resnet18", width=8).state_dict()
    torch.manual_seed(1)
    b = create_model("resnet18", width=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    std = a["stem.0.weight"].std().item()
    fan_out = 8 * 3 * 3
    assert abs(std - (2 / fan_out) ** 0.5) < 0.25 * (2 / fan_out) ** 0.5


def test_unknown_model():
    with pytest.raises(UserError, match="unknown model"):
        create_model("vgg99")
