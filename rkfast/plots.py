"""PNG plots of training runs (matplotlib, Agg canvas; no pyplot state, no global backend switch).

The plots every domain gets (the training curve, the comparison of tableaus) live here; a domain's own
plots live in its module (:mod:`rkfast.tasks`) and use :func:`new_figure` / :func:`save_figure`.
:func:`write_run_plots` makes every plot of a finished run. ``import rkfast`` does not import this module, so it
never loads matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .figures import mark_nonfinite, new_figure, readable_log_axis, save_figure
from .report import GridGroup, pooled_summary
from .train import RATES_PLOT, TABLEAU_PLOT, RunResult

__all__ = [
    "new_figure",
    "save_figure",
    "plot_training",
    "plot_compare",
    "plot_compare_grid",
    "plot_rates",
    "plot_learned_tableau",
    "write_run_plots",
]


def _smooth(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Moving average (window ~3% of the run, at most 500) and the iterations it ends at."""
    v = np.asarray(values, dtype=np.float64)
    w = max(1, min(500, len(v) // 30))
    c = np.cumsum(np.insert(v, 0, 0.0))
    return np.arange(w, len(v) + 1), (c[w:] - c[:-w]) / w


def _scale(ax: Axes, higher_is_better: bool) -> None:
    """Losses on a log scale with labelled ticks (linear when they span less than a decade); accuracies
    (bounded, higher is better) on a linear one."""
    if higher_is_better:
        ax.grid(True, alpha=0.3)
    else:
        readable_log_axis(ax)


def _eval_curve(run: RunResult, step: str) -> tuple[list[int], list[float]]:
    """The held-out metric after ``step`` adaptation steps at every evaluation (NaN where it was not finite)."""
    name = run.domain.metric.name
    values = [e[name].get(step) for e in run.evals]
    return [e["iteration"] for e in run.evals], [math.nan if v is None else float(v) for v in values]


_Series = tuple[Sequence[float], Sequence[float | None], str]  # (x, y, color) of a plotted series


def _mark_nonfinite(ax: Axes, marked: Sequence[_Series]) -> None:
    """Every non-finite point of ``marked`` (``(x, y, color)`` per series) marked at the top of ``ax``, one
    legend entry for them all; call it after the axis scale is set."""
    label: str | None = "non-finite (x at the top)"
    for x, y, color in marked:
        if mark_nonfinite(ax, x, y, color, label):
            label = None


def _steps_label(step: int) -> str:
    return "before adaptation" if step == 0 else f"after {step} step{'s' * (step != 1)}"


def plot_training(run: RunResult, path: Path | str) -> None:
    """Meta-loss per iteration (raw and smoothed) and the periodic held-out metric after adaptation."""
    metric = run.domain.metric
    fig = new_figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    loss_ax = ax.twinx() if metric.higher_is_better else ax  # a loss and an accuracy need their own axes
    loss_ax.plot(np.arange(1, len(run.losses) + 1), run.losses, color="C0", alpha=0.15, lw=0.5)
    loss_ax.plot(*_smooth(run.losses), color="C0", label="meta-loss (smoothed)")
    steps = (0, *run.defaults.eval_steps)
    markers = ("x", "o", "s", "^", "v", "D")
    marked: list[_Series] = []
    for k, step in enumerate(steps):
        iterations, values = _eval_curve(run, str(step))
        marked.append((iterations, values, f"C{k + 1}"))
        ax.plot(
            iterations,
            values,
            marker=markers[k % len(markers)],
            ms=4,
            ls="--",
            color=f"C{k + 1}",
            label=f"held-out {metric.short} {_steps_label(step)}",
        )
    ax.set(xlabel="meta-step", ylabel=metric.short, title=f"{run.domain.name}, tableau {run.tableau.name}")
    _scale(ax, metric.higher_is_better)
    _mark_nonfinite(ax, marked)
    if loss_ax is not ax:
        loss_ax.set_ylabel("meta-loss")
        readable_log_axis(loss_ax)
        loss_ax.legend(fontsize=8, loc="upper right")
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, path)


def plot_compare(runs: Sequence[RunResult], path: Path | str) -> None:
    """Left: the test metric vs adaptation steps with 95% CI per tableau. Right: held-out metric during
    training (after the first evaluation step). A run without a meta-test (diverged) has only its curve."""
    metric = runs[0].domain.metric
    tested = [run for run in runs if run.test is not None]
    first = str(runs[0].defaults.eval_steps[0])
    fig = new_figure(figsize=(12, 4.5))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    steps = [0, *runs[0].defaults.test_steps]
    marked: dict[Axes, list[_Series]] = {left: [], right: []}
    for i, run in enumerate(runs):
        if run.test is not None:
            summary = run.test.summary()
            steps = summary["steps"]
            mean, ci = zip(*(summary[metric.source][n] for n in steps), strict=True)
            label = f"{run.tableau.name} (order {run.tableau.order}, step {summary['step_size']:.4g})"
            left.errorbar(
                np.array(steps) + 0.06 * (i - (len(runs) - 1) / 2),
                mean,
                yerr=ci,
                marker="o",
                capsize=3,
                color=f"C{i}",
                label=label,
            )
            marked[left].append((steps, mean, f"C{i}"))
        iterations, values = _eval_curve(run, first)
        marked[right].append((iterations, values, f"C{i}"))
        right.plot(
            iterations,
            values,
            marker="o",
            ms=3,
            color=f"C{i}",
            label=f"{run.tableau.name}, {_steps_label(int(first))}",
        )
        if not metric.higher_is_better:
            right.plot(*_smooth(run.losses), color=f"C{i}", alpha=0.35, lw=1)
    left.set(
        xlabel="adaptation steps",
        ylabel=metric.label,
        title=f"meta-test, {tested[0].meta_test().losses.shape[1] if tested else 0} tasks (95% CI)",
    )
    left.set_xticks(steps)
    faint = "" if metric.higher_is_better else " (faint: smoothed meta-loss)"
    right.set(
        xlabel="meta-step", ylabel=metric.short, title=f"held-out {metric.short} {_steps_label(int(first))}{faint}"
    )
    for ax in (left, right):
        _scale(ax, metric.higher_is_better)
        _mark_nonfinite(ax, marked[ax])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save_figure(fig, path)


def _grid_scores(ax: Axes, groups: Sequence[GridGroup], metric_short: str, step: int) -> list[_Series]:
    """The right panel of a grid comparison over several h: each tableau's final held-out score per h (first
    seed), the selected h circled, an h without a finite score (diverged, or non-finite after ``step``
    adaptation steps) marked at the top (what it returns, for :func:`_mark_nonfinite`)."""
    grid = groups[0].grid
    marked: list[_Series] = []
    for i, g in enumerate(groups):
        color = f"C{i % 10}"
        values = [math.nan if (v := g.scores.get(h)) is None else v for h in grid]
        ax.plot(list(grid), values, marker="o", ms=4, color=color, label=g.tableau.name)
        if g.selected is not None and (best := g.scores.get(g.selected)) is not None:
            ax.plot([g.selected], [best], marker="o", ms=11, mfc="none", color=color)
        marked.append(([h for h in grid if h in g.scores], [g.scores[h] for h in grid if h in g.scores], color))
    ax.set_xscale("log")
    ax.set_xticks(list(grid))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set(
        xlabel="inner step h",
        ylabel=metric_short,
        title=f"final held-out {metric_short} {_steps_label(step)}, seed {groups[0].seeds[0]} (circled: selected)",
    )
    return marked


def plot_compare_grid(groups: Sequence[GridGroup], path: Path | str) -> None:
    """A comparison over a grid of inner steps and seeds. Left: per tableau, the test metric vs adaptation
    steps with the selected h, the mean over seeds x test tasks with its 95% CI. Right: the final held-out
    score of each h (first seed) that selected it, after the selecting step count (the groups'
    ``select_steps``), the selected h circled and an h without a finite score marked; with one h, each seed's
    test metric after the first test step count instead. A tableau without a meta-test has only its right
    curve."""
    first = next((r for g in groups for r in [*g.search.values(), *g.runs.values()]), None)
    fig = new_figure(figsize=(12, 4.5))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if first is None:
        save_figure(fig, path)
        return
    metric, grid = first.domain.metric, groups[0].grid
    steps = [0, *first.defaults.test_steps]
    shown_step = steps[1] if len(steps) > 1 else 0
    marked: dict[Axes, list[_Series]] = {left: [], right: []}
    for i, g in enumerate(groups):
        color = f"C{i % 10}"
        tested = g.tested
        if tested:
            pooled = pooled_summary(tested)
            steps = sorted(pooled)
            mean, ci = [pooled[n]["mean"] for n in steps], [pooled[n]["ci95"] for n in steps]
            label = f"{g.tableau.name} (h={g.selected:g}, {len(tested)} seed{'s' * (len(tested) != 1)})"
            x = np.array(steps) + 0.06 * (i - (len(groups) - 1) / 2)
            left.errorbar(x, mean, yerr=ci, marker="o", capsize=3, color=color, label=label)
            marked[left].append((list(x), mean, color))
        if len(grid) == 1 and tested:
            seeds = [r.config.seed for r in tested]
            means = [pooled_summary([r])[shown_step]["mean"] for r in tested]
            right.plot(seeds, means, marker="o", ls="", color=color, label=g.tableau.name)
            marked[right].append((seeds, means, color))
    tasks = first.config.test_tasks
    left.set(
        xlabel="adaptation steps", ylabel=metric.label, title=f"meta-test, selected h, seeds x {tasks} tasks (95% CI)"
    )
    left.set_xticks(steps)
    if len(grid) > 1:
        step = groups[0].select_steps
        marked[right] = _grid_scores(
            right, groups, metric.short, first.defaults.eval_steps[-1] if step is None else step
        )
    else:
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.set(
            xlabel="training seed",
            ylabel=metric.short,
            title=f"test {metric.short} {_steps_label(shown_step)} per seed (h={grid[0]:g})",
        )
    for ax in (left, right):
        _scale(ax, metric.higher_is_better)
        _mark_nonfinite(ax, marked[ax])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_rates(run: RunResult, path: Path | str) -> None:
    """The learned inner rates vs meta-step, from the values recorded at every held-out evaluation: one line
    per parameter tensor (and rate set, with per-stage rates); element rates show their mean with a min-max
    band. Frozen tensors (fixed rates) are named in the title; scalar rates are one line."""
    history = run.rate_history
    info = run.rates or {}
    frozen = set(info.get("frozen", {}))
    iterations = np.array([h["iteration"] for h in history])
    names = [n for n in (history[0]["values"] if history else {}) if n not in frozen]
    if info.get("granularity") == "scalar":
        names = names[:1]  # every learned tensor shares the one rate
    sets = int(info.get("sets", 1))
    fig = new_figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    k = 0
    for name in names:
        for s in range(sets):
            entries = [h["values"][name][s] for h in history]
            label = "all tensors" if info.get("granularity") == "scalar" else name
            label += f", set {s}" if sets > 1 else ""
            color = f"C{k % 10}"
            if entries and isinstance(entries[0], dict):
                mean = np.array([e["mean"] for e in entries])
                ax.fill_between(
                    iterations,
                    [e["min"] for e in entries],
                    [e["max"] for e in entries],
                    color=color,
                    alpha=0.06 if len(names) * sets > 3 else 0.15,
                    lw=0,
                )
                ax.plot(iterations, mean, marker="o", ms=3, color=color, label=label)
            else:
                ax.plot(iterations, entries, marker="o", ms=3, color=color, label=label)
            k += 1
    ax.axhline(float(info.get("inner_lr", run.config.inner_lr or 0.0)), color="k", ls=":", lw=1, label="inner_lr")
    fixed = (
        ""
        if not frozen
        else (
            f"\nfixed: {', '.join(f'{n}={v:g}' for n, v in info['frozen'].items())}"
            if len(frozen) <= 4
            else f"\n{len(frozen)} tensors fixed"
        )
    )
    per_stage = ", per stage" if info.get("per_stage") else ""
    per_stage += ": mean and min-max band" if info.get("granularity") == "element" else ""
    ax.set(
        xlabel="meta-step",
        ylabel="inner rate",
        title=f"learned rates ({info.get('granularity')}{per_stage}), tableau {run.tableau.name}{fixed}",
    )
    ax.title.set_fontsize(10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2 if k > 8 else 1)
    save_figure(fig, path)


def plot_learned_tableau(history: Any, path: Path | str, info: dict[str, Any] | None = None) -> None:
    """The learned tableau vs meta-step, from the values recorded at every held-out evaluation
    (``results.json``'s ``training.tableau``: ``[{"iteration", "A", "b"}, ...]``). Left: every learned entry
    ``A_jl`` (1-based, as Butcher writes them); right: every weight ``b_j`` (constant with fixed weights).

    ``history`` may also be a :class:`~rkfast.train.RunResult` (its ``tableau_history``, and its
    ``learned_tableau`` as ``info``), so that it plots as the other run plots do. ``info``
    (:func:`~rkfast.train.learned_tableau_info`) names the learned entries and titles the plot; without it
    the entries shown are those below the diagonal that are non-zero in any record."""
    if hasattr(history, "tableau_history"):
        info = history.learned_tableau if info is None else info
        history = history.tableau_history
    history = list(history)
    info = info or {}
    iterations = np.array([h["iteration"] for h in history])
    stages = len(history[0]["b"]) if history else 0
    entries = [tuple(e) for e in info.get("entries", ())] or [
        (j, col) for j in range(stages) for col in range(j) if any(h["A"][j][col] != 0.0 for h in history)
    ]
    fig = new_figure(figsize=(12, 4.5))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    markers = ("o", "s", "^", "v", "D", "x")
    for k, (j, col) in enumerate(entries):
        left.plot(
            iterations,
            [h["A"][j][col] for h in history],
            marker=markers[k % len(markers)],
            ms=3,
            color=f"C{k % 10}",
            label=f"$A_{{{j + 1}{col + 1}}}$" if stages < 10 else f"A[{j + 1},{col + 1}]",
        )
    for j in range(stages):
        right.plot(
            iterations,
            [h["b"][j] for h in history],
            marker=markers[j % len(markers)],
            ms=3,
            color=f"C{j % 10}",
            label=f"$b_{{{j + 1}}}$" if stages < 10 else f"b[{j + 1}]",
        )
    weights = {"order": "b by the order conditions", "fixed": "b fixed"}.get(info.get("weights") or "", "b")
    base = f" from {info['base']}" if info.get("base") else ""
    pattern = f"{info['pattern']}, " if info.get("pattern") else ""
    left.set(xlabel="meta-step", ylabel="entry of A", title=f"learned tableau{base} ({pattern}{weights}): entries of A")
    right.set(xlabel="meta-step", ylabel="weight", title=f"learned tableau{base}: weights b")
    for ax in (left, right):
        ax.title.set_fontsize(10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best", ncol=2 if len(ax.get_legend_handles_labels()[0]) > 8 else 1)
    save_figure(fig, path)


def write_run_plots(run: RunResult, out: Path) -> list[Path]:
    """Every plot of a finished run into the folder ``out``: ``training.png``, the domain's own plots, and
    ``rates.png`` / ``tableau.png`` when the run learned inner rates / a tableau; returns the paths written."""
    makers = {"training.png": plot_training, **run.domain.plots}
    if run.rate_history:  # learned inner rates
        makers[RATES_PLOT] = plot_rates
    if run.tableau_history:  # learned tableau
        makers[TABLEAU_PLOT] = plot_learned_tableau
    for name, make in makers.items():
        make(run, out / name)
    return [out / name for name in makers]
