"""CIFAR model zoo: `create_model(name, num_classes=..., **arch_args)` over one registry.

Each family lives in its own module and registers its models on import: resnet.py
(ResNet-18/34/50, pre-activation ResNet-18), cifar_resnet.py (He et al.'s ResNet-20 ...
110), wrn.py (wide ResNets), vgg.py, mobilenet.py (MobileNetV2), densenet.py,
airbench.py (the time-to-accuracy network of Jordan, 2024).
All take 32x32 inputs; all but airbench have a 3x3 first convolution at stride 1 and no
max-pool in the stem.
"""

# Import order is registration order, the order `cifarlab models` lists them in.
from cifarlab.models import resnet, cifar_resnet, wrn, vgg, mobilenet, densenet, airbench  # noqa: F401, E501, I001
from cifarlab.models.registry import (
    BASE_WIDTH,
    LAYERS,
    MODELS,
    architecture,
    check_name,
    create_model,
    initialise_from_data,
    model_args,
)

__all__ = ["BASE_WIDTH", "LAYERS", "MODELS", "architecture", "check_name", "create_model",
           "initialise_from_data", "model_args"]
