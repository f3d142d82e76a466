"""Whole meta-steps replayed from CUDA graphs (``MetaOptimizer(..., capture=True)``).

Small few-shot models are launch-bound on a GPU: a meta-step is hundreds of small kernels (every stage's
vmapped forward and backward, the stage arithmetic, the outer update). All of them have static shapes, so
the whole step is captured once in a ``torch.cuda.CUDAGraph`` and replayed for every later batch, which
is copied into the graph's static input buffers first.

The life of one batch signature (shapes and dtypes of the four batch tensors):

1. the first ``warmup_steps`` calls run eagerly on a side stream (real steps: lazy state such as the outer
   optimizer's moments, cuBLAS workspaces and autograd caches is created outside the capture);
2. the next call captures one step into a graph and replays it (a captured region only records, so the
   replay is what performs this call's update);
3. every later call copies the batch into the static buffers and replays.

A batch with another signature raises :class:`CaptureShapeError` (``capture=True``), or starts this cycle
again for the new signature (``capture="auto"``; the old graph is released).

Outputs of a replayed step are the graph's static tensors: valid until the next step, read them (or clone
them) before that. Nothing here synchronizes with the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from .batch import TaskBatch
from .results import MetaStepOutput

__all__ = ["CaptureMode", "CaptureShapeError", "StepCapture", "EagerSteps", "make_step_capture"]

CaptureMode = bool | Literal["auto"]
Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


class CaptureShapeError(ValueError):
    """A batch's shapes differ from the ones the CUDA graph was captured with (``capture=True``)."""


Step = Callable[[Any], MetaStepOutput]


def make_step_capture(capture: object) -> StepCapture | EagerSteps:
    """The step engine for ``MetaOptimizer(capture=...)``.

    ``False``: :class:`EagerSteps`. ``True`` / ``"auto"``: a :class:`StepCapture` in that mode. A
    :class:`StepCapture` instance is used as given: the seam for another engine, such as the tests' stand-in
    that records the step instead of capturing a CUDA graph.
    """
    if isinstance(capture, StepCapture):
        return capture
    if capture not in (False, True, "auto"):
        raise ValueError(f"capture must be False, True or 'auto', got {capture!r}")
    return StepCapture(capture) if capture else EagerSteps()


class EagerSteps:
    """The engine of ``capture=False``: every step runs eagerly (its tasks checked by the step itself), and a
    failed one raises. :class:`StepCapture`'s interface, doing nothing else."""

    mode: CaptureMode = False
    requires_cuda = False
    skipped: Tensor | None = None  # eager steps raise instead of skipping

    def check_device(self, device: torch.device) -> None:
        """Any device runs eager steps."""

    def place(self, device: torch.device) -> None:
        """Nothing depends on the parameters' device."""

    def release(self) -> None:
        """Nothing is captured."""

    def run(self, tasks: Any, eager_step: Step, captured_step: Step, check: Callable[[Any], Any]) -> MetaStepOutput:
        """``eager_step(tasks)``."""
        return eager_step(tasks)

    def count_skipped(self, ok: Tensor) -> None:
        """Never called: only a replayed step skips (an eager one raises)."""


def signature(batch: TaskBatch) -> Signature:
    return tuple((tuple(t.shape), t.dtype) for t in batch)


def _describe(sig: Signature) -> str:
    return ", ".join(f"{name}{list(shape)}" for name, (shape, _) in zip(TaskBatch._fields, sig, strict=True))


class StepCapture:
    """Runs a step function eagerly for warm-up, then as one captured CUDA graph per batch signature
    (``MetaOptimizer(..., capture=StepCapture(...))``; ``capture=True`` / ``"auto"`` are shorthands).

    CUDA only. A replayed step does not synchronize with the host: a non-finite step is skipped on the device
    (parameters and optimizer state kept, ``.grad`` zero) and counted in :attr:`skipped` instead of raising.
    The learning rate is part of the captured step: after changing it, call
    ``MetaOptimizer.release_capture()``. Captured steps take :class:`~rkfast.batch.TaskBatch` es; Adam/AdamW
    are created with ``capturable=True``. Not with task parallelism (``docs/api.md``, "Captured steps").

    Args:
        mode: ``True`` (a new signature raises :class:`CaptureShapeError`) or ``"auto"`` (re-capture).
        warmup_steps: eager calls per signature before the capture.

    Attributes:
        skipped: (once the optimizer placed it) a device counter of the replayed steps skipped for a
            non-finite loss or direction.
    """

    requires_cuda = True  # the graph, streams and replay below are CUDA's (a stand-in may run anywhere)

    def __init__(self, mode: CaptureMode = True, warmup_steps: int = 2) -> None:
        if not (mode is True or mode == "auto"):
            raise ValueError(f"StepCapture mode must be True or 'auto', got {mode!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be at least 1, got {warmup_steps}")
        self.mode = mode
        self.skipped: Tensor | None = None
        self.warmup_steps = warmup_steps
        self.signature: Signature | None = None
        self.warm = 0  # eager calls made for the current signature
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: TaskBatch | None = None
        self.static_out: MetaStepOutput | None = None
        self.captures = 0  # graphs captured so far (a re-capture counts again)

    def check_device(self, device: torch.device) -> None:
        """Raise unless this engine can capture steps over meta-parameters on ``device``."""
        if self.requires_cuda and torch.device(device).type != "cuda":
            raise RuntimeError(
                f"capture={self.mode!r} replays the meta-step as a CUDA graph and needs CUDA parameters; "
                f"the meta-parameters are on {device}. Move the model to a GPU or use capture=False."
            )

    def place(self, device: torch.device) -> None:
        """Bind to meta-parameters on ``device`` (checked first: :meth:`check_device`): a captured graph reads
        and writes the old buffers, so it is released; the skip counter moves there."""
        self.check_device(device)
        self.release()
        self.skipped = (
            torch.zeros((), dtype=torch.int64, device=device) if self.skipped is None else self.skipped.to(device)
        )

    def count_skipped(self, ok: Tensor) -> None:
        """Add a skipped step to :attr:`skipped` where the 0-d boolean ``ok`` is false (on the device)."""
        assert self.skipped is not None  # set by place(), which binding the optimizer calls first
        self.skipped.add_((~ok).to(self.skipped.dtype))

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def run(self, tasks: Any, eager_step: Step, captured_step: Step, check: Callable[[Any], Any]) -> MetaStepOutput:
        """One step on ``check(tasks)``, a checked batch: eager warm-up, capture + replay, or copy + replay."""
        batch = check(tasks)
        sig = signature(batch)
        if self.signature is not None and sig != self.signature:
            if self.mode is True:
                raise CaptureShapeError(
                    f"this MetaOptimizer captured its step for batches of {_describe(self.signature)}; "
                    f"got {_describe(sig)}. Keep batch shapes fixed, or use capture='auto' to re-capture "
                    "for each new shape."
                )
            self.release()
        if self.warm < self.warmup_steps or self.signature is None:
            # a warm-up step counts (and fixes the shapes) only once it succeeded: a failed one changes
            # nothing, so the graph is never captured before the outer optimizer's state exists
            out = self._warm(eager_step, batch)
            self.signature, self.warm = sig, self.warm + 1
            return out
        if self.graph is None:
            self._capture(captured_step, batch)
        return self._replay(batch)

    def release(self) -> None:
        """Drop the graph and its static buffers (the next step warms up and captures again)."""
        self.signature, self.warm = None, 0
        self.graph = self.static_batch = self.static_out = None

    # -- the CUDA parts (overridden in the CPU tests of the state machine above) ---------------------------

    def _warm(self, step: Callable[[TaskBatch], MetaStepOutput], batch: TaskBatch) -> MetaStepOutput:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = step(batch)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, step: Callable[[TaskBatch], MetaStepOutput], batch: TaskBatch) -> None:
        self.static_batch = TaskBatch(*(t.clone() for t in batch))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_out = step(self.static_batch)
        self.graph = graph
        self.captures += 1

    def _replay(self, batch: TaskBatch) -> MetaStepOutput:
        assert self.graph is not None and self.static_batch is not None and self.static_out is not None
        for static, new in zip(self.static_batch, batch, strict=True):
            if static.data_ptr() != new.data_ptr():
                static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.static_out
