"""The one training loop: meta-train any registered task domain, evaluate it, report and save the run.

Every run is seeded: ``seed`` fixes the initialization and the stream of training tasks; the held-out
validation tasks and the meta-test tasks come from ``test_seed`` (independent streams), so runs with
different tableaus or training seeds are tested on the very same tasks.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .optim import MetaOptimizer
from .results import AdaptationOutput
from .tableau import Tableau, get_tableau
from .tasks import Domain, TaskSampler, get_domain

__all__ = ["TrainConfig", "RunResult", "train", "evaluate_tasks", "task_generator", "save_checkpoint",
           "load_checkpoint", "load_run", "write_json", "slug", "task_chunks", "build_optimizer", "CHECKPOINT_FORMAT"]

LOG_EVERY = 50  # steps between progress-bar postfix updates (one host sync each)
STREAMS = {"train": 0, "val": 1, "test": 2}  # independent random streams of a seed
CHECKPOINT_FORMAT = "rkfast-run/1"


@dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` fields take the domain's published defaults
    (:class:`~rkfast.tasks.registry.Defaults`); ``options`` are the domain's own settings.

    Attributes:
        domain: a registered task domain (``"sinusoid"``...).
        tableau: a tableau or its name.
        iterations, meta_batch, inner_lr, lr: meta-steps, tasks per meta-step, the RK step h, Adam's rate.
        first_order: ignore second derivatives.
        seed: the initialization and the training tasks.
        eval_every, eval_tasks: meta-steps between held-out evaluations (0: at start and end only) and
            their task count (0: none).
        test_tasks, test_seed: the meta-test tasks and their seed (also the held-out tasks' seed).
        test_step: the meta-test adaptation step (default: the tableau's ``h * c_s``).
        device, backend: where the run computes and which kernels it uses.
        options: the domain's options (``{"shots": 5}``); unset ones take their defaults.
    """

    domain: str = "sinusoid"
    tableau: str | Tableau = "maml"
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
        """A copy with the domain's defaults filled in and its options checked (errors name the option)."""
        domain = get_domain(self.domain)
        filled = {name: getattr(domain.defaults, name) for name in
                  ("iterations", "meta_batch", "inner_lr", "lr", "eval_every", "eval_tasks", "test_tasks")
                  if getattr(self, name) is None}
        return replace(self, **filled, options=domain.resolve_options(self.options))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (the tableau by name)."""
        name = self.tableau.name if isinstance(self.tableau, Tableau) else self.tableau
        return asdict(replace(self, tableau=name))


@dataclass
class RunResult:
    """A finished run: the training curve, the meta-test result and timings (plus the optimizer)."""

    config: TrainConfig  # resolved
    domain: Domain
    tableau: Tableau
    losses: list[float]
    evals: list[dict[str, Any]]
    test: AdaptationOutput
    train_time_s: float
    wall_time_s: float
    opt: MetaOptimizer = field(repr=False)

    @property
    def ms_per_step(self) -> float:
        """Mean wall time of one meta-step (task sampling included, evaluation excluded), in ms."""
        return 1000.0 * self.train_time_s / max(1, len(self.losses))

    def task_generator(self, split: str) -> torch.Generator:
        """A fresh generator of the run's ``split`` stream: sampling from it again gives the run's tasks."""
        return task_generator(self.config.seed if split == "train" else self.config.test_seed, split)

    def test_summary(self) -> dict[str, dict[int, tuple[float, float]]]:
        """``{metric name: {steps: (mean, ci95)}}`` of the meta-test, for every metric of the domain."""
        summary = self.test.summary()
        return {m.name: summary[m.source] for m in self.domain.metrics}

    def to_json(self) -> dict[str, Any]:
        """The run as plain JSON data (what ``results.json`` holds)."""
        tab, cfg = self.tableau, self.config
        return {
            "domain": self.domain.name,
            "config": cfg.to_json(),
            "backend": self.opt.backend,
            "tableau": {**tab.to_dict(), "order": tab.order, "stages": tab.stages, "describe": tab.describe()},
            "metrics": [asdict(m) for m in self.domain.metrics],
            "training": {"meta_loss": [float(f"{x:.5g}") for x in self.losses], "eval": self.evals},
            "test": {"tasks": int(self.test.losses.shape[1]), "seed": cfg.test_seed,
                     **self.domain.test_protocol(cfg.options), **self.test.summary()},
            "train_time_s": self.train_time_s,
            "wall_time_s": self.wall_time_s,
            "ms_per_meta_step": self.ms_per_step,
        }


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


def train(config: TrainConfig, *, progress: bool = True, log: Callable[[str], None] | None = None) -> RunResult:
    """Meta-train the domain's model with the RK tableau of ``config`` and meta-test it.

    Every ``eval_every`` steps (and before the first and after the last) the metrics of ``eval_tasks``
    held-out tasks after ``defaults.eval_steps`` adaptation steps are recorded. The final meta-test uses
    ``test_tasks`` tasks, adapted with plain gradient steps of ``test_step`` (default: the tableau's
    ``h * c_s``).

    Args:
        config: the run's configuration (domain defaults fill its ``None`` fields).
        progress: show a tqdm progress bar with the recent meta-loss.
        log: where the periodic evaluation lines go (default: above the progress bar, or nowhere when
            ``progress`` is off).
    """
    start = time.perf_counter()
    domain = get_domain(config.domain)
    cfg = config.resolved()
    tableau = get_tableau(cfg.tableau)
    if log is None:
        log = tqdm.write if progress else (lambda _: None)
    device = torch.device(cfg.device)
    opt = build_optimizer(cfg, domain)
    chunk, metric = domain.defaults.eval_chunk, domain.metric
    train_tasks = domain.make_tasks(cfg.options, "train", device)
    val_tasks = domain.make_tasks(cfg.options, "val", device)
    val = task_chunks(val_tasks, cfg.eval_tasks, chunk, task_generator(cfg.test_seed, "val")) if cfg.eval_tasks else []
    gen = task_generator(cfg.seed, "train")

    evals: list[dict[str, Any]] = []

    def evaluate_val(iteration: int) -> float:
        t0 = time.perf_counter()
        if val:
            summary = evaluate_tasks(opt, val, domain.defaults.eval_steps, cfg.test_step).summary()
            record: dict[str, Any] = {"iteration": iteration}
            for m in domain.metrics:
                record[m.name] = {str(n): mean for n, (mean, _) in summary[m.source].items()}
            evals.append(record)
            values = record[metric.name]
            last = str(domain.defaults.eval_steps[-1])
            log(f"[{tableau.name}] step {iteration:>6}: held-out {metric.label} {values['0']:.3f} before, "
                + ", ".join(f"{values[str(n)]:.3f} after {n} step{'s' if n > 1 else ''}"
                            for n in domain.defaults.eval_steps[:-1])
                + f", {values[last]:.3f} after {last}")
        return time.perf_counter() - t0

    evaluate_val(0)
    losses = torch.empty(cfg.iterations, device=device)  # no host sync per step
    bar = tqdm(range(cfg.iterations), desc=tableau.name, unit="step", disable=not progress)
    train_start, eval_time = time.perf_counter(), 0.0
    for it in bar:
        losses[it] = opt.step(train_tasks.sample(cfg.meta_batch, gen)).loss
        done = it + 1
        if done % LOG_EVERY == 0:
            bar.set_postfix(loss=f"{losses[done - LOG_EVERY:done].mean().item():.3f}", refresh=False)
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.iterations:
            eval_time += evaluate_val(done)
    bar.close()
    train_time = time.perf_counter() - train_start - eval_time

    test_tasks = domain.make_tasks(cfg.options, "test", device)
    test_sets = task_chunks(test_tasks, cfg.test_tasks, chunk, task_generator(cfg.test_seed, "test"))
    test = evaluate_tasks(opt, test_sets, domain.defaults.test_steps, cfg.test_step)
    return RunResult(cfg, domain, tableau, losses.tolist(), evals, test, train_time, time.perf_counter() - start, opt)


# -- files ----------------------------------------------------------------------------------------------


def slug(name: str) -> str:
    """``name`` as a file-name part (``maml(3)`` -> ``maml-3``)."""
    return re.sub(r"[^\w.]+", "-", name).strip("-")


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """Write through a temporary file in the same folder, flushed to disk, then renamed over ``path``:
    a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``, written atomically."""
    _atomic_write(Path(path), lambda f: f.write(json.dumps(data, indent=1) + "\n"), "w")


def save_checkpoint(run: RunResult, path: Path) -> None:
    """The run's model, optimizer state and configuration at ``path`` (atomically), for ``rkfast eval``."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": run.config.to_json(),
        "iteration": len(run.losses),
        "model": run.opt.model.state_dict(),
        "optimizer": run.opt.state_dict(),
    }
    _atomic_write(Path(path), lambda f: torch.save(payload, f), "wb")


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a missing, truncated or foreign file raises a
    ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"{path} is not a readable rkfast checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an rkfast run checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return payload


def load_run(run_dir: Path | str, device: str | None = None) -> tuple[TrainConfig, MetaOptimizer, int]:
    """The configuration, the trained optimizer (with its model) and the iteration count of a run folder."""
    payload = load_checkpoint(Path(run_dir) / "checkpoint.pt")
    fields = dict(payload["config"])
    # the config names the tableau; the optimizer state holds it whole (a custom tableau has no parsable name)
    fields["tableau"] = Tableau.from_dict(payload["optimizer"]["rkfast"]["tableau"])
    if device is not None:
        fields["device"] = device
    cfg = TrainConfig(**fields).resolved()
    opt = build_optimizer(cfg, get_domain(cfg.domain))
    opt.model.load_state_dict(payload["model"])  # copies into the flat buffer's views
    opt.load_state_dict(payload["optimizer"])
    return cfg, opt, int(payload["iteration"])
