"""Comparisons of tableaus: every tableau meta-trained with the same seeds and meta-tested on the same tasks,
in one folder, with one table, ``compare.json`` and ``compare.png``; optionally over a grid of inner steps h
(selected per tableau on held-out tasks, never on the test tasks) and several training seeds.

::

    from rkfast.compare import compare
    from rkfast.train import TrainConfig

    result = compare(
        TrainConfig("sinusoid", iterations=2000),
        ["maml", "heun", "rk4"],
        out="runs/cmp",
        inner_lrs=[0.01, 0.02, 0.04],
        seeds=[0, 1, 2],
    )
    print(result.report())  # what `rkfast compare` prints

With one inner step and one seed a comparison is one run per tableau, in ``<out>/<tableau>``; with several
(a grid) every h trains with the first seed, the best final held-out evaluation (:func:`validation_score`,
:func:`select_inner_lr`) picks h per tableau, and the other seeds train with that h, each run in
``<out>/<tableau>/h<h>-s<seed>`` (:func:`grid_folder`). Every tableau is meta-tested on the same test tasks
(the config's ``test_seed``), so the table and ``compare.json`` add each tableau's paired difference to the
first, task by task (:func:`~rkfast.report.paired_summary`). ``rkfast compare DOMAIN`` is this module behind
the command line; ``docs/method.md`` ("Grids") describes the selection.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import plots
from .distributed import TaskParallel, resolve_process_group
from .report import GridGroup, compare_report, compare_rows, grid_report, grid_rows, run_line, selection_line
from .runs import RunError, RunFolder, load_checkpoint, write_json
from .tableau import Tableau, get_tableau
from .tasks import get_domain
from .train import (
    Callback,
    RunDiverged,
    RunInterrupted,
    RunResult,
    TrainConfig,
    lead_decides,
    load_result,
    select_steps_among,
    slug,
    train,
)

__all__ = [
    "compare",
    "CompareResult",
    "CompareSettings",
    "CompareInterrupted",
    "load_settings",
    "validation_score",
    "select_inner_lr",
    "selection_steps",
    "check_grid",
    "grid_folder",
    "ARGUMENT_NAMES",
    "STATE_FILE",
    "PLOT_FILE",
]

STATE_FILE = "compare.json"
PLOT_FILE = "compare.png"
# how the checks of a grid name the settings: compare()'s arguments (the command line passes its flags)
ARGUMENT_NAMES = {"inner_lrs": "several inner_lrs", "eval_tasks": "eval_tasks", "select_steps": "select_steps="}


class CompareInterrupted(Exception):
    """SIGINT/SIGTERM stopped a comparison during one of its runs; that run and ``compare.json`` (status
    ``"interrupted"``) are saved, and ``compare(..., resume=True)`` continues.

    Attributes:
        tableau: the name of the tableau whose run stopped.
        out: the comparison folder.
        run: the run's :class:`~rkfast.train.RunInterrupted`.
    """

    def __init__(self, tableau: str, out: Path, run: RunInterrupted) -> None:
        super().__init__(f"{tableau}: {run}")
        self.tableau, self.out, self.run = tableau, out, run


@dataclass
class CompareSettings:
    """What defines a comparison (what ``compare.json`` records, :func:`load_settings` reads back).

    Attributes:
        config: the configuration every run shares (its ``tableau`` is ignored; with a grid its ``inner_lr``
            and ``seed`` too).
        tableaus: the tableaus, in order: the first is the reference of the paired differences.
        inner_lrs, seeds, select_steps: the grid (``None`` for one run per tableau), as :func:`compare`
            takes them.
    """

    config: TrainConfig
    tableaus: list[Tableau]
    inner_lrs: list[float] | None = None
    seeds: list[int] | None = None
    select_steps: int | None = None


def load_settings(out: Path | str) -> CompareSettings:
    """The settings of the comparison saved in ``out`` (its ``compare.json``), to resume it with
    ``compare(s.config, s.tableaus, inner_lrs=s.inner_lrs, seeds=s.seeds, select_steps=s.select_steps,
    out=out, resume=True)``; :class:`~rkfast.runs.RunError` for a file that is missing or not a comparison."""
    state_file = Path(out) / STATE_FILE
    try:
        data = json.loads(state_file.read_text())
        config = TrainConfig(**data["config"])
        tableaus = [get_tableau(name) for name in data["tableaus"]]
        grid = data.get("grid")
        if grid is None:
            return CompareSettings(config, tableaus)
        return CompareSettings(
            config,
            tableaus,
            [float(h) for h in grid["inner_lr"]],
            [int(s) for s in grid["seeds"]],
            grid.get("select_steps"),
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunError(f"{state_file} is not a readable rkfast comparison ({type(err).__name__}: {err})") from None


# -- selecting h on the held-out tasks ------------------------------------------------------------------


def validation_score(run: RunResult | None, steps: int | None = None) -> float | None:
    """What a grid of inner steps selects on: the run's final held-out evaluation (the ``val`` stream of
    ``test_seed``, never the test tasks), its primary metric after ``steps`` adaptation steps (default: the
    domain's last evaluation step count). ``None`` for a run that did not complete, has no final held-out
    evaluation, or a non-finite value."""
    if run is None or run.status != "complete" or not run.evals or run.evals[-1]["iteration"] != run.iteration:
        return None
    steps = run.defaults.eval_steps[-1] if steps is None else steps
    value = run.evals[-1][run.domain.metric.name].get(str(steps))
    return float(value) if value is not None and math.isfinite(value) else None


def select_inner_lr(scores: dict[float, float | None], higher_is_better: bool) -> float | None:
    """The inner step with the best validation score (lower, or higher for a metric where higher is better;
    the first one listed among equals); ``None`` when no score is finite (every run diverged)."""
    best: float | None = None
    best_score = math.nan
    for h, score in scores.items():
        if score is None:
            continue
        if best is None or (score > best_score if higher_is_better else score < best_score):
            best, best_score = h, score
    return best


def selection_steps(
    config: TrainConfig, select_steps: int | None = None, names: Mapping[str, str] = ARGUMENT_NAMES
) -> int:
    """The adaptation step count whose held-out result selects h: ``select_steps``, which must be one of the
    domain's held-out evaluation step counts, or by default the one a run's best.pt is chosen on
    (:func:`~rkfast.train.default_select_steps`: the step count the run trains with learned rates or several
    inner steps, else the domain's last). ``ValueError`` otherwise, naming the setting as ``names`` does (the
    command line: its flags)."""
    resolved = config.resolved()
    counts = get_domain(resolved.domain).defaults_for(resolved.options).eval_steps
    learned_rates = resolved.learn_rates is not None
    return select_steps_among(
        select_steps, resolved.settings().tableau, learned_rates, counts, names["select_steps"], ""
    )


def check_grid(
    config: TrainConfig,
    inner_lrs: Sequence[float],
    select_steps: int | None = None,
    names: Mapping[str, str] = ARGUMENT_NAMES,
) -> None:
    """A grid of several inner steps is selected on the held-out tasks: ``config`` must evaluate some, after
    ``select_steps`` adaptation steps (:func:`selection_steps`). ``ValueError`` naming the setting as ``names``
    does."""
    if len(inner_lrs) > 1 and not config.resolved().eval_tasks:
        raise ValueError(
            f"a grid of inner steps ({names['inner_lrs']}) is selected on the held-out tasks: "
            f"{names['eval_tasks']} must be > 0"
        )
    if select_steps is not None:
        selection_steps(config, select_steps, names)


def grid_folder(tableau: Tableau, inner_lr: float, seed: int) -> str:
    """A grid run's folder in the comparison folder: ``<tableau>/h<h>-s<seed>`` (``heun/h0.02-s1``)."""
    return f"{slug(tableau.name)}/{slug(f'h{float(inner_lr)!r}-s{seed}')}"


# -- the comparison -------------------------------------------------------------------------------------


@dataclass
class CompareResult:
    """A comparison, as :func:`compare` returns it (and ``compare.json`` records it).

    Attributes:
        out: the comparison folder.
        config: the shared configuration as ``compare.json`` records it (JSON: with one run per tableau its
            ``tableau`` is ``None``; with a grid it names the first tableau and its ``inner_lr`` is ``None``).
        tableaus: the tableaus, in order (the first is the reference of the paired differences).
        inner_lrs, seeds: the inner steps and training seeds (one of each without a grid).
        is_grid: whether the comparison is a grid (several inner steps or seeds; else one run per tableau).
        select_steps: the held-out step count that selects h (a grid; else ``None``).
        groups: one :class:`~rkfast.report.GridGroup` per tableau begun, in order (one run per tableau: its
            one h and seed). On ranks other than 0 of a distributed comparison they hold no runs.
        status: ``"running"``, ``"interrupted"`` or ``"complete"``.
    """

    out: Path
    config: dict[str, Any]
    tableaus: list[Tableau]
    inner_lrs: list[float]
    seeds: list[int]
    is_grid: bool = False
    select_steps: int | None = None
    groups: list[GridGroup] = field(default_factory=list)
    status: str = "running"

    @property
    def runs(self) -> list[RunResult]:
        """Every run so far, in ``compare.json``'s order (one per tableau, or each tableau's grid runs)."""
        return [run for g in self.groups for _, run in g.all_runs()]

    def report(self) -> str:
        """The table ``rkfast compare`` prints (:func:`~rkfast.report.compare_report` or
        :func:`~rkfast.report.grid_report`), with the paired differences to the first tableau."""
        return grid_report(self.groups) if self.is_grid else compare_report(self.runs)

    def to_json(self) -> dict[str, Any]:
        """``compare.json``: the settings, the table's rows (:func:`~rkfast.report.compare_rows` or
        :func:`~rkfast.report.grid_rows`) and every run's results."""
        base = {
            "status": self.status,
            "domain": self.config["domain"],
            "config": self.config,
            "tableaus": [t.name for t in self.tableaus],
        }
        if not self.is_grid:
            return {**base, "table": compare_rows(self.runs), "runs": [r.to_json() for r in self.runs]}
        resolved = TrainConfig(**{**self.config, "tableau": self.tableaus[0], "inner_lr": self.inner_lrs[0]}).resolved()
        metric = get_domain(resolved.domain).metric
        selection = {
            "on": "held-out (validation) tasks: the 'val' stream of test_seed; test tasks are never read",
            "metric": metric.name,
            "steps": self.select_steps,
            "higher_is_better": metric.higher_is_better,
            "seed": self.seeds[0],
            "tasks": resolved.eval_tasks,
            "test_seed": resolved.test_seed,
            "when": "the final held-out evaluation, after the last meta-step",
        }
        return {
            **base,
            "grid": {"inner_lr": self.inner_lrs, "seeds": self.seeds, "select_steps": self.select_steps},
            "selection": selection,
            "table": grid_rows(self.groups),
            "runs": [{"folder": folder, **run.to_json()} for g in self.groups for folder, run in g.all_runs()],
        }

    def folders(self) -> list[RunFolder]:
        """The run folders the comparison writes (every h and seed of a grid: the selection decides which)."""
        if not self.is_grid:
            return [RunFolder(self.out / slug(t.name)) for t in self.tableaus]
        return [
            RunFolder(self.out / grid_folder(t, h, s))
            for t in self.tableaus
            for h in self.inner_lrs
            for s in self.seeds
        ]


class _Comparison:
    """The runs of one :func:`compare` call: trained, resumed or read back, in order; ``compare.json`` kept up
    to date (rank 0 alone reads and writes files, prints and holds the results)."""

    def __init__(
        self,
        result: CompareResult,
        parallel: TaskParallel | None,
        resume: bool,
        train_options: dict[str, Any],
        log: Callable[[str], None],
        callbacks: Callable[[str], Sequence[Callback]] | None = None,
    ) -> None:
        self.result, self.parallel, self.resume, self.train_options = result, parallel, resume, train_options
        self.callbacks = callbacks  # each run's, by its folder under out
        self.lead = parallel is None or parallel.rank == 0
        self.log = log if self.lead else (lambda _: None)
        self.higher_is_better = get_domain(result.config["domain"]).metric.higher_is_better

    def write(self, status: str, collective: bool = True) -> None:
        """``compare.json`` with ``status``: rank 0 writes it, the others learn whether that failed (a
        collective) unless ``collective`` is off (when the ranks may no longer be in step)."""
        self.result.status = status
        path = self.result.out / STATE_FILE
        if collective:
            lead_decides(self.parallel, lambda: write_json(path, self.result.to_json()), f"write {path}")
        elif self.lead:
            write_json(path, self.result.to_json())

    def run(self, cfg: TrainConfig, folder: RunFolder) -> RunResult | None:
        """One run in ``folder``: read back when it finished earlier (rank 0 alone: ``None`` on the others),
        resumed from its checkpoint when it has one (with ``resume``), else trained. A diverged run is returned
        as such; :class:`~rkfast.train.RunInterrupted` goes to the caller."""
        loaded: dict[str, RunResult] = {}

        def saved_state() -> tuple[bool, bool]:
            """(finished, has a checkpoint): a finished run's result is read here, on rank 0."""
            has_checkpoint = self.resume and folder.checkpoint.exists()
            finished = has_checkpoint and load_checkpoint(folder.checkpoint)["status"] in ("complete", "diverged")
            if finished and self.lead:
                loaded["run"] = load_result(folder.path)
            return finished, has_checkpoint

        try:
            finished, has_checkpoint = lead_decides(self.parallel, saved_state)
            if finished:
                return loaded.get("run")
            run = folder.path.relative_to(self.result.out).as_posix()
            callbacks = () if self.callbacks is None else self.callbacks(run)
            return train(cfg, out=folder.path, resume=has_checkpoint, callbacks=callbacks, **self.train_options)
        except RunDiverged as err:
            return err.result

    def one(self, group: GridGroup, h: float, seed: int) -> RunResult | None:
        """The run of ``group``'s tableau with inner step ``h`` and ``seed``, recorded in its folders."""
        if self.result.is_grid:
            folder = grid_folder(group.tableau, h, seed)
            cfg = TrainConfig(**{**self.result.config, "tableau": group.tableau, "inner_lr": h, "seed": seed})
        else:  # the shared configuration as given (its inner step may be the domain's default)
            folder = slug(group.tableau.name)
            cfg = TrainConfig(**{**self.result.config, "tableau": group.tableau})
        run = self.run(cfg, RunFolder(self.result.out / folder))
        if self.lead:
            assert run is not None
            group.folders[(h, seed)] = folder
            self.log(f"[h={h:g}, seed {seed}] {run_line(run)}" if self.result.is_grid else run_line(run))
        return run

    def group(self, group: GridGroup) -> None:
        """Every h of the grid with the first seed, h selected on the held-out tasks, the other seeds with it."""
        lrs, seeds, steps = group.grid, group.seeds, self.result.select_steps
        for h in lrs:
            run = self.one(group, h, seeds[0])
            if self.lead and run is not None:  # rank 0 holds every run
                group.search[h] = run
        if len(lrs) > 1:

            def decide() -> tuple[dict[float, float | None], float | None]:
                scores = {h: validation_score(group.search.get(h), steps) for h in lrs}
                return scores, select_inner_lr(scores, self.higher_is_better)

            group.scores, group.selected = lead_decides(self.parallel, decide)
            self.log(selection_line(group, steps))
        else:
            group.scores, group.selected = {lrs[0]: validation_score(group.search.get(lrs[0]), steps)}, lrs[0]
        if group.selected is None:
            return
        if self.lead:
            group.runs[seeds[0]] = group.search[group.selected]
        for seed in seeds[1:]:
            run = self.one(group, group.selected, seed)
            if self.lead and run is not None:
                group.runs[seed] = run


def _distinct(values: Sequence[Any], what: str) -> None:
    twice = sorted({str(v) for v in values if list(values).count(v) > 1})
    if twice:
        raise ValueError(f"{what} lists {', '.join(twice)} more than once")


def _plan(
    config: TrainConfig,
    tableaus: Sequence[Tableau | str],
    out: Path | str,
    inner_lrs: Sequence[float] | None,
    seeds: Sequence[int] | None,
    select_steps: int | None,
) -> CompareResult:
    """The comparison's settings checked (``ValueError`` naming the bad one), as an empty result."""
    tabs = [t if isinstance(t, Tableau) else get_tableau(t) for t in tableaus]
    if not tabs:
        raise ValueError("compare needs at least one tableau")
    _distinct([t.name for t in tabs], "tableaus")
    lrs = None if inner_lrs is None else [float(h) for h in inner_lrs]
    seed_list = None if seeds is None else list(seeds)
    for values, what in ((lrs, "inner_lrs"), (seed_list, "seeds")):
        if values is not None and not values:
            raise ValueError(f"{what} is empty: give at least one value, or None for the config's")
        _distinct(values or [], what)
    config = replace(config, tableau=tabs[0])
    if len(lrs or ()) <= 1 and len(seed_list or ()) <= 1:  # one run per tableau
        config = replace(
            config, inner_lr=lrs[0] if lrs else config.inner_lr, seed=seed_list[0] if seed_list else config.seed
        )
        resolved = config.resolved()
        return CompareResult(
            Path(out),
            {**config.to_json(), "tableau": None},
            tabs,
            [float(resolved.settings().inner_lr)],
            [resolved.seed],
        )
    seed_list = seed_list or [config.seed]
    config = replace(config, seed=seed_list[0])
    lrs = lrs or [float(config.resolved().settings().inner_lr)]
    for h in lrs:
        for seed in seed_list:
            replace(config, inner_lr=h, seed=seed).resolved()  # each checked, naming the setting
    steps = selection_steps(replace(config, inner_lr=lrs[0]), select_steps)
    check_grid(replace(config, inner_lr=lrs[0]), lrs, steps)
    return CompareResult(
        Path(out),
        replace(config, inner_lr=None).to_json(),
        tabs,
        lrs,
        [int(s) for s in seed_list],
        is_grid=True,
        select_steps=steps,
    )


def _check_folders(result: CompareResult, resume: bool, overwrite: bool) -> None:
    """The comparison folder: to resume, it holds this comparison; else no earlier one (unless ``overwrite``);
    every output can be written (:meth:`~rkfast.runs.RunFolder.check_writable`)."""
    out = result.out
    if resume:
        saved = load_settings(out)
        given = (result.is_grid, result.inner_lrs, result.seeds) if result.is_grid else (False,)
        had = (True, saved.inner_lrs, saved.seeds) if saved.inner_lrs is not None else (False,)
        if [t.name for t in saved.tableaus] != [t.name for t in result.tableaus] or given != had:
            raise ValueError(
                f"the comparison in {out} runs other tableaus, inner steps or seeds: resume it with "
                "its own (rkfast.compare.load_settings reads them)"
            )
    elif not overwrite and ((out / STATE_FILE).is_file() or RunFolder(out).holds_run()):
        raise RunError(f"{out} holds an earlier comparison: resume=True continues it, overwrite=True replaces it")
    for folder in [RunFolder(out, (STATE_FILE, PLOT_FILE)), *result.folders()]:
        folder.check_writable()


def compare(
    config: TrainConfig,
    tableaus: Sequence[Tableau | str],
    *,
    out: Path | str,
    inner_lrs: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    select_steps: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    parallel: Any = "auto",
    callbacks: Callable[[str], Sequence[Callback]] | None = None,
) -> CompareResult:
    """Meta-train and meta-test every tableau with ``config`` and the same seeds, into the folder ``out``.

    With at most one inner step and one seed, each tableau is one run in ``<out>/<tableau>``. With several
    (a grid), per tableau every h of ``inner_lrs`` trains with the first seed, the best final held-out result
    after ``select_steps`` adaptation steps selects h (:func:`validation_score`, :func:`select_inner_lr`; a
    diverged h never wins), and the other seeds train with it, in ``<out>/<tableau>/h<h>-s<seed>``.
    ``compare.json`` is rewritten as the runs finish and ``compare.png`` plots the comparison at the end. The
    table and ``compare.json`` give each tableau's paired difference to the first on the same test tasks
    (:func:`~rkfast.report.paired_summary`).

    Args:
        config: what every run shares (:class:`~rkfast.train.TrainConfig`; its ``tableau`` is ignored, and with
            a grid its ``inner_lr`` and ``seed``).
        tableaus: tableaus or their names, distinct; the first is the paired differences' reference.
        out: the comparison folder.
        inner_lrs: the inner steps h (default: ``config.inner_lr``, or the domain's).
        seeds: the training seeds (default: ``config.seed``).
        select_steps: a grid's selecting held-out step count, one of the domain's (default: the last).
        resume: continue the comparison saved in ``out`` (:func:`load_settings` reads its settings): finished
            runs are read back, interrupted ones resume from their checkpoints.
        overwrite, checkpoint_every, progress, parallel: every run's, as :func:`~rkfast.train.train`
            takes them (distributed: every rank calls ``compare`` alike; rank 0 alone reads, writes and logs).
        log: where the line on each finished run and each selection goes (``None``: nowhere).
        callbacks: ``callbacks(run)`` gives the :class:`~rkfast.train.Callback` s of the run in the folder
            ``<out>/<run>`` (e.g. a :class:`~rkfast.train.TensorBoardLogger` per run), as
            :func:`~rkfast.train.train` takes them.

    Returns:
        The :class:`CompareResult` (status ``"complete"``; :meth:`CompareResult.report` is the table).

    Raises:
        CompareInterrupted: SIGINT/SIGTERM during a run, after saving it and ``compare.json``.
        ValueError: a bad setting (naming it), or ``resume`` with settings other than the saved ones.
        RunError: an output that cannot be written, an earlier comparison in ``out`` (without ``resume`` or
            ``overwrite``), or none to resume.
    """
    result = _plan(config, tableaus, out, inner_lrs, seeds, select_steps)
    group_of_ranks = resolve_process_group(parallel)
    if group_of_ranks is not None and group_of_ranks.world_size == 1:
        group_of_ranks = None  # a group of one: nothing to share
    lead_decides(group_of_ranks, lambda: _check_folders(result, resume, overwrite))
    options = {"overwrite": overwrite, "checkpoint_every": checkpoint_every, "progress": progress, "parallel": parallel}
    comparison = _Comparison(result, group_of_ranks, resume, options, log or (lambda _: None), callbacks)
    comparison.write("running")
    for tableau in result.tableaus:
        group = GridGroup(tableau, tuple(result.inner_lrs), tuple(result.seeds), select_steps=result.select_steps)
        result.groups.append(group)
        try:
            comparison.group(group)
        except RunInterrupted as stop:
            comparison.write("interrupted", collective=False)
            raise CompareInterrupted(tableau.name, result.out, stop) from None
        comparison.write("running")
    comparison.write("complete", collective=False)
    if comparison.lead:
        if result.is_grid:
            plots.plot_compare_grid(result.groups, result.out / PLOT_FILE)
        else:
            plots.plot_compare(result.runs, result.out / PLOT_FILE)
    return result
