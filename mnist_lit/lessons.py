"""The networks the lesson recipes (``configs/lessons/``) put in place of the seed's, and a look inside a
trained network: its first-layer filters and the feature maps of its blocks (docs/lessons.md).

Loaded only by a recipe that names one of these networks, by ``test``'s report and by ``serve``.
"""

import torch
from torch import nn

from mnist_lit.model import NUM_CLASSES


class ConvNetWithoutBatchNorm(nn.Module):
    """:class:`mnist_lit.model.ConvNet` without its two BatchNorms: conv5x5(1->16)+pool+ReLU,
    conv5x5(16->32)+pool+ReLU, linear -> 10 logits; 28,938 parameters (the BatchNorms had 96)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=5, padding=2),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            nn.MaxPool2d(2),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(32 * 7 * 7, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).flatten(1))


class FullyConnected(nn.Module):
    """Every pixel to every hidden unit: linear(784->hidden)+BatchNorm+ReLU, linear -> 10 logits.

    The default 37 hidden units give 29,499 parameters, about the ConvNet's 29,034, so that the lesson
    compares how the parameters are used rather than how many there are.

    Args:
        hidden: hidden units.
    """

    def __init__(self, hidden: int = 37) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(1), nn.Linear(28 * 28, hidden), nn.BatchNorm1d(hidden), nn.ReLU()
        )  # fmt: skip
        self.classifier = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def first_filters(net: nn.Module) -> torch.Tensor | None:
    """The first convolution's kernels (out, in, h, w), or None for a network without one."""
    conv = next((module for module in net.modules() if isinstance(module, nn.Conv2d)), None)
    return None if conv is None else conv.weight.detach()


def block_maps(net: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Each convolutional block's output (N, channels, h, w) for normalized ``images``: what every ReLU
    that rectifies a feature map hands on, in order (none for a fully connected network)."""
    maps = []
    hooks = [
        module.register_forward_hook(lambda _, __, out: maps.append(out.detach()) if out.dim() == 4 else None)
        for module in net.modules()
        if isinstance(module, nn.ReLU)
    ]
    try:
        with torch.no_grad():
            net(images)
    finally:
        for hook in hooks:
            hook.remove()
    return maps
