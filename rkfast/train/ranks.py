"""What the ranks of a distributed run decide together: rank 0's decisions and their outcome on every rank
(:func:`lead_decides`), stop signals (:class:`RankStopRequests`, :func:`agreed_stop`) and the check that every
rank was given the same run (:func:`check_same_settings`)."""

from __future__ import annotations

import pickle
import signal as signal_module
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ..distributed import RankFailedError, TaskParallel
from ..interrupt import StopRequests
from .config import TrainConfig

__all__ = ["lead_decides", "RankStopRequests", "agreed_stop", "check_same_settings", "REPEAT_SIGNAL_S"]

REPEAT_SIGNAL_S = 2.0  # a rank of a distributed run takes a signal repeated within this many seconds as one

_T = TypeVar("_T")


def lead_decides(parallel: TaskParallel | None, decide: Callable[[], _T], what: str | None = None) -> _T:
    """``decide()`` on rank 0 alone, and its outcome on every rank: its value, or its exception.

    For what rank 0 alone does or sees (the run folder, the files it reads and writes): the other ranks wait
    for its answer instead of looking for themselves, and fail with it instead of waiting for it forever.
    Without ``parallel`` this is just ``decide()``; with it, a collective (every rank calls it).

    Args:
        parallel: the run's task parallelism, or ``None``.
        decide: what rank 0 does; its value must be picklable (it is broadcast).
        what: how the other ranks' error names a failure (``"save the checkpoint"``): they raise
            :class:`~rkfast.distributed.RankFailedError` ``"rank 0 failed to <what>: ..."``. Without it they raise
            a copy of rank 0's exception (the same type and message: for checks every rank fails alike).

    Raises:
        Exception: ``decide``'s, on rank 0 as raised and on the others as described.
    """
    if parallel is None:
        return decide()
    outcome: tuple[str, Any] | None = None
    own: Exception | None = None
    if parallel.rank == 0:
        try:
            outcome = ("ok", decide())
        except Exception as err:  # noqa: BLE001 - broadcast, then re-raised on every rank
            own = err
            outcome = ("error", _portable(err, what))
    status, value = parallel.broadcast_object(outcome)
    if status == "ok":
        return value
    if own is not None:
        raise own
    if isinstance(value, RankFailedError):
        value.rank = parallel.rank
    raise value


def _portable(err: Exception, what: str | None) -> Exception:
    """What the other ranks raise for rank 0's ``err`` (see :func:`lead_decides`); picklable."""
    if what is None:
        try:
            return pickle.loads(pickle.dumps(err))  # the same exception, if it survives the trip
        except Exception:  # noqa: BLE001 - an exception type that does not pickle: say it in words
            pass
    return RankFailedError(f"rank 0 failed to {what or 'decide'}: {type(err).__name__}: {err}", (0,), -1)


class RankStopRequests(StopRequests):
    """:class:`~rkfast.interrupt.StopRequests` for one rank of a distributed run.

    Only rank 0 announces the signal (``announce``). A signal repeated within :data:`REPEAT_SIGNAL_S` seconds of
    the first is the same request: where a launcher leaves its workers in the terminal's process group, one
    Ctrl-C reaches every worker twice (from the terminal, and forwarded by the launcher), which must not count
    as the second Ctrl-C that stops at once without saving. (torchrun starts its workers in sessions of their
    own and forwards the signal once.)
    """

    def __init__(self, announce: bool, active: bool = True) -> None:
        super().__init__(active=active)
        self.announce = announce
        self._first = 0.0

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.signal is None:
            self.signal, self._first = signum, now
            if self.announce:
                print(f"\n{signal_module.Signals(signum).name} received: {self._message}", file=sys.stderr, flush=True)
        elif now - self._first >= REPEAT_SIGNAL_S and signum == signal_module.SIGINT:
            raise KeyboardInterrupt


def check_same_settings(
    parallel: TaskParallel, cfg: TrainConfig, every: int, saving: bool, resume: bool, overwrite: bool
) -> None:
    """``ValueError`` on every rank unless every rank was given the same run (the device may differ)."""
    config = cfg.to_json()
    config["tableau"] = cfg.settings().tableau.to_dict()
    config.pop("device")
    mine = {
        **{f"config.{k}": v for k, v in config.items()},
        "checkpoint_every": every,
        "out": saving,
        "resume": resume,
        "overwrite": overwrite,
    }
    every_rank = parallel.all_gather_object(mine)
    for r, theirs in enumerate(every_rank):
        differ = [k for k in mine if theirs.get(k) != every_rank[0].get(k)]
        if differ:
            raise ValueError(
                f"the processes of the run were given different settings: rank {r} differs from rank 0 "
                f"in {', '.join(differ)}; every rank of a distributed run must run the same configuration"
            )


def agreed_stop(parallel: TaskParallel | None, stop: StopRequests, saving: bool) -> int | None:
    """The signal that stops the run after this step, or ``None``: distributed (and ``saving``: a run without
    a folder leaves the signals alone), a signal that reached any rank stops every rank after the same step
    (one all-reduce of one integer per step)."""
    if parallel is None or not saving:
        return stop.signal
    dist = torch.distributed
    on_cpu = "gloo" in parallel.backend or "nccl" not in parallel.backend
    device = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([stop.signal or 0], dtype=torch.int64, device=device)
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=parallel.group)
    except Exception as err:
        raise RankFailedError(
            f"rank {parallel.rank} lost contact with the other {parallel.world_size - 1} rank(s) of the run "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}): another "
            "rank has probably failed (see its error) or was stopped",
            (),
            parallel.rank,
        ) from err
    return int(flag.item()) or None
