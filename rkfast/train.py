"""The one training loop: meta-train any registered task domain, evaluate it, report and save the run.

Every run is seeded: ``seed`` fixes the initialization and the stream of training tasks; the held-out
validation tasks and the meta-test tasks come from ``test_seed`` (independent streams), so runs with
different tableaus or training seeds are tested on the very same tasks.

A run given a folder (``train(config, out=...)``) never loses its work: it checkpoints atomically every
``checkpoint_every`` meta-steps, on a new best held-out evaluation (``best.pt``), when it diverges and at the
end; SIGINT/SIGTERM finish the current step, save, and raise :class:`RunInterrupted`; and
``train(config, out=..., resume=True)`` continues from the checkpoint, on the CPU bit for bit as if never
interrupted (the checkpoint holds the model, the optimizer, every random state and the history). A run without
a folder has nothing to save: it leaves SIGINT and SIGTERM alone (Ctrl-C raises ``KeyboardInterrupt`` at once).
"""

from __future__ import annotations

import math
import numbers
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .functional import check_step
from .interrupt import StopRequests
from .optim import MetaOptimizer, NonFiniteLossError
from .outer import check_lr
from .results import AdaptationOutput
from .runs import (CHECKPOINT_FORMAT, RunError, RunFolder, load_checkpoint, save_payload, write_json)
from .tableau import Tableau, get_tableau
from .tasks import Defaults, Domain, TaskSampler, get_domain

__all__ = ["TrainConfig", "RunResult", "RunInterrupted", "RunDiverged", "train", "evaluate_tasks",
           "task_generator", "load_checkpoint", "load_run", "load_result", "resume_config", "write_json", "slug",
           "task_chunks", "build_optimizer", "check_device", "RESUMABLE_CHANGES", "CHECKPOINT_FORMAT"]

LOG_EVERY = 50  # steps between progress-bar postfix updates (one host sync each)
STREAMS = {"train": 0, "val": 1, "test": 2}  # independent random streams of a seed
RESUMABLE_CHANGES = ("iterations", "device", "backend")  # what a resumed run may set differently


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that can hold tensors here; ``ValueError`` naming it otherwise."""
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"device {str(device)!r} is not available here: {reason}") from None
    return dev


def _check_seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


@dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` fields take the domain's published defaults
    (:class:`~rkfast.tasks.registry.Defaults`); ``options`` are the domain's own settings.

    Attributes:
        domain: a registered task domain (``"sinusoid"``...).
        tableau: a tableau or its name (default: the domain's, ``"maml"`` for most).
        iterations, meta_batch, inner_lr, lr: meta-steps, tasks per meta-step, the RK step h (finite,
            > 0), Adam's rate (finite, >= 0 as for :class:`~rkfast.optim.MetaOptimizer`; 0 keeps the
            initialization).
        first_order: ignore second derivatives.
        seed: the initialization and the training tasks (an integer >= 0).
        eval_every, eval_tasks: meta-steps between held-out evaluations (0: at start and end only) and
            their task count (0: none).
        test_tasks, test_seed: the meta-test tasks and their seed (also the held-out tasks' seed).
        test_step: the meta-test adaptation step, finite and > 0 (default: the tableau's own step,
            :meth:`~rkfast.tableau.Tableau.test_step`).
        device, backend: where the run computes and which kernels it uses.
        options: the domain's options (``{"shots": 5}``); unset ones take their defaults.
    """

    domain: str = "sinusoid"
    tableau: str | Tableau | None = None
    iterations: int | None = None
    meta_batch: int | None = None
    inner_lr: float | None = None
    lr: float | None = None
    first_order: bool = False
    seed: int = 0
    eval_every: int | None = None
    eval_tasks: int | None = None
    test_tasks: int | None = None
    test_seed: int = 0
    test_step: float | None = None
    device: str = "cpu"
    backend: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with the domain's defaults filled in and everything checked (errors name the setting)."""
        domain = get_domain(self.domain)
        options = domain.resolve_options(self.options)
        defaults = domain.defaults_for(options)
        filled = {name: getattr(defaults, name) for name in
                  ("tableau", "iterations", "meta_batch", "inner_lr", "lr", "eval_every", "eval_tasks", "test_tasks")
                  if getattr(self, name) is None}
        cfg = replace(self, **filled, options=options)
        get_tableau(cfg.tableau)  # type: ignore[arg-type]  # a bad name fails here, naming it
        _check_seed("seed", cfg.seed)
        _check_seed("test_seed", cfg.test_seed)
        for name in ("iterations", "meta_batch", "test_tasks"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("eval_every", "eval_tasks"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("inner_lr", "test_step"):  # as MetaOptimizer's inner_lr and evaluate's step_size
            value = getattr(cfg, name)
            if value is not None:
                try:
                    check_step(name, value)
                except TypeError as err:  # a string or a bool: still a bad setting (ValueError, as documented)
                    raise ValueError(str(err)) from None
        check_lr(cfg.lr)  # as MetaOptimizer's (and torch's) lr: finite and >= 0
        check_device(cfg.device)
        return cfg

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (the tableau by name)."""
        name = self.tableau.name if isinstance(self.tableau, Tableau) else self.tableau
        return asdict(replace(self, tableau=name))


@dataclass
class RunResult:
    """A run: the training curve, the meta-test result and timings (plus the optimizer).

    ``status`` is ``"complete"`` (``test`` holds the meta-test), ``"interrupted"`` or ``"diverged"``
    (``test`` is ``None``; ``error`` says what happened).
    """

    config: TrainConfig  # resolved
    domain: Domain
    tableau: Tableau
    losses: list[float]
    evals: list[dict[str, Any]]
    test: AdaptationOutput | None
    train_time_s: float
    wall_time_s: float
    opt: MetaOptimizer = field(repr=False)
    status: str = "complete"
    error: str | None = None
    best: dict[str, Any] | None = None  # {"iteration", "value"} of the best held-out evaluation

    @property
    def defaults(self) -> Defaults:
        """The domain's published defaults for this run's options (evaluation and test step counts...)."""
        return self.domain.defaults_for(self.config.options)

    @property
    def iteration(self) -> int:
        """Meta-steps done."""
        return len(self.losses)

    @property
    def ms_per_step(self) -> float:
        """Mean wall time of one meta-step (task sampling included, evaluation excluded), in ms."""
        return 1000.0 * self.train_time_s / max(1, len(self.losses))

    def task_generator(self, split: str) -> torch.Generator:
        """A fresh generator of the run's ``split`` stream: sampling from it again gives the run's tasks."""
        return task_generator(self.config.seed if split == "train" else self.config.test_seed, split)

    def test_summary(self) -> dict[str, dict[int, tuple[float, float]]]:
        """``{metric name: {steps: (mean, ci95)}}`` of the meta-test, for every metric of the domain."""
        if self.test is None:
            raise ValueError(f"the run is {self.status}: it has no meta-test result")
        summary = self.test.summary()
        return {m.name: summary[m.source] for m in self.domain.metrics}

    def to_json(self) -> dict[str, Any]:
        """The run as plain JSON data (what ``results.json`` holds)."""
        tab, cfg = self.tableau, self.config
        test = None if self.test is None else {
            "tasks": int(self.test.losses.shape[1]), "seed": cfg.test_seed,
            **self.domain.test_protocol(cfg.options), **self.test.summary()}
        return {
            "status": self.status,
            "iteration": self.iteration,
            **({"error": self.error} if self.error else {}),
            "domain": self.domain.name,
            "config": cfg.to_json(),
            "backend": self.opt.backend,
            "tableau": {**tab.to_dict(), "order": tab.order, "stages": tab.stages, "describe": tab.describe()},
            "metrics": [asdict(m) for m in self.domain.metrics],
            "training": {"meta_loss": [float(f"{x:.5g}") for x in self.losses], "eval": self.evals,
                         "best": self.best},
            "test": test,
            "train_time_s": self.train_time_s,
            "wall_time_s": self.wall_time_s,
            "ms_per_meta_step": self.ms_per_step,
        }


class RunInterrupted(Exception):
    """SIGINT/SIGTERM stopped a run after a finished step; its checkpoint and partial results are saved.

    Attributes:
        result: the partial :class:`RunResult` (``status == "interrupted"``).
        run_dir: the run folder (resume with ``train(config, out=run_dir, resume=True)``).
        signal: the signal number.
    """

    def __init__(self, result: RunResult, run_dir: Path, signum: int) -> None:
        super().__init__(f"interrupted after meta-step {result.iteration} of {result.config.iterations}; "
                         f"saved {run_dir}")
        self.result, self.run_dir, self.signal = result, run_dir, signum


class RunDiverged(NonFiniteLossError):
    """A meta-step was non-finite; the last finite state and the partial results are saved.

    Attributes:
        result: the partial :class:`RunResult` (``status == "diverged"``, ``error`` the step's message).
        run_dir: the run folder, or ``None`` when the run had none.
    """

    def __init__(self, result: RunResult, run_dir: Path | None) -> None:
        where = f"; the last finite state is saved in {run_dir}" if run_dir is not None else ""
        super().__init__(f"meta-step {result.iteration + 1} diverged: {result.error}{where}")
        self.result, self.run_dir = result, run_dir


# -- the run ------------------------------------------------------------------------------------------


def task_generator(seed: int, split: str) -> torch.Generator:
    """A torch generator for one of the independent random streams (``"train"``, ``"val"``, ``"test"``) of ``seed``."""
    state = np.random.SeedSequence(seed, spawn_key=(STREAMS[split],)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def task_chunks(sampler: TaskSampler, count: int, chunk: int, gen: torch.Generator) -> list[Any]:
    return [sampler.sample(min(chunk, count - i), gen) for i in range(0, count, chunk)]


def evaluate_tasks(opt: MetaOptimizer, chunks: Sequence[Any], steps: Sequence[int],
                   step_size: float | None) -> AdaptationOutput:
    """Meta-test ``opt`` on every chunk of tasks and join the per-task results."""
    return AdaptationOutput.cat([opt.evaluate(t, steps=steps, step_size=step_size) for t in chunks])


def build_optimizer(cfg: TrainConfig, domain: Domain) -> MetaOptimizer:
    """The run's model (initialized under ``cfg.seed``, the global RNG left alone) and its optimizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = domain.make_model(cfg.options).to(torch.device(cfg.device))
    return MetaOptimizer(
        model, domain.loss_fn, tableau=get_tableau(cfg.tableau), inner_lr=cfg.inner_lr, outer="adam", lr=cfg.lr,
        first_order=cfg.first_order, backend=cfg.backend,  # type: ignore[arg-type]
    )


def run_files(domain: Domain) -> tuple[str, ...]:
    """The plot files a run of ``domain`` writes besides results and checkpoints."""
    return ("training.png", *domain.plots)


class _Training:
    """The state of one run between meta-steps, and what saves and restores it."""

    def __init__(self, cfg: TrainConfig, domain: Domain, folder: RunFolder | None, log: Callable[[str], None]) -> None:
        self.cfg, self.domain, self.folder, self.log = cfg, domain, folder, log
        self.tableau = get_tableau(cfg.tableau)  # type: ignore[arg-type]
        self.defaults = domain.defaults_for(cfg.options)
        self.device = torch.device(cfg.device)
        self.opt = build_optimizer(cfg, domain)
        self.sampler = domain.make_tasks(cfg.options, "train", self.device)
        chunk = self.defaults.eval_chunk
        val = domain.make_tasks(cfg.options, "val", self.device)
        self.val = (task_chunks(val, cfg.eval_tasks, chunk, task_generator(cfg.test_seed, "val"))
                    if cfg.eval_tasks else [])
        self.gen = task_generator(cfg.seed, "train")
        self.losses = torch.empty(cfg.iterations, device=self.device)  # no host sync per step
        self.done = 0
        self.evals: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.train_time = self.wall_before = 0.0
        self.test: AdaptationOutput | None = None

    # -- held-out evaluation ----------------------------------------------------------------------

    def evaluate_val(self) -> None:
        """The held-out metrics after ``defaults.eval_steps`` adaptation steps; a new best saves ``best.pt``."""
        if not self.val:
            return
        domain, metric = self.domain, self.domain.metric
        summary = evaluate_tasks(self.opt, self.val, self.defaults.eval_steps, self.cfg.test_step).summary()
        record: dict[str, Any] = {"iteration": self.done}
        for m in domain.metrics:
            record[m.name] = {str(n): mean for n, (mean, _) in summary[m.source].items()}
        self.evals.append(record)
        values = record[metric.name]
        steps = self.defaults.eval_steps
        self.log(f"[{self.tableau.name}] step {self.done:>6}: held-out {metric.label} {values['0']:.3f} before, "
                 + ", ".join(f"{values[str(n)]:.3f} after {n} step{'s' if n > 1 else ''}" for n in steps))
        value = values[str(steps[-1])]
        better = (self.best is None or (value > self.best["value"] if metric.higher_is_better
                                        else value < self.best["value"]))
        if better and math.isfinite(value):
            self.best = {"iteration": self.done, "value": value, "steps": steps[-1], "metric": metric.name}
            if self.folder is not None:
                save_payload(self.folder.best, self.payload("running"))

    # -- saving and restoring ---------------------------------------------------------------------

    def payload(self, status: str, error: str | None = None) -> dict[str, Any]:
        """Everything needed to resume (or to re-create the result) as a checkpoint dictionary."""
        random = {"train_tasks": self.gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            random["cuda"] = torch.cuda.get_rng_state(self.device)
        sampler_state = getattr(self.sampler, "state_dict", None)
        test = None if self.test is None else {
            "steps": list(self.test.steps), "step_size": self.test.step_size, "losses": self.test.losses.cpu(),
            "metrics": {k: v.cpu() for k, v in self.test.metrics.items()}}
        return {
            "format": CHECKPOINT_FORMAT,
            "status": status,
            **({"error": error} if error else {}),
            "config": self.cfg.to_json(),
            "iteration": self.done,
            "model": self.opt.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "random": random,
            "sampler": sampler_state() if callable(sampler_state) else None,
            "history": {"losses": self.losses[:self.done].to("cpu", copy=True), "evals": self.evals, "best": self.best,
                        "train_time_s": self.train_time, "wall_time_s": self.wall_before},
            "test": test,
        }

    def restore(self, payload: dict[str, Any]) -> None:
        """Continue from a checkpoint: model, optimizer, random states, sampler and history."""
        self.opt.model.load_state_dict(payload["model"])  # copies into the flat buffer's views
        self.opt.load_state_dict(payload["optimizer"])
        random = payload["random"]
        self.gen.set_state(random["train_tasks"])
        torch.set_rng_state(random["torch"])
        if "cuda" in random and self.device.type == "cuda":
            torch.cuda.set_rng_state(random["cuda"], self.device)
        if payload.get("sampler") is not None:
            self.sampler.load_state_dict(payload["sampler"])  # type: ignore[attr-defined]
        history = payload["history"]
        self.done = int(payload["iteration"])
        self.losses[:self.done] = history["losses"].to(self.device)
        self.evals, self.best = list(history["evals"]), history["best"]
        self.train_time, self.wall_before = float(history["train_time_s"]), float(history["wall_time_s"])
        test = payload.get("test")
        if test is not None and self.done == self.cfg.iterations:
            self.test = AdaptationOutput(tuple(test["steps"]), test["step_size"], test["losses"], dict(test["metrics"]))

    def result(self, status: str, wall_start: float, error: str | None = None) -> RunResult:
        return RunResult(self.cfg, self.domain, self.tableau, self.losses[:self.done].tolist(), list(self.evals),
                         self.test, self.train_time, self.wall_before + time.perf_counter() - wall_start, self.opt,
                         status, error, self.best)

    def save(self, status: str, wall_start: float, error: str | None = None) -> RunResult:
        """Checkpoint and ``results.json`` with ``status`` (nothing without a folder); returns the result."""
        result = self.result(status, wall_start, error)
        if self.folder is not None:
            payload = self.payload(status, error)
            payload["history"]["wall_time_s"] = result.wall_time_s
            save_payload(self.folder.checkpoint, payload)
            write_json(self.folder.results, result.to_json())
        return result

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, checkpoint_every: int, progress: bool,
            on_step: Callable[[int, torch.Tensor], None] | None) -> RunResult:
        cfg, opt = self.cfg, self.opt
        wall_start = time.perf_counter()
        # without a folder there is nothing to save, so a signal has nothing to wait for: it keeps its usual effect
        with StopRequests(active=self.folder is not None) as stop:
            if self.done == 0:
                self.evaluate_val()
                self.save("running", wall_start)
            bar = tqdm(range(self.done, cfg.iterations), desc=self.tableau.name, unit="step",
                       initial=self.done, total=cfg.iterations, disable=not progress)
            step_start = time.perf_counter()
            for it in bar:
                try:
                    self.losses[it] = opt.step(self.sampler.sample(cfg.meta_batch, self.gen)).loss
                except NonFiniteLossError as err:
                    self.train_time += time.perf_counter() - step_start
                    bar.close()
                    raise RunDiverged(self.save("diverged", wall_start, str(err)),
                                      self.folder.path if self.folder else None) from None
                self.done = done = it + 1
                if on_step is not None:
                    on_step(done, self.losses[it])
                if done % LOG_EVERY == 0:
                    bar.set_postfix(loss=f"{self.losses[done - LOG_EVERY:done].mean().item():.3f}", refresh=False)
                evaluate = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.iterations
                checkpoint = done % checkpoint_every == 0 or stop.requested
                if evaluate or checkpoint:
                    self.train_time += time.perf_counter() - step_start
                    if evaluate:
                        self.evaluate_val()
                    if checkpoint and done < cfg.iterations:
                        result = self.save("interrupted" if stop.requested else "running", wall_start)
                        if stop.requested and self.folder is not None:
                            bar.close()
                            raise RunInterrupted(result, self.folder.path, stop.signal or 0)
                    step_start = time.perf_counter()
            self.train_time += time.perf_counter() - step_start
            bar.close()
            if self.test is None:
                test = self.domain.make_tasks(cfg.options, "test", self.device)
                chunks = task_chunks(test, cfg.test_tasks, self.defaults.eval_chunk,
                                     task_generator(cfg.test_seed, "test"))
                self.test = evaluate_tasks(opt, chunks, self.defaults.test_steps, cfg.test_step)
            return self.save("complete", wall_start)


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
) -> RunResult:
    """Meta-train the domain's model with the RK tableau of ``config`` and meta-test it.

    Every ``eval_every`` steps (and before the first and after the last) the metrics of ``eval_tasks``
    held-out tasks after ``defaults.eval_steps`` adaptation steps are recorded. The final meta-test uses
    ``test_tasks`` tasks, adapted with plain gradient steps of ``test_step`` (default: the tableau's own
    step, :meth:`~rkfast.tableau.Tableau.test_step`).

    Args:
        config: the run's configuration (domain defaults fill its ``None`` fields).
        out: the run folder (:class:`~rkfast.runs.RunFolder`). With it the run writes ``results.json`` and
            ``checkpoint.pt`` every ``checkpoint_every`` steps and at the end, ``best.pt`` at each new best
            held-out evaluation, and turns SIGINT/SIGTERM into a clean stop: the current step finishes, the
            run saves and raises :class:`RunInterrupted` (a second SIGINT raises ``KeyboardInterrupt`` at
            once). Every output path is checked before training, by creating the folder and a file in it.
            Without ``out`` nothing is saved and the signals keep their usual effect: SIGINT raises
            ``KeyboardInterrupt`` at once, mid-step; SIGTERM does what the process's handler does (by
            default it ends the process).
        resume: continue the run saved in ``out``; ``config`` must equal its configuration except for
            :data:`RESUMABLE_CHANGES` (:func:`resume_config` reads it).
        overwrite: a new run into a folder that holds an earlier run's files deletes them first (without
            it such a folder is refused).
        checkpoint_every: meta-steps between checkpoints (default: ``eval_every``, or 1000 when that is 0).
        progress: show a tqdm progress bar with the recent meta-loss.
        log: where the periodic evaluation lines go (default: above the progress bar, or nowhere when
            ``progress`` is off).
        on_step: called after every meta-step with the number of steps done and the meta-loss (a device
            tensor: reading it synchronizes).

    Raises:
        RunError: a folder that cannot be written, holds another run, or a checkpoint that cannot be resumed.
        RunInterrupted: SIGINT/SIGTERM (with ``out``), after saving.
        KeyboardInterrupt: SIGINT without ``out`` (nothing saved), or a second SIGINT with it.
        RunDiverged: a non-finite meta-step, after saving the last finite state (with ``out``).
        ValueError: an invalid configuration.
    """
    domain = get_domain(config.domain)
    cfg = config.resolved()
    if log is None:
        log = tqdm.write if progress else (lambda _: None)
    every = checkpoint_every if checkpoint_every is not None else (cfg.eval_every or 1000)
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    folder = None if out is None else RunFolder(out, run_files(domain))
    saved = None
    if folder is not None:
        folder.check_writable()
        if resume:
            saved = _resumable_checkpoint(folder, cfg)
        elif folder.holds_run():
            if not overwrite:
                raise RunError(f"{folder.path} holds an earlier run ({folder.describe_run()}): resume it, "
                               "overwrite it, or choose another output folder")
            folder.clear()
    elif resume:
        raise ValueError("resume=True needs out=, the folder of the run to continue")
    training = _Training(cfg, domain, folder, log)
    if saved is not None:
        training.restore(saved)
    return training.run(int(every), progress, on_step)


def _resumable_checkpoint(folder: RunFolder, cfg: TrainConfig) -> dict[str, Any]:
    """The folder's checkpoint, if ``cfg`` may continue it (else :class:`RunError` saying why)."""
    payload = load_checkpoint(folder.checkpoint)
    if payload["format"] != CHECKPOINT_FORMAT:
        raise RunError(f"{folder.checkpoint} was written by an older rkfast without the state needed to resume")
    saved = _config_from_payload(payload)
    ours, theirs = cfg.to_json(), saved.to_json()
    ours["tableau"] = get_tableau(cfg.tableau).to_dict()
    theirs["tableau"] = get_tableau(saved.tableau).to_dict()
    differ = [k for k in ours if k not in RESUMABLE_CHANGES and ours[k] != theirs[k]]
    if differ:
        changes = ", ".join(f"{k}: {theirs[k]!r} -> {ours[k]!r}" for k in differ)
        raise RunError(f"cannot resume {folder.path} with other settings ({changes}); a resumed run continues "
                       f"as it started (only {', '.join(RESUMABLE_CHANGES)} may change)")
    if cfg.iterations < payload["iteration"]:
        raise RunError(f"{folder.path} already has {payload['iteration']} meta-steps; "
                       f"iterations={cfg.iterations} would end before that")
    return payload


# -- files ----------------------------------------------------------------------------------------------


def slug(name: str) -> str:
    """``name`` as a file-name part (``maml(3)`` -> ``maml-3``)."""
    return re.sub(r"[^\w.]+", "-", name).strip("-")


def _config_from_payload(payload: dict[str, Any], device: str | None = None) -> TrainConfig:
    fields = dict(payload["config"])
    # the config names the tableau; the optimizer state holds it whole (a custom tableau has no parsable name)
    fields["tableau"] = Tableau.from_dict(payload["optimizer"]["rkfast"]["tableau"])
    if device is not None:
        fields["device"] = device
    return TrainConfig(**fields)


def resume_config(run_dir: Path | str) -> TrainConfig:
    """The configuration of the run saved in ``run_dir`` (what ``train(..., resume=True)`` continues)."""
    return _config_from_payload(load_checkpoint(RunFolder(run_dir).checkpoint))


def load_run(run_dir: Path | str, device: str | None = None, checkpoint: str = "checkpoint.pt"
             ) -> tuple[TrainConfig, MetaOptimizer, int]:
    """The configuration, the trained optimizer (with its model) and the iteration count of a run folder
    (``checkpoint="best.pt"``: the state at the best held-out evaluation)."""
    payload = load_checkpoint(Path(run_dir) / checkpoint)
    cfg = _config_from_payload(payload, device).resolved()
    opt = build_optimizer(cfg, get_domain(cfg.domain))
    opt.model.load_state_dict(payload["model"])  # copies into the flat buffer's views
    opt.load_state_dict(payload["optimizer"])
    return cfg, opt, int(payload["iteration"])


def load_result(run_dir: Path | str, device: str | None = None) -> RunResult:
    """The :class:`RunResult` of a run folder's checkpoint (its status as saved), without training."""
    folder = RunFolder(run_dir)
    payload = load_checkpoint(folder.checkpoint)
    if payload["format"] != CHECKPOINT_FORMAT:
        raise RunError(f"{folder.checkpoint} was written by an older rkfast without the run's history")
    cfg = _config_from_payload(payload, device).resolved()
    training = _Training(cfg, get_domain(cfg.domain), None, lambda _: None)
    training.restore(payload)
    return training.result(payload["status"], time.perf_counter(), payload.get("error"))
