"""The ``rkfast`` command line: train and compare Runge-Kutta meta-learners on sinusoid regression.

::

    rkfast tableaus                                     # the named tableaus, their stages, order, entries
    rkfast train sinusoid --tableau rk4                 # one run: table, results.json, training/test plots
    rkfast compare sinusoid --tableaus maml,heun,rk4    # same seeds for every tableau, one table and plot

Every run is seeded: ``--seed`` fixes the initialization and the stream of training tasks; the held-out
validation tasks and the meta-test tasks come from ``--test-seed`` (independent streams), so runs with
different tableaus or training seeds are tested on the very same tasks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .functional import AdaptationOutput
from .models import sinusoid_mlp
from .optim import MetaOptimizer, NonFiniteLossError
from .tableau import Tableau, get_tableau, named_tableaus
from .tasks.sinusoid import SinusoidBatch, SinusoidTasks

__all__ = ["TrainConfig", "RunResult", "train_sinusoid", "main"]

DEFAULT_ITERATIONS = 20000
TEST_STEPS = (1, 5, 10)
EVAL_CHUNK = 100  # tasks per evaluation batch
LOG_EVERY = 50  # steps between progress-bar postfix updates (one host sync each)
_TRAIN, _VAL, _TEST = 0, 1, 2  # independent random streams


@dataclass
class TrainConfig:
    """Everything that defines a sinusoid run (the CLI options of ``rkfast train sinusoid``)."""

    tableau: str | Tableau = "maml"
    shots: int = 10
    meta_batch: int = 25
    iterations: int = DEFAULT_ITERATIONS
    inner_lr: float = 0.01
    lr: float = 1e-3
    first_order: bool = False
    seed: int = 0
    eval_every: int = 1000
    eval_tasks: int = 100
    test_tasks: int = 600
    test_query_shots: int = 100
    test_seed: int = 0
    test_step: float | None = None
    device: str = "cpu"
    backend: str = "auto"


@dataclass
class RunResult:
    """A finished run: the training curve, the meta-test result and timings (plus the optimizer)."""

    config: TrainConfig
    tableau: Tableau
    losses: list[float]
    evals: list[dict[str, Any]]
    test: AdaptationOutput
    train_time_s: float
    wall_time_s: float
    opt: MetaOptimizer = field(repr=False)
    plot_tasks: SinusoidBatch = field(repr=False)

    @property
    def ms_per_step(self) -> float:
        """Mean wall time of one meta-step (task sampling included, evaluation excluded), in ms."""
        return 1000.0 * self.train_time_s / max(1, len(self.losses))

    def to_json(self) -> dict[str, Any]:
        """The run as plain JSON data (what ``results.json`` holds)."""
        tab = self.tableau
        return {
            "config": asdict(replace(self.config, tableau=tab.name)),
            "backend": self.opt.backend,
            "tableau": {**tab.to_dict(), "order": tab.order, "stages": tab.stages, "describe": tab.describe()},
            "training": {
                "meta_loss": [float(f"{x:.5g}") for x in self.losses],
                "eval": self.evals,
            },
            "test": {
                "tasks": int(self.test.losses.shape[1]),
                "support_shots": self.config.shots,
                "query_shots": self.config.test_query_shots,
                **self.test.summary(),
            },
            "train_time_s": self.train_time_s,
            "wall_time_s": self.wall_time_s,
            "ms_per_meta_step": self.ms_per_step,
        }


# -- the run ------------------------------------------------------------------------------------------


def _generator(seed: int, stream: int) -> torch.Generator:
    """A torch generator for one of the independent random streams of ``seed``."""
    state = np.random.SeedSequence(seed, spawn_key=(stream,)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def _evaluate(
    opt: MetaOptimizer, tasks: list[SinusoidBatch], steps: Sequence[int], step_size: float | None
) -> AdaptationOutput:
    return AdaptationOutput.cat([opt.evaluate(t.batch, steps=steps, step_size=step_size) for t in tasks])


def _task_chunks(tasks: SinusoidTasks, count: int, gen: torch.Generator) -> list[SinusoidBatch]:
    sizes = [min(EVAL_CHUNK, count - i) for i in range(0, count, EVAL_CHUNK)]
    return [tasks.sample_with_params(n, gen) for n in sizes]


def train_sinusoid(
    cfg: TrainConfig, *, progress: bool = True, log: Callable[[str], None] | None = None
) -> RunResult:
    """Meta-train ``sinusoid_mlp()`` with the RK tableau of ``cfg`` and meta-test it.

    Training tasks have ``shots`` support and ``shots`` query points (as in MAML). Every ``eval_every``
    steps (and before the first and after the last) the post-adaptation query MSE of ``eval_tasks``
    held-out tasks is recorded. The final meta-test uses ``test_tasks`` tasks with ``shots`` support and
    ``test_query_shots`` query points, adapted with plain gradient steps of ``test_step`` (default: the
    tableau's ``h * c_s``).

    Args:
        cfg: the run's configuration.
        progress: show a tqdm progress bar with the recent meta-loss.
        log: where the periodic evaluation lines go (default: above the progress bar, or nowhere when
            ``progress`` is off).
    """
    start = time.perf_counter()
    tableau = get_tableau(cfg.tableau)
    if log is None:
        log = tqdm.write if progress else (lambda _: None)
    device = torch.device(cfg.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = sinusoid_mlp().to(device)
    opt = MetaOptimizer(
        model, F.mse_loss, tableau=tableau, inner_lr=cfg.inner_lr, outer="adam", lr=cfg.lr,
        first_order=cfg.first_order, backend=cfg.backend,
    )
    train_tasks = SinusoidTasks(shots=cfg.shots, device=device)
    held_out = SinusoidTasks(shots=cfg.shots, query_shots=cfg.test_query_shots, device=device)
    val = _task_chunks(held_out, cfg.eval_tasks, _generator(cfg.test_seed, _VAL)) if cfg.eval_tasks else []
    gen = _generator(cfg.seed, _TRAIN)

    evals: list[dict[str, Any]] = []

    def evaluate_val(iteration: int) -> float:
        t0 = time.perf_counter()
        if val:
            summary = _evaluate(opt, val, (1, 10), cfg.test_step).summary()["loss"]
            mse = {str(n): mean for n, (mean, _) in summary.items()}
            evals.append({"iteration": iteration, "mse": mse})
            log(f"[{tableau.name}] step {iteration:>6}: held-out query MSE "
                f"{mse['0']:.3f} before, {mse['1']:.3f} after 1 step, {mse['10']:.3f} after 10")
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

    test_sets = _task_chunks(held_out, cfg.test_tasks, _generator(cfg.test_seed, _TEST))
    test = _evaluate(opt, test_sets, TEST_STEPS, cfg.test_step)
    return RunResult(
        cfg, tableau, losses.tolist(), evals, test, train_time, time.perf_counter() - start, opt, test_sets[0]
    )


# -- reporting ----------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, two spaces apart."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _mse(mean_ci: tuple[float, float]) -> str:
    mean, ci = mean_ci
    return f"{mean:.3f} ± {ci:.3f}"


def _test_protocol(cfg: TrainConfig, tasks: int) -> str:
    return (
        f"meta-test on {tasks} tasks (test seed {cfg.test_seed}): {cfg.shots}-shot support, "
        f"{cfg.test_query_shots} query points per task; query MSE after n plain gradient steps on the support set"
    )


def _train_report(run: RunResult) -> str:
    cfg, summary = run.config, run.test.summary()
    source = "--test-step" if cfg.test_step is not None else (
        f"the tableau's h*c_s = {cfg.inner_lr:g}*{run.tableau.last_node:.4g}"
    )
    rows = [[str(n), f"{mean:.4f}", f"± {ci:.4f}"] for n, (mean, ci) in summary["loss"].items()]
    return "\n".join([
        run.tableau.describe(),
        _test_protocol(cfg, run.test.losses.shape[1]),
        f"test step size {summary['step_size']:.4g} ({source})",
        _table(["test steps", "query MSE", "95% CI"], rows),
        f"training: {len(run.losses)} meta-steps in {run.train_time_s:.1f} s "
        f"({run.ms_per_step:.2f} ms per meta-step), wall time {run.wall_time_s:.1f} s",
    ])


def _compare_report(runs: Sequence[RunResult]) -> str:
    headers = ["tableau", "order", "test step", *(f"MSE @{n}" for n in (0, *TEST_STEPS)), "train s", "ms/step"]
    rows = []
    for run in runs:
        s = run.test.summary()
        mse = [_mse(s["loss"][n]) for n in s["steps"]]
        rows.append([run.tableau.name, str(run.tableau.order), f"{s['step_size']:.4g}", *mse,
                     f"{run.train_time_s:.1f}", f"{run.ms_per_step:.2f}"])
    protocol = _test_protocol(runs[0].config, runs[0].test.losses.shape[1])
    return "\n".join([f"{protocol} (± 95% CI; each tableau's test step)", _table(headers, rows)])


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def _slug(name: str) -> str:
    return re.sub(r"[^\w.]+", "-", name).strip("-")


# -- commands -----------------------------------------------------------------------------------------


def _config(args: argparse.Namespace, tableau: Tableau) -> TrainConfig:
    names = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names and k != "tableau"}, tableau=tableau)


def cmd_train(args: argparse.Namespace) -> int:
    """``rkfast train sinusoid``: one run, its table, ``results.json`` and two plots."""
    from . import plots

    cfg = _config(args, args.tableau)
    out = Path(args.out or f"runs/sinusoid-{_slug(args.tableau.name)}")
    out.mkdir(parents=True, exist_ok=True)
    run = train_sinusoid(cfg, progress=not args.quiet)
    print(_train_report(run))
    _write_json(out / "results.json", run.to_json())
    plots.plot_training(run, out / "training.png")
    plots.plot_test_tasks(run, out / "test_tasks.png")
    print(f"wrote {out / 'results.json'}, {out / 'training.png'}, {out / 'test_tasks.png'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``rkfast compare sinusoid``: every tableau with the same seeds; one table, JSON and plot."""
    from . import plots

    out = Path(args.out or "runs/compare-sinusoid")
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for tableau in args.tableaus:
        run = train_sinusoid(_config(args, tableau), progress=not args.quiet)
        mean, ci = run.test.summary()["loss"][1]
        print(f"{tableau.name}: test MSE after 1 step {mean:.3f} ± {ci:.3f} ({run.train_time_s:.1f} s)", flush=True)
        runs.append(run)
    print(_compare_report(runs))
    table = [
        {"tableau": r.tableau.name, "order": r.tableau.order, "test_step": r.test.step_size,
         "loss": r.test.summary()["loss"], "train_time_s": r.train_time_s, "ms_per_meta_step": r.ms_per_step}
        for r in runs
    ]
    _write_json(out / "compare.json", {"table": table, "runs": [r.to_json() for r in runs]})
    plots.plot_compare(runs, out / "compare.png")
    print(f"wrote {out / 'compare.json'}, {out / 'compare.png'}")
    return 0


def cmd_tableaus(args: argparse.Namespace) -> int:
    """``rkfast tableaus``: every named tableau with its stages, order and entries."""
    for tab in named_tableaus().values():
        print(tab.describe())
    print("factories: maml(steps), rk2(c), maml_msl(w1, ..., ws); e.g. --tableau 'maml(3)'")
    return 0


# -- argument parsing ---------------------------------------------------------------------------------


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


def _number(kind: type, minimum: float, strict: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
        return value

    return parse


def _device_arg(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available")
    return text


def _add_training_options(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    pos_int, count, pos_float = _number(int, 0, True), _number(int, 0, False), _number(float, 0, True)
    p.add_argument("task", choices=["sinusoid"], help="the task family")
    for flag, kind, default, text in [
        ("--shots", pos_int, d.shots, "support (and training query) points per task"),
        ("--meta-batch", pos_int, d.meta_batch, "tasks per meta-step"),
        ("--iterations", pos_int, d.iterations, "meta-steps"),
        ("--inner-lr", pos_float, d.inner_lr, "the RK step h of the stages"),
        ("--lr", pos_float, d.lr, "Adam's outer learning rate"),
        ("--seed", int, d.seed, "seed of the initialization and the training tasks"),
        ("--eval-every", count, d.eval_every, "meta-steps between held-out evaluations (0: at start and end only)"),
        ("--eval-tasks", count, d.eval_tasks, "held-out tasks of those evaluations"),
        ("--test-tasks", pos_int, d.test_tasks, "meta-test tasks"),
        ("--test-query-shots", pos_int, d.test_query_shots, "query points per held-out and test task"),
        ("--test-seed", int, d.test_seed, "seed of the held-out and test tasks"),
        ("--test-step", pos_float, None, "meta-test step size (default: the tableau's h*c_s)"),
        ("--device", _device_arg, d.device, "torch device"),
    ]:
        help_text = text if default is None else f"{text} (default: %(default)s)"
        p.add_argument(flag, type=kind, default=default, help=help_text)
    p.add_argument("--first-order", action="store_true", help="ignore second derivatives (first-order MAML and kin)")
    p.add_argument("--backend", choices=("auto", "torch", "cpp", "triton"), default=d.backend,
                   help="kernels of the stage arithmetic (default: %(default)s: C++ on CPU, Triton on CUDA)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or periodic evaluation lines")


def build_parser() -> argparse.ArgumentParser:
    """The ``rkfast`` argument parser with its ``train``, ``compare`` and ``tableaus`` subcommands."""
    parser = argparse.ArgumentParser(prog="rkfast", description="Runge-Kutta meta-learning (RK-MAML) in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,compare,tableaus}")

    train = sub.add_parser("train", help="meta-train one tableau and meta-test it")
    train.add_argument("--tableau", type=_tableau_arg, default=_tableau_arg("maml"),
                       help="a name (maml, heun, rk4, ...) or a factory call (maml(3), rk2(0.75)); default: maml")
    train.add_argument("--out", help="output folder (default: runs/sinusoid-<tableau>)")
    _add_training_options(train)
    train.set_defaults(func=cmd_train)

    compare = sub.add_parser("compare", help="meta-train several tableaus with the same seeds and compare them")
    compare.add_argument("--tableaus", type=_tableau_list_arg, default=_tableau_list_arg("maml,heun,ralston,rk4"),
                         help="comma-separated tableaus (default: maml,heun,ralston,rk4)")
    compare.add_argument("--out", help="output folder (default: runs/compare-sinusoid)")
    _add_training_options(compare)
    compare.set_defaults(func=cmd_compare)

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
    except NonFiniteLossError as err:
        print(f"rkfast: training diverged: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` & co., which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
