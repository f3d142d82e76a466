"""The reference models of the few-shot benchmarks."""

from __future__ import annotations

from typing import Sequence

from torch import nn

__all__ = ["sinusoid_mlp", "conv4"]


def sinusoid_mlp(hidden: Sequence[int] = (40, 40)) -> nn.Sequential:
    """The sinusoid regression MLP of Finn et al. 2017: ``1 -> 40 -> 40 -> 1`` with ReLU."""
    sizes = [1, *hidden]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 1))


def conv4(in_channels: int = 1, num_classes: int = 5, hidden: int = 64, image_size: int = 28) -> nn.Sequential:
    """The conv4 few-shot backbone: 4 x [conv 3x3, BatchNorm, ReLU, max-pool 2], then a linear head.

    BatchNorm is created with ``track_running_stats=False``: each task normalizes with its own batch
    statistics (MAML's convention), which is also what lets the model run under ``vmap``.
    """
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels, size = hidden, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * size * size, num_classes))
