"""The ``rkfast`` command line: argument parsing over :mod:`rkfast.train` (one run) and :mod:`rkfast.compare`
(comparisons of tableaus) for every registered domain.

::

    rkfast tableaus                                     # the named tableaus, their stages, order, entries
    rkfast train sinusoid --tableau rk4                 # one run: table, results.json, checkpoint, plots
    rkfast compare sinusoid --tableaus maml,heun,rk4    # same seeds for every tableau, one table and plot
    rkfast compare sinusoid --tableaus maml,heun --inner-lr 0.01,0.02,0.04 --seeds 0,1,2
                                                        # h per tableau chosen on held-out tasks, 3 seeds each
    rkfast eval runs/sinusoid-rk4 --test-tasks 1000     # meta-test a finished run again
    rkfast train sinusoid --learn-rates element         # Meta-SGD: learned per-element inner rates (rates.png)
    rkfast train sinusoid --config runs/sinusoid-rk4/config.json --seed 1   # a run again, another seed
    rkfast train DOMAIN --help                          # a domain's options and published defaults
    torchrun --nproc-per-node 2 -m rkfast train sinusoid   # the same run, task-parallel over 2 processes

Every run is seeded: ``--seed`` fixes the initialization and the stream of training tasks; the held-out
validation tasks and the meta-test tasks come from ``--test-seed`` (independent streams), so runs with
different tableaus or training seeds are tested on the very same tasks.

Under a launcher that sets ``WORLD_SIZE`` > 1 (``torchrun``), ``train`` and ``compare`` initialize
torch.distributed's default process group themselves unless it already is
(:func:`rkfast.train.launched_process_group`): gloo, plus NCCL for CUDA tensors where CUDA is available, with
a timeout of ``RKFAST_DIST_TIMEOUT`` seconds (default 300) for every collective, so a rank that stops
answering ends the job instead of hanging it. Rank 0 alone prints and writes; the other ranks print only their
own errors. ``eval`` runs in one process and refuses a launcher.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shlex
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from . import kernels
from .compare import (
    PLOT_FILE,
    STATE_FILE,
    CompareInterrupted,
    CompareSettings,
    check_grid,
    compare,
    load_settings,
    selection_steps,
)
from .data.images import DataError
from .distributed import RankFailedError, TaskParallel
from .learned import GRANULARITIES, TABLEAU_PATTERNS, TABLEAU_WEIGHTS
from .memory import AMP_DTYPES
from .optim import NonFiniteLossError
from .plots import write_run_plots
from .report import checkpoint_line, rates_line, step_source, test_report, train_report
from .runs import RunError, RunFolder, write_json
from .tableau import Tableau, get_tableau, named_tableaus
from .tasks import Defaults, Domain, domains, get_domain
from .train import (
    CONFIG_FILE,
    DEFAULT_DIST_TIMEOUT_S,
    DIST_TIMEOUT_ENV,
    METRICS_FILE,
    Callback,
    ConfigFileError,
    LaunchError,
    RunDiverged,
    RunInterrupted,
    RunResult,
    TensorBoardLogger,
    TrainConfig,
    check_device,
    check_resolves,
    describe_learned_tableau,
    evaluate_run,
    launched_process_group,
    launched_world,
    lead_decides,
    learned_tableau_info,
    lost_contact,
    rates_info,
    read_config,
    reported_by_rank,
    resume_config,
    silenced,
    slug,
    train,
    use_local_gpu,
)

__all__ = ["build_parser", "main"]

_OPTION_DEST = "domain_option_"  # argparse dest prefix of a domain's own options
_GIVEN = "_given_options"  # where the parser records which options were typed (resuming keeps the others)
# how the checks of a grid comparison name its settings here (rkfast.compare.check_grid)
COMPARE_FLAGS = {"inner_lrs": "--inner-lr H,H,...", "eval_tasks": "--eval-tasks", "select_steps": "--select-steps "}


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the full usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Typed(argparse.Action):
    """Store the value and record that the user typed this option."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        setattr(namespace, _GIVEN, {*getattr(namespace, _GIVEN, ()), self.dest})


def _flag(parser: argparse.ArgumentParser | Any, *names: str, **kwargs: Any) -> None:
    """An ``store_true`` option whose use is recorded (see :class:`_Typed`)."""
    parser.add_argument(*names, action=_Typed, nargs=0, const=True, default=False, **kwargs)


class CommandError(Exception):
    """A problem with the command's inputs found after parsing (a run folder without a checkpoint...):
    reported in one line with exit code 2."""


# -- commands -----------------------------------------------------------------------------------------


def _given(args: argparse.Namespace) -> set[str]:
    """The destinations of the options the user typed (not left at their defaults)."""
    return set(getattr(args, _GIVEN, ()))


def _options(args: argparse.Namespace, domain: Domain, only_given: bool = False) -> dict[str, Any]:
    given = _given(args)
    return {
        o.name: getattr(args, _OPTION_DEST + o.name)
        for o in domain.options
        if not only_given or _OPTION_DEST + o.name in given
    }


def _config(args: argparse.Namespace, tableau: Tableau | None) -> TrainConfig:
    domain = get_domain(args.domain)
    common = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and k != "tableau"}
    return TrainConfig(**{**common, "options": _options(args, domain)}, tableau=tableau)


def _resumed_config(args: argparse.Namespace, saved: TrainConfig, tableau: Tableau | None = None) -> TrainConfig:
    """The saved run's configuration with the options typed on this command line laid over it (``train``
    refuses the ones a resumed run may not change)."""
    if saved.domain != args.domain:
        raise CommandError(
            f"the run to resume is a {saved.domain!r} run, not {args.domain!r}: "
            f"rkfast train {saved.domain} --resume ..."
        )
    return _typed_over(args, saved, tableau)


def _typed_over(args: argparse.Namespace, base: TrainConfig, tableau: Tableau | None = None) -> TrainConfig:
    """``base`` with the options typed on this command line laid over it (``tableau``, if given, wins)."""
    given = _given(args)
    typed = {k: getattr(args, k) for k in given if k in TrainConfig.__dataclass_fields__ and k != "tableau"}
    options = {**base.options, **_options(args, get_domain(args.domain), only_given=True)}
    cfg = replace(base, **typed, options=options)
    if tableau is not None:
        cfg = replace(cfg, tableau=tableau)
    elif "tableau" in given:
        cfg = replace(cfg, tableau=args.tableau)
    return cfg


def _file_config(args: argparse.Namespace) -> TrainConfig:
    """``--config FILE``: the configuration in FILE (a run folder's ``config.json``) for this command's domain,
    with the options typed on this command line laid over it (they may mend the file: ``--device cpu``).
    A setting that does not resolve is named in the file's terms when the file's own settings fail."""
    try:
        saved = read_config(args.config, domain=args.domain, resolve=False)
        cfg = _typed_over(args, saved)
        try:
            cfg.resolved()
        except ValueError as err:
            check_resolves(args.config, saved)  # the file's own fault: named with the file
            raise CommandError(str(err)) from None  # a typed flag's
    except ConfigFileError as err:
        raise CommandError(str(err)) from None
    return cfg


def _checked(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` if it resolves (the domain's defaults, every value checked); else a one-line error."""
    try:
        cfg.resolved()
    except ValueError as err:
        raise CommandError(str(err)) from None
    return cfg


def _run_folder(args: argparse.Namespace, default: str) -> tuple[Path, bool]:
    """The output folder and whether the command resumes it (``--resume DIR`` or ``--out DIR``)."""
    if args.resume is not None:
        if args.out is not None and Path(args.out) != Path(args.resume):
            raise CommandError("--resume DIR continues the run in DIR; drop --out (or give the same folder)")
        if args.overwrite:
            raise CommandError("--resume continues a run and --overwrite replaces it: give one of them")
        return Path(args.resume), True
    out = Path(args.out or default)
    # the same test train() applies, said here in the command line's terms
    if not args.overwrite and (RunFolder(out).holds_run() or (out / "compare.json").is_file()):
        raise CommandError(
            f"{out} holds an earlier run: --resume {shlex.quote(str(out))} continues it, "
            "--overwrite replaces it, --out DIR writes elsewhere"
        )
    return out, False


def _train(cfg: TrainConfig, out: Path, resume: bool, args: argparse.Namespace) -> RunResult:
    return train(
        cfg,
        out=out,
        resume=resume,
        overwrite=args.overwrite,
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
        callbacks=_tensorboard(args, ""),
    )


def _tensorboard(args: argparse.Namespace, run: str) -> list[Callback]:
    """``--tensorboard DIR``: a TensorBoard logger of the run in ``DIR`` (a comparison's run in ``DIR/<run>``)."""
    if args.tensorboard is None:
        return []
    return [TensorBoardLogger(Path(args.tensorboard) / run)]


# -- many processes (torchrun) ------------------------------------------------------------------------


def _parallel(args: argparse.Namespace) -> TaskParallel | None:
    return getattr(args, "parallel", None)


def _is_lead(args: argparse.Namespace) -> bool:
    parallel = _parallel(args)
    return parallel is None or parallel.rank == 0


def _check_parallel(cfg: TrainConfig, parallel: TaskParallel | None) -> None:
    """What a run over several processes needs of its configuration (the same on every rank)."""
    if parallel is None:
        return
    world, resolved = parallel.world_size, cfg.resolved()
    meta_batch = resolved.settings().meta_batch
    if meta_batch < world:
        raise CommandError(
            f"--meta-batch {meta_batch} is smaller than the {world} processes of the run: "
            f"every process needs at least one task per meta-step; give --meta-batch {world} or "
            "more, or start fewer processes"
        )
    device = str(resolved.device)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if device.startswith("cuda:") and local_world > 1:
        raise CommandError(
            f"--device {device} would put all {local_world} processes of this machine on one GPU: "
            "give --device cuda (process LOCAL_RANK computes on GPU LOCAL_RANK)"
        )
    use_local_gpu(device)


def _resume_hint(args: argparse.Namespace, out: Path) -> str:
    command = f"rkfast {args.command} {args.domain} --resume {shlex.quote(str(out))}"
    parallel = _parallel(args)
    if parallel is None:
        return command
    if int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) == parallel.world_size:  # one machine
        return f"torchrun --nproc-per-node {parallel.world_size} -m {command}"
    return f"{command} (launched on {parallel.world_size} processes again, as this run was)"


def cmd_train(args: argparse.Namespace) -> int:
    """``rkfast train DOMAIN``: one run, its table, ``results.json``, checkpoints and plots (distributed: rank
    0 reads the command's files and decides, every rank trains, rank 0 prints and writes)."""

    def decide() -> tuple[TrainConfig, Path, bool]:
        if args.config is not None and args.resume is not None:
            raise CommandError("--config FILE starts a new run and --resume continues a saved one: give one of them")
        if args.resume is None:
            cfg = _checked(_file_config(args) if args.config is not None else _config(args, args.tableau))
            tableau = cfg.resolved().settings().tableau
            out, resume = _run_folder(args, f"runs/{args.domain}-{slug(tableau.name)}")
        else:
            out, resume = _run_folder(args, "")
            cfg = _checked(_resumed_config(args, resume_config(out)))
        return cfg, out, resume

    cfg, out, resume = lead_decides(_parallel(args), decide)
    _check_parallel(cfg, _parallel(args))
    lead = _is_lead(args)
    try:
        run = _train(cfg, out, resume, args)
    except RunInterrupted as stop:
        if lead:
            print(f"{stop}; resume with: {_resume_hint(args, out)}", file=sys.stderr)
        return 130
    except RunDiverged as err:
        if lead:
            print(f"rkfast: training diverged: {err}", file=sys.stderr)
        return 1
    if not lead:
        return 0
    print(train_report(run))
    if run.distributed is not None:
        d = run.distributed
        print(
            f"task-parallel over {d['world_size']} processes ({d['backend']}): tasks per meta-step and process "
            f"{', '.join(map(str, d['meta_batch_per_rank']))}"
        )
    written = [out / "results.json", out / CONFIG_FILE, out / "checkpoint.pt", out / METRICS_FILE]
    written += write_run_plots(run, out)
    if run.best is not None:
        written.insert(3, out / "best.pt")
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def _compare_seeds(args: argparse.Namespace) -> tuple[int, ...]:
    """The training seeds of a new comparison: ``--seeds``, else ``--seed`` (one of them, not both)."""
    given = _given(args)
    if "seeds" in given and "seed" in given:
        raise CommandError("give --seed (one training seed) or --seeds (several), not both")
    return tuple(args.seeds) if args.seeds is not None else (args.seed,)


def _resumed_compare(out: Path, args: argparse.Namespace, typed_lrs: list[float] | None) -> CompareSettings:
    """The settings of the comparison saved in ``out`` with the options typed on this command line laid over
    them (those that define the comparison must be the saved ones: said in the flags' terms)."""
    saved, given = load_settings(out), _given(args)
    tableaus = saved.tableaus
    cfg = _resumed_config(args, saved.config, tableau=tableaus[0])
    if "tableaus" in given and [t.name for t in args.tableaus] != [t.name for t in tableaus]:
        raise CommandError(
            f"the comparison in {out} runs {', '.join(t.name for t in tableaus)}; drop --tableaus to resume it"
        )
    if saved.inner_lrs is None or saved.seeds is None:
        if typed_lrs is not None and len(typed_lrs) > 1:
            raise CommandError(f"the comparison in {out} has one inner step, not a grid; drop --inner-lr to resume it")
        if "seeds" in given and list(args.seeds) != [saved.config.seed]:
            raise CommandError(f"the comparison in {out} trains seed {saved.config.seed}; drop --seeds to resume it")
        if typed_lrs is not None:
            cfg = replace(cfg, inner_lr=typed_lrs[0])
        return CompareSettings(_checked(cfg), tableaus)
    lrs, seeds = saved.inner_lrs, saved.seeds
    if typed_lrs is not None and [float(h) for h in typed_lrs] != lrs:
        raise CommandError(
            f"the comparison in {out} runs the inner steps "
            f"{','.join(f'{h:g}' for h in lrs)}; drop --inner-lr to resume it"
        )
    if ("seeds" in given and list(args.seeds) != seeds) or "seed" in given:
        raise CommandError(
            f"the comparison in {out} trains the seeds {','.join(map(str, seeds))}; drop --seed/--seeds to resume it"
        )
    if "select_steps" in given and args.select_steps != saved.select_steps:
        raise CommandError(
            f"the comparison in {out} selects h after {saved.select_steps} step(s); drop --select-steps to resume it"
        )
    cfg = _checked(cfg)
    return CompareSettings(cfg, tableaus, lrs, seeds, _check_grid(cfg, lrs, saved.select_steps))


def _compare_settings(out: Path, resume: bool, args: argparse.Namespace) -> CompareSettings:
    """The comparison's settings: from ``compare.json`` when resuming, else from the command line. Without a
    grid (one inner step, one seed) ``inner_lrs`` and ``seeds`` are ``None`` and the configuration holds them;
    with one, the configuration's ``inner_lr`` is ``None`` and its ``seed`` the first seed."""
    typed_lrs = [float(h) for h in args.inner_lrs] if "inner_lrs" in _given(args) else None
    if resume:
        return _resumed_compare(out, args, typed_lrs)
    names = [t.name for t in args.tableaus]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CommandError(f"--tableaus lists {', '.join(twice)} more than once")
    seeds = _compare_seeds(args)
    cfg = _config(args, args.tableaus[0])
    if typed_lrs is not None and len(typed_lrs) == 1:
        cfg = replace(cfg, inner_lr=typed_lrs[0])
    if cfg.select_steps is not None:  # it also picks each run's best.pt: a bad count is refused in the flag's terms
        _check_select_steps(_checked(replace(cfg, select_steps=None)), cfg.select_steps)
    cfg = _checked(replace(cfg, seed=seeds[0]))
    if (typed_lrs is None or len(typed_lrs) == 1) and len(seeds) == 1:
        return CompareSettings(cfg, list(args.tableaus))
    lrs = typed_lrs if typed_lrs is not None else [float(cfg.resolved().settings().inner_lr)]
    select = _check_grid(cfg, lrs, args.select_steps)
    return CompareSettings(replace(cfg, inner_lr=None), list(args.tableaus), lrs, list(seeds), select)


def _check_select_steps(cfg: TrainConfig, select_steps: int) -> None:
    """``--select-steps`` of a comparison is one of the domain's held-out step counts (else a one-line error)."""
    try:
        selection_steps(cfg, select_steps, COMPARE_FLAGS)
    except ValueError as err:
        raise CommandError(str(err)) from None


def _check_grid(cfg: TrainConfig, lrs: Sequence[float], select_steps: int | None) -> int:
    """The held-out step count that selects h (``--select-steps``, or the domain's last), after the checks
    of :func:`rkfast.compare.check_grid` said in the flags' terms."""
    try:
        steps = selection_steps(replace(cfg, inner_lr=lrs[0]), select_steps, COMPARE_FLAGS)
        check_grid(replace(cfg, inner_lr=lrs[0]), lrs, steps, COMPARE_FLAGS)
    except ValueError as err:
        raise CommandError(str(err)) from None
    return steps


def cmd_compare(args: argparse.Namespace) -> int:
    """``rkfast compare DOMAIN``: :func:`rkfast.compare.compare` with the command line's settings; one table,
    JSON and plot. Distributed: every run is task-parallel; rank 0 reads and writes the files and prints."""
    parallel, lead = _parallel(args), _is_lead(args)

    def setup() -> tuple[Path, bool, CompareSettings]:
        out, resume = _run_folder(args, f"runs/compare-{args.domain}")
        return out, resume, _compare_settings(out, resume, args)

    out, resume, settings = lead_decides(parallel, setup)
    first_lr = settings.config.inner_lr if settings.inner_lrs is None else settings.inner_lrs[0]
    _check_parallel(replace(settings.config, tableau=settings.tableaus[0], inner_lr=first_lr), parallel)
    try:
        result = compare(
            settings.config,
            settings.tableaus,
            out=out,
            inner_lrs=settings.inner_lrs,
            seeds=settings.seeds,
            select_steps=settings.select_steps,
            resume=resume,
            overwrite=args.overwrite,
            checkpoint_every=args.checkpoint_every,
            progress=not args.quiet,
            log=lambda line: print(line, flush=True),
            callbacks=lambda run: _tensorboard(args, run),
        )
    except CompareInterrupted as stop:
        if lead:
            print(f"{stop}; resume the comparison with: {_resume_hint(args, out)}", file=sys.stderr)
        return 130
    if not lead:
        return 0
    print(result.report())
    folders = (
        f"one run folder per tableau, inner step and seed ({out}/<tableau>/h<h>-s<seed>)"
        if result.is_grid
        else "one run folder per tableau"
    )
    print(f"wrote {out / STATE_FILE}, {out / PLOT_FILE} and {folders}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``rkfast eval RUN_DIR``: meta-test the run's trained model again (other tasks, steps or step size) with
    :func:`rkfast.train.evaluate_run`; its table, and ``eval.json``."""
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "eval.json"
    if out.is_dir():
        raise CommandError(f"cannot write {out}: it is a folder")
    run = evaluate_run(
        run_dir,
        checkpoint=f"{args.checkpoint}.pt",
        test_tasks=args.test_tasks,
        test_seed=args.test_seed,
        steps=args.steps,
        test_step=args.test_step,
        adaptation=args.adaptation,
        device=args.device,
    )
    cfg, tableau = run.config, run.tableau
    which = checkpoint_line(run.checkpoint, run.selected_by)
    print(f"{run_dir}: {run.domain.name}, {run.iterations} meta-steps ({which}); {tableau.describe()}")
    source = step_source(cfg, tableau, cfg.test_step, args.adaptation)
    print(test_report(run.domain, cfg, run.summary(), run.tasks, source, args.adaptation, run.test))
    for line in (rates_line(rates_info(run.opt)), describe_learned_tableau(learned_tableau_info(run.opt))):
        if line:
            print(line)
    write_json(out, run.to_json())
    print(f"wrote {out}")
    return 0


def cmd_tableaus(args: argparse.Namespace) -> int:
    """``rkfast tableaus``: every named tableau with its stages, order and entries."""
    for tab in named_tableaus().values():
        print(tab.describe())
    print("factories: maml(steps), rk2(c), maml_msl(w1, ..., ws); e.g. --tableau 'maml(3)'")
    return 0


# -- argument types -----------------------------------------------------------------------------------


def _tableau_arg(spec: str) -> Tableau:
    try:
        return get_tableau(spec)
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _tableau_list_arg(specs: str) -> list[Tableau]:
    """Comma-separated tableaus; commas inside a factory call (``maml_msl(0.5,0.5)``) do not split."""
    parts, depth, current = [], 0, ""
    for ch in specs:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    if not any(p.strip() for p in parts):
        raise argparse.ArgumentTypeError("no tableau given")
    return [_tableau_arg(p) for p in parts if p.strip()]


def _number(kind: type, minimum: float | None, strict: bool) -> Callable[[str], Any]:
    """A parser of ``kind`` (``int`` or ``float``) values ``> minimum`` (``strict``) or ``>= minimum``; floats
    must also be finite. The rules are the ones :class:`~rkfast.train.TrainConfig` and the API apply."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not math.isfinite(value) or (minimum is not None and (value < minimum or (strict and value == minimum))):
            rule = "" if minimum is None else f"{'>' if strict else '>='} {minimum:g}"
            if kind is float:
                rule = f"a finite number {rule}".rstrip()
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    return parse


def _frozen_rates_arg(text: str) -> dict[str, float]:
    """``PATTERN=VALUE[,PATTERN=VALUE...]`` as ``{pattern: rate}`` (``'features.*=0'``: ANIL). Whether a
    pattern names a parameter of the domain's model is checked with the rest of the configuration."""
    out: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        pattern, eq, value = part.partition("=")
        pattern = pattern.strip()
        if not eq or not pattern:
            raise argparse.ArgumentTypeError(f"expected PATTERN=VALUE[,PATTERN=VALUE...], got {part.strip()!r}")
        try:
            rate = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"the rate of {pattern!r} is not a number: {value.strip()!r}") from None
        if not math.isfinite(rate):
            raise argparse.ArgumentTypeError(f"the rate of {pattern!r} must be a finite number, got {value.strip()}")
        if pattern in out and out[pattern] != rate:
            raise argparse.ArgumentTypeError(f"{pattern!r} is given two rates, {out[pattern]:g} and {rate:g}")
        out[pattern] = rate
    if not out:
        raise argparse.ArgumentTypeError("no PATTERN=VALUE given")
    return out


def _list_arg(kind: type, minimum: float, strict: bool, what: str) -> Callable[[str], tuple[Any, ...]]:
    """A parser of comma-separated ``kind`` values, each checked as :func:`_number` checks one; an empty list
    or a value given twice is refused (``what`` names the values in the message)."""
    parse = _number(kind, minimum, strict)

    def parse_list(text: str) -> tuple[Any, ...]:
        values = tuple(parse(part.strip()) for part in text.split(",") if part.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"no {what} given")
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise argparse.ArgumentTypeError(f"lists {', '.join(f'{v:g}' for v in twice)} more than once")
        return values

    return parse_list


def _steps_arg(text: str) -> tuple[int, ...]:
    parse = _number(int, 0, True)
    steps = tuple(sorted({parse(part) for part in text.split(",") if part.strip()}))
    if not steps:
        raise argparse.ArgumentTypeError("no step count given")
    return steps


def _device_arg(text: str) -> str:
    try:
        check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


# -- the parser ---------------------------------------------------------------------------------------


# the parsers of the training flags' numbers (an outer learning rate may be 0, as for MetaOptimizer and torch)
_POSITIVE_INT, _COUNT, _POSITIVE_FLOAT = _number(int, 0, True), _number(int, 0, False), _number(float, 0, True)
_RATE = _number(float, 0, False)


def _add_training_options(p: argparse.ArgumentParser, domain: Domain, compare: bool = False) -> None:
    """The training flags of ``train`` and ``compare``, in the order ``--help`` lists them; ``compare`` takes a
    grid of inner steps (``--inner-lr H[,H...]``) and ``--seeds``."""
    _add_run_settings(p, domain, compare)
    if compare:
        _add_grid_options(p)
    else:
        _add_select_steps(
            p,
            "pick best.pt by the held-out result after N adaptation steps, one of the domain's held-out step "
            "counts (default: the step count the run trains, 1 for maml or learned rates, k for maml(k), where "
            "the domain evaluates it; else the last held-out count)",
        )
    _flag(p, "--first-order", help="ignore second derivatives (first-order MAML and kin)")
    _add_memory_options(p)
    _add_rate_options(p)
    _add_tableau_options(p)
    _add_run_control(p)
    _add_domain_options(p, domain)


def _inner_lr_setting(d: Defaults, compare: bool) -> tuple[str, Callable[[str], Any], None, float, str]:
    """``--inner-lr`` as :func:`_add_run_settings` lists it: one step, or (``compare``) a grid of steps."""
    if not compare:
        return ("--inner-lr", _POSITIVE_FLOAT, None, d.inner_lr, "the RK step h of the stages, > 0")
    return (
        "--inner-lr",
        _list_arg(float, 0, True, "inner step"),
        None,
        d.inner_lr,
        "the RK step h of the stages, > 0; several, comma-separated (0.01,0.02,0.04), are a grid: per "
        "tableau every h trains with the first seed, the best final held-out result picks h, and the other "
        "seeds train with that h",
    )


def _add_run_settings(p: argparse.ArgumentParser, domain: Domain, compare: bool) -> None:
    """The flags of a run's :class:`~rkfast.train.TrainConfig` settings, with the domain's defaults in their help."""
    d = domain.defaults
    by_options = " with the default options" if domain.defaults_by_options else ""
    # the domain's published settings stay None here, so that TrainConfig.resolved() fills them in for the
    # options given (Omniglot 20-way has its own meta-batch and inner step)
    settings: list[tuple[str, Callable[[str], Any], Any, Any, str]] = [
        ("--meta-batch", _POSITIVE_INT, None, d.meta_batch, "tasks per meta-step"),
        ("--iterations", _POSITIVE_INT, None, d.iterations, "meta-steps"),
        _inner_lr_setting(d, compare),
        ("--lr", _RATE, None, d.lr, "Adam's outer learning rate, >= 0 (0 keeps the initialization)"),
        ("--seed", _COUNT, 0, 0, "seed of the initialization and the training tasks"),
        (
            "--eval-every",
            _COUNT,
            None,
            d.eval_every,
            "meta-steps between held-out evaluations (0: at start and end only)",
        ),
        ("--eval-tasks", _COUNT, None, d.eval_tasks, "held-out tasks of those evaluations"),
        ("--test-tasks", _POSITIVE_INT, None, d.test_tasks, "meta-test tasks"),
        ("--test-seed", _COUNT, 0, 0, "seed of the held-out and test tasks"),
        (
            "--test-step",
            _POSITIVE_FLOAT,
            None,
            None,
            "meta-test step size, > 0 (default: the tableau's own step, docs/method.md)",
        ),
        ("--device", _device_arg, "cpu", "cpu", "torch device"),
    ]
    for flag, kind, default, shown, text in settings:
        where = by_options if default is None else ""
        # compare's grid of inner steps has a dest of its own (TrainConfig.inner_lr is one number)
        more: dict[str, Any] = {"dest": "inner_lrs", "metavar": "H[,H...]"} if compare and flag == "--inner-lr" else {}
        p.add_argument(
            flag,
            type=kind,
            default=default,
            action=_Typed,
            **more,
            help=text if shown is None else f"{text} (default: {shown}{where})",
        )


def _add_grid_options(p: argparse.ArgumentParser) -> None:
    """``compare``'s seeds and the step count that selects h on a grid of inner steps."""
    p.add_argument(
        "--seeds",
        type=_list_arg(int, 0, False, "seed"),
        default=None,
        action=_Typed,
        metavar="S[,S...]",
        help="several training seeds (0,1,2), each a run of every tableau with the "
        "(selected) h; the table gives the mean over seeds x test tasks and "
        "the seed-to-seed spread (default: --seed)",
    )
    _add_select_steps(
        p,
        "select h on the held-out result after N adaptation steps, one of the domain's "
        "held-out step counts (default: the last of them)",
    )


def _add_select_steps(p: argparse.ArgumentParser, text: str) -> None:
    """``--select-steps N``: the held-out step count that picks h (``compare``) or ``best.pt`` (``train``)."""
    p.add_argument("--select-steps", type=_POSITIVE_INT, default=None, action=_Typed, metavar="N", help=text)


def _add_rate_options(p: argparse.ArgumentParser) -> None:
    """Learned (or frozen) inner rates."""
    rates = p.add_argument_group("learned inner rates (docs/method.md)")
    rates.add_argument(
        "--learn-rates",
        choices=GRANULARITIES,
        default=None,
        action=_Typed,
        help="learn the inner rates, starting at --inner-lr: one scalar, one per parameter tensor "
        "(MAML++'s per-layer rates) or one per element (Meta-SGD); writes rates.png",
    )
    _flag(
        rates,
        "--per-stage-rates",
        help="one set of rates per stage slope (with --tableau 'maml(k)': MAML++'s "
        "per-step rates); needs --learn-rates",
    )
    rates.add_argument(
        "--rate-lr",
        type=_RATE,
        default=None,
        action=_Typed,
        metavar="X",
        help="Adam's learning rate of the rates, >= 0 (default: --lr); needs --learn-rates",
    )
    rates.add_argument(
        "--frozen-rates",
        type=_frozen_rates_arg,
        default=None,
        action=_Typed,
        metavar="PATTERN=VALUE[,...]",
        help="fixed, not learned, rates of the parameter tensors whose names match a glob "
        "(e.g. '0.*=0,2.*=0' adapts only the sinusoid MLP's head: ANIL)",
    )


def _add_tableau_options(p: argparse.ArgumentParser) -> None:
    """A learned tableau."""
    learned = p.add_argument_group("learned tableau (docs/method.md)")
    learned.add_argument(
        "--learn-tableau",
        choices=TABLEAU_PATTERNS,
        default=None,
        action=_Typed,
        help="learn the tableau's entries of A, starting at --tableau's: its non-zero entries "
        "('pattern') or every entry below the diagonal ('full'); writes tableau.png",
    )
    learned.add_argument(
        "--tableau-weights",
        choices=TABLEAU_WEIGHTS,
        default="fixed",
        action=_Typed,
        help="b stays the tableau's ('fixed', default) or follows A through the order conditions "
        "('order': the scheme stays consistent); needs --learn-tableau",
    )
    learned.add_argument(
        "--tableau-lr",
        type=_RATE,
        default=None,
        action=_Typed,
        metavar="X",
        help="Adam's learning rate of the learned tableau, >= 0 (default: --lr); needs --learn-tableau",
    )


def _add_memory_options(p: argparse.ArgumentParser) -> None:
    """The memory levers of every meta-step (:class:`~rkfast.memory.Memory`, ``docs/memory.md``)."""
    g = p.add_argument_group("memory (docs/memory.md)")
    g.add_argument(
        "--task-chunk",
        type=_POSITIVE_INT,
        default=None,
        action=_Typed,
        metavar="K",
        help="run each meta-batch K tasks at a time, each chunk back-propagated before the next: the same step, "
        "peak memory of K tasks (default: all at once under vmap, one at a time on the task-by-task path)",
    )
    _flag(
        g,
        "--recompute",
        help="second order: keep each stage's point only and rebuild its graph in the backward "
        "(peak memory about one stage's graph; one more forward and backward per stage)",
    )
    g.add_argument(
        "--amp",
        choices=sorted(AMP_DTYPES),
        default=None,
        action=_Typed,
        help="run the task losses under torch.autocast in this dtype (bf16: CPU and CUDA; fp16: CUDA); the "
        "meta-parameters and the outer update stay float32",
    )


def _add_run_control(p: argparse.ArgumentParser) -> None:
    """How the run computes, shows its progress, saves, resumes and logs."""
    p.add_argument(
        "--backend",
        choices=kernels.backend_choices(),
        default="auto",
        action=_Typed,
        help="kernels of the stage arithmetic (default: %(default)s: C++ on CPU, Triton on CUDA)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or periodic evaluation lines")
    p.add_argument(
        "--checkpoint-every",
        type=_POSITIVE_INT,
        default=None,
        metavar="N",
        help="meta-steps between checkpoints (default: --eval-every, or 1000 when that is 0); "
        "a checkpoint is also written at the end, on a new best held-out result, on SIGINT/SIGTERM",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run saved in RUN_DIR (its settings; only --iterations, --device and --backend may change)",
    )
    _flag(p, "--overwrite", help="a new run into a folder that holds an earlier run's files deletes them first")
    p.add_argument(
        "--tensorboard",
        metavar="DIR",
        default=None,
        help="also log to TensorBoard in DIR (compare: one subfolder per run); needs the tensorboard "
        "extra: pip install rkfast[tensorboard]",
    )


def _add_domain_options(p: argparse.ArgumentParser, domain: Domain) -> None:
    """The domain's own options (:class:`~rkfast.tasks.Option`), in a group of their own."""
    if domain.options:
        group = p.add_argument_group(f"{domain.name} options")
        for o in domain.options:
            kind = type(o.default)
            parse = _number(kind, 0, True) if kind in (int, float) and o.positive else kind
            group.add_argument(
                o.flag,
                dest=_OPTION_DEST + o.name,
                metavar="|".join(map(str, o.choices)) if o.choices else o.name.upper(),
                type=parse,
                choices=o.choices or None,
                default=o.default,
                action=_Typed,
                help=o.help if o.default == "" else f"{o.help} (default: %(default)s)",
            )


def _add_domain_commands(command: argparse.ArgumentParser, compare: bool) -> None:
    by_domain = command.add_subparsers(dest="domain", required=True, metavar="DOMAIN", title="task domains")
    for domain in domains().values():
        source = f" Defaults: {domain.defaults.source}." if domain.defaults.source else ""
        p = by_domain.add_parser(domain.name, help=domain.description, description=domain.description + "." + source)
        if compare:
            p.add_argument(
                "--tableaus",
                type=_tableau_list_arg,
                default=_tableau_list_arg("maml,heun,ralston,rk4"),
                action=_Typed,
                help="comma-separated tableaus (default: maml,heun,ralston,rk4)",
            )
            p.add_argument("--out", help=f"output folder (default: runs/compare-{domain.name})")
        else:
            p.add_argument(
                "--tableau",
                type=_tableau_arg,
                default=None,
                action=_Typed,
                help="a name (maml, heun, rk4, ...) or a factory call (maml(3), rk2(0.75)); default: "
                f"{domain.defaults.tableau}{' with the default options' if domain.defaults_by_options else ''}",
            )
            p.add_argument("--out", help=f"output folder (default: runs/{domain.name}-<tableau>)")
            p.add_argument(
                "--config",
                metavar="FILE",
                default=None,
                help="run the configuration in FILE again (a run folder's config.json); the flags typed "
                "here override its settings (e.g. another --seed)",
            )
        _add_training_options(p, domain, compare=compare)


def build_parser() -> argparse.ArgumentParser:
    """The ``rkfast`` argument parser: ``train``/``compare`` per registered domain, ``eval``, ``tableaus``."""
    parser = _Parser(
        prog="rkfast",
        description="Runge-Kutta meta-learning (RK-MAML) in PyTorch.",
        epilog="Many processes: torchrun --nproc-per-node N -m rkfast train|compare DOMAIN ... splits "
        "every meta-batch over N processes (gloo on CPU, NCCL on CUDA; rank 0 prints and writes). "
        f"{DIST_TIMEOUT_ENV}=SECONDS (default {DEFAULT_DIST_TIMEOUT_S:g}) bounds every wait for "
        "another process.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,compare,tableaus}")

    train_cmd = sub.add_parser("train", help="meta-train one tableau on a task domain and meta-test it")
    _add_domain_commands(train_cmd, compare=False)
    train_cmd.set_defaults(func=cmd_train)

    compare = sub.add_parser("compare", help="meta-train several tableaus with the same seeds and compare them")
    _add_domain_commands(compare, compare=True)
    compare.set_defaults(func=cmd_compare)

    ev = sub.add_parser("eval", help="meta-test a finished run again (from its folder's checkpoint.pt)")
    ev.add_argument("run_dir", help="the folder `rkfast train` wrote")
    ev.add_argument("--test-tasks", type=_number(int, 0, True), help="meta-test tasks (default: the run's)")
    ev.add_argument("--test-seed", type=_number(int, 0, False), help="seed of the test tasks (default: the run's)")
    ev.add_argument("--steps", type=_steps_arg, help="adaptation step counts, e.g. 1,5,10 (default: the domain's)")
    ev.add_argument("--test-step", type=_number(float, 0, True), help="adaptation step size (default: the run's)")
    ev.add_argument(
        "--adaptation",
        choices=("gradient", "stages"),
        default="gradient",
        help="each adaptation step: a plain gradient step (default), or the tableau's own stages ending "
        "at its last stage's point, with the step h or the learned rates (docs/method.md)",
    )
    ev.add_argument("--device", type=_device_arg, help="torch device (default: the run's)")
    ev.add_argument("--out", help="where to write the results (default: RUN_DIR/eval.json)")
    ev.add_argument(
        "--checkpoint",
        choices=("checkpoint", "best"),
        default="checkpoint",
        help="the final state (checkpoint.pt, default) or the best held-out evaluation's (best.pt)",
    )
    ev.set_defaults(func=cmd_eval)

    tableaus = sub.add_parser("tableaus", help="list the named tableaus")
    tableaus.set_defaults(func=cmd_tableaus)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rkfast`` command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Under a launcher (``WORLD_SIZE`` > 1 in the environment, as torchrun sets it) ``train`` and ``compare``
    run task-parallel over its processes (see the module's documentation); ranks other than 0 print only
    the errors that may be theirs alone, with their rank. There an unexpected exception is printed with its
    traceback and ends the process with code 1 after the process group is gone (not during interpreter
    shutdown, where a gloo group's last reference can abort the process)."""
    world, rank = launched_world()
    if world == 1:
        return _main(argv, world, rank)
    try:
        return _main(argv, world, rank)
    except Exception:  # noqa: BLE001 - printed as Python would, then the frames holding the group are dropped
        traceback.print_exc()
        return 1
    finally:
        gc.collect()


def _peek_device(argv: Sequence[str]) -> str | None:
    """The value of ``--device`` on the command line, before parsing (which already touches the device)."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return None


def _main(argv: Sequence[str] | None, world: int, rank: int) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if world > 1:
        use_local_gpu(_peek_device(argv))  # before parsing, which checks the device on the current GPU
    try:
        with silenced(("stdout", "stderr"), rank != 0):  # usage errors and --help: rank 0's alone
            args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse errors (code 2) and --help (code 0)
        return int(exit_.code or 0)
    where = f" [rank {rank} of {world}]" if rank != 0 else ""  # rank 0 speaks for the run
    try:
        with silenced(("stdout",), rank != 0):
            if world > 1 and args.command == "eval":
                raise CommandError(
                    "rkfast eval meta-tests in one process: run it without torchrun (rkfast eval RUN_DIR)"
                )
            if args.command not in ("train", "compare"):
                return args.func(args)
            with launched_process_group() as args.parallel:  # None for one process
                try:
                    return args.func(args)
                except (Exception, KeyboardInterrupt) as err:
                    # reported while the process group lives: once another process has exited, the launcher
                    # may end this one at any moment (torchrun sends SIGTERM), so say it first
                    code = _reported(err, args.command, rank, where)
                    if code is None and world > 1 and not isinstance(err, BrokenPipeError):
                        traceback.print_exc()
                        code = 1
                    if code is None:
                        raise
                    return code
    except BrokenPipeError:  # output piped into `head` & co., which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (Exception, KeyboardInterrupt) as err:
        code = _reported(err, args.command, rank, where)
        if code is None:
            raise
        return code


def _reported(err: BaseException, command: str, rank: int, where: str) -> int | None:
    """Report ``err`` as the command line does (one line on stderr, when this rank shows it: see
    :func:`~rkfast.train.reported_by_rank`) and return the exit code; ``None`` for an exception it does not
    handle."""
    if isinstance(err, (CommandError, RunError, DataError, LaunchError)):
        message, code = f"rkfast {command}{where}: error: {err}", 2
    elif isinstance(err, NonFiniteLossError):
        message, code = f"rkfast{where}: training diverged: {err}", 1
    elif isinstance(err, RankFailedError):
        message, code = f"rkfast {command}{where}: error: {err}", 1
    elif isinstance(err, KeyboardInterrupt):  # a second Ctrl-C: stopped at once, the last checkpoint is what was saved
        message, code = "interrupted", 130
    elif (lost := lost_contact(err)) is not None:
        message, code = f"rkfast {command}{where}: error: {lost}", 1
    else:
        return None
    if reported_by_rank(err, rank, alike=(CommandError,)):
        print(message, file=sys.stderr, flush=True)
    return code
