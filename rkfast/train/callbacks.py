"""Hooks into the training loop: :class:`Callback` (what a run reports: its start, every meta-step, every
held-out evaluation, every checkpoint and its end) and :class:`ProgressCallback`, the progress bar and the
periodic evaluation lines. The loggers built on the same hooks are in :mod:`rkfast.train.loggers`.

The meta-loss lives on the run's device; the loop reads it to the host every :data:`LOG_EVERY` steps, before
every held-out evaluation and checkpoint, and at the end, in one synchronization for all the steps since the
last read. :meth:`Callback.on_step` is called then, once per step and in order, with plain numbers, so that
logging costs no synchronization of its own. :meth:`Callback.on_meta_step` is called right after each step,
before its numbers are read (what a progress display needs). Under ``torchrun`` only rank 0 calls the
callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..runs import finite_or_none  # strict JSON lives in the core layer; named here as before
from ..tableau import Tableau
from ..tasks import Domain
from .config import TrainConfig
from .results import RunResult

__all__ = [
    "LOG_EVERY",
    "RunStart",
    "StepEvent",
    "EvaluationEvent",
    "CheckpointEvent",
    "EndEvent",
    "Callback",
    "CallbackList",
    "ProgressCallback",
    "finite_or_none",
]

LOG_EVERY = 50  # steps between the loop's reads of the meta-loss (one host sync each) and progress-bar updates


@dataclass(frozen=True)
class RunStart:
    """A run starting, or resuming from its checkpoint.

    Attributes:
        iteration: meta-steps already done (0 for a new run; the checkpoint's for a resumed one).
        iterations: the meta-steps the run will have done at its end.
        config: the resolved configuration.
        domain, tableau: the run's domain and tableau.
        run_dir: the run folder, or ``None``.
        losses: the meta-losses of the steps already done (resumed runs).
    """

    iteration: int
    iterations: int
    config: TrainConfig
    domain: Domain
    tableau: Tableau
    run_dir: Path | None
    losses: list[float] = field(default_factory=list)

    @property
    def resumed(self) -> bool:
        """Whether the run continues a checkpoint with steps done."""
        return self.iteration > 0


@dataclass(frozen=True)
class StepEvent:
    """One meta-step: its number (from 1), its meta-loss, the query loss of each stage with a weight (numbered
    from 1, :class:`~rkfast.results.MetaStepOutput`) and the wall time of the step (sampling included), in s."""

    iteration: int
    loss: float
    stage_losses: dict[int, float]
    time_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "step",
            "iteration": self.iteration,
            "loss": self.loss,
            "stage_losses": {str(j): v for j, v in self.stage_losses.items()},
            "time_s": self.time_s,
        }


@dataclass(frozen=True)
class EvaluationEvent:
    """A held-out evaluation after ``iteration`` meta-steps: ``scores`` is ``{metric name: {adaptation steps
    (a string): mean over the held-out tasks}}`` (``"0"``: before adaptation); ``best``: a new best value of
    the primary metric (saved as ``best.pt`` with a folder)."""

    iteration: int
    scores: dict[str, dict[str, float]]
    best: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"event": "evaluation", "iteration": self.iteration, "scores": self.scores, "best": self.best}


@dataclass(frozen=True)
class CheckpointEvent:
    """A checkpoint written after ``iteration`` meta-steps at ``path`` (``checkpoint.pt``, or ``best.pt``);
    ``status`` is the run's as saved (``"running"``, ``"interrupted"``...), ``"best"`` for ``best.pt``."""

    iteration: int
    path: Path
    status: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "checkpoint", "iteration": self.iteration, "path": str(self.path), "status": self.status}


@dataclass(frozen=True)
class EndEvent:
    """The end of a run: ``status`` ``"complete"``, ``"interrupted"`` or ``"diverged"``, and its result (saved
    before this event, with a folder)."""

    status: str
    result: RunResult

    @property
    def iteration(self) -> int:
        """Meta-steps done."""
        return self.result.iteration

    def to_json(self) -> dict[str, Any]:
        test = None if self.result.test is None else self.result.test_summary()
        return {
            "event": "end",
            "iteration": self.iteration,
            "status": self.status,
            **({"error": self.result.error} if self.result.error else {}),
            "test": test,
        }


class Callback:
    """What a run reports, as it trains (every method does nothing here: override what you need).

    Pass instances to :func:`~rkfast.train.train` (``callbacks=[...]``). The hooks come in run order: every
    step's :meth:`on_step` before an evaluation or checkpoint at that step. Distributed, they are called on
    rank 0 only. An exception raised by a hook stops the run (after the last checkpoint).
    """

    def on_start(self, start: RunStart) -> None:
        """The run starts or resumes (before the first held-out evaluation of a new run)."""

    def on_meta_step(self, iteration: int) -> None:
        """Meta-step ``iteration`` is done (called right away; its numbers come later, in :meth:`on_step`)."""

    def on_step(self, step: StepEvent) -> None:
        """The numbers of one meta-step, once the loop has read them (see the module's documentation)."""

    def on_evaluation(self, evaluation: EvaluationEvent) -> None:
        """A held-out evaluation (at the start, every ``eval_every`` steps and at the end)."""

    def on_checkpoint(self, checkpoint: CheckpointEvent) -> None:
        """A checkpoint was saved (runs with a folder only)."""

    def on_end(self, end: EndEvent) -> None:
        """The run ends complete, interrupted (before :class:`~rkfast.train.RunInterrupted` is raised) or
        diverged (before :class:`~rkfast.train.RunDiverged`)."""

    def close(self) -> None:
        """Release what the callback holds (files, a progress bar): called once, however the run ends."""


class CallbackList(Callback):
    """Several callbacks as one, called in order; a context manager that closes them all on exit."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)
        for c in self.callbacks:
            if not isinstance(c, Callback):
                raise TypeError(f"callbacks must be rkfast.train.Callback instances, got {type(c).__name__}")

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def on_start(self, start: RunStart) -> None:
        for c in self.callbacks:
            c.on_start(start)

    def on_meta_step(self, iteration: int) -> None:
        for c in self.callbacks:
            c.on_meta_step(iteration)

    def on_step(self, step: StepEvent) -> None:
        for c in self.callbacks:
            c.on_step(step)

    def on_evaluation(self, evaluation: EvaluationEvent) -> None:
        for c in self.callbacks:
            c.on_evaluation(evaluation)

    def on_checkpoint(self, checkpoint: CheckpointEvent) -> None:
        for c in self.callbacks:
            c.on_checkpoint(checkpoint)

    def on_end(self, end: EndEvent) -> None:
        for c in self.callbacks:
            c.on_end(end)

    def close(self) -> None:
        for c in self.callbacks:
            c.close()

    def __enter__(self) -> CallbackList:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProgressCallback(Callback):
    """A tqdm progress bar with the mean meta-loss of the last :data:`LOG_EVERY` steps, and one line per held-out
    evaluation (``[maml] step   1000: held-out query MSE 3.071 before, 0.366 after 1 step, ...``).

    Args:
        bar: show the progress bar.
        log: where the evaluation lines go (default: above the bar, or nowhere without the bar).
    """

    def __init__(self, bar: bool = True, log: Callable[[str], None] | None = None) -> None:
        self.show_bar = bar
        self.log = log if log is not None else (tqdm.write if bar else None)
        self.bar: tqdm | None = None
        self.losses: dict[int, float] = {}
        self.start: RunStart | None = None

    def on_start(self, start: RunStart) -> None:
        self.start = start
        recent = start.losses[-LOG_EVERY:]  # a resumed run's bar shows the steps before it too
        self.losses = dict(zip(range(start.iteration - len(recent) + 1, start.iteration + 1), recent, strict=True))
        self.bar = tqdm(
            total=start.iterations,
            initial=start.iteration,
            desc=start.tableau.name,
            unit="step",
            disable=not self.show_bar,
        )

    def on_meta_step(self, iteration: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_step(self, step: StepEvent) -> None:
        self.losses[step.iteration] = step.loss
        self.losses.pop(step.iteration - LOG_EVERY, None)  # only the last LOG_EVERY are shown
        if step.iteration % LOG_EVERY == 0 and self.bar is not None:
            recent = list(self.losses.values())
            self.bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", refresh=False)

    def on_evaluation(self, evaluation: EvaluationEvent) -> None:
        if self.log is None or self.start is None:
            return
        metric, steps = self.start.domain.metric, self.start.domain.defaults_for(self.start.config.options).eval_steps
        values = evaluation.scores[metric.name]
        self.log(
            f"[{self.start.tableau.name}] step {evaluation.iteration:>6}: held-out {metric.label} "
            f"{values['0']:.3f} before, "
            + ", ".join(f"{values[str(n)]:.3f} after {n} step{'s' if n > 1 else ''}" for n in steps)
        )

    def on_end(self, end: EndEvent) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
