"""Sinusoid regression (Finn et al. 2017): each task is ``y = A sin(x - phi)`` with its own A and phi.

The task distribution (:class:`SinusoidTasks`) and the registered ``sinusoid`` domain: the MLP
1-40-40-1, MSE, the published hyper-parameters and a plot of a few meta-test tasks before and after
adaptation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..batch import TaskBatch
from ..figures import new_figure, save_figure
from ..models import sinusoid_mlp
from ..optim import MetaOptimizer
from .registry import Defaults, Domain, Metric, Option, TrainedRun, kept_params, meta_test_tasks, register

__all__ = ["SinusoidTasks", "SinusoidBatch", "SINUSOID", "adapted_predictions", "plot_test_tasks"]


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


# -- the registered domain ----------------------------------------------------------------------------


def adapted_predictions(
    opt: MetaOptimizer, tasks: SinusoidBatch, x: Tensor, steps: Sequence[int], step_size: float | None
) -> Tensor:
    """Predictions ``[len(steps), T, len(x), 1]`` on the grid ``x [M, 1]`` of the meta-learned model after
    ``n`` plain gradient steps on each task's support set, for each ``n`` in ``steps`` (0: before);
    ``step_size=None`` adapts as :meth:`MetaOptimizer.evaluate` does by default (the tableau's own step, or
    the learned inner rates)."""
    from torch.func import functional_call, vmap

    T = tasks.batch.num_tasks
    grid = x.expand(T, *x.shape)
    truth = SinusoidTasks.target(tasks.amplitude, tasks.phase, grid)
    batch = TaskBatch(tasks.batch.support_x, tasks.batch.support_y, grid, truth)
    adapted = opt.evaluate(batch, steps=[n for n in steps if n > 0], step_size=step_size, keep_params=True)
    rows = kept_params(adapted)[[adapted.steps.index(n) for n in steps]]
    predict = vmap(lambda row: functional_call(opt.model, opt.layout.unflatten(row), (x,)))
    return torch.stack([predict(r) for r in rows])


def plot_test_tasks(run: TrainedRun, path: Path | str, tasks: int = 4, steps: Sequence[int] = (0, 1, 10)) -> None:
    """A few meta-test tasks: the true sine, the support points and the fit before and after adaptation."""
    # the run's own meta-test adaptation: --test-step if given, else evaluate's default (learned rates too)
    opt, step_size, options = run.opt, run.config.test_step, run.config.options
    sampler = _make_tasks(options, "test", opt.device)
    first_chunk = sampler.sample_with_params(
        min(meta_test_tasks(run), run.defaults.eval_chunk), run.task_generator("test")
    )  # the first meta-test tasks
    count = min(tasks, first_chunk.batch.num_tasks)
    data = SinusoidBatch(
        TaskBatch(*(t[:count] for t in first_chunk.batch)), first_chunk.amplitude[:count], first_chunk.phase[:count]
    )
    batch = data.batch
    x = torch.linspace(-5.0, 5.0, 200, dtype=opt.dtype, device=opt.device).unsqueeze(-1)
    cols = 2 if count > 1 else 1
    rows = -(-count // cols)
    fig = new_figure(figsize=(5 * cols, 3.4 * rows))
    preds = adapted_predictions(opt, data, x, steps, step_size)
    for i in range(count):
        ax = fig.add_subplot(rows, cols, i + 1)
        true = SinusoidTasks.target(data.amplitude[i : i + 1], data.phase[i : i + 1], x.unsqueeze(0))[0]
        xs = x.squeeze(-1).cpu().numpy()
        ax.plot(xs, true.squeeze(-1).cpu().numpy(), color="k", lw=2, label="true")
        for k, n in enumerate(steps):
            label = "before adaptation" if n == 0 else f"after {n} step{'s' if n > 1 else ''}"
            ax.plot(xs, preds[k, i].squeeze(-1).cpu().numpy(), color=f"C{k}", ls="--" if n == 0 else "-", label=label)
        ax.scatter(
            batch.support_x[i].cpu().numpy(),
            batch.support_y[i].cpu().numpy(),
            color="r",
            zorder=5,
            s=20,
            label=f"support ({batch.support_x.shape[1]} points)",
        )
        ax.set_title(f"A={float(data.amplitude[i]):.2f}, phase={float(data.phase[i]):.2f}", fontsize=9)
        if i == 0:
            ax.legend(fontsize=7)
    if step_size is None and opt.rates is not None:
        how = "the learned inner rates" if opt.rates.granularity else "the fixed per-tensor rates"
    else:
        how = f"step size {run.test.step_size if step_size is None and run.test else step_size:.4g}"
    fig.suptitle(f"meta-test tasks, tableau {run.tableau.name}, {how}")
    save_figure(fig, path)


def _make_tasks(options: Mapping[str, Any], split: str, device: torch.device) -> SinusoidTasks:
    """Training tasks have ``shots`` query points (as in MAML); held-out and test tasks ``test_query_shots``."""
    query = None if split == "train" else options["test_query_shots"]
    return SinusoidTasks(shots=options["shots"], query_shots=query, device=device)


SINUSOID = register(
    Domain(
        name="sinusoid",
        description="sinusoid regression (Finn et al. 2017): y = A sin(x - phi), A ~ U[0.1, 5], phi ~ U[0, pi], "
        "x ~ U[-5, 5]; MLP 1-40-40-1",
        make_tasks=_make_tasks,
        make_model=lambda options: sinusoid_mlp(),
        loss_fn=F.mse_loss,
        metrics=(Metric("mse", "loss", "query MSE", "MSE"),),
        defaults=Defaults(
            iterations=20000,
            meta_batch=25,
            inner_lr=0.01,
            lr=1e-3,
            source="Finn et al. 2017: 10-shot, 25 tasks per meta-batch, inner step 0.01, Adam 1e-3",
        ),
        options=(
            Option("shots", 10, "support (and training query) points per task"),
            Option("test_query_shots", 100, "query points per held-out and test task"),
        ),
        describe_test=lambda o: f"{o['shots']}-shot support, {o['test_query_shots']} query points per task",
        test_protocol=lambda o: {"support_shots": o["shots"], "query_shots": o["test_query_shots"]},
        plots={"test_tasks.png": plot_test_tasks},
    )
)
