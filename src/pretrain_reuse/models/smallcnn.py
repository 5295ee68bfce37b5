"""A small CNN for 32–64 px images, the backbone the package pre-trains on its synthetic world."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """``stages`` blocks of two 3×3 conv-BN-ReLU layers (widths ``width``, 2·``width``, 4·``width``,
    ...), each but the last followed by 2×2 max-pooling; global average pooling; a ``Linear``
    classifier ``fc``. Features (the classifier's input) have ``width · 2**(stages-1)`` dims.
    Any input of at least ``2**(stages-1)`` px works; it is meant for 32–64 px.
    """

    def __init__(self, *, width: int = 32, stages: int = 3, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(stages):
            c_out = width * 2**i
            layers += _conv_bn_relu(c_in, c_out) + _conv_bn_relu(c_out, c_out)
            if i < stages - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = c_in
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(x)))
