"""Running under a launcher such as ``torchrun``: the world it sets up in the environment
(:func:`launched_world`), torch.distributed's default process group made from it
(:func:`launched_process_group`, bounded by :func:`dist_timeout`), the GPU of each process
(:func:`use_local_gpu`) and which rank says what (:func:`silenced`, :func:`reported_by_rank`,
:func:`lost_contact`).

The ``rkfast`` command line runs ``train`` and ``compare`` this way; a script of one's own can too::

    with launched_process_group("cuda") as parallel:  # None without a launcher
        result = train(cfg, out="runs/mine", parallel=parallel)
        if parallel is None or parallel.rank == 0:
            print(result.test.summary())

and start it with ``torchrun --nproc-per-node 2 script.py`` (``docs/distributed.md``).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta

import torch

from ..distributed import RankFailedError, TaskParallel, resolve_process_group
from ..optim import NonFiniteLossError
from ..runs import RunError

__all__ = [
    "DIST_TIMEOUT_ENV",
    "DEFAULT_DIST_TIMEOUT_S",
    "LaunchError",
    "launched_world",
    "dist_timeout",
    "use_local_gpu",
    "launched_process_group",
    "silenced",
    "reported_by_rank",
    "lost_contact",
]

DIST_TIMEOUT_ENV = "RKFAST_DIST_TIMEOUT"  # seconds a collective may wait for the other processes
DEFAULT_DIST_TIMEOUT_S = 300.0


class LaunchError(ValueError):
    """The launcher's environment asks for what this process cannot do (``WORLD_SIZE`` > 1 without
    torch.distributed, a bad :data:`DIST_TIMEOUT_ENV`); every rank raises it alike."""


def launched_world() -> tuple[int, int]:
    """``(world size, rank)`` as a launcher such as torchrun sets them in the environment (``WORLD_SIZE``,
    ``RANK``); ``(1, 0)`` without one."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return 1, 0
    return (world, rank) if world > 1 else (1, 0)


def dist_timeout() -> timedelta:
    """How long a collective may wait for the other processes: ``RKFAST_DIST_TIMEOUT`` seconds (default 300).

    Raises:
        LaunchError: the variable is set to anything but a number of seconds > 0.
    """
    text = os.environ.get(DIST_TIMEOUT_ENV)
    if text is None or not text.strip():
        return timedelta(seconds=DEFAULT_DIST_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise LaunchError(f"{DIST_TIMEOUT_ENV}={text!r}: must be a number of seconds > 0")
    return timedelta(seconds=seconds)


def use_local_gpu(device: str | torch.device | None) -> None:
    """A CUDA run under a launcher: this process computes on GPU ``LOCAL_RANK`` (``"cuda"`` names the current
    device), set before anything touches CUDA. A device with an index, a CPU device and ``None`` are left
    alone, as is a machine without CUDA."""
    device = None if device is None else str(device)
    if device is None or not device.startswith("cuda") or ":" in device or not torch.cuda.is_available():
        return
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    torch.cuda.set_device(local % torch.cuda.device_count())


@contextlib.contextmanager
def launched_process_group(device: str | torch.device | None = None) -> Iterator[TaskParallel | None]:
    """The task parallelism of a process started by a launcher (``WORLD_SIZE`` > 1), ``None`` without one.

    torch.distributed's default group is initialized here unless it already is (gloo, plus NCCL for CUDA
    tensors where CUDA is available; every collective waits at most :func:`dist_timeout`), and destroyed on
    leaving if it was initialized here. ``device``, the run's device: a CUDA device without an index becomes
    this process's GPU ``LOCAL_RANK`` first (:func:`use_local_gpu`).

    Raises:
        LaunchError: this torch build has no torch.distributed, or :func:`dist_timeout`'s.
    """
    world, _ = launched_world()
    if world == 1:
        yield None
        return
    if not torch.distributed.is_available():
        raise LaunchError(
            f"WORLD_SIZE={world} asks for {world} processes (a launcher such as torchrun), but "
            "this torch build has no torch.distributed"
        )
    use_local_gpu(device)
    dist = torch.distributed
    created = False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=dist_timeout())
        created = True
    try:
        yield resolve_process_group("auto")
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
            # the last references to the group (the run's optimizers, in reference cycles too) go now, while
            # the interpreter is whole: a gloo group destroyed during interpreter shutdown can abort the process
            # ("terminate called without an active exception", seen with Triton imported)
            gc.collect()


@contextlib.contextmanager
def silenced(streams: Sequence[str], active: bool) -> Iterator[None]:
    """Redirect ``sys.stdout``/``sys.stderr`` (the named ``streams``: ``"stdout"``, ``"stderr"``) to
    ``os.devnull`` while ``active`` (on the ranks other than 0, say)."""
    if not active:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.ExitStack() as stack:
        for name in streams:
            stack.enter_context((contextlib.redirect_stdout if name == "stdout" else contextlib.redirect_stderr)(sink))
        yield


def reported_by_rank(err: BaseException, rank: int, alike: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether ``rank`` reports ``err``: rank 0 reports everything; another rank only what may be its alone (a
    data error, a lost connection, its own failure), not the errors every rank raises alike (a bad launch,
    the run folder's checks and writes that rank 0 decides, divergence, another rank's failure that rank 0
    names, an interrupt, and the types in ``alike``)."""
    if rank == 0:
        return True
    if isinstance(err, RankFailedError):
        return not err.ranks  # the collective itself failed: this rank may be the one left to say so
    return not isinstance(err, (LaunchError, RunError, NonFiniteLossError, KeyboardInterrupt, *alike))


def lost_contact(err: BaseException) -> str | None:
    """What a torch.distributed error (``DistError``: a collective timed out, a peer closed the connection)
    means for a run, in words; ``None`` for any other exception."""
    dist_error = getattr(torch.distributed, "DistError", None) if torch.distributed.is_available() else None
    if dist_error is None or not isinstance(err, dist_error):
        return None
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"lost contact with the other processes of the run ({type(err).__name__}: {first}); another process "
        "has probably failed (see its error) or the launcher stopped the job"
    )
