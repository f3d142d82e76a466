"""The ``rkfast`` command line: argument parsing over :mod:`rkfast.train` for every registered domain.

::

    rkfast tableaus                                     # the named tableaus, their stages, order, entries
    rkfast train sinusoid --tableau rk4                 # one run: table, results.json, checkpoint, plots
    rkfast compare sinusoid --tableaus maml,heun,rk4    # same seeds for every tableau, one table and plot
    rkfast eval runs/sinusoid-rk4 --test-tasks 1000     # meta-test a finished run again
    rkfast train DOMAIN --help                          # a domain's options and published defaults

Every run is seeded: ``--seed`` fixes the initialization and the stream of training tasks; the held-out
validation tasks and the meta-test tasks come from ``--test-seed`` (independent streams), so runs with
different tableaus or training seeds are tested on the very same tasks.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import kernels
from .optim import NonFiniteLossError
from .report import compare_report, compare_rows, step_source, test_report, train_report
from .tableau import Tableau, get_tableau, named_tableaus
from .tasks import Domain, domains, get_domain
from .train import (
    RunResult,
    TrainConfig,
    evaluate_tasks,
    load_run,
    save_checkpoint,
    slug,
    task_chunks,
    task_generator,
    train,
    write_json,
)

__all__ = ["build_parser", "main"]

_OPTION_DEST = "domain_option_"  # argparse dest prefix of a domain's own options


class CommandError(Exception):
    """A problem with the command's inputs found after parsing (a run folder without a checkpoint...):
    reported in one line with exit code 2."""


# -- commands -----------------------------------------------------------------------------------------


def _config(args: argparse.Namespace, tableau: Tableau) -> TrainConfig:
    domain = get_domain(args.domain)
    common = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and k != "tableau"}
    options = {o.name: getattr(args, _OPTION_DEST + o.name) for o in domain.options}
    return TrainConfig(**{**common, "options": options}, tableau=tableau)


def _write_plots(run: RunResult, out: Path) -> list[Path]:
    from . import plots

    makers = {"training.png": plots.plot_training, **run.domain.plots}
    for name, make in makers.items():
        make(run, out / name)
    return [out / name for name in makers]


def cmd_train(args: argparse.Namespace) -> int:
    """``rkfast train DOMAIN``: one run, its table, ``results.json``, ``checkpoint.pt`` and plots."""
    out = Path(args.out or f"runs/{args.domain}-{slug(args.tableau.name)}")
    out.mkdir(parents=True, exist_ok=True)
    run = train(_config(args, args.tableau), progress=not args.quiet)
    print(train_report(run))
    write_json(out / "results.json", run.to_json())
    save_checkpoint(run, out / "checkpoint.pt")
    written = [out / "results.json", out / "checkpoint.pt", *_write_plots(run, out)]
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``rkfast compare DOMAIN``: every tableau with the same seeds; one table, JSON and plot."""
    from . import plots

    out = Path(args.out or f"runs/compare-{args.domain}")
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for tableau in args.tableaus:
        run = train(_config(args, tableau), progress=not args.quiet)
        metric = run.domain.metric
        mean, ci = run.test.summary()[metric.source][run.domain.defaults.test_steps[0]]
        print(f"{tableau.name}: test {metric.short} after {run.domain.defaults.test_steps[0]} step "
              f"{mean:.3f} ± {ci:.3f} ({run.train_time_s:.1f} s)", flush=True)
        runs.append(run)
    print(compare_report(runs))
    write_json(out / "compare.json", {"domain": args.domain, "table": compare_rows(runs),
                                      "runs": [r.to_json() for r in runs]})
    plots.plot_compare(runs, out / "compare.png")
    print(f"wrote {out / 'compare.json'}, {out / 'compare.png'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``rkfast eval RUN_DIR``: meta-test the run's trained model again (other tasks, steps or step size)."""
    run_dir = Path(args.run_dir)
    try:
        cfg, opt, iterations = load_run(run_dir, device=args.device)
    except ValueError as err:
        raise CommandError(str(err)) from None
    domain = get_domain(cfg.domain)
    test_tasks = args.test_tasks or cfg.test_tasks
    test_seed = cfg.test_seed if args.test_seed is None else args.test_seed
    test_step = cfg.test_step if args.test_step is None else args.test_step
    steps = args.steps or domain.defaults.test_steps
    cfg = replace(cfg, test_tasks=test_tasks, test_seed=test_seed, test_step=test_step)
    sampler = domain.make_tasks(cfg.options, "test", opt.device)
    chunks = task_chunks(sampler, test_tasks, domain.defaults.eval_chunk, task_generator(test_seed, "test"))
    result = evaluate_tasks(opt, chunks, steps, test_step)
    summary = result.summary()
    print(f"{run_dir}: {domain.name}, {iterations} meta-steps; {opt.tableau.describe()}")
    print(test_report(domain, cfg, summary, result.losses.shape[1],
                      step_source(cfg, opt.tableau.last_node, args.test_step)))
    out = Path(args.out) if args.out else run_dir / "eval.json"
    write_json(out, {"run": str(run_dir), "domain": domain.name, "iterations": iterations,
                     "config": cfg.to_json(), "test": {"tasks": int(result.losses.shape[1]), "seed": test_seed,
                                                        **domain.test_protocol(cfg.options), **summary}})
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
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not math.isfinite(value) or (minimum is not None and (value < minimum or (strict and value == minimum))):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
        return value

    return parse


def _steps_arg(text: str) -> tuple[int, ...]:
    parse = _number(int, 0, True)
    steps = tuple(sorted({parse(part) for part in text.split(",") if part.strip()}))
    if not steps:
        raise argparse.ArgumentTypeError("no step count given")
    return steps


def _device_arg(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available")
    return text


# -- the parser ---------------------------------------------------------------------------------------


def _add_training_options(p: argparse.ArgumentParser, domain: Domain) -> None:
    d = domain.defaults
    pos_int, count, pos_float = _number(int, 0, True), _number(int, 0, False), _number(float, 0, True)
    for flag, kind, default, text in [
        ("--meta-batch", pos_int, d.meta_batch, "tasks per meta-step"),
        ("--iterations", pos_int, d.iterations, "meta-steps"),
        ("--inner-lr", pos_float, d.inner_lr, "the RK step h of the stages"),
        ("--lr", pos_float, d.lr, "Adam's outer learning rate"),
        ("--seed", int, 0, "seed of the initialization and the training tasks"),
        ("--eval-every", count, d.eval_every, "meta-steps between held-out evaluations (0: at start and end only)"),
        ("--eval-tasks", count, d.eval_tasks, "held-out tasks of those evaluations"),
        ("--test-tasks", pos_int, d.test_tasks, "meta-test tasks"),
        ("--test-seed", int, 0, "seed of the held-out and test tasks"),
        ("--test-step", pos_float, None, "meta-test step size (default: the tableau's h*c_s)"),
        ("--device", _device_arg, "cpu", "torch device"),
    ]:
        p.add_argument(flag, type=kind, default=default, help=text if default is None else f"{text} (default: %(default)s)")
    p.add_argument("--first-order", action="store_true", help="ignore second derivatives (first-order MAML and kin)")
    p.add_argument("--backend", choices=kernels.backend_choices(), default="auto",
                   help="kernels of the stage arithmetic (default: %(default)s: C++ on CPU, Triton on CUDA)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or periodic evaluation lines")
    if domain.options:
        group = p.add_argument_group(f"{domain.name} options")
        for o in domain.options:
            kind = type(o.default)
            parse = _number(kind, 0, True) if kind in (int, float) and o.positive else kind
            group.add_argument(o.flag, dest=_OPTION_DEST + o.name, metavar=o.name.upper(), type=parse,
                               default=o.default, help=f"{o.help} (default: %(default)s)")


def _add_domain_commands(command: argparse.ArgumentParser, compare: bool) -> None:
    by_domain = command.add_subparsers(dest="domain", required=True, metavar="DOMAIN",
                                       title="task domains")
    for domain in domains().values():
        source = f" Defaults: {domain.defaults.source}." if domain.defaults.source else ""
        p = by_domain.add_parser(domain.name, help=domain.description, description=domain.description + "." + source)
        if compare:
            p.add_argument("--tableaus", type=_tableau_list_arg, default=_tableau_list_arg("maml,heun,ralston,rk4"),
                           help="comma-separated tableaus (default: maml,heun,ralston,rk4)")
            p.add_argument("--out", help=f"output folder (default: runs/compare-{domain.name})")
        else:
            p.add_argument("--tableau", type=_tableau_arg, default=_tableau_arg("maml"),
                           help="a name (maml, heun, rk4, ...) or a factory call (maml(3), rk2(0.75)); default: maml")
            p.add_argument("--out", help=f"output folder (default: runs/{domain.name}-<tableau>)")
        _add_training_options(p, domain)


def build_parser() -> argparse.ArgumentParser:
    """The ``rkfast`` argument parser: ``train``/``compare`` per registered domain, ``eval``, ``tableaus``."""
    parser = argparse.ArgumentParser(prog="rkfast", description="Runge-Kutta meta-learning (RK-MAML) in PyTorch.")
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
    ev.add_argument("--test-seed", type=int, help="seed of the test tasks (default: the run's)")
    ev.add_argument("--steps", type=_steps_arg, help="adaptation step counts, e.g. 1,5,10 (default: the domain's)")
    ev.add_argument("--test-step", type=_number(float, 0, True), help="adaptation step size (default: the run's)")
    ev.add_argument("--device", type=_device_arg, help="torch device (default: the run's)")
    ev.add_argument("--out", help="where to write the results (default: RUN_DIR/eval.json)")
    ev.set_defaults(func=cmd_eval)

    tableaus = sub.add_parser("tableaus", help="list the named tableaus")
    tableaus.set_defaults(func=cmd_tableaus)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rkfast`` command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse errors (code 2) and --help (code 0)
        return int(exit_.code or 0)
    try:
        return args.func(args)
    except CommandError as err:
        print(f"rkfast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"rkfast: training diverged: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` & co., which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
