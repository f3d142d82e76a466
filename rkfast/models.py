"""The reference models of the few-shot benchmarks."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import nn

from .norms import PerStepBatchNorm2d

__all__ = ["sinusoid_mlp", "conv4"]


def sinusoid_mlp(hidden: Sequence[int] = (40, 40)) -> nn.Sequential:
    """The sinusoid regression MLP of Finn et al. 2017: ``1 -> 40 -> 40 -> 1`` with ReLU."""
    sizes = [1, *hidden]
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 1))


def conv4(
    in_channels: int = 1, num_classes: int = 5, hidden: int = 64, image_size: int = 28, per_step_norm: int | None = None
) -> nn.Sequential:
    """The conv4 few-shot backbone: 4 x [conv 3x3, BatchNorm, ReLU, max-pool 2], then a linear head.

    BatchNorm is created with ``track_running_stats=False``: each task normalizes with its own batch
    statistics (MAML's convention) in ``train()`` and ``eval()`` mode alike. rkfast never updates running
    statistics (its calls use batch statistics, :mod:`rkfast.norms`), so tracked ones would stay at their
    initial values and ``eval()`` would normalize with those (mean 0, variance 1) instead of what the model
    was meta-trained with; the state dict has no running buffers either way.

    ``per_step_norm=S`` uses MAML++'s per-step batch norm instead
    (:class:`~rkfast.norms.PerStepBatchNorm2d` with ``S`` rows of weights and biases: stage / adaptation
    step ``j`` uses row ``min(j, S - 1)``); ``None`` (default) plain BatchNorm.
    """
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, hidden, 3, padding=1),
            _batch_norm(hidden, per_step_norm),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels, size = hidden, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * size * size, num_classes))


def _batch_norm(channels: int, per_step: int | None) -> nn.Module:
    """conv4's norm layer: batch statistics, with ``per_step`` rows of affine parameters if given."""
    if per_step is None:
        return nn.BatchNorm2d(channels, track_running_stats=False)
    return PerStepBatchNorm2d(channels, per_step)
