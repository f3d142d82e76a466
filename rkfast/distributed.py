"""Task-parallel meta-steps over ``torch.distributed``: every rank computes the meta-direction of its own
tasks, and one all-reduce per step makes it the meta-direction of all of them, on every rank.

:class:`~rkfast.optim.MetaOptimizer` does this by itself inside an initialized process group
(``parallel="auto"``, the default, or a :class:`TaskParallel` or group passed in); :class:`TaskParallel` is
what it keeps in :attr:`MetaOptimizer.distributed <rkfast.optim.MetaOptimizer.distributed>`, with the
helpers a training loop needs (split the tasks, rank-dependent seeds, gather results). The transport is the
process group's own (gloo on CPU, NCCL on CUDA), as started by ``torchrun`` or
``torch.distributed.init_process_group``.

One step, on every rank (``docs/distributed.md``):

1. the meta-direction ``d_r`` and meta-loss ``L_r`` of this rank's ``n_r`` tasks (the mean over them), or
   an exception, caught;
2. one ``all_reduce(SUM)`` of one flat buffer
   ``[d_r * n_r, L_r * n_r, stage losses * n_r, n_r, failed one-hot [W], non-finite one-hot [W]]``;
3. a rank that failed re-raises its own exception, the others raise :class:`RankFailedError` naming it;
   otherwise ``d = sum_r d_r n_r / sum_r n_r``, the mean over all tasks, bit-identical on every rank, which
   every rank then applies with the same outer update.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .learned import RatesStepOutput
from .results import MetaStepOutput

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "TaskParallel",
    "LocalTasks",
    "RankFailedError",
    "InconsistentParametersError",
    "resolve_process_group",
    "block_sizes",
    "is_ddp_wrapped",
]


class RankFailedError(RuntimeError):
    """A distributed meta-step failed on another rank (or the collective itself failed).

    Raised on every rank that did not fail itself; the ranks that failed raise their own exception.
    Parameters, ``.grad`` and optimizer state are left as they were on every rank.

    Attributes:
        ranks: the ranks (in the process group) that reported a failure; empty when the collective itself
            failed (a rank died or stopped calling ``step``, and the process group's timeout expired).
        rank: this process's rank in the group.
    """

    def __init__(self, message: str, ranks: Sequence[int] = (), rank: int = -1) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)
        self.rank = rank


class InconsistentParametersError(RuntimeError):
    """``TaskParallel(check_consistency=True)``: the meta-parameters differ across ranks after an outer update.

    Attributes:
        ranks: the ranks whose parameters differ from rank 0's.
    """

    def __init__(self, message: str, ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def is_ddp_wrapped(model: torch.nn.Module) -> bool:
    """Whether ``model`` is, or contains, a ``torch.nn.parallel.DistributedDataParallel`` module."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - builds without distributed support
        return False
    return any(isinstance(m, DistributedDataParallel) for m in model.modules())


def resolve_process_group(parallel: TaskParallel | ProcessGroup | str | None) -> TaskParallel | None:
    """The :class:`TaskParallel` of ``MetaOptimizer(parallel=...)``, or ``None`` for no distribution.

    ``"auto"``: :meth:`TaskParallel.auto`; ``None``: never; a :class:`TaskParallel`: that one; a
    ``torch.distributed.ProcessGroup``: ``TaskParallel(group)`` (this process must belong to it).

    Raises:
        TypeError: anything else.
        ValueError: a group this process is not a member of.
        RuntimeError: a group passed while torch.distributed is not available.
    """
    if parallel is None or isinstance(parallel, TaskParallel):
        return parallel
    expected = "'auto', None, a TaskParallel or a torch.distributed.ProcessGroup"
    if isinstance(parallel, str):
        if parallel != "auto":
            raise ValueError(f"parallel must be {expected}, got {parallel!r}")
        return TaskParallel.auto()
    if not torch.distributed.is_available():
        raise RuntimeError("a process group was given but this torch build has no torch.distributed")
    if not isinstance(parallel, _dist().ProcessGroup):
        raise TypeError(f"parallel must be {expected}, got {type(parallel).__name__}")
    return TaskParallel(parallel)


def block_sizes(count: int, parts: int) -> list[int]:
    """How ``count`` tasks are shared by ``parts`` contiguous blocks, in order: the first ``count % parts``
    blocks get one task more (``block_sizes(5, 2) == [3, 2]``). The one rule behind
    :meth:`TaskParallel.split` and the evaluation slices of :mod:`rkfast.train`."""
    base, extra = divmod(count, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the reduced buffer: the parameters' own, at least float32 (task counts and rank flags
    stay exact, and half-precision directions are summed in float32)."""
    return torch.promote_types(dtype, torch.float32)


class TaskParallel:
    """Task parallelism over one ``torch.distributed`` process group.

    Each rank computes the meta-direction of its own tasks; :meth:`reduce_meta_step` turns them into the
    meta-direction of all tasks with one all-reduce. ``MetaOptimizer(..., parallel=TaskParallel(...))``
    (``parallel="auto"``, the default, is :meth:`auto`); a training loop uses :meth:`split`,
    :meth:`rank_seed` and the object helpers. With it, building the optimizer broadcasts the
    meta-parameters from rank 0, and each ``step``/``compute`` is a collective: every rank passes its own
    tasks, and one all-reduce makes the meta-direction the task-weighted mean over all ranks' tasks,
    identical on every rank. A failure on one rank makes the others raise :class:`RankFailedError`.
    ``apply`` and ``evaluate`` do not communicate (``docs/distributed.md``).

    Every method that communicates is a collective: every rank of the group must call it, in the same order.

    Args:
        group: a ``torch.distributed.ProcessGroup``, or ``None`` for the default group (which must be
            initialized).
        check_consistency: a debug check after every outer update: all ranks compare a checksum of the
            meta-parameters' bits (one small ``all_gather``) and raise :class:`InconsistentParametersError`,
            naming the ranks that differ from rank 0 (the update itself is kept).

    Attributes:
        group: the process group (the default group's object when ``None`` was given).
        rank: this process's rank in ``group`` (``0 .. world_size - 1``).
        world_size: the number of ranks in ``group``.
    """

    def __init__(self, group: ProcessGroup | None = None, *, check_consistency: bool = False) -> None:
        dist = _dist()
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group "
                "(torchrun sets up its environment) before building a TaskParallel"
            )
        self.group: ProcessGroup = dist.group.WORLD if group is None else group
        self.rank: int = dist.get_rank(self.group)
        self.world_size: int = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the given process group")
        self.backend: str = str(dist.get_backend(self.group))
        self.check_consistency = bool(check_consistency)

    @classmethod
    def auto(cls, check_consistency: bool = False) -> TaskParallel | None:
        """Over torch.distributed's default group when it is available, initialized and has more than one
        rank (as under ``torchrun``); else ``None``."""
        if not torch.distributed.is_available():
            return None
        dist = _dist()
        if not dist.is_initialized() or dist.get_world_size() <= 1:
            return None
        return cls(None, check_consistency=check_consistency)

    def __repr__(self) -> str:
        return (
            f"TaskParallel(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}, "
            f"check_consistency={self.check_consistency})"
        )

    def global_rank(self, rank: int) -> int:
        """The global (default-group) rank of ``rank`` of this group."""
        if self.group is _dist().group.WORLD:
            return rank
        return _dist().get_global_rank(self.group, rank)

    # -- what a training loop uses ----------------------------------------------------------------------

    def split(self, count: int) -> tuple[int, int]:
        """This rank's share of ``count`` tasks: ``(start, length)`` of a contiguous block.

        The blocks of ranks ``0 .. world_size - 1`` tile ``range(count)`` in order; the first
        ``count % world_size`` ranks get one task more (``split(5)`` over 2 ranks: ``(0, 3)`` and ``(3, 2)``).

        Raises:
            TypeError: ``count`` is not an integer.
            ValueError: ``count < world_size`` (a rank without tasks has no meta-direction to contribute).
        """
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"count must be an integer, got {type(count).__name__}")
        if count < self.world_size:
            raise ValueError(
                f"cannot split {count} task(s) over {self.world_size} ranks: every rank needs at least one task "
                f"per meta-step; use a meta-batch of at least {self.world_size} tasks (or fewer processes)"
            )
        sizes = block_sizes(count, self.world_size)
        return sum(sizes[: self.rank]), sizes[self.rank]

    def rank_seed(self, seed: int) -> int:
        """A reproducible seed for this rank derived from ``seed``: the same ``(seed, rank)`` always gives the
        same value, different ranks (and different seeds) practically never collide. In ``[0, 2**32)``,
        which ``torch.manual_seed``, ``torch.Generator.manual_seed``, ``random.seed`` and
        ``numpy.random.seed`` all accept. Depends on the rank only, not on ``world_size``."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        digest = hashlib.sha256(f"rkfast-rank-seed:{seed}:{self.rank}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank (e.g. evaluation results, which
        :meth:`~rkfast.optim.MetaOptimizer.evaluate` computes per rank: join them with
        ``AdaptationOutput.cat``). Tensors come back on the device they were sent from; move them to the CPU
        first for gloo (``torch.distributed.all_gather_object`` pickles them)."""
        out: list[Any] = [None] * self.world_size
        _dist().all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (picklable) on every rank (the others' ``obj`` is ignored); ``src`` is a rank
        of this group."""
        if not 0 <= src < self.world_size:
            raise ValueError(f"src must be a rank in 0..{self.world_size - 1}, got {src}")
        box = [obj if self.rank == src else None]
        _dist().broadcast_object_list(box, src=self.global_rank(src), group=self.group)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank of the group has called it."""
        _dist().barrier(group=self.group)

    # -- what MetaOptimizer uses (LocalTasks has the same) -----------------------------------------------

    def reduce_step(
        self,
        compute: Callable[[], tuple[MetaStepOutput, int]],
        like: Tensor,
        numel: int,
        stages: int,
        coefficients: Sequence[Tensor] = (),
    ) -> tuple[MetaStepOutput, tuple[int, ...]]:
        """:meth:`reduce_meta_step` of a step whose output may carry the learned ``coefficients``'
        directions (:class:`~rkfast.learned.RatesStepOutput`): they ride in the same buffer, after the
        parameters' ``numel`` entries (still one all-reduce). ``like``: a tensor of the parameters' dtype
        and device as they are now (a re-bind inside ``compute`` may change them)."""
        extra = sum(t.numel() for t in coefficients)
        buffer = like.new_empty(numel + extra)
        if not extra:
            return self.reduce_meta_step(compute, buffer, stages)
        local: list[MetaStepOutput] = []

        def joined() -> tuple[MetaStepOutput, int]:
            out, count = compute()
            local.append(out)
            return _joined(out), count

        out, nonfinite = self.reduce_meta_step(joined, buffer, stages)
        return _split(out, local[0], numel, coefficients), nonfinite

    def after_update(self, tensor: Tensor) -> None:
        """With ``check_consistency``: :meth:`check_identical` of the updated meta-parameters."""
        if self.check_consistency:
            self.check_identical(tensor)

    def reduction_note(self, ranks: Sequence[int]) -> str:
        """Where a reduced meta-step was non-finite, for its error message."""
        if ranks:
            return (
                f" (reduced over {self.world_size} ranks; non-finite on rank(s) {list(ranks)}: every rank "
                "raises this error)"
            )
        return f" (reduced over {self.world_size} ranks)"

    def broadcast_(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Overwrite ``tensor`` in place with rank ``src``'s (a collective); returns ``tensor``."""
        with torch.no_grad():
            _dist().broadcast(tensor, src=self.global_rank(src), group=self.group)
        return tensor

    def reduce_meta_step(
        self, compute: Callable[[], tuple[MetaStepOutput, int]], like: Tensor, stages: int
    ) -> tuple[MetaStepOutput, tuple[int, ...]]:
        """The meta-step of all ranks' tasks: ``compute()`` on this rank, then one all-reduce.

        Args:
            compute: this rank's part: returns its :class:`~rkfast.results.MetaStepOutput` (the mean over
                its tasks) and its task count ``n``. Any exception it raises is caught, reported to the
                other ranks through the same all-reduce, and re-raised here afterwards.
            like: a tensor of the meta-parameters' dtype, device and size ``[N]``.
            stages: the tableau's stage count (the stage losses' slots in the buffer).

        Returns:
            The task-weighted mean over ranks: ``direction``, ``loss`` and ``stage_losses`` of all tasks,
            identical on every rank (``stage_metrics`` are this rank's own); and the ranks whose own
            direction or loss was non-finite (the reduced ones are non-finite then too).

        Raises:
            Exception: this rank's own, from ``compute`` (after the all-reduce, so no rank waits for it).
            RankFailedError: another rank failed (its ranks in ``.ranks``), or the all-reduce itself failed.
        """
        n_params, world = like.numel(), self.world_size
        dtype = _reduce_dtype(like.dtype)
        loss_at, stages_at, count_at = n_params, n_params + 1, n_params + 1 + stages
        failed_at, nonfinite_at = count_at + 1, count_at + 1 + world
        buf = torch.zeros(nonfinite_at + world, dtype=dtype, device=like.device)
        error: BaseException | None = None
        out: MetaStepOutput | None = None
        try:
            out, n = compute()
            with torch.no_grad():
                scale = float(n)
                buf[:n_params].copy_(out.direction.reshape(-1)).mul_(scale)
                buf[loss_at] = out.loss.to(dtype) * scale
                for j, value in out.stage_losses.items():
                    buf[stages_at + j - 1] = value.to(dtype) * scale
                buf[count_at] = scale
                ok = torch.isfinite(out.direction).all() & torch.isfinite(out.loss)  # on the device
                buf[nonfinite_at + self.rank] = (~ok).to(dtype)
        except Exception as err:  # noqa: BLE001 - any failure is reported through the all-reduce, re-raised below
            error = err
            buf.zero_()
            buf[failed_at + self.rank] = 1.0
        self._all_reduce_step(buf, error)
        tail = buf[count_at:].tolist()  # one host synchronization: the task count and the rank flags
        total = tail[0]
        failed = [r for r in range(world) if tail[1 + r] > 0]
        if failed:
            if error is not None:
                others = [r for r in failed if r != self.rank]
                if others and hasattr(error, "add_note"):
                    error.add_note(f"(rkfast: the distributed meta-step also failed on rank(s) {others})")
                raise error
            raise RankFailedError(
                f"the distributed meta-step failed on rank(s) {failed} of {world} (each raises its own exception "
                f"there: see its log); rank {self.rank} raises this error so that no rank waits for it. "
                "Parameters, .grad and optimizer state are unchanged on every rank.",
                failed,
                self.rank,
            )
        assert out is not None
        direction = (buf[:n_params] / total).to(like.dtype)
        loss = (buf[loss_at] / total).to(out.loss.dtype)
        stage_losses = {j: (buf[stages_at + j - 1] / total).to(v.dtype) for j, v in out.stage_losses.items()}
        nonfinite = tuple(r for r in range(world) if tail[1 + world + r] > 0)
        return MetaStepOutput(direction, loss, stage_losses, out.stage_metrics), nonfinite

    def _all_reduce_step(self, buf: Tensor, error: BaseException | None) -> None:
        """The step's one all-reduce of ``buf`` (summed in place). If it fails, this rank's own ``error`` (from
        its ``compute``) is raised, else :class:`RankFailedError`."""
        reduce_error: Exception | None = None
        try:
            with torch.no_grad():
                _dist().all_reduce(buf, op=_dist().ReduceOp.SUM, group=self.group)
        except Exception as err:  # noqa: BLE001 - any failure of the transport is raised below
            reduce_error = err
        if reduce_error is None:
            return
        if error is not None:  # this rank's own failure comes first
            raise error
        raise RankFailedError(
            f"the meta-step's all-reduce over {self.world_size} ranks failed on rank {self.rank}: {reduce_error}. "
            "Another rank has probably died, or stopped calling step(); the wait is bounded by the process "
            "group's timeout (init_process_group(timeout=...)). Parameters, .grad and optimizer state are "
            "unchanged on this rank.",
            (),
            self.rank,
        ) from reduce_error

    def check_identical(self, tensor: Tensor, what: str = "meta-parameters") -> None:
        """Raise :class:`InconsistentParametersError` on every rank unless ``tensor`` is bit-identical on
        every rank (compared by an integer checksum of the bits: one ``all_gather`` of three float64 slots per
        rank, the sum and sum of squares only for the message)."""
        dist = _dist()
        summary = _checksum(tensor)
        gathered = [torch.empty_like(summary) for _ in range(self.world_size)]
        dist.all_gather(gathered, summary, group=self.group)
        rows = [g.cpu() for g in gathered]
        keys = [r[2:].numpy().tobytes() for r in rows]  # the bit checksum: float sums may differ in rounding
        differ = [r for r in range(self.world_size) if keys[r] != keys[0]]
        if differ:
            stats = "; ".join(
                f"rank {r}: sum {float(rows[r][0])!r}, sum of squares {float(rows[r][1])!r}" for r in [0, *differ]
            )
            raise InconsistentParametersError(
                f"check_consistency: the {what} differ across ranks after the outer update: rank(s) {differ} "
                f"differ from rank 0 ({stats}). Something changed them on some ranks only: an edit of the "
                "parameters outside the optimizer, a rank-dependent .grad edit between compute() and apply(), "
                "a checkpoint or outer-optimizer state loaded on some ranks only. The update was applied.",
                differ,
            )


def _checksum(tensor: Tensor) -> Tensor:
    """``[sum, sum of squares, bit checksum]`` of ``tensor`` as float64 ``[3]`` on its device: the bit
    checksum (the raw bits as integers, position-weighted, summed with int64 wrap-around, its bits stored in a
    float64 slot) tells apart values that differ in their last bit."""
    flat = tensor.detach().reshape(-1)
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[flat.element_size()]
    bits = flat.contiguous().view(ints).to(torch.int64)
    weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
    bit_sum = (bits * weights).sum().reshape(1)
    values = flat.to(torch.float64)
    return torch.cat([values.sum().reshape(1), (values * values).sum().reshape(1), bit_sum.view(torch.float64)])


class LocalTasks:
    """The single-process counterpart of :class:`TaskParallel`: the interface ``MetaOptimizer`` steps
    through, without communication (every task is this process's)."""

    world_size = 1

    def reduce_step(
        self,
        compute: Callable[[], tuple[MetaStepOutput, int]],
        like: Tensor,
        numel: int,
        stages: int,
        coefficients: Sequence[Tensor] = (),
    ) -> tuple[MetaStepOutput, tuple[int, ...]]:
        """``compute()``'s output as it is (no rank is non-finite but this one)."""
        return compute()[0], ()

    def broadcast_(self, tensor: Tensor, src: int = 0) -> Tensor:
        return tensor

    def after_update(self, tensor: Tensor) -> None:
        """Nothing to compare with."""

    def reduction_note(self, ranks: Sequence[int]) -> str:
        return ""


Parallel = TaskParallel | LocalTasks


def _joined(out: MetaStepOutput) -> MetaStepOutput:
    """``out`` with the learned coefficients' directions appended to the flat direction (one buffer to reduce)."""
    extra = [d.reshape(-1).to(out.direction.dtype) for d in out.coefficient_directions]
    return MetaStepOutput(torch.cat([out.direction.reshape(-1), *extra]), out.loss, out.stage_losses, out.stage_metrics)


def _split(out: MetaStepOutput, local: MetaStepOutput, numel: int, coefficients: Sequence[Tensor]) -> MetaStepOutput:
    """Inverse of :func:`_joined` for the reduced output: the parameters' direction and each coefficient
    tensor's, shaped and typed like the tensor, grouped as ``local`` (this rank's output) groups them."""
    pieces, offset = [], numel
    for t in coefficients:
        pieces.append(out.direction[offset : offset + t.numel()].view(t.shape).to(t.dtype))
        offset += t.numel()
    rates = len(getattr(local, "rate_directions", ()))
    return RatesStepOutput(
        MetaStepOutput(out.direction[:numel], out.loss, out.stage_losses, out.stage_metrics),
        pieces[:rates],
        pieces[rates:],
    )
