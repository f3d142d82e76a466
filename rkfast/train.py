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

Inside an initialized ``torch.distributed`` process group of more than one rank (``torchrun``; see
``process_group`` of :func:`train`) every rank runs this loop together: each samples its share of the
meta-batch (:meth:`~rkfast.distributed.TaskParallel.split`) from its own reproducible stream
(:meth:`~rkfast.distributed.TaskParallel.rank_seed` of ``seed``), the optimizer reduces the meta-direction
over the ranks, held-out and test evaluations are split across the ranks and gathered in task order (the
very tasks a single process evaluates), and rank 0 alone prints, writes ``results.json``, plots and
checkpoints. Every decision that ends or saves the run (a stop signal, a non-finite step, a new best
evaluation, a failed check or write) is taken together, so that no rank waits for another. Checkpoints hold
every rank's random state: a run resumes, bit for bit on the CPU, with the same number of processes.
"""

from __future__ import annotations

import math
import numbers
import pickle
import re
import signal as signal_module
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from .batch import TaskBatch
from .distributed import RankFailedError, TaskParallel, block_sizes, resolve_process_group
from .functional import check_step
from .interrupt import StopRequests
from .layout import ParamLayout
from .learned import LearnedRates, LearnedTableau
from .optim import MetaOptimizer, NonFiniteLossError
from .outer import check_lr
from .results import AdaptationOutput
from .runs import (CHECKPOINT_FORMAT, RunError, RunFolder, load_checkpoint, save_payload, write_json)
from .tableau import Tableau, get_tableau
from .tasks import Defaults, Domain, TaskSampler, get_domain

__all__ = ["TrainConfig", "RunResult", "RunInterrupted", "RunDiverged", "train", "evaluate_tasks",
           "task_generator", "load_checkpoint", "load_run", "load_result", "resume_config", "write_json", "slug",
           "task_chunks", "eval_pieces", "build_optimizer", "check_device", "lead_decides", "RESUMABLE_CHANGES",
           "CHECKPOINT_FORMAT", "rate_summary", "rates_info", "describe_rates", "RATES_PLOT", "TABLEAU_PLOT",
           "tableau_summary", "learned_tableau_info", "describe_learned_tableau"]

LOG_EVERY = 50  # steps between progress-bar postfix updates (one host sync each)
STREAMS = {"train": 0, "val": 1, "test": 2}  # independent random streams of a seed
RESUMABLE_CHANGES = ("iterations", "device", "backend")  # what a resumed run may set differently
REPEAT_SIGNAL_S = 2.0  # a rank of a distributed run takes a signal repeated within this many seconds as one
RATES_PLOT = "rates.png"  # written by runs with learned inner rates (a run folder's files always name it)
TABLEAU_PLOT = "tableau.png"  # written by runs with a learned tableau (a run folder's files always name it)
_NO_GROUP = SimpleNamespace(_capture=None, _dist=None)  # MetaOptimizer's rate checks, for a run's configuration


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
        learn_rates, per_stage_rates, rate_lr, frozen_rates: learned (or fixed per-tensor) inner rates, as
            :class:`~rkfast.optim.MetaOptimizer` takes them (``docs/method.md``, "Learned inner rates"):
            ``"scalar"``, ``"tensor"`` (MAML++'s per-layer rates; per step with ``per_stage_rates`` and
            ``maml(k)``) or ``"element"`` (Meta-SGD); ``rate_lr`` their Adam rate (default: ``lr``);
            ``frozen_rates`` ``{name or glob: rate}`` (``{"features.*": 0.0}``: ANIL).
        learn_tableau, tableau_weights, tableau_lr: a learned tableau, as :class:`~rkfast.optim.MetaOptimizer`
            takes it (``docs/method.md``, "Learned tableaus"): ``learn_tableau`` ``"pattern"`` (the non-zero
            entries of ``tableau``'s ``A``, from their values) or ``"full"`` (every entry below the diagonal);
            ``tableau_weights`` ``"fixed"`` (``b`` stays the tableau's) or ``"order"`` (``b`` follows ``A`` by
            the order conditions; needs ``learn_tableau``); ``tableau_lr`` the entries' Adam rate (default:
            ``lr``; needs ``learn_tableau``). The tableau must have entries to learn (``euler`` has none on its
            pattern). Held-out evaluations and the meta-test adapt with the learned tableau's step
            (``test_step`` unset); ``results.json`` reports it under ``"learned_tableau"``
            (:func:`learned_tableau_info`) and its values at every held-out evaluation under
            ``training.tableau``.
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
    learn_rates: str | None = None
    per_stage_rates: bool = False
    rate_lr: float | None = None
    frozen_rates: dict[str, float] | None = None
    learn_tableau: str | None = None
    tableau_weights: str = "fixed"
    tableau_lr: float | None = None

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
        return _check_learned_tableau(_check_rates(cfg, domain))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (the tableau by name)."""
        name = self.tableau.name if isinstance(self.tableau, Tableau) else self.tableau
        return asdict(replace(self, tableau=name))


def _check_rates(cfg: TrainConfig, domain: Domain) -> TrainConfig:
    """``cfg`` with its rate settings checked by MetaOptimizer's own rules (``ValueError`` naming the setting)
    and ``frozen_rates`` as plain ``{str: float}``. The patterns are matched against the names of the domain's
    model, built on the meta device (no memory, no random numbers drawn)."""
    if not isinstance(cfg.per_stage_rates, bool):
        raise ValueError(f"per_stage_rates must be True or False, got {cfg.per_stage_rates!r}")
    MetaOptimizer._check_rate_options(_NO_GROUP, cfg.learn_rates, cfg.per_stage_rates, cfg.rate_lr,  # type: ignore[arg-type]
                                      cfg.frozen_rates)
    if cfg.learn_rates is None and cfg.frozen_rates is None:
        return cfg
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = domain.make_model(cfg.options)
    layout = ParamLayout.from_named((n, p) for n, p in model.named_parameters() if p.requires_grad)
    try:
        rates = LearnedRates(layout, 1.0, cfg.learn_rates, per_stage=cfg.per_stage_rates,  # type: ignore[arg-type]
                             stages=get_tableau(cfg.tableau).stages, frozen=cfg.frozen_rates, device="meta")
    except TypeError as err:  # a pattern that is not a string: still a bad setting
        raise ValueError(str(err)) from None
    del rates
    frozen = None if cfg.frozen_rates is None else {str(k): float(v) for k, v in cfg.frozen_rates.items()}
    rate_lr = None if cfg.rate_lr is None else float(cfg.rate_lr)
    return replace(cfg, frozen_rates=frozen, rate_lr=rate_lr)


def _check_learned_tableau(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its learned-tableau settings checked by MetaOptimizer's own rules and by the tableau itself
    (a :class:`~rkfast.learned.LearnedTableau` of it is built on the CPU: ``euler`` has nothing to learn on its
    pattern, an ``"order"`` ``b`` needs order conditions the starting ``A`` admits); ``ValueError`` naming the
    setting. ``tableau_lr`` as a float."""
    MetaOptimizer._check_tableau_options(_NO_GROUP, cfg.learn_tableau, cfg.tableau_weights,  # type: ignore[arg-type]
                                         cfg.tableau_lr)
    if cfg.learn_tableau is None:
        return cfg
    LearnedTableau(get_tableau(cfg.tableau), cfg.learn_tableau, cfg.tableau_weights,  # type: ignore[arg-type]
                   device="cpu")
    return replace(cfg, tableau_lr=None if cfg.tableau_lr is None else float(cfg.tableau_lr))


def _rate(value: Any) -> float:
    """A rate for JSON: 7 significant digits (a float32 rate's precision; ``0.01``, not ``0.009999999776``)."""
    return float(f"{float(value):.7g}")


def rate_summary(rates: LearnedRates) -> dict[str, list[Any]]:
    """``{parameter name: one entry per rate set}``: the rate (a number) of a scalar, per-tensor or frozen
    rate, ``{"mean", "min", "max"}`` over the tensor's elements for element rates (7 significant digits)."""
    out: dict[str, list[Any]] = {}
    for name, values in rates.values().items():
        if values.dim() == 1:
            out[name] = [_rate(v) for v in values.cpu()]
        else:
            rows = values.reshape(values.shape[0], -1).cpu()
            out[name] = [{"mean": _rate(r.mean()), "min": _rate(r.min()), "max": _rate(r.max())} for r in rows]
    return out


def rates_info(opt: MetaOptimizer) -> dict[str, Any] | None:
    """The inner rates of ``opt`` as ``results.json`` reports them (``None`` without learned or frozen
    rates): their settings and :func:`rate_summary`."""
    rates = opt.rates
    if rates is None:
        return None
    return {"granularity": rates.granularity, "per_stage": rates.per_stage, "sets": rates.sets,
            "inner_lr": opt.inner_lr, "rate_lr": _group_lr(opt, rates.tensors) if rates.learned else None,
            "frozen": dict(rates.frozen), "values": rate_summary(rates)}


def describe_rates(info: Mapping[str, Any] | None) -> str | None:
    """One line on the learned rates of :func:`rates_info` (``None`` when nothing is learned)."""
    if info is None or info["granularity"] is None:
        return None
    frozen = set(info["frozen"])
    learned = [(name, entries) for name, entries in info["values"].items() if name not in frozen]
    means = [e["mean"] if isinstance(e, dict) else e for _, entries in learned for e in entries]
    lows = [e["min"] if isinstance(e, dict) else e for _, entries in learned for e in entries]
    highs = [e["max"] if isinstance(e, dict) else e for _, entries in learned for e in entries]
    sets = f", per stage ({info['sets']} sets)" if info["per_stage"] else ""
    fixed = info["frozen"]
    frozen_text = ("" if not fixed else f"; fixed: {', '.join(f'{n}={v:g}' for n, v in fixed.items())}"
                   if len(fixed) <= 4 else f"; {len(fixed)} tensors fixed at {', '.join(sorted({f'{v:g}' for v in fixed.values()}))}")
    spread = f"range {min(lows):.4g} to {max(highs):.4g}; " if min(lows) != max(highs) else ""
    what = "final mean" if spread else "final value"
    return (f"learned rates: {info['granularity']}{sets}; {what} {sum(means) / len(means):.4g} "
            f"({spread}started at inner_lr {info['inner_lr']:g}){frozen_text}")


def _group_lr(opt: MetaOptimizer, tensors: Sequence[torch.Tensor]) -> float | None:
    """The learning rate of the param group of ``opt`` that holds ``tensors`` (learned rates and a learned
    tableau have a group each, the tableau's last)."""
    ids = {id(t) for t in tensors}
    for group in opt.param_groups:
        if any(id(p) in ids for p in group["params"]):
            return group["lr"]
    return None


def tableau_summary(tableau: Tableau) -> dict[str, list[Any]]:
    """``{"A": [[...]], "b": [...]}`` of a tableau (a learned one's ``current()``), 7 significant digits."""
    return {"A": [[_rate(x) for x in row] for row in tableau.A], "b": [_rate(x) for x in tableau.b]}


def learned_tableau_info(opt: MetaOptimizer) -> dict[str, Any] | None:
    """The learned tableau of ``opt`` as ``results.json`` reports it (``None`` without one): ``pattern``,
    ``weights`` (``"fixed"`` or ``"order"``), ``tableau_lr`` (its param group's rate), ``base`` (the starting
    tableau's name), ``entries`` (the learned ``(j, l)`` positions of ``A``, 0-based), ``A`` and ``b`` now
    (:func:`tableau_summary`), its ``order`` and the meta-test ``test_step`` it gives at ``inner_lr``."""
    learned = opt.learned_tableau
    if learned is None:
        return None
    current = learned.current()
    return {"pattern": learned.pattern, "weights": learned.weights_mode,
            "tableau_lr": _group_lr(opt, learned.tensors), "base": learned.base.name,
            "entries": [list(e) for e in learned.entries], **tableau_summary(current),
            "order": current.order, "test_step": _rate(current.test_step(opt.inner_lr))}


def describe_learned_tableau(info: Mapping[str, Any] | None) -> str | None:
    """One line on the learned tableau of :func:`learned_tableau_info` (``None`` without one):
    ``learned tableau (pattern, b by order): A21=0.93, b=(0.46, 0.54); from heun, order 2, test step 0.0093``
    (the learned entries of ``A``, 1-based as Butcher writes them)."""
    if info is None:
        return None
    A, b = info["A"], info["b"]
    entries = info.get("entries") or [[j, l] for j in range(len(A)) for l in range(j) if A[j][l] != 0.0]
    shown = ", ".join(f"A{j + 1}{l + 1}={A[j][l]:.4g}" if len(A) < 10 else f"A[{j + 1},{l + 1}]={A[j][l]:.4g}"
                      for j, l in entries)
    weights = "b by order" if info["weights"] == "order" else "b fixed"
    return (f"learned tableau ({info['pattern']}, {weights}): {shown}, b=({', '.join(f'{x:.4g}' for x in b)}); "
            f"from {info['base']}, order {info['order']}, test step {info['test_step']:.4g}")


@dataclass
class RunResult:
    """A run: the training curve, the meta-test result and timings (plus the optimizer).

    ``status`` is ``"complete"`` (``test`` holds the meta-test), ``"interrupted"`` or ``"diverged"``
    (``test`` is ``None``; ``error`` says what happened). ``distributed`` describes a run over several
    processes (``world_size``, ``backend``, ``meta_batch_per_rank``); ``None`` for one process.
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
    distributed: dict[str, Any] | None = None  # {"world_size", "backend", "meta_batch_per_rank"}; None: one process
    rate_history: list[dict[str, Any]] = field(default_factory=list)  # learned rates: {"iteration", "values"}
    tableau_history: list[dict[str, Any]] = field(default_factory=list)  # learned tableau: {"iteration", "A", "b"}

    @property
    def rates(self) -> dict[str, Any] | None:
        """The inner rates as they are now (:func:`rates_info`; ``None`` without learned or frozen rates)."""
        return rates_info(self.opt)

    @property
    def learned_tableau(self) -> dict[str, Any] | None:
        """The learned tableau as it is now (:func:`learned_tableau_info`; ``None`` without one)."""
        return learned_tableau_info(self.opt)

    @property
    def world_size(self) -> int:
        """The number of processes that trained the run (1 without ``torch.distributed``)."""
        return 1 if self.distributed is None else int(self.distributed["world_size"])

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
            "world_size": self.world_size,
            "distributed": self.distributed,
            "tableau": {**tab.to_dict(), "order": tab.order, "stages": tab.stages, "describe": tab.describe()},
            "metrics": [asdict(m) for m in self.domain.metrics],
            "training": {"meta_loss": [float(f"{x:.5g}") for x in self.losses], "eval": self.evals,
                         "best": self.best, **({"rates": self.rate_history} if self.rate_history else {}),
                         **({"tableau": self.tableau_history} if self.tableau_history else {})},
            "rates": self.rates,
            "learned_tableau": self.learned_tableau,
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
            pieces.append(TaskBatch(*(t[start:start + size] for t in chunk)))
            start += size
    return pieces


def _output_to(out: AdaptationOutput, device: torch.device | str) -> AdaptationOutput:
    return AdaptationOutput(out.steps, out.step_size, out.losses.to(device),
                            {k: v.to(device) for k, v in out.metrics.items()},
                            None if out.params is None else out.params.to(device))


def evaluate_tasks(opt: MetaOptimizer, chunks: Sequence[Any], steps: Sequence[int],
                   step_size: float | None, adaptation: str = "gradient") -> AdaptationOutput:
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
        return AdaptationOutput.cat([opt.evaluate(t, steps=steps, step_size=step_size, adaptation=adaptation)
                                     for t in chunks])
    world, rank = parallel.world_size, parallel.rank
    pieces = eval_pieces(chunks, world)
    mine: list[tuple[int, AdaptationOutput]] = []
    error: Exception | None = None
    try:
        for i in range(rank, len(pieces), world):
            mine.append((i, _output_to(opt.evaluate(pieces[i], steps=steps, step_size=step_size,
                                                    adaptation=adaptation), "cpu")))
    except Exception as err:  # reported through the gather, re-raised below: no rank waits for this one
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
            sorted(failed), rank)
    parts = sorted((pair for _, got in gathered for pair in got), key=lambda pair: pair[0])
    if [i for i, _ in parts] != list(range(len(pieces))):  # pragma: no cover - a bug, not a user error
        raise RuntimeError(f"the distributed evaluation gathered pieces {[i for i, _ in parts]} of {len(pieces)}")
    return _output_to(AdaptationOutput.cat([out for _, out in parts]), opt.device)


def build_optimizer(cfg: TrainConfig, domain: Domain, process_group: Any = "auto") -> MetaOptimizer:
    """The run's model (initialized under ``cfg.seed``, the global RNG left alone) and its optimizer.

    ``process_group`` is :class:`~rkfast.optim.MetaOptimizer`'s: ``"auto"`` reduces the meta-direction over
    torch.distributed's default group when it is initialized with more than one rank, ``None`` keeps the
    optimizer to this process, or a ``ProcessGroup``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = domain.make_model(cfg.options).to(torch.device(cfg.device))
    return MetaOptimizer(
        model, domain.loss_fn, tableau=get_tableau(cfg.tableau), inner_lr=cfg.inner_lr, outer="adam", lr=cfg.lr,
        first_order=cfg.first_order, backend=cfg.backend, process_group=process_group,  # type: ignore[arg-type]
        learn_rates=cfg.learn_rates, per_stage_rates=cfg.per_stage_rates, rate_lr=cfg.rate_lr,  # type: ignore[arg-type]
        frozen_rates=cfg.frozen_rates, learn_tableau=cfg.learn_tableau,  # type: ignore[arg-type]
        tableau_weights=cfg.tableau_weights, tableau_lr=cfg.tableau_lr,  # type: ignore[arg-type]
    )


def run_files(domain: Domain) -> tuple[str, ...]:
    """The plot files a run of ``domain`` may write besides results and checkpoints (``rates.png`` only with
    learned inner rates, ``tableau.png`` only with a learned tableau; named always, so that their paths are
    checked and an earlier run's copies are cleared)."""
    return ("training.png", *domain.plots, RATES_PLOT, TABLEAU_PLOT)


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
        except Exception as err:  # broadcast, then re-raised on every rank
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


class _RankStopRequests(StopRequests):
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


class _Training:
    """The state of one run between meta-steps, and what saves and restores it.

    With ``parallel`` (more than one rank), every method that saves or evaluates is a collective: all ranks
    call it at the same points of the loop.
    """

    def __init__(self, cfg: TrainConfig, domain: Domain, folder: RunFolder | None, log: Callable[[str], None],
                 parallel: TaskParallel | None = None) -> None:
        self.cfg, self.domain, self.folder, self.log = cfg, domain, folder, log
        self.parallel = parallel
        self.rank = 0 if parallel is None else parallel.rank
        self.lead = self.rank == 0  # prints and writes
        self.tableau = get_tableau(cfg.tableau)  # type: ignore[arg-type]
        self.defaults = domain.defaults_for(cfg.options)
        self.device = torch.device(cfg.device)
        self.opt = build_optimizer(cfg, domain, None if parallel is None else parallel.group)
        # this rank's share of every meta-batch, from its own stream of training tasks
        self.meta_batch = cfg.meta_batch if parallel is None else parallel.split(cfg.meta_batch)[1]
        self.distributed: dict[str, Any] | None = None if parallel is None else {
            "world_size": parallel.world_size, "backend": parallel.backend,
            "meta_batch_per_rank": block_sizes(cfg.meta_batch, parallel.world_size)}
        self.sampler = domain.make_tasks(cfg.options, "train", self.device)
        chunk = self.defaults.eval_chunk
        val = domain.make_tasks(cfg.options, "val", self.device)
        # every rank draws every held-out task; evaluate_tasks shares them out
        self.val = (task_chunks(val, cfg.eval_tasks, chunk, task_generator(cfg.test_seed, "val"))
                    if cfg.eval_tasks else [])
        self.gen = task_generator(cfg.seed if parallel is None else parallel.rank_seed(cfg.seed), "train")
        self.losses = torch.empty(cfg.iterations, device=self.device)  # no host sync per step
        self.done = 0
        self.evals: list[dict[str, Any]] = []
        self.rate_history: list[dict[str, Any]] = []  # learned rates at every held-out evaluation
        self.tableau_history: list[dict[str, Any]] = []  # the learned tableau at every held-out evaluation
        self.best: dict[str, Any] | None = None
        self.train_time = self.wall_before = 0.0
        self.test: AdaptationOutput | None = None

    # -- held-out evaluation ----------------------------------------------------------------------

    def evaluate_val(self) -> None:
        """The held-out metrics after ``defaults.eval_steps`` adaptation steps; a new best saves ``best.pt``.

        Distributed: every rank gets the same gathered result, so every rank takes the same decision.
        Learned rates (:func:`rate_summary`) and a learned tableau (:func:`tableau_summary`) are recorded at
        every evaluation, held-out tasks or not."""
        rates = self.opt.rates
        if rates is not None and rates.learned:
            self.rate_history.append({"iteration": self.done, "values": rate_summary(rates)})
        learned = self.opt.learned_tableau
        if learned is not None:
            self.tableau_history.append({"iteration": self.done, **tableau_summary(learned.current())})
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
                payload, path = self.payload("running"), self.folder.best
                lead_decides(self.parallel, lambda: save_payload(path, payload), f"write {path}")

    # -- saving and restoring ---------------------------------------------------------------------

    def random_state(self) -> dict[str, Any]:
        """This rank's random state: its training-task generator, torch's (and CUDA's) RNG, its sampler."""
        state: dict[str, Any] = {"train_tasks": self.gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        sampler_state = getattr(self.sampler, "state_dict", None)
        state["sampler"] = sampler_state() if callable(sampler_state) else None
        return state

    def payload(self, status: str, error: str | None = None) -> dict[str, Any]:
        """Everything needed to resume (or to re-create the result) as a checkpoint dictionary.

        Distributed, a collective: ``random`` holds rank 0's state (as a one-process checkpoint does), the
        world size, and every rank's state under ``"ranks"`` (gathered)."""
        own = self.random_state()
        ranks = None if self.parallel is None else self.parallel.all_gather_object(own)
        first = own if ranks is None else ranks[0]
        random = {k: v for k, v in first.items() if k != "sampler"}
        if ranks is not None:
            random.update(world_size=len(ranks), ranks=ranks)
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
            "sampler": first["sampler"],
            "distributed": self.distributed,
            "history": {"losses": self.losses[:self.done].to("cpu", copy=True), "evals": self.evals, "best": self.best,
                        "rates": self.rate_history, "tableau": self.tableau_history, "train_time_s": self.train_time,
                        "wall_time_s": self.wall_before},
            "test": test,
        }

    def restore(self, payload: dict[str, Any]) -> None:
        """Continue from a checkpoint: model, optimizer, random states, sampler and history (distributed: this
        rank's own random state; the world size was checked by :func:`_resumable_checkpoint`)."""
        self.opt.model.load_state_dict(payload["model"])  # copies into the flat buffer's views
        self.opt.load_state_dict(payload["optimizer"])
        random = payload["random"]
        if self.parallel is not None:
            mine = random["ranks"][self.rank]
        else:  # a one-process run, or re-creating a distributed run's result: rank 0's state
            mine = {**random, "sampler": payload.get("sampler")}
            self.distributed = payload.get("distributed")
        self.gen.set_state(mine["train_tasks"])
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], self.device)
        if mine.get("sampler") is not None:
            self.sampler.load_state_dict(mine["sampler"])  # type: ignore[attr-defined]
        history = payload["history"]
        self.done = int(payload["iteration"])
        self.losses[:self.done] = history["losses"].to(self.device)
        self.evals, self.best = list(history["evals"]), history["best"]
        self.rate_history = list(history.get("rates", ()))  # none in checkpoints from before learned rates
        self.tableau_history = list(history.get("tableau", ()))  # nor from before learned tableaus
        self.train_time, self.wall_before = float(history["train_time_s"]), float(history["wall_time_s"])
        test = payload.get("test")
        if test is not None and self.done == self.cfg.iterations:
            self.test = AdaptationOutput(tuple(test["steps"]), test["step_size"], test["losses"], dict(test["metrics"]))

    def result(self, status: str, wall_start: float, error: str | None = None) -> RunResult:
        return RunResult(self.cfg, self.domain, self.tableau, self.losses[:self.done].tolist(), list(self.evals),
                         self.test, self.train_time, self.wall_before + time.perf_counter() - wall_start, self.opt,
                         status, error, self.best, self.distributed, list(self.rate_history),
                         list(self.tableau_history))

    def save(self, status: str, wall_start: float, error: str | None = None) -> RunResult:
        """Checkpoint and ``results.json`` with ``status`` (nothing without a folder); returns the result.

        Distributed, a collective: rank 0 writes (with every rank's random state), the others wait for the
        outcome, so a failed write fails every rank."""
        result = self.result(status, wall_start, error)
        if self.folder is not None:
            folder, payload = self.folder, self.payload(status, error)
            payload["history"]["wall_time_s"] = result.wall_time_s

            def write() -> None:
                save_payload(folder.checkpoint, payload)
                write_json(folder.results, result.to_json())

            lead_decides(self.parallel, write, f"save the checkpoint in {folder.path}")
        return result

    # -- the loop ---------------------------------------------------------------------------------

    def sample(self) -> Any:
        """This rank's share of the next meta-batch. Distributed, a failure to sample is reported through the
        meta-step's own all-reduce, which the other ranks are waiting in: they raise
        :class:`~rkfast.distributed.RankFailedError` naming this rank, and this rank raises its error."""
        try:
            return self.sampler.sample(self.meta_batch, self.gen)
        except Exception as err:
            if self.parallel is None:
                raise
            failure = err

        def fail() -> Any:
            raise failure

        self.parallel.reduce_meta_step(fail, self.opt.flat_parameters.detach(), self.opt.tableau.stages)
        raise failure  # pragma: no cover - reduce_meta_step re-raises it

    def agreed_stop(self, stop: StopRequests) -> int | None:
        """The signal that stops the run after this step, or ``None``: distributed (and saving), a signal that
        reached any rank stops every rank after the same step (one all-reduce of one integer per step)."""
        parallel = self.parallel
        if parallel is None or self.folder is None:
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
                "rank has probably failed (see its error) or was stopped", (), parallel.rank) from err
        return int(flag.item()) or None

    def run(self, checkpoint_every: int, progress: bool,
            on_step: Callable[[int, torch.Tensor], None] | None) -> RunResult:
        cfg, opt = self.cfg, self.opt
        wall_start = time.perf_counter()
        # without a folder there is nothing to save, so a signal has nothing to wait for: it keeps its usual effect
        saving = self.folder is not None
        stop = StopRequests(active=saving) if self.parallel is None else _RankStopRequests(self.lead, active=saving)
        with stop:
            if self.done == 0:
                self.evaluate_val()
                self.save("running", wall_start)
            bar = tqdm(range(self.done, cfg.iterations), desc=self.tableau.name, unit="step",
                       initial=self.done, total=cfg.iterations, disable=not progress)
            step_start = time.perf_counter()
            for it in bar:
                try:
                    self.losses[it] = opt.step(self.sample()).loss
                except NonFiniteLossError as err:  # distributed: every rank raises it, after the same step
                    self.train_time += time.perf_counter() - step_start
                    bar.close()
                    raise RunDiverged(self.save("diverged", wall_start, str(err)),
                                      self.folder.path if self.folder else None) from None
                self.done = done = it + 1
                if on_step is not None:
                    on_step(done, self.losses[it])
                if done % LOG_EVERY == 0:
                    bar.set_postfix(loss=f"{self.losses[done - LOG_EVERY:done].mean().item():.3f}", refresh=False)
                stop_signal = self.agreed_stop(stop)
                evaluate = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.iterations
                checkpoint = done % checkpoint_every == 0 or stop_signal is not None
                if evaluate or checkpoint:
                    self.train_time += time.perf_counter() - step_start
                    if evaluate:
                        self.evaluate_val()
                    if checkpoint and done < cfg.iterations:
                        result = self.save("interrupted" if stop_signal is not None else "running", wall_start)
                        if stop_signal is not None and self.folder is not None:
                            bar.close()
                            raise RunInterrupted(result, self.folder.path, stop_signal)
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
    process_group: Any = "auto",
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
            :data:`RESUMABLE_CHANGES` (:func:`resume_config` reads it), and a distributed run resumes with
            the same number of processes.
        overwrite: a new run into a folder that holds an earlier run's files deletes them first (without
            it such a folder is refused).
        checkpoint_every: meta-steps between checkpoints (default: ``eval_every``, or 1000 when that is 0).
        progress: show a tqdm progress bar with the recent meta-loss.
        log: where the periodic evaluation lines go (default: above the progress bar, or nowhere when
            ``progress`` is off).
        on_step: called after every meta-step with the number of steps done and the meta-loss (a device
            tensor: reading it synchronizes).
        process_group: task parallelism (:class:`~rkfast.optim.MetaOptimizer`'s ``process_group``):
            ``"auto"`` (default) runs over torch.distributed's default group when it is initialized with more
            than one rank (``torchrun``), ``None`` trains in this process alone, or a ``ProcessGroup``. Every
            rank then calls ``train`` with the same arguments (checked: different settings raise
            ``ValueError`` on every rank); ``meta_batch`` is split over the ranks (at least one task each),
            each rank draws its share from its own stream of ``seed``, the evaluations are shared out and
            gathered, and rank 0 alone shows progress, logs (``log`` is not called on the other ranks) and
            writes ``out``. A stop signal on any rank stops every rank after the same step; rank 0 saves
            and every rank raises :class:`RunInterrupted`.

    Raises:
        RunError: a folder that cannot be written, holds another run, or a checkpoint that cannot be resumed
            (one written by another number of processes, too).
        RunInterrupted: SIGINT/SIGTERM (with ``out``), after saving.
        KeyboardInterrupt: SIGINT without ``out`` (nothing saved), or a second SIGINT with it.
        RunDiverged: a non-finite meta-step, after saving the last finite state (with ``out``).
        ValueError: an invalid configuration (distributed: also a meta-batch smaller than the number of
            ranks, or ranks given different settings).
        rkfast.distributed.RankFailedError: distributed, another rank failed (the one that failed raises
            its own error).
    """
    domain = get_domain(config.domain)
    cfg = config.resolved()
    every = checkpoint_every if checkpoint_every is not None else (cfg.eval_every or 1000)
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    if resume and out is None:
        raise ValueError("resume=True needs out=, the folder of the run to continue")
    parallel = resolve_process_group(process_group)
    if parallel is not None and parallel.world_size == 1:
        parallel = None  # a group of one: nothing to share
    if parallel is not None:
        _check_same_settings(parallel, cfg, int(every), out is not None, resume, overwrite)
        if cfg.meta_batch < parallel.world_size:
            raise ValueError(f"meta_batch {cfg.meta_batch} is smaller than the {parallel.world_size} processes of "
                             f"the run: every process needs at least one task per meta-step; use a meta-batch of "
                             f"at least {parallel.world_size} or fewer processes")
    lead = parallel is None or parallel.rank == 0
    progress = progress and lead
    if not lead:
        log = lambda _: None  # noqa: E731
    elif log is None:
        log = tqdm.write if progress else (lambda _: None)
    folder = None if out is None else RunFolder(out, run_files(domain))
    world = 1 if parallel is None else parallel.world_size
    saved = lead_decides(parallel, lambda: _prepare_folder(folder, cfg, resume, overwrite, world))
    training = _Training(cfg, domain, folder, log, parallel)
    if saved is not None:
        training.restore(saved)
    return training.run(int(every), progress, on_step)


def _prepare_folder(folder: RunFolder | None, cfg: TrainConfig, resume: bool, overwrite: bool,
                    world_size: int) -> dict[str, Any] | None:
    """Check the run folder before training: writable, and either the checkpoint to resume (returned) or
    free for a new run (an earlier run's files deleted with ``overwrite``). Raises :class:`RunError`."""
    if folder is None:
        return None
    folder.check_writable()
    if resume:
        return _resumable_checkpoint(folder, cfg, world_size)
    if folder.holds_run():
        if not overwrite:
            raise RunError(f"{folder.path} holds an earlier run ({folder.describe_run()}): resume it, "
                           "overwrite it, or choose another output folder")
        folder.clear()
    return None


def _check_same_settings(parallel: TaskParallel, cfg: TrainConfig, every: int, saving: bool, resume: bool,
                         overwrite: bool) -> None:
    """``ValueError`` on every rank unless every rank was given the same run (the device may differ)."""
    config = cfg.to_json()
    config["tableau"] = get_tableau(cfg.tableau).to_dict()  # type: ignore[arg-type]
    config.pop("device")
    mine = {**{f"config.{k}": v for k, v in config.items()}, "checkpoint_every": every, "out": saving,
            "resume": resume, "overwrite": overwrite}
    every_rank = parallel.all_gather_object(mine)
    for r, theirs in enumerate(every_rank):
        differ = [k for k in mine if theirs.get(k) != every_rank[0].get(k)]
        if differ:
            raise ValueError(f"the processes of the run were given different settings: rank {r} differs from rank 0 "
                             f"in {', '.join(differ)}; every rank of a distributed run must run the same configuration")


def _resumable_checkpoint(folder: RunFolder, cfg: TrainConfig, world_size: int = 1) -> dict[str, Any]:
    """The folder's checkpoint, if ``cfg`` may continue it with ``world_size`` processes (else
    :class:`RunError` saying why)."""
    payload = load_checkpoint(folder.checkpoint)
    if payload["format"] != CHECKPOINT_FORMAT:
        raise RunError(f"{folder.checkpoint} was written by an older rkfast without the state needed to resume")
    saved_world = int(payload["random"].get("world_size", 1))
    if saved_world != world_size:
        def procs(n: int) -> str:
            return f"{n} process{'es' if n > 1 else ''}"

        how = ("without torchrun" if saved_world == 1 else f"torchrun --nproc-per-node {saved_world} -m rkfast ..."
               if world_size == 1 else f"{procs(saved_world)} in all")
        raise RunError(f"{folder.path} was trained by {procs(saved_world)} and this run has {procs(world_size)}: "
                       f"resume it with {procs(saved_world)} ({how}); every process continues its own stream "
                       "of training tasks, saved in the checkpoint")
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
    (``checkpoint="best.pt"``: the state at the best held-out evaluation). The optimizer belongs to this
    process alone (``process_group=None``), even inside a distributed job. Learned rates and a learned tableau
    are rebuilt from the configuration and loaded at their saved values, so that
    :meth:`~rkfast.optim.MetaOptimizer.evaluate` adapts with them (the learned tableau's step:
    ``opt.current_tableau().test_step(inner_lr)``)."""
    payload = load_checkpoint(Path(run_dir) / checkpoint)
    cfg = _config_from_payload(payload, device).resolved()
    opt = build_optimizer(cfg, get_domain(cfg.domain), process_group=None)
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
