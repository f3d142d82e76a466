"""Meta-testing a trained optimizer on chunks of tasks, in one process or shared out over the ranks of a
distributed run (:func:`evaluate_tasks`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..distributed import RankFailedError
from ..optim import MetaOptimizer
from ..results import AdaptationOutput
from ..tasks import eval_pieces

__all__ = ["evaluate_tasks"]


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
    gradient steps or the tableau's stages, :meth:`~rkfast.optim.MetaOptimizer.evaluate`).

    With a distributed ``opt`` (:attr:`~rkfast.optim.MetaOptimizer.distributed`, more than one rank) this is a
    collective: every rank passes the same chunks, the pieces of :func:`eval_pieces` are adapted round robin
    (piece ``i`` on rank ``i % world_size``), gathered, and joined in task order, so that every rank returns
    the same result, which covers every task once, in the order one process gives. A rank whose evaluation
    raises re-raises its exception after the gather; the others raise
    :class:`~rkfast.distributed.RankFailedError` naming it.
    """
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
