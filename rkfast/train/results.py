"""What a run gives back: :class:`RunResult` (the training curve, the meta-test, timings, the trained optimizer),
the exceptions that stop a run with its partial result saved (:class:`RunInterrupted`, :class:`RunDiverged`),
and the one-line descriptions of the learned coefficients' JSON summaries."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..optim import MetaOptimizer, NonFiniteLossError
from ..results import AdaptationOutput
from ..tableau import Tableau
from ..tasks import Defaults, Domain, task_generator
from .config import TrainConfig
from .optimizer import learned_tableau_info, rates_info

__all__ = [
    "RunResult",
    "RunInterrupted",
    "RunDiverged",
    "describe_rates",
    "describe_learned_tableau",
    "selection_warning",
]


def describe_rates(info: Mapping[str, Any] | None) -> str | None:
    """One line on the learned rates of :func:`rates_info` (``None`` when nothing is learned)."""
    if info is None or info["granularity"] is None:
        return None
    frozen = set(info["frozen"])
    learned = [(name, entries) for name, entries in info["values"].items() if name not in frozen]
    means = [e["mean"] if isinstance(e, dict) else e for _, entries in learned for e in entries]
    lows = [e["min"] if isinstance(e, dict) else e for _, entries in learned for e in entries]
    highs = [e["max"] if isinstance(e, dict) else e for _, entries in learned for e in entries]
    sets = f", per stage ({info['sets']} sets)" if info["per_stage"] else ""
    fixed = info["frozen"]
    frozen_text = (
        ""
        if not fixed
        else f"; fixed: {', '.join(f'{n}={v:g}' for n, v in fixed.items())}"
        if len(fixed) <= 4
        else f"; {len(fixed)} tensors fixed at {', '.join(sorted({f'{v:g}' for v in fixed.values()}))}"
    )
    spread = f"range {min(lows):.4g} to {max(highs):.4g}; " if min(lows) != max(highs) else ""
    what = "final mean" if spread else "final value"
    return (
        f"learned rates: {info['granularity']}{sets}; {what} {sum(means) / len(means):.4g} "
        f"({spread}started at inner_lr {info['inner_lr']:g}){frozen_text}"
    )


def describe_learned_tableau(info: Mapping[str, Any] | None) -> str | None:
    """One line on the learned tableau of :func:`learned_tableau_info` (``None`` without one):
    ``learned tableau (pattern, b by order): A21=0.93, b=(0.46, 0.54); from heun, order 2, test step 0.0093``
    (the learned entries of ``A``, 1-based as Butcher writes them)."""
    if info is None:
        return None
    A, b = info["A"], info["b"]
    entries = info.get("entries") or [[j, k] for j in range(len(A)) for k in range(j) if A[j][k] != 0.0]
    shown = ", ".join(
        f"A{j + 1}{k + 1}={A[j][k]:.4g}" if len(A) < 10 else f"A[{j + 1},{k + 1}]={A[j][k]:.4g}" for j, k in entries
    )
    weights = "b by order" if info["weights"] == "order" else "b fixed"
    return (
        f"learned tableau ({info['pattern']}, {weights}): {shown}, b=({', '.join(f'{x:.4g}' for x in b)}); "
        f"from {info['base']}, order {info['order']}, test step {info['test_step']:.4g}"
    )


@dataclass
class RunResult:
    """A run: the training curve, the meta-test result and timings (plus the optimizer).

    ``status`` is ``"complete"`` (``test`` holds the meta-test), ``"interrupted"`` or ``"diverged"``
    (``test`` is ``None``; ``error`` says what happened). ``distributed`` describes a run over several
    processes (``world_size``, ``backend``, ``meta_batch_per_rank``); ``None`` for one process.
    """

    config: TrainConfig  # resolved
    domain: Domain
    tableau: Tableau
    losses: list[float]
    evals: list[dict[str, Any]]
    test: AdaptationOutput | None
    train_time_s: float
    wall_time_s: float
    opt: MetaOptimizer = field(repr=False)
    status: str = "complete"
    error: str | None = None
    best: dict[str, Any] | None = None  # the best held-out evaluation: {"iteration", "value", "steps", "metric"}
    distributed: dict[str, Any] | None = None  # {"world_size", "backend", "meta_batch_per_rank"}; None: one process
    rate_history: list[dict[str, Any]] = field(default_factory=list)  # learned rates: {"iteration", "values"}
    tableau_history: list[dict[str, Any]] = field(default_factory=list)  # learned tableau: {"iteration", "A", "b"}

    @property
    def rates(self) -> dict[str, Any] | None:
        """The inner rates as they are now (:func:`rates_info`; ``None`` without learned or frozen rates)."""
        return rates_info(self.opt)

    @property
    def learned_tableau(self) -> dict[str, Any] | None:
        """The learned tableau as it is now (:func:`learned_tableau_info`; ``None`` without one)."""
        return learned_tableau_info(self.opt)

    @property
    def world_size(self) -> int:
        """The number of processes that trained the run (1 without ``torch.distributed``)."""
        return 1 if self.distributed is None else int(self.distributed["world_size"])

    @property
    def defaults(self) -> Defaults:
        """The domain's published defaults for this run's options (evaluation and test step counts...)."""
        return self.domain.defaults_for(self.config.options)

    @property
    def iteration(self) -> int:
        """Meta-steps done."""
        return len(self.losses)

    @property
    def ms_per_step(self) -> float:
        """Mean wall time of one meta-step (task sampling included, evaluation excluded), in ms."""
        return 1000.0 * self.train_time_s / max(1, len(self.losses))

    def task_generator(self, split: str) -> torch.Generator:
        """A fresh generator of the run's ``split`` stream: sampling from it again gives the run's tasks."""
        return task_generator(self.config.seed if split == "train" else self.config.test_seed, split)

    def meta_test(self) -> AdaptationOutput:
        """The meta-test result (``test``) of a complete run; ``ValueError`` for a run without one."""
        if self.test is None:
            raise ValueError(f"the run is {self.status}: it has no meta-test result")
        return self.test

    def test_summary(self) -> dict[str, dict[int, tuple[float, float]]]:
        """``{metric name: {steps: (mean, ci95)}}`` of the meta-test, for every metric of the domain."""
        summary = self.meta_test().summary()
        return {m.name: summary[m.source] for m in self.domain.metrics}

    def to_json(self) -> dict[str, Any]:
        """The run as plain JSON data (what ``results.json`` holds)."""
        tab, cfg = self.tableau, self.config
        test = (
            None
            if self.test is None
            else {
                "tasks": int(self.test.losses.shape[1]),
                "seed": cfg.test_seed,
                **self.domain.test_protocol(cfg.options),
                **self.test.summary(),
            }
        )
        return {
            "status": self.status,
            "iteration": self.iteration,
            **({"error": self.error} if self.error else {}),
            "domain": self.domain.name,
            "config": cfg.to_json(),
            "backend": self.opt.backend,
            "world_size": self.world_size,
            "distributed": self.distributed,
            "tableau": {**tab.to_dict(), "order": tab.order, "stages": tab.stages, "describe": tab.describe()},
            "metrics": [asdict(m) for m in self.domain.metrics],
            "training": {
                "meta_loss": [float(f"{x:.5g}") for x in self.losses],
                "eval": self.evals,
                "best": self.best,
                **({"rates": self.rate_history} if self.rate_history else {}),
                **({"tableau": self.tableau_history} if self.tableau_history else {}),
            },
            "rates": self.rates,
            "learned_tableau": self.learned_tableau,
            "test": test,
            "train_time_s": self.train_time_s,
            "wall_time_s": self.wall_time_s,
            "ms_per_meta_step": self.ms_per_step,
        }


class RunInterrupted(Exception):
    """SIGINT/SIGTERM stopped a run after a finished step; its checkpoint and partial results are saved.

    Attributes:
        result: the partial :class:`RunResult` (``status == "interrupted"``).
        run_dir: the run folder (resume with ``train(config, out=run_dir, resume=True)``).
        signal: the signal number.
    """

    def __init__(self, result: RunResult, run_dir: Path, signum: int) -> None:
        super().__init__(
            f"interrupted after meta-step {result.iteration} of {result.config.iterations}; saved {run_dir}"
        )
        self.result, self.run_dir, self.signal = result, run_dir, signum


class RunDiverged(NonFiniteLossError):
    """A meta-step was non-finite; the last finite state and the partial results are saved.

    Attributes:
        result: the partial :class:`RunResult` (``status == "diverged"``, ``error`` the step's message).
        run_dir: the run folder, or ``None`` when the run had none.
    """

    def __init__(self, result: RunResult, run_dir: Path | None) -> None:
        where = f"; the last finite state is saved in {run_dir}" if run_dir is not None else ""
        super().__init__(f"meta-step {result.iteration + 1} diverged: {result.error}{where}")
        self.result, self.run_dir = result, run_dir


def selection_warning(run: RunResult) -> str | None:
    """One line when the held-out score that picks ``best.pt`` (the primary metric after ``select_steps``
    adaptation steps) was NaN or infinite at some evaluation: how often, which checkpoint ``best.pt`` holds
    (the untrained model's, or none), and the flag that selects on another step count. ``None`` otherwise."""
    metric, steps, evals = run.domain.metric, run.config.select_steps, run.evals
    if steps is None or not evals:
        return None
    values = [e.get(metric.name, {}).get(str(steps)) for e in evals]
    bad = sum(1 for v in values if v is None or not math.isfinite(v))
    if not bad:
        return None
    if run.best is None:
        outcome = "no evaluation was finite, so best.pt was not written"
    else:
        untrained = " (the untrained model)" if run.best["iteration"] == 0 else ""
        outcome = f"best.pt holds iteration {run.best['iteration']}{untrained}"
    counts = ", ".join(map(str, run.defaults.eval_steps))
    return (
        f"warning: the held-out {metric.short} after {steps} adaptation step{'s' if steps != 1 else ''}, which "
        f"picks best.pt, was NaN or infinite at {bad} of {len(values)} evaluations (the adaptation diverges "
        f"there); {outcome}; select on a step count where it stays finite with --select-steps N (one of {counts})"
    )
