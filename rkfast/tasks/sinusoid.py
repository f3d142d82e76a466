"""Sinusoid regression (Finn et al. 2017): each task is ``y = A sin(x - phi)`` with its own A and phi."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from ..batch import TaskBatch

__all__ = ["SinusoidTasks", "SinusoidBatch"]


class SinusoidBatch(NamedTuple):
    """A task batch and the amplitude/phase of every task (for plotting the true curves)."""

    batch: TaskBatch
    amplitude: Tensor  # [T]
    phase: Tensor  # [T]


@dataclass(frozen=True)
class SinusoidTasks:
    """The sinusoid task distribution, sampled a whole meta-batch at a time (no loop over tasks).

    Amplitude ~ U[0.1, 5], phase ~ U[0, pi], inputs ~ U[-5, 5]; ``shots`` support and ``query_shots``
    (default: ``shots``) query points per task, shaped ``[T, K, 1]``.
    """

    shots: int = 10
    query_shots: int | None = None
    amplitude_range: tuple[float, float] = (0.1, 5.0)
    phase_range: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        if self.shots < 1:
            raise ValueError(f"shots must be >= 1, got {self.shots}")
        if self.query_shots is not None and self.query_shots < 1:
            raise ValueError(f"query_shots must be >= 1, got {self.query_shots}")

    @staticmethod
    def target(amplitude: Tensor, phase: Tensor, x: Tensor) -> Tensor:
        """``A sin(x - phi)`` with amplitude and phase ``[T]`` broadcast over ``x [T, K, 1]``."""
        return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))

    def _uniform(self, low_high: tuple[float, float], shape: tuple[int, ...], gen: torch.Generator | None) -> Tensor:
        low, high = low_high
        return torch.rand(shape, generator=gen, dtype=self.dtype) * (high - low) + low

    def sample_with_params(self, num_tasks: int, generator: torch.Generator | None = None) -> SinusoidBatch:
        """``num_tasks`` tasks with their amplitudes and phases."""
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        amplitude = self._uniform(self.amplitude_range, (num_tasks,), generator)
        phase = self._uniform(self.phase_range, (num_tasks,), generator)
        q = self.query_shots or self.shots
        x = self._uniform(self.x_range, (num_tasks, self.shots + q, 1), generator)
        y = self.target(amplitude, phase, x)
        dev = torch.device(self.device)
        batch = TaskBatch(x[:, : self.shots], y[:, : self.shots], x[:, self.shots :], y[:, self.shots :])
        return SinusoidBatch(batch.to(dev), amplitude.to(dev), phase.to(dev))

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """A :class:`~rkfast.batch.TaskBatch` of ``num_tasks`` tasks."""
        return self.sample_with_params(num_tasks, generator).batch

    def batches(self, meta_batch: int, count: int, seed: int = 0) -> Iterator[TaskBatch]:
        """``count`` meta-batches of ``meta_batch`` tasks from a generator seeded with ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        for _ in range(count):
            yield self.sample(meta_batch, gen)
