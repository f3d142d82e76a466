"""The end-to-end benchmark's workloads, and the common setup every contender's meta-step starts from.

A :class:`Workload` is a model, a task batch and the inner step; :func:`make_setup` builds its model at the
common initialization (one seed) with the batch on the device: the :class:`Setup` each contender of
``e2e_contenders`` turns into a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import rkfast

OUTER_LR = 1e-3  # every contender's outer step: Adam at this learning rate
ORDERS = ("second", "first")


@dataclass(frozen=True)
class Workload:
    name: str
    describe: str
    make_model: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    inner_lr: float
    make_batch: Callable[[int], rkfast.TaskBatch]  # seed -> batch (on the CPU)
    warmup: int  # steps before timing, the sanity step included
    repeats: int  # timed steps


def _sinusoid_batch(seed: int) -> rkfast.TaskBatch:
    return rkfast.tasks.SinusoidTasks(shots=10, query_shots=10).sample(25, torch.Generator().manual_seed(seed))


def _conv4_batch(seed: int, tasks: int = 32, ways: int = 5, shots: int = 1, queries: int = 15) -> rkfast.TaskBatch:
    gen = torch.Generator().manual_seed(seed)
    support_x = torch.randn(tasks, ways * shots, 1, 28, 28, generator=gen)
    query_x = torch.randn(tasks, ways * queries, 1, 28, 28, generator=gen)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return rkfast.TaskBatch(support_x, support_y, query_x, query_y)


WORKLOADS: dict[str, Workload] = {
    "sinusoid": Workload("sinusoid", "sinusoid MLP 1-40-40-1, 25 tasks x 10 support / 10 query, MSE, inner lr 0.01",
                         rkfast.models.sinusoid_mlp, F.mse_loss, 0.01, _sinusoid_batch, warmup=10, repeats=100),
    "conv4": Workload("conv4", "conv4(1, 5, 64, 28), 32 tasks, 5-way 1-shot, 15 query/class, cross-entropy, "
                      "inner lr 0.4", lambda: rkfast.models.conv4(1, 5, 64, 28), F.cross_entropy, 0.4,
                      _conv4_batch, warmup=1, repeats=3),
}


def has_norm_layers(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm)) for m in model.modules())


@dataclass
class Setup:
    """What every contender gets: a fresh model at the common initialization, the batch and the step."""

    workload: Workload
    model: nn.Module
    batch: rkfast.TaskBatch
    tableau: rkfast.Tableau
    first_order: bool
    device: torch.device

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.model.named_parameters()]

    def loss(self, params: dict[str, Tensor] | None, x: Tensor, y: Tensor) -> Tensor:
        """The task loss of ``x, y`` at ``params`` (``None``: the module's own parameters)."""
        out = self.model(x) if params is None else functional_call(self.model, params, (x,))
        return self.workload.loss_fn(out, y)

    def adam(self, params: Any) -> torch.optim.Optimizer:
        """The outer optimizer every non-rkfast contender uses: what a user writes."""
        return torch.optim.Adam(params, lr=OUTER_LR)


def make_setup(workload: Workload, tableau: str, first_order: bool, device: torch.device, seed: int,
               dtype: torch.dtype = torch.float32, tasks: int | None = None) -> Setup:
    """The common initialization (``seed``) and batch; ``tasks``: only the first ones (the exact check)."""
    torch.manual_seed(seed)
    model = workload.make_model().to(device=device, dtype=dtype)
    batch = workload.make_batch(seed)
    batch = rkfast.TaskBatch(*(t[:tasks].to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                               for t in batch))
    return Setup(workload, model, batch, rkfast.get_tableau(tableau), first_order, device)


def flat_grad(params: list[Tensor]) -> Tensor:
    """The parameters' ``.grad`` as one flat vector (zeros where a parameter has none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in params])
