"""Loggers on the training loop's hooks (:class:`~rkfast.train.callbacks.Callback`): :class:`JsonLinesLogger`
(``metrics.jsonl``, which every run with a folder writes) and :class:`TensorBoardLogger` (optional:
``pip install rkfast[tensorboard]``).

A resumed run continues the log of the run it resumes: what was logged after the checkpoint it continues from
(by a run stopped by a crash, say) is dropped first, so that every meta-step is logged once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from ..runs import atomic_write, finite_or_none
from .callbacks import (
    LOG_EVERY,
    Callback,
    CheckpointEvent,
    EndEvent,
    EvaluationEvent,
    RunStart,
    StepEvent,
)

__all__ = ["JsonLinesLogger", "TensorBoardLogger", "read_metrics"]


def _strict_line(record: dict[str, Any]) -> str:
    """``record`` as one line of strict JSON (non-finite numbers as ``null``)."""
    return json.dumps(finite_or_none(record), allow_nan=False) + "\n"


def _iteration_of(line: str) -> int | None:
    """The ``iteration`` of one logged line; ``None`` for a line that does not parse (cut by a crash)."""
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """The events of a ``metrics.jsonl`` file, in order (``NaN`` and infinities were written as ``None``)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class JsonLinesLogger(Callback):
    """One JSON object per line at ``path``, per event: ``{"event": "step", "iteration": 7, "loss": ...,
    "stage_losses": {"1": ...}, "time_s": ...}``, ``"evaluation"`` (``"scores"``: ``{metric: {steps: mean}}``,
    ``"best"``), ``"checkpoint"`` (``"path"``, ``"status"``) and ``"end"`` (``"status"``, ``"test"``:
    ``{metric: {steps: [mean, ci95]}}`` of a complete run). Strict JSON: NaN and infinities are ``null``.

    A new run starts the file afresh; a resumed one keeps the lines up to its checkpoint's iteration and
    appends. The file is flushed with every :data:`~rkfast.train.callbacks.LOG_EVERY` steps and every other
    event (what a crash loses is past the last checkpoint, which a resumed run drops anyway)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.file: IO[str] | None = None

    def on_start(self, start: RunStart) -> None:
        if start.resumed and self.path.is_file():
            kept = [
                line
                for line in self.path.read_text().splitlines(keepends=True)
                if (i := _iteration_of(line)) is not None and i <= start.iteration
            ]
            atomic_write(self.path, lambda f: f.writelines(kept), "w")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a" if start.resumed else "w")  # noqa: SIM115 - open until close()

    def _write(self, record: dict[str, Any], flush: bool = True) -> None:
        if self.file is not None:
            self.file.write(_strict_line(record))
            if flush:
                self.file.flush()

    def on_step(self, step: StepEvent) -> None:
        self._write(step.to_json(), flush=step.iteration % LOG_EVERY == 0)

    def on_evaluation(self, evaluation: EvaluationEvent) -> None:
        self._write(evaluation.to_json())

    def on_checkpoint(self, checkpoint: CheckpointEvent) -> None:
        self._write(checkpoint.to_json())

    def on_end(self, end: EndEvent) -> None:
        self._write(end.to_json())
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class TensorBoardLogger(Callback):
    """TensorBoard scalars in ``log_dir`` (``torch.utils.tensorboard``), by meta-step: ``train/meta_loss``,
    ``train/stage_loss/<j>`` (stage ``j``'s query loss) and ``held_out/<metric>/<n>_steps`` (the held-out
    mean after ``n`` adaptation steps; ``0_steps``: before adaptation).

    A resumed run purges what was logged after its checkpoint's iteration (``SummaryWriter``'s
    ``purge_step``), so that every step is shown once.

    Raises:
        ImportError: TensorBoard is not installed (``pip install rkfast[tensorboard]``).
    """

    def __init__(self, log_dir: Path | str) -> None:
        try:  # an optional dependency: imported by the logger that needs it, not with rkfast
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                f"TensorBoardLogger needs the tensorboard package ({err}); install it with "
                "`pip install rkfast[tensorboard]` (or `pip install tensorboard`)"
            ) from None
        self.log_dir = Path(log_dir)
        self._writer_type = SummaryWriter
        self.writer: Any = None

    def on_start(self, start: RunStart) -> None:
        purge = start.iteration + 1 if start.resumed else None  # drop what a crashed run logged past its checkpoint
        self.writer = self._writer_type(log_dir=str(self.log_dir), purge_step=purge)

    def on_step(self, step: StepEvent) -> None:
        self.writer.add_scalar("train/meta_loss", step.loss, step.iteration)
        for j, value in step.stage_losses.items():
            self.writer.add_scalar(f"train/stage_loss/{j}", value, step.iteration)

    def on_evaluation(self, evaluation: EvaluationEvent) -> None:
        for metric, by_steps in evaluation.scores.items():
            for steps, value in by_steps.items():
                self.writer.add_scalar(f"held_out/{metric}/{steps}_steps", value, evaluation.iteration)

    def on_checkpoint(self, checkpoint: CheckpointEvent) -> None:
        self.writer.flush()

    def on_end(self, end: EndEvent) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
