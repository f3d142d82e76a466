"""The one training loop (:func:`train`): meta-train a registered task domain, evaluate it on held-out tasks,
checkpoint it, meta-test it, and report every step to the callbacks. ``docs/training.md`` describes a run:
its folder, stopping and resuming it, runs over many processes, and the callbacks and loggers."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..distributed import TaskParallel, resolve_process_group
from ..interrupt import StopRequests
from ..optim import NonFiniteLossError
from ..runs import RunFolder, save_payload, write_json
from ..tasks import Domain, get_domain, task_chunks, task_generator
from .callbacks import (
    LOG_EVERY,
    Callback,
    CallbackList,
    CheckpointEvent,
    EndEvent,
    EvaluationEvent,
    ProgressCallback,
    RunStart,
    StepEvent,
)
from .checkpoint import METRICS_FILE, RunState, prepare_folder, run_files, write_run_config
from .config import TrainConfig
from .evaluation import evaluate_tasks
from .loggers import JsonLinesLogger
from .optimizer import rate_summary, tableau_summary
from .ranks import RankStopRequests, agreed_stop, check_same_settings, lead_decides
from .results import RunDiverged, RunInterrupted, RunResult

__all__ = ["train"]


@dataclass
class _PendingStep:
    """A meta-step whose numbers are still on the device (read with the next ones, in one sync)."""

    iteration: int
    stages: tuple[int, ...]
    stage_losses: torch.Tensor | None  # [len(stages)]
    time_s: float


class _Training:
    """One run's loop around its :class:`~rkfast.train.checkpoint.RunState`: held-out evaluations, saving,
    the meta-steps and the decisions between them, and the callbacks.

    With ``parallel`` (more than one rank), every method that saves or evaluates is a collective: all ranks
    call it at the same points of the loop.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        domain: Domain,
        folder: RunFolder | None,
        parallel: TaskParallel | None = None,
        callbacks: CallbackList | None = None,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
    ) -> None:
        self.cfg, self.domain, self.folder, self.parallel = cfg, domain, folder, parallel
        self.state = RunState(cfg, domain, parallel)
        self.settings, self.opt = self.state.settings, self.state.opt
        self.lead = self.state.rank == 0  # prints and writes
        # this rank's share of every meta-batch
        meta_batch = self.settings.meta_batch
        self.meta_batch = meta_batch if parallel is None else parallel.split(meta_batch)[1]
        val = domain.make_tasks(cfg.options, "val", self.state.device)
        # every rank draws every held-out task; evaluate_tasks shares them out
        eval_tasks = self.settings.eval_tasks
        self.val = (
            task_chunks(val, eval_tasks, self.state.defaults.eval_chunk, task_generator(cfg.test_seed, "val"))
            if eval_tasks
            else []
        )
        self.callbacks = callbacks if callbacks is not None else CallbackList()
        self.on_step = on_step
        self.pending: list[_PendingStep] = []
        self.wall_start = self.step_start = 0.0

    # -- held-out evaluation ----------------------------------------------------------------------

    def record_coefficients(self) -> None:
        """Learned rates (:func:`rate_summary`) and a learned tableau (:func:`tableau_summary`) as they are now,
        into the run's history (at every held-out evaluation, held-out tasks or not)."""
        state, rates, learned = self.state, self.opt.rates, self.opt.learned_tableau
        if rates is not None and rates.learned:
            state.rate_history.append({"iteration": state.done, "values": rate_summary(rates)})
        if learned is not None:
            state.tableau_history.append({"iteration": state.done, **tableau_summary(learned.current())})

    def evaluate_val(self) -> None:
        """The held-out metrics after ``defaults.eval_steps`` adaptation steps; a new best primary metric after
        ``select_steps`` steps saves ``best.pt`` (a NaN or infinite one never does).

        Distributed: every rank gets the same gathered result, so every rank takes the same decision."""
        self.record_coefficients()
        if not self.val:
            return
        state, metric, steps = self.state, self.domain.metric, self.state.defaults.eval_steps
        summary = evaluate_tasks(self.opt, self.val, steps, self.cfg.test_step).summary()
        scores = {m.name: {str(n): mean for n, (mean, _) in summary[m.source].items()} for m in self.domain.metrics}
        bad = summary.get("nonfinite", {})  # tasks whose value is NaN or infinite, beside the means they spoil
        nonfinite = {
            m.name: {str(n): c for n, c in bad[m.source].items()} for m in self.domain.metrics if m.source in bad
        }
        state.evals.append({"iteration": state.done, **scores, **({"nonfinite": nonfinite} if nonfinite else {})})
        select = self.cfg.select_steps if self.cfg.select_steps is not None else steps[-1]
        value = scores[metric.name][str(select)]
        best = state.best
        better = best is None or (value > best["value"] if metric.higher_is_better else value < best["value"])
        better = better and math.isfinite(value)
        self.callbacks.on_evaluation(EvaluationEvent(state.done, scores, better))
        if better:
            state.best = {"iteration": state.done, "value": value, "steps": select, "metric": metric.name}
            if self.folder is not None:
                payload, path = state.payload("running"), self.folder.best
                lead_decides(self.parallel, lambda: save_payload(path, payload), f"write {path}")
                self.callbacks.on_checkpoint(CheckpointEvent(state.done, path, "best"))

    # -- saving -----------------------------------------------------------------------------------

    def save(self, status: str, error: str | None = None) -> RunResult:
        """Checkpoint and ``results.json`` with ``status`` (nothing without a folder); returns the result.

        Distributed, a collective: rank 0 writes (with every rank's random state), the others wait for the
        outcome, so a failed write fails every rank."""
        self.read_steps()
        result = self.state.result(status, self.wall_start, error)
        if self.folder is not None:
            folder, payload = self.folder, self.state.payload(status, error)
            payload["history"]["wall_time_s"] = result.wall_time_s

            def write() -> None:
                write_run_config(folder, self.cfg, resume=True)  # the first save writes it; later ones keep it
                save_payload(folder.checkpoint, payload)
                write_json(folder.results, result.to_json())

            lead_decides(self.parallel, write, f"save the checkpoint in {folder.path}")
            self.callbacks.on_checkpoint(CheckpointEvent(self.state.done, folder.checkpoint, status))
        return result

    def finish(self, status: str, error: str | None = None) -> RunResult:
        """Save the run with its final ``status`` and tell the callbacks it ended."""
        result = self.save(status, error)
        self.callbacks.on_end(EndEvent(status, result))
        return result

    # -- the meta-steps ---------------------------------------------------------------------------

    def sample(self) -> Any:
        """This rank's share of the next meta-batch. Distributed, a failure to sample is reported through the
        meta-step's own all-reduce, which the other ranks are waiting in: they raise
        :class:`~rkfast.distributed.RankFailedError` naming this rank, and this rank raises its error."""
        try:
            return self.state.sampler.sample(self.meta_batch, self.state.gen)
        except Exception as err:
            if self.parallel is None:
                raise
            failure = err

        def fail() -> Any:
            raise failure

        self.parallel.reduce_meta_step(fail, self.opt.flat_parameters.detach(), self.opt.tableau.stages)
        raise failure  # pragma: no cover - reduce_meta_step re-raises it

    def meta_step(self, it: int) -> None:
        """Meta-step ``it + 1``; its meta-loss stays on the device (:meth:`read_steps` reads it later). A
        non-finite step saves the last finite state and raises :class:`RunDiverged`."""
        state, began = self.state, time.perf_counter()
        try:
            out = self.opt.step(self.sample())
        except NonFiniteLossError as err:  # distributed: every rank raises it, after the same step
            state.train_time += time.perf_counter() - self.step_start
            raise RunDiverged(self.finish("diverged", str(err)), self.folder.path if self.folder else None) from None
        state.losses[it] = out.loss
        state.done = done = it + 1
        if self.on_step is not None:
            self.on_step(done, state.losses[it])
        if self.callbacks:
            stages = tuple(out.stage_losses)
            losses = torch.stack([out.stage_losses[j].detach() for j in stages]) if stages else None  # no sync
            self.pending.append(_PendingStep(done, stages, losses, time.perf_counter() - began))
            self.callbacks.on_meta_step(done)
            if done % LOG_EVERY == 0:
                self.read_steps()

    def read_steps(self) -> None:
        """The numbers of the steps since the last read, from the device in one sync, to the callbacks."""
        if not self.pending:
            return
        first, count = self.pending[0].iteration, len(self.pending)
        parts = [
            self.state.losses[first - 1 : first - 1 + count].double(),
            *(p.stage_losses.double() for p in self.pending if p.stage_losses is not None),
        ]
        values = torch.cat(parts).tolist()
        losses, stage_values = values[:count], iter(values[count:])
        pending, self.pending = self.pending, []
        for p, loss in zip(pending, losses, strict=True):
            stage_losses = {j: next(stage_values) for j in p.stages}
            self.callbacks.on_step(StepEvent(p.iteration, loss, stage_losses, p.time_s))

    def between_steps(self, stop: StopRequests, checkpoint_every: int) -> None:
        """After a step: a held-out evaluation and a checkpoint when due; a stop signal saves the run and
        raises :class:`RunInterrupted`."""
        settings, done = self.settings, self.state.done
        stop_signal = agreed_stop(self.parallel, stop, self.folder is not None)
        evaluate = (settings.eval_every and done % settings.eval_every == 0) or done == settings.iterations
        checkpoint = done % checkpoint_every == 0 or stop_signal is not None
        if not (evaluate or checkpoint):
            return
        self.state.train_time += time.perf_counter() - self.step_start
        self.read_steps()
        if evaluate:
            self.evaluate_val()
        if checkpoint and done < settings.iterations:
            status = "interrupted" if stop_signal is not None else "running"
            result = self.save(status)
            if stop_signal is not None and self.folder is not None:
                self.callbacks.on_end(EndEvent(status, result))
                raise RunInterrupted(result, self.folder.path, stop_signal)
        self.step_start = time.perf_counter()

    def meta_test(self) -> None:
        """The final meta-test on ``test_tasks`` tasks (kept from the checkpoint of a run already complete)."""
        state, cfg = self.state, self.cfg
        if state.test is None:
            test = self.domain.make_tasks(cfg.options, "test", state.device)
            generator = task_generator(cfg.test_seed, "test")
            chunks = task_chunks(test, self.settings.test_tasks, state.defaults.eval_chunk, generator)
            state.test = evaluate_tasks(self.opt, chunks, state.defaults.test_steps, cfg.test_step)

    def run(self, checkpoint_every: int) -> RunResult:
        state, cfg = self.state, self.cfg
        self.wall_start = time.perf_counter()
        # without a folder there is nothing to save, so a signal has nothing to wait for: it keeps its usual effect
        saving = self.folder is not None
        stop = StopRequests(active=saving) if self.parallel is None else RankStopRequests(self.lead, active=saving)
        with stop, self.callbacks:
            self.callbacks.on_start(
                RunStart(
                    state.done,
                    self.settings.iterations,
                    cfg,
                    self.domain,
                    state.tableau,
                    self.folder.path if self.folder else None,
                    state.losses[: state.done].tolist() if self.callbacks else [],
                )
            )
            if state.done == 0:
                self.evaluate_val()
                self.save("running")
            self.step_start = time.perf_counter()
            for it in range(state.done, self.settings.iterations):
                self.meta_step(it)
                self.between_steps(stop, checkpoint_every)
            state.train_time += time.perf_counter() - self.step_start
            self.meta_test()
            return self.finish("complete")


def train(
    config: TrainConfig,
    *,
    out: Path | str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    callbacks: Sequence[Callback] = (),
    parallel: Any = "auto",
) -> RunResult:
    """Meta-train the domain's model with the RK tableau of ``config`` and meta-test it.

    Every ``eval_every`` steps (and before the first and after the last) the metrics of ``eval_tasks``
    held-out tasks after ``defaults.eval_steps`` adaptation steps are recorded. The final meta-test uses
    ``test_tasks`` tasks, adapted with ``test_step`` (default: the tableau's own step). ``docs/training.md``
    describes the run folder, signals, resuming and runs over many processes in full.

    Args:
        config: the run's configuration (domain defaults fill its ``None`` fields).
        out: the run folder: ``results.json``, ``checkpoint.pt`` (every ``checkpoint_every`` steps and at the
            end), ``best.pt`` (each new best held-out evaluation after
            ``select_steps`` steps; none when no evaluation is finite), ``metrics.jsonl``
            (:class:`~rkfast.train.JsonLinesLogger`) and the plots' paths, checked before training.
            SIGINT/SIGTERM then finish the step, save and raise :class:`RunInterrupted`. Without it nothing
            is saved and the signals keep their usual effect.
        resume: continue the run saved in ``out`` (``config`` as saved but for :data:`RESUMABLE_CHANGES`;
            the same number of processes).
        overwrite: a new run into a folder that holds an earlier run's files deletes them first.
        checkpoint_every: meta-steps between checkpoints (default: ``eval_every``, or 1000 when that is 0).
        progress: show a tqdm progress bar with the recent meta-loss (:class:`ProgressCallback`).
        log: where the periodic evaluation lines go (default: above the progress bar, or nowhere).
        on_step: called after every meta-step, on every rank, with the number of steps done and the meta-loss
            (a device tensor: reading it synchronizes).
        callbacks: :class:`Callback` s told of the run's start, steps, evaluations, checkpoints and end
            (rank 0 only), after the progress display and the ``metrics.jsonl`` logger.
        parallel: task parallelism (:class:`~rkfast.optim.MetaOptimizer`'s): ``"auto"`` uses
            torch.distributed's default group when it has more than one rank (``torchrun``), ``None`` trains
            in this process alone, or a :class:`~rkfast.distributed.TaskParallel` or ``ProcessGroup``. Every
            rank calls ``train`` with the same arguments (checked) and shares the meta-batch and the
            evaluations; rank 0 alone shows progress, logs and writes ``out``.

    Raises:
        RunError: a folder that cannot be written, holds another run, or a checkpoint that cannot be resumed.
        RunInterrupted: SIGINT/SIGTERM (with ``out``), after saving.
        KeyboardInterrupt: SIGINT without ``out`` (nothing saved), or a second SIGINT with it.
        RunDiverged: a non-finite meta-step, after saving the last finite state (with ``out``).
        ValueError: an invalid configuration (distributed: also a meta-batch smaller than the number of
            ranks, or ranks given different settings).
        rkfast.distributed.RankFailedError: distributed, another rank failed.
    """
    domain = get_domain(config.domain)
    cfg = config.resolved()
    every = checkpoint_every if checkpoint_every is not None else (cfg.settings().eval_every or 1000)
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    if resume and out is None:
        raise ValueError("resume=True needs out=, the folder of the run to continue")
    parallel = _task_parallel(parallel, cfg, int(every), out is not None, resume, overwrite)
    folder = None if out is None else RunFolder(out, run_files(domain))
    world = 1 if parallel is None else parallel.world_size
    saved = lead_decides(parallel, lambda: prepare_folder(folder, cfg, resume, overwrite, world))
    lead = parallel is None or parallel.rank == 0
    hooks = CallbackList(_run_callbacks(folder, progress, log, callbacks) if lead else ())
    training = _Training(cfg, domain, folder, parallel, hooks, on_step)
    if saved is not None:
        training.state.restore(saved)
    return training.run(int(every))


def _task_parallel(
    choice: Any, cfg: TrainConfig, every: int, saving: bool, resume: bool, overwrite: bool
) -> TaskParallel | None:
    """The run's task parallelism (``None`` for one process), with every rank's settings checked alike."""
    parallel = resolve_process_group(choice)
    if parallel is None or parallel.world_size == 1:
        return None  # a group of one: nothing to share
    check_same_settings(parallel, cfg, every, saving, resume, overwrite)
    meta_batch = cfg.settings().meta_batch
    if meta_batch < parallel.world_size:
        raise ValueError(
            f"meta_batch {meta_batch} is smaller than the {parallel.world_size} processes of "
            f"the run: every process needs at least one task per meta-step; use a meta-batch of "
            f"at least {parallel.world_size} or fewer processes"
        )
    return parallel


def _run_callbacks(
    folder: RunFolder | None, progress: bool, log: Callable[[str], None] | None, callbacks: Sequence[Callback]
) -> list[Callback]:
    """Rank 0's callbacks: the progress display (when shown), ``metrics.jsonl`` (with a folder), the user's."""
    hooks: list[Callback] = []
    if progress or log is not None:
        hooks.append(ProgressCallback(progress, log))
    if folder is not None:
        hooks.append(JsonLinesLogger(folder.path / METRICS_FILE))
    return [*hooks, *callbacks]
