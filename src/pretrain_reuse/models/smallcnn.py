"""A small CNN for 32–64 px images, the backbone the package pre-trains on its synthetic world."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """``stages`` conv-BN-ReLU blocks of widths ``width``, 2·``width``, 4·``width``, ..., with 2×2
    max-pooling between them, then global *max* pooling and a ``Linear`` classifier ``fc``.

    One convolution per stage keeps it fast on a CPU (one pass over the 12,800 images of the
    synthetic pre-training set takes seconds); max pooling suits the synthetic world, whose classes
    depend on which parts appear, not where. Features (the classifier's input) have
    ``width · 2**(stages-1)`` dims.
    """

    def __init__(self, *, width: int = 16, stages: int = 4, num_classes: int = 10,
                 in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(stages):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            if i < stages - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.num_features = c_in
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) of images (B, C, H, W)."""
        return self.fc(self.pool(self.blocks(x)))
