"""Meta-testing a trained optimizer on chunks of tasks, in one process or shared out over the ranks of a
distributed run (:func:`evaluate_tasks`), and a saved run again from its folder (:func:`evaluate_run`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from ..distributed import RankFailedError
from ..models import eval_mode
from ..optim import MetaOptimizer
from ..results import AdaptationOutput
from ..tableau import Tableau
from ..tasks import Domain, eval_pieces, get_domain, task_chunks, task_generator
from .checkpoint import load_run_payload
from .config import TrainConfig
from .optimizer import learned_tableau_info, rates_info

__all__ = ["evaluate_tasks", "evaluate_run", "RunEvaluation"]


def _output_to(out: AdaptationOutput, device: torch.device | str) -> AdaptationOutput:
    return AdaptationOutput(
        out.steps,
        out.step_size,
        out.losses.to(device),
        {k: v.to(device) for k, v in out.metrics.items()},
        None if out.params is None else out.params.to(device),
    )


def evaluate_tasks(
    opt: MetaOptimizer,
    chunks: Sequence[Any],
    steps: Sequence[int],
    step_size: float | None,
    adaptation: Literal["gradient", "stages"] = "gradient",
) -> AdaptationOutput:
    """Meta-test ``opt`` on every chunk of tasks and join the per-task results (``adaptation``: plain
    gradient steps or the tableau's stages, :meth:`~rkfast.optim.MetaOptimizer.evaluate`), the model in
    ``eval()`` mode (:func:`~rkfast.models.eval_mode`).

    With a distributed ``opt`` (:attr:`~rkfast.optim.MetaOptimizer.distributed`, more than one rank) this is a
    collective: every rank passes the same chunks, the pieces of :func:`eval_pieces` are adapted round robin
    (piece ``i`` on rank ``i % world_size``), gathered, and joined in task order, so that every rank returns
    the same result, which covers every task once, in the order one process gives. A rank whose evaluation
    raises re-raises its exception after the gather; the others raise
    :class:`~rkfast.distributed.RankFailedError` naming it.
    """
    with eval_mode(opt.model):  # dropout and DropBlock regularize meta-training only
        return _evaluate_chunks(opt, chunks, steps, step_size, adaptation)


def _evaluate_chunks(
    opt: MetaOptimizer,
    chunks: Sequence[Any],
    steps: Sequence[int],
    step_size: float | None,
    adaptation: Literal["gradient", "stages"],
) -> AdaptationOutput:
    """:func:`evaluate_tasks` with the model in the mode the caller set."""
    parallel = opt.distributed
    if parallel is None or parallel.world_size == 1:
        return AdaptationOutput.cat(
            [opt.evaluate(t, steps=steps, step_size=step_size, adaptation=adaptation) for t in chunks]
        )
    world, rank = parallel.world_size, parallel.rank
    pieces = eval_pieces(chunks, world)
    mine: list[tuple[int, AdaptationOutput]] = []
    error: Exception | None = None
    try:
        for i in range(rank, len(pieces), world):
            mine.append(
                (i, _output_to(opt.evaluate(pieces[i], steps=steps, step_size=step_size, adaptation=adaptation), "cpu"))
            )
    except Exception as err:  # noqa: BLE001 - reported through the gather, re-raised below: no rank waits for this one
        error = err
    sent: tuple[str, Any] = ("failed", f"{type(error).__name__}: {error}") if error is not None else ("ok", mine)
    gathered = parallel.all_gather_object(sent)
    failed = {r: what for r, (status, what) in enumerate(gathered) if status == "failed"}
    if error is not None:
        raise error
    if failed:
        raise RankFailedError(
            f"the distributed evaluation failed on rank(s) {sorted(failed)} of {world} (each raises its own "
            f"exception there): " + "; ".join(f"rank {r}: {what}" for r, what in sorted(failed.items())),
            sorted(failed),
            rank,
        )
    parts = sorted((pair for _, got in gathered for pair in got), key=lambda pair: pair[0])
    if [i for i, _ in parts] != list(range(len(pieces))):  # pragma: no cover - a bug, not a user error
        raise RuntimeError(f"the distributed evaluation gathered pieces {[i for i, _ in parts]} of {len(pieces)}")
    return _output_to(AdaptationOutput.cat([out for _, out in parts]), opt.device)


@dataclass
class RunEvaluation:
    """A saved run meta-tested again (:func:`evaluate_run`)."""

    run_dir: Path
    checkpoint: str  # the file of the run folder evaluated: "checkpoint.pt" or "best.pt"
    domain: Domain
    config: TrainConfig  # the run's (resolved), with this evaluation's test_tasks, test_seed and test_step
    opt: MetaOptimizer  # the trained optimizer, its learned coefficients at their saved values
    iterations: int  # meta-steps the run had taken at that checkpoint
    adaptation: Literal["gradient", "stages"]
    test: AdaptationOutput  # every test task's losses and metrics after each number of adaptation steps
    # best.pt: the held-out evaluation that picked it, {"iteration", "value", "steps", "metric"}; else None
    selected_by: dict[str, Any] | None = None

    @property
    def tasks(self) -> int:
        """The number of test tasks."""
        return int(self.test.losses.shape[1])

    @property
    def tableau(self) -> Tableau:
        """The run's tableau (a learned tableau at its saved values)."""
        return self.opt.current_tableau()

    def summary(self) -> dict[str, Any]:
        """The test result, JSON-friendly (:meth:`~rkfast.results.AdaptationOutput.summary`)."""
        return self.test.summary()

    def to_json(self) -> dict[str, Any]:
        """What ``rkfast eval`` writes to ``eval.json``: the run, its settings, the test protocol and result,
        and the learned rates and tableau where the run learned them."""
        rates, learned = rates_info(self.opt), learned_tableau_info(self.opt)
        return {
            "run": str(self.run_dir),
            "checkpoint": self.checkpoint,
            "domain": self.domain.name,
            "iterations": self.iterations,
            **({"selected_by": self.selected_by} if self.selected_by is not None else {}),
            "config": self.config.to_json(),
            "adaptation": self.adaptation,
            "test": {
                "tasks": self.tasks,
                "seed": self.config.test_seed,
                **self.domain.test_protocol(self.config.options),
                **self.summary(),
            },
            **({"rates": rates} if rates is not None else {}),
            **({"learned_tableau": learned} if learned is not None else {}),
        }


def evaluate_run(
    run_dir: Path | str,
    *,
    checkpoint: str = "checkpoint.pt",
    test_tasks: int | None = None,
    test_seed: int | None = None,
    steps: Sequence[int] | None = None,
    test_step: float | None = None,
    adaptation: Literal["gradient", "stages"] = "gradient",
    device: str | None = None,
) -> RunEvaluation:
    """Meta-test the model a run folder saved (:func:`~rkfast.train.load_run`) on the domain's test tasks, in
    this process.

    Args:
        run_dir: the folder :func:`~rkfast.train.train` wrote.
        checkpoint: the final state (``"checkpoint.pt"``) or the best held-out evaluation's (``"best.pt"``).
        test_tasks: how many test tasks (``None``: the run's).
        test_seed: the seed of the test tasks (``None``: the run's).
        steps: the adaptation step counts to report (``None``: the domain's published ones).
        test_step: the adaptation step size (``None``: the run's, else the tableau's own step).
        adaptation: each step a plain gradient step, or the tableau's stages
            (:meth:`~rkfast.optim.MetaOptimizer.evaluate`).
        device: where to evaluate (``None``: the run's device).

    Raises:
        rkfast.runs.RunError: the folder holds no readable run.
    """
    run_dir = Path(run_dir)
    cfg, opt, payload = load_run_payload(run_dir, device=device, checkpoint=checkpoint)
    iterations = int(payload["iteration"])
    # best.pt is saved as its evaluation makes it the best: the history's best is that evaluation
    best = payload.get("history", {}).get("best") if checkpoint == "best.pt" else None
    domain = get_domain(cfg.domain)
    tasks = test_tasks or cfg.settings().test_tasks
    seed = cfg.test_seed if test_seed is None else test_seed
    step = cfg.test_step if test_step is None else test_step
    cfg = replace(cfg, test_tasks=tasks, test_seed=seed, test_step=step)
    defaults = domain.defaults_for(cfg.options)
    sampler = domain.make_tasks(cfg.options, "test", opt.device)
    chunks = task_chunks(sampler, tasks, defaults.eval_chunk, task_generator(seed, "test"))
    output = evaluate_tasks(opt, chunks, steps or defaults.test_steps, step, adaptation)
    return RunEvaluation(run_dir, checkpoint, domain, cfg, opt, iterations, adaptation, output, best)
