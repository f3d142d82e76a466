"""PNG plots of sinusoid runs (matplotlib, Agg canvas; no pyplot state, no global backend switch).

Imported lazily by :mod:`rkfast.cli`, so ``import rkfast`` never loads matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from torch import Tensor
from torch.func import functional_call, vmap

from .batch import TaskBatch
from .optim import MetaOptimizer
from .tasks.sinusoid import SinusoidBatch, SinusoidTasks

if TYPE_CHECKING:
    from .cli import RunResult

__all__ = ["adapted_predictions", "plot_training", "plot_test_tasks", "plot_compare"]


def adapted_predictions(
    opt: MetaOptimizer, tasks: SinusoidBatch, x: Tensor, steps: Sequence[int], step_size: float
) -> Tensor:
    """Predictions ``[len(steps), T, len(x), 1]`` on the grid ``x [M, 1]`` of the meta-learned model after
    ``n`` plain gradient steps on each task's support set, for each ``n`` in ``steps`` (0: before)."""
    T = tasks.batch.num_tasks
    grid = x.expand(T, *x.shape)
    truth = SinusoidTasks.target(tasks.amplitude, tasks.phase, grid)
    batch = TaskBatch(tasks.batch.support_x, tasks.batch.support_y, grid, truth)
    adapted = opt.evaluate(batch, steps=[n for n in steps if n > 0], step_size=step_size, keep_params=True)
    rows = adapted.params[[adapted.steps.index(n) for n in steps]]  # type: ignore[index]
    predict = vmap(lambda row: functional_call(opt.model, opt.layout.unflatten(row), (x,)))
    return torch.stack([predict(r) for r in rows])


def _smooth(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Moving average (window ~3% of the run, at most 500) and the iterations it ends at."""
    v = np.asarray(values, dtype=np.float64)
    w = max(1, min(500, len(v) // 30))
    c = np.cumsum(np.insert(v, 0, 0.0))
    return np.arange(w, len(v) + 1), (c[w:] - c[:-w]) / w


def _log_y(ax: Axes) -> None:
    """Log-scale y axis labelled with plain numbers (0.5, 2, 3) rather than powers of ten."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    mantissa = lambda v: round(v / 10 ** np.floor(np.log10(v))) if v > 0 else 0
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if mantissa(v) in (2, 3, 5) else ""))
    ax.grid(True, which="both", alpha=0.3)


def _save(fig: Figure, path: Path | str) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _eval_curve(run: RunResult, step: str) -> tuple[list[int], list[float]]:
    return [e["iteration"] for e in run.evals], [e["mse"][step] for e in run.evals]


def plot_training(run: RunResult, path: Path | str) -> None:
    """Meta-loss per iteration (raw and smoothed) and the periodic held-out query MSE, log scale."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(run.losses) + 1), run.losses, color="C0", alpha=0.15, lw=0.5)
    ax.plot(*_smooth(run.losses), color="C0", label="meta-loss (smoothed)")
    for k, (step, marker) in enumerate((("0", "x"), ("1", "o"), ("10", "s"))):
        label = "before adaptation" if step == "0" else f"after {step} step{'s' * (step != '1')}"
        ax.plot(*_eval_curve(run, step), marker=marker, ms=4, ls="--", color=f"C{k + 1}", label=f"held-out MSE {label}")
    ax.set(xlabel="meta-step", ylabel="MSE", title=f"sinusoid, tableau {run.tableau.name}")
    _log_y(ax)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_test_tasks(run: RunResult, path: Path | str, tasks: int = 4, steps: Sequence[int] = (0, 1, 10)) -> None:
    """A few meta-test tasks: the true sine, the support points and the fit before and after adaptation."""
    count = min(tasks, run.plot_tasks.batch.num_tasks)
    data = SinusoidBatch(TaskBatch(*(t[:count] for t in run.plot_tasks.batch)), *(t[:count] for t in run.plot_tasks[1:]))
    batch, opt, step_size = data.batch, run.opt, run.test.step_size
    x = torch.linspace(-5.0, 5.0, 200, dtype=opt.dtype, device=opt.device).unsqueeze(-1)
    cols = 2 if count > 1 else 1
    rows = -(-count // cols)
    fig = Figure(figsize=(5 * cols, 3.4 * rows))
    preds = adapted_predictions(opt, data, x, steps, step_size)
    for i in range(count):
        ax = fig.add_subplot(rows, cols, i + 1)
        true = SinusoidTasks.target(data.amplitude[i : i + 1], data.phase[i : i + 1], x.unsqueeze(0))[0]
        xs = x.squeeze(-1).cpu().numpy()
        ax.plot(xs, true.squeeze(-1).cpu().numpy(), color="k", lw=2, label="true")
        for k, n in enumerate(steps):
            label = "before adaptation" if n == 0 else f"after {n} step{'s' if n > 1 else ''}"
            ax.plot(xs, preds[k, i].squeeze(-1).cpu().numpy(), color=f"C{k}", ls="--" if n == 0 else "-", label=label)
        ax.scatter(batch.support_x[i].cpu().numpy(), batch.support_y[i].cpu().numpy(), color="r", zorder=5,
                   s=20, label=f"support ({batch.support_x.shape[1]} points)")
        ax.set_title(f"A={float(data.amplitude[i]):.2f}, phase={float(data.phase[i]):.2f}", fontsize=9)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"meta-test tasks, tableau {run.tableau.name}, step size {step_size:.4g}")
    _save(fig, path)


def plot_compare(runs: Sequence[RunResult], path: Path | str) -> None:
    """Left: test MSE vs adaptation steps with 95% CI per tableau. Right: held-out MSE during training."""
    fig = Figure(figsize=(12, 4.5))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, run in enumerate(runs):
        summary = run.test.summary()
        steps = summary["steps"]
        mean, ci = zip(*(summary["loss"][n] for n in steps))
        label = f"{run.tableau.name} (order {run.tableau.order}, step {summary['step_size']:.4g})"
        left.errorbar(np.array(steps) + 0.06 * (i - (len(runs) - 1) / 2), mean, yerr=ci, marker="o", capsize=3,
                      color=f"C{i}", label=label)
        right.plot(*_eval_curve(run, "1"), marker="o", ms=3, color=f"C{i}", label=f"{run.tableau.name}, after 1 step")
        right.plot(*_smooth(run.losses), color=f"C{i}", alpha=0.35, lw=1)
    left.set(xlabel="adaptation steps", ylabel="query MSE",
             title=f"meta-test, {runs[0].test.losses.shape[1]} tasks (95% CI)")
    left.set_xticks(steps)
    right.set(xlabel="meta-step", ylabel="MSE",
              title="held-out MSE after 1 step (faint: smoothed meta-loss)")
    for ax in (left, right):
        _log_y(ax)
        ax.legend(fontsize=8)
    _save(fig, path)
