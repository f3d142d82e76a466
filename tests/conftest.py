"""Shared fixtures: small models and random task batches (fresh randomness each run unless seeded)."""

from __future__ import annotations

import os

import torch

# Without a GPU, the Triton kernels are tested in Triton's CPU interpreter, which must be chosen before
# Triton compiles anything (i.e. before rkfast.kernels.triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn

from rkfast import TaskBatch
from rkfast.functional import ParamLayout

# Tests draw fresh random inputs each run; a failing seed is printed so it can be replayed.
_SEED = int(os.environ.get("RKFAST_TEST_SEED", torch.seed() % 2**31))


def pytest_report_header(config):  # noqa: D103
    return f"rkfast test seed: {_SEED} (replay with RKFAST_TEST_SEED={_SEED})"


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(_SEED)
    yield


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
