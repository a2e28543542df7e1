"""cifarlab: train image classifiers on CIFAR-10-style 32x32 data."""

__version__ = "0.1.0"
