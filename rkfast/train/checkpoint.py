"""Saving and restoring a run: its state between meta-steps as a checkpoint (:class:`RunState`), the run
folder's files and the checks before training (:func:`prepare_folder`, :func:`resumable_checkpoint`), and
reading a saved run back (:func:`load_run`, :func:`load_result`, :func:`resume_config`)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch

from ..distributed import TaskParallel, block_sizes
from ..optim import MetaOptimizer
from ..results import AdaptationOutput
from ..runs import CHECKPOINT_FORMAT, RunError, RunFolder, load_checkpoint
from ..tableau import Tableau
from ..tasks import Domain, StatefulSampler, get_domain, task_generator
from .config import TrainConfig, build_optimizer
from .config_file import CONFIG_FILE, write_config
from .results import RunResult

__all__ = [
    "RunState",
    "RESUMABLE_CHANGES",
    "RATES_PLOT",
    "TABLEAU_PLOT",
    "METRICS_FILE",
    "run_files",
    "slug",
    "prepare_folder",
    "resumable_checkpoint",
    "config_from_payload",
    "resume_config",
    "load_run",
    "load_run_payload",
    "load_result",
]

RESUMABLE_CHANGES = ("iterations", "device", "backend")  # what a resumed run may set differently
RATES_PLOT = "rates.png"  # written by runs with learned inner rates (a run folder's files always name it)
TABLEAU_PLOT = "tableau.png"  # written by runs with a learned tableau (a run folder's files always name it)
METRICS_FILE = "metrics.jsonl"  # the event log of every run with a folder (rkfast.train.JsonLinesLogger)


class RunState:
    """The state of one run between meta-steps (its optimizer, random streams and history), and what saves it
    as a checkpoint payload and restores it (``cfg`` resolved: :meth:`~rkfast.train.TrainConfig.resolved`).

    Distributed (``parallel`` of more than one rank), :meth:`payload` is a collective: every rank calls it.
    """

    def __init__(self, cfg: TrainConfig, domain: Domain, parallel: TaskParallel | None = None) -> None:
        self.cfg, self.domain, self.parallel = cfg, domain, parallel
        self.rank = 0 if parallel is None else parallel.rank
        self.settings = cfg.settings()
        self.tableau = self.settings.tableau
        self.defaults = domain.defaults_for(cfg.options)
        self.device = torch.device(cfg.device)
        self.opt: MetaOptimizer = build_optimizer(cfg, domain, None if parallel is None else parallel.group)
        self.distributed: dict[str, Any] | None = (
            None
            if parallel is None
            else {
                "world_size": parallel.world_size,
                "backend": parallel.backend,
                "meta_batch_per_rank": block_sizes(self.settings.meta_batch, parallel.world_size),
            }
        )
        self.sampler = domain.make_tasks(cfg.options, "train", self.device)
        # this rank's own stream of training tasks
        self.gen = task_generator(cfg.seed if parallel is None else parallel.rank_seed(cfg.seed), "train")
        self.losses = torch.empty(self.settings.iterations, device=self.device)  # no host sync per step
        self.done = 0
        self.evals: list[dict[str, Any]] = []
        self.rate_history: list[dict[str, Any]] = []  # learned rates at every held-out evaluation
        self.tableau_history: list[dict[str, Any]] = []  # the learned tableau at every held-out evaluation
        self.best: dict[str, Any] | None = None
        self.train_time = self.wall_before = 0.0
        self.test: AdaptationOutput | None = None

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
        test = (
            None
            if self.test is None
            else {
                "steps": list(self.test.steps),
                "step_size": self.test.step_size,
                "losses": self.test.losses.cpu(),
                "metrics": {k: v.cpu() for k, v in self.test.metrics.items()},
            }
        )
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
            "history": {
                "losses": self.losses[: self.done].to("cpu", copy=True),
                "evals": self.evals,
                "best": self.best,
                "rates": self.rate_history,
                "tableau": self.tableau_history,
                "train_time_s": self.train_time,
                "wall_time_s": self.wall_before,
            },
            "test": test,
        }

    def restore(self, payload: dict[str, Any]) -> None:
        """Continue from a checkpoint: model, optimizer, random states, sampler and history (distributed: this
        rank's own random state; the world size was checked by :func:`resumable_checkpoint`)."""
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
            if not isinstance(self.sampler, StatefulSampler):
                raise RunError(
                    f"the checkpoint holds the state of a {self.domain.name} task sampler, and this one has no "
                    "load_state_dict to restore it"
                )
            self.sampler.load_state_dict(mine["sampler"])
        history = payload["history"]
        self.done = int(payload["iteration"])
        self.losses[: self.done] = history["losses"].to(self.device)
        self.evals, self.best = list(history["evals"]), history["best"]
        self.rate_history = list(history.get("rates", ()))  # none in checkpoints from before learned rates
        self.tableau_history = list(history.get("tableau", ()))  # nor from before learned tableaus
        self.train_time, self.wall_before = float(history["train_time_s"]), float(history["wall_time_s"])
        test = payload.get("test")
        if test is not None and self.done == self.settings.iterations:
            self.test = AdaptationOutput(tuple(test["steps"]), test["step_size"], test["losses"], dict(test["metrics"]))

    def result(self, status: str, wall_start: float, error: str | None = None) -> RunResult:
        return RunResult(
            self.cfg,
            self.domain,
            self.tableau,
            self.losses[: self.done].tolist(),
            list(self.evals),
            self.test,
            self.train_time,
            self.wall_before + time.perf_counter() - wall_start,
            self.opt,
            status,
            error,
            self.best,
            self.distributed,
            list(self.rate_history),
            list(self.tableau_history),
        )


def run_files(domain: Domain) -> tuple[str, ...]:
    """The files a run of ``domain`` may write besides results and checkpoints: :data:`METRICS_FILE`,
    :data:`~rkfast.train.config_file.CONFIG_FILE`, the training curve and the domain's plots (``rates.png``
        only with learned inner rates, ``tableau.png`` only with a learned tableau; named always, so that their
    paths are checked and an earlier run's copies are cleared)."""
    return (METRICS_FILE, CONFIG_FILE, "training.png", *domain.plots, RATES_PLOT, TABLEAU_PLOT)


def prepare_folder(
    folder: RunFolder | None, cfg: TrainConfig, resume: bool, overwrite: bool, world_size: int
) -> dict[str, Any] | None:
    """Check the run folder before training: writable, and either the checkpoint to resume (returned) or
    free for a new run (an earlier run's files deleted with ``overwrite``). Raises :class:`RunError`."""
    if folder is None:
        return None
    folder.check_writable()
    if resume:
        return resumable_checkpoint(folder, cfg, world_size)
    if folder.holds_run():
        if not overwrite:
            raise RunError(
                f"{folder.path} holds an earlier run ({folder.describe_run()}): resume it, "
                "overwrite it, or choose another output folder"
            )
        folder.clear()
    return None


def write_run_config(folder: RunFolder, cfg: TrainConfig, resume: bool) -> None:
    """Write the run's resolved configuration ``cfg`` to :data:`~rkfast.train.config_file.CONFIG_FILE` in
    ``folder``, so that ``rkfast train DOMAIN --config FILE`` runs it again: with the run's first save, so that a
    run that fails before it (a missing data set) leaves nothing behind. A resumed run keeps the file its start
    wrote (``resume``: one is written only for a folder without it, saved by an older rkfast)."""
    path = folder.path / CONFIG_FILE
    if resume and path.is_file():
        return
    try:
        write_config(path, cfg)
    except OSError as err:
        raise RunError(f"cannot write {path}: {err.strerror or err}") from None


def resumable_checkpoint(folder: RunFolder, cfg: TrainConfig, world_size: int = 1) -> dict[str, Any]:
    """The folder's checkpoint, if ``cfg`` (resolved) may continue it with ``world_size`` processes (else
    :class:`RunError` saying why)."""
    payload = load_checkpoint(folder.checkpoint)
    if payload["format"] != CHECKPOINT_FORMAT:
        raise RunError(f"{folder.checkpoint} was written by an older rkfast without the state needed to resume")
    saved_world = int(payload["random"].get("world_size", 1))
    if saved_world != world_size:

        def procs(n: int) -> str:
            return f"{n} process{'es' if n > 1 else ''}"

        how = (
            "without torchrun"
            if saved_world == 1
            else f"torchrun --nproc-per-node {saved_world} -m rkfast ..."
            if world_size == 1
            else f"{procs(saved_world)} in all"
        )
        raise RunError(
            f"{folder.path} was trained by {procs(saved_world)} and this run has {procs(world_size)}: "
            f"resume it with {procs(saved_world)} ({how}); every process continues its own stream "
            "of training tasks, saved in the checkpoint"
        )
    saved = config_from_payload(payload)
    ours, theirs = cfg.to_json(), saved.to_json()
    settings = cfg.settings()
    ours["tableau"] = settings.tableau.to_dict()
    theirs["tableau"] = saved.settings().tableau.to_dict()
    differ = [k for k in ours if k not in RESUMABLE_CHANGES and ours[k] != theirs[k]]
    if differ:
        changes = ", ".join(f"{k}: {theirs[k]!r} -> {ours[k]!r}" for k in differ)
        raise RunError(
            f"cannot resume {folder.path} with other settings ({changes}); a resumed run continues "
            f"as it started (only {', '.join(RESUMABLE_CHANGES)} may change)"
        )
    if settings.iterations < payload["iteration"]:
        raise RunError(
            f"{folder.path} already has {payload['iteration']} meta-steps; "
            f"iterations={settings.iterations} would end before that"
        )
    return payload


def slug(name: str) -> str:
    """``name`` as a file-name part (``maml(3)`` -> ``maml-3``)."""
    return re.sub(r"[^\w.]+", "-", name).strip("-")


def config_from_payload(payload: dict[str, Any], device: str | None = None) -> TrainConfig:
    """The configuration saved in a checkpoint ``payload`` (on ``device`` instead of its own, if given)."""
    fields = dict(payload["config"])
    # the config names the tableau; the optimizer state holds it whole (a custom tableau has no parsable name)
    fields["tableau"] = Tableau.from_dict(payload["optimizer"]["rkfast"]["tableau"])
    if "select_steps" not in fields:  # saved before select_steps: best.pt was picked on the last held-out count
        options = get_domain(fields["domain"]).resolve_options(fields.get("options", {}))
        fields["select_steps"] = get_domain(fields["domain"]).defaults_for(options).eval_steps[-1]
    if device is not None:
        fields["device"] = device
    return TrainConfig(**fields)


def resume_config(run_dir: Path | str) -> TrainConfig:
    """The configuration of the run saved in ``run_dir`` (what ``train(..., resume=True)`` continues)."""
    return config_from_payload(load_checkpoint(RunFolder(run_dir).checkpoint))


def load_run(
    run_dir: Path | str, device: str | None = None, checkpoint: str = "checkpoint.pt"
) -> tuple[TrainConfig, MetaOptimizer, int]:
    """The configuration, the trained optimizer (with its model) and the iteration count of a run folder
    (``checkpoint="best.pt"``: the state at the best held-out evaluation). The optimizer belongs to this
    process alone (``parallel=None``), even inside a distributed job. Learned rates and a learned tableau
    are rebuilt from the configuration and loaded at their saved values, so that
    :meth:`~rkfast.optim.MetaOptimizer.evaluate` adapts with them (the learned tableau's step:
    ``opt.current_tableau().test_step(inner_lr)``)."""
    cfg, opt, payload = load_run_payload(run_dir, device, checkpoint)
    return cfg, opt, int(payload["iteration"])


def load_run_payload(
    run_dir: Path | str, device: str | None = None, checkpoint: str = "checkpoint.pt"
) -> tuple[TrainConfig, MetaOptimizer, dict[str, Any]]:
    """:func:`load_run`, with the whole checkpoint payload (its ``history``: ``best`` says which held-out
    evaluation picked ``best.pt``) in place of the iteration count."""
    payload = load_checkpoint(Path(run_dir) / checkpoint)
    cfg = config_from_payload(payload, device).resolved()
    opt = build_optimizer(cfg, get_domain(cfg.domain), parallel=None)
    opt.model.load_state_dict(payload["model"])  # copies into the flat buffer's views
    opt.load_state_dict(payload["optimizer"])
    return cfg, opt, payload


def load_result(run_dir: Path | str, device: str | None = None) -> RunResult:
    """The :class:`RunResult` of a run folder's checkpoint (its status as saved), without training."""
    folder = RunFolder(run_dir)
    payload = load_checkpoint(folder.checkpoint)
    if payload["format"] != CHECKPOINT_FORMAT:
        raise RunError(f"{folder.checkpoint} was written by an older rkfast without the run's history")
    cfg = config_from_payload(payload, device).resolved()
    state = RunState(cfg, get_domain(cfg.domain))
    state.restore(payload)
    return state.result(payload["status"], time.perf_counter(), payload.get("error"))
