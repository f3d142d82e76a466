"""Small models and random task batches shared by the tests (fresh randomness: conftest seeds each test)."""

from __future__ import annotations

import torch
from torch import nn

from rkfast import TaskBatch
from rkfast.functional import ParamLayout


def smooth_mlp(hidden: int = 8, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A small tanh MLP: smooth, so finite differences of second-order quantities are accurate."""
    return nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(dtype)


def regression_batch(tasks: int = 3, shots: int = 5, query: int = 6, dtype: torch.dtype = torch.float64) -> TaskBatch:
    return TaskBatch(
        torch.randn(tasks, shots, 1, dtype=dtype),
        torch.randn(tasks, shots, 1, dtype=dtype),
        torch.randn(tasks, query, 1, dtype=dtype),
        torch.randn(tasks, query, 1, dtype=dtype),
    )


def classification_batch(tasks: int = 3, ways: int = 3, shots: int = 2, query: int = 4, size: int = 16,
                         dtype: torch.dtype = torch.float64) -> TaskBatch:
    return TaskBatch(
        torch.randn(tasks, ways * shots, 1, size, size, dtype=dtype),
        torch.randint(0, ways, (tasks, ways * shots)),
        torch.randn(tasks, ways * query, 1, size, size, dtype=dtype),
        torch.randint(0, ways, (tasks, ways * query)),
    )


def flat_theta(model: nn.Module) -> tuple[ParamLayout, torch.Tensor]:
    layout = ParamLayout.from_module(model)
    return layout, layout.flatten(list(model.parameters())).detach()
