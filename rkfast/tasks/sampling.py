"""The random streams of a run and how its tasks are drawn: the training tasks, the held-out tasks and the
meta-test tasks of a seed come from independent streams (:func:`task_generator`), drawn in chunks
(:func:`task_chunks`) that a distributed evaluation cuts into per-rank pieces (:func:`eval_pieces`).

What the training loop, the domains' plots and the command line share, so that each of them draws the very
tasks a run trained and was tested on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..batch import TaskBatch
from ..distributed import block_sizes
from .registry import TaskSampler

__all__ = ["STREAMS", "task_generator", "task_chunks", "eval_pieces"]

STREAMS = {"train": 0, "val": 1, "test": 2}  # independent random streams of a seed


def task_generator(seed: int, split: str) -> torch.Generator:
    """A torch generator for one of the independent random streams (``"train"``, ``"val"``, ``"test"``) of ``seed``."""
    state = np.random.SeedSequence(seed, spawn_key=(STREAMS[split],)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def task_chunks(sampler: TaskSampler, count: int, chunk: int, gen: torch.Generator) -> list[Any]:
    """``count`` tasks drawn from ``sampler`` with ``gen``, in batches of ``chunk`` tasks (the last one smaller)."""
    return [sampler.sample(min(chunk, count - i), gen) for i in range(0, count, chunk)]


def eval_pieces(chunks: Sequence[Any], parts: int) -> list[Any]:
    """``chunks`` cut for ``parts`` ranks: every task once, in task order.

    Each :class:`~rkfast.batch.TaskBatch` chunk is cut into ``parts`` contiguous slices of its tasks (fewer
    when it has fewer tasks), so that with pieces dealt round robin (piece ``i`` to rank ``i % parts``) every
    rank adapts a slice of every chunk: equal work, whatever the number of chunks. Every task is adapted on
    its own, so a slice gives each task the result it gets in the whole chunk (up to floating-point
    reassociation). Any other kind of chunk (a :class:`~rkfast.batch.TaskSet`, whose tasks may share data such
    as one rollout seed) stays whole and goes to one rank.
    """
    if parts <= 1:
        return list(chunks)
    pieces: list[Any] = []
    for chunk in chunks:
        if not isinstance(chunk, TaskBatch) or chunk.num_tasks < 2:
            pieces.append(chunk)
            continue
        start = 0
        for size in block_sizes(chunk.num_tasks, min(parts, chunk.num_tasks)):
            pieces.append(TaskBatch(*(t[start : start + size] for t in chunk)))
            start += size
    return pieces
