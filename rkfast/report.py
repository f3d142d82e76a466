"""Plain-text tables of runs: one run's meta-test, a comparison of tableaus, a re-evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .results import AdaptationOutput, count_nonfinite, mean_ci95
from .tableau import Tableau
from .tasks import Domain
from .train import RunResult, TrainConfig, describe_learned_tableau, describe_rates, selection_warning

__all__ = [
    "table",
    "train_report",
    "compare_report",
    "test_report",
    "checkpoint_line",
    "compare_rows",
    "run_line",
    "step_source",
    "rates_line",
    "GridGroup",
    "pooled_summary",
    "pooled_tables",
    "t_quantile_975",
    "grid_report",
    "grid_rows",
    "selection_line",
    "SPREAD_NOTE",
    "paired_tables",
    "paired_summary",
    "PAIRED_NOTE",
]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, two spaces apart."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _protocol(domain: Domain, cfg: TrainConfig, tasks: int, adaptation: str = "gradient") -> str:
    described = domain.describe_test(cfg.options)
    steps = "plain gradient steps" if adaptation == "gradient" else "adaptation steps (each: the tableau's stages)"
    return (
        f"meta-test on {tasks} tasks (test seed {cfg.test_seed}): {described + '; ' if described else ''}"
        f"{domain.metric.label} after n {steps} on the support set"
    )


def _learned_rates_used(cfg: TrainConfig) -> bool:
    """Whether the meta-test of ``cfg`` (its ``test_step`` the one used) adapts with the learned rates."""
    return getattr(cfg, "learn_rates", None) is not None and cfg.test_step is None


def _rates_name(cfg: TrainConfig) -> str:
    return f"{cfg.learn_rates}{', per stage' if cfg.per_stage_rates else ''}"


def rates_line(info: Mapping[str, Any] | None) -> str | None:
    """One line on the learned rates (:func:`~rkfast.train.rates_info`), or ``None`` when none are learned."""
    return describe_rates(info)


def test_report(
    domain: Domain,
    cfg: TrainConfig,
    summary: Mapping[str, Any],
    tasks: int,
    step_source: str,
    adaptation: str = "gradient",
    output: AdaptationOutput | None = None,
) -> str:
    """The protocol, the step size and a table of every metric after each number of adaptation steps.

    With learned inner rates (and no ``test_step``) the step line says that the adaptation used them, times
    the tableau's test-step factor (``summary["step_size"]``). Where some tasks are NaN or infinite
    (``summary["nonfinite"]``), that metric gets two more columns, its finite tasks and (with the per-task
    ``output``) their median, and a warning line below the table names the cause and the flag."""
    nonfinite = summary.get("nonfinite", {})
    headers = ["test steps"]
    for m in domain.metrics:
        headers += [m.label, "95% CI", *(["finite", "median"] if m.source in nonfinite else [])]
    rows = []
    for n in summary["steps"]:
        row = [str(n)]
        for m in domain.metrics:
            mean, ci = summary[m.source][n]
            row += [f"{mean:.4f}", f"± {ci:.4f}"]
            if m.source in nonfinite:
                row += [f"{tasks - nonfinite[m.source][n]}/{tasks}", _finite_median(output, m.source, n)]
        rows.append(row)
    step = (
        f"test step: the learned inner rates ({_rates_name(cfg)}) x {summary['step_size']:.4g} ({step_source})"
        if _learned_rates_used(cfg)
        else f"test step size {summary['step_size']:.4g} ({step_source})"
    )
    warning = _divergence_warning(domain, cfg, nonfinite)
    return "\n".join([_protocol(domain, cfg, tasks, adaptation), step, table(headers, rows), *warning])


def _finite_median(output: AdaptationOutput | None, source: str, steps: int) -> str:
    """The median over the tasks whose ``source`` value after ``steps`` steps is finite ("-" without any)."""
    if output is None:
        return "-"
    values = (output.losses if source == "loss" else output.metrics[source])[output.steps.index(steps)]
    finite = values[torch.isfinite(values)]
    return f"{finite.double().median().item():.4f}" if finite.numel() else "-"


def _divergence_warning(domain: Domain, cfg: TrainConfig, nonfinite: Mapping[str, Mapping[int, int]]) -> list[str]:
    """One line when the test adaptation diverged on some tasks: after which step counts, the likely cause
    (learned rates are trained for the steps the run takes; else the step size) and the flag to change."""
    counts = nonfinite.get(domain.metric.source, {})
    diverged = [n for n, c in counts.items() if c]
    if not diverged:
        return []
    trained = cfg.settings().tableau.adaptation_steps
    cause = (
        f"the learned rates are trained for {trained} step{'s' if trained != 1 else ''}, and repeating them diverges"
        if _learned_rates_used(cfg)
        else "the step is too large for that many steps"
    )
    return [
        f"warning: the test adaptation diverged (NaN or infinite {domain.metric.short}) on some tasks after "
        f"{', '.join(map(str, diverged))} step(s), so the mean there is not finite: {cause}; finite is the "
        "count of finite tasks, median their median; a smaller --test-step keeps the adaptation finite"
    ]


def checkpoint_line(checkpoint: str, selected_by: Mapping[str, Any] | None) -> str:
    """Which checkpoint a re-evaluation read: ``best.pt`` with the held-out evaluation that picked it (its
    iteration, metric, step count and value)."""
    if selected_by is None:
        return checkpoint
    steps = selected_by.get("steps")
    after = f" after {steps} step{'s' if steps != 1 else ''}" if steps is not None else ""
    value = selected_by.get("value")
    shown = f" = {value:.4g}" if isinstance(value, float) else ""
    return (
        f"{checkpoint}: chosen at iteration {selected_by['iteration']} by the held-out "
        f"{selected_by.get('metric', 'primary metric')}{after}{shown}"
    )


def step_source(run_cfg: TrainConfig, tableau: Tableau, test_step: float | None, adaptation: str = "gradient") -> str:
    """Where the meta-test step size came from, in words (``adaptation="stages"``: each step is the tableau's
    stages, :meth:`~rkfast.optim.MetaOptimizer.evaluate`)."""
    learned = getattr(run_cfg, "learn_rates", None) is not None
    if adaptation == "stages":
        what = (
            "--test-step as h"
            if test_step is not None
            else ("the learned rates" if learned else f"h = {run_cfg.inner_lr:g}")
        )
        return f"each step is the tableau's stages up to its last stage's point, with {what}, docs/method.md"
    if test_step is not None:
        return "--test-step, in place of the learned rates" if learned else "--test-step"
    if learned:
        return "the tableau's test-step factor, docs/method.md"
    which = "the learned tableau's" if getattr(run_cfg, "learn_tableau", None) is not None else "the tableau's"
    return f"{which} own step at h = {run_cfg.inner_lr:g}, docs/method.md"


def train_report(run: RunResult) -> str:
    """What ``rkfast train`` prints: the tableau, the meta-test table, the learned rates and the training time."""
    cfg, test = run.config, run.meta_test()
    rates, learned = rates_line(run.rates), describe_learned_tableau(run.learned_tableau)
    tableau = run.opt.current_tableau()  # the learned one at its final values, if any
    return "\n".join(
        [
            tableau.describe(),
            test_report(
                run.domain,
                cfg,
                test.summary(),
                test.losses.shape[1],
                step_source(cfg, tableau, cfg.test_step),
                output=test,
            ),
            *([rates] if rates else []),
            *([learned] if learned else []),
            f"training: {len(run.losses)} meta-steps in {run.train_time_s:.1f} s "
            f"({run.ms_per_step:.2f} ms per meta-step), wall time {run.wall_time_s:.1f} s",
            *([selection] if (selection := selection_warning(run)) else []),
        ]
    )


def _mean_ci(mean_ci: tuple[float, float]) -> str:
    mean, ci = mean_ci
    return f"{mean:.3f} ± {ci:.3f}"


def _not_tested(run: RunResult) -> str:
    return f"{run.status} at step {run.iteration + (run.status == 'diverged')}"


def run_line(run: RunResult) -> str:
    """One line per finished (or diverged) run of a comparison."""
    name = run.opt.current_tableau().name
    if run.test is None:
        return f"{name}: {_not_tested(run)}: {run.error or ''} ({run.train_time_s:.1f} s)"
    metric, first = run.domain.metric, run.defaults.test_steps[0]
    mean, ci = run.test.summary()[metric.source][first]
    extra = [x for x in (rates_line(run.rates), describe_learned_tableau(run.learned_tableau)) if x]
    return (
        f"{name}: test {metric.short} after {first} step {mean:.3f} ± {ci:.3f} "
        f"({run.train_time_s:.1f} s){''.join('; ' + x for x in extra)}"
    )


def compare_report(runs: Sequence[RunResult]) -> str:
    """What ``rkfast compare`` prints: one row per tableau, the primary metric after each step count
    (a diverged tableau's row says where it diverged), then each tableau's paired difference to the first
    (:func:`paired_summary`)."""
    domain = runs[0].domain
    metric, steps = domain.metric, (0, *runs[0].defaults.test_steps)
    headers = ["tableau", "order", "test step", *(f"{metric.short} @{n}" for n in steps), "train s", "ms/step"]
    rows = []
    for run in runs:
        if run.test is None:
            cells = [_not_tested(run), *([""] * (len(steps) - 1))]
            step = f"{run.tableau.test_step(run.config.settings().inner_lr):.4g}"
        else:
            s = run.test.summary()
            cells = [_mean_ci(s[metric.source][n]) for n in s["steps"]]
            step = f"rates x {s['step_size']:.4g}" if _learned_rates_used(run.config) else f"{s['step_size']:.4g}"
        current = run.opt.current_tableau()  # a learned tableau: its name and order at its final values
        rows.append(
            [current.name, str(current.order), step, *cells, f"{run.train_time_s:.1f}", f"{run.ms_per_step:.2f}"]
        )
    tested = [r for r in runs if r.test is not None]
    tasks = tested[0].meta_test().losses.shape[1] if tested else runs[0].config.settings().test_tasks
    protocol = _protocol(domain, runs[0].config, tasks)
    named = _single_pairs(runs)
    return "\n".join(
        [f"{protocol} (± 95% CI; each tableau's test step)", table(headers, rows), _paired_section(named, named[0][0])]
    )


def compare_rows(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """The comparison as JSON rows: tableau, order, status, test step, every metric's summary, the paired
    difference to the first tableau (``paired_difference``: :func:`paired_summary`, ``None`` when either has no
    meta-test), timings; where some test tasks are NaN or infinite, ``nonfinite``: ``{name: {step: count}}``
    (:meth:`~rkfast.results.AdaptationOutput.nonfinite`)."""
    rows = []
    for r, (_, pairs) in zip(runs, _single_pairs(runs), strict=True):
        row: dict[str, Any] = {
            "tableau": r.tableau.name,
            "order": r.tableau.order,
            "status": r.status,
            "iteration": r.iteration,
        }
        if r.test is not None:
            s = r.test.summary()
            row["test_step"] = r.test.step_size
            row.update({m.source: s[m.source] for m in r.domain.metrics})
            row["loss"] = s["loss"]
            if "nonfinite" in s:  # tasks whose value is NaN or infinite: {name: {step: count}}
                row["nonfinite"] = s["nonfinite"]
        else:
            row["error"] = r.error
        row["paired_difference"] = _paired_json(pairs, runs[0].tableau.name)
        row.update(train_time_s=r.train_time_s, ms_per_meta_step=r.ms_per_step)
        rows.append(row)
    return rows


# -- comparisons over a grid of inner steps and several seeds -------------------------------------------

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)

SPREAD_NOTE = (
    "seed spread: ± the 95% CI of the mean of the per-seed means (Student t, n-1 dof), with the per-seed min..max"
)


def t_quantile_975(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` >= 1 degrees of freedom (the half-width factor of a
    two-sided 95% interval): tabulated to 30, then ``1.96 + 2.4 / dof`` (within 0.002 of the exact value)."""
    if dof < 1:
        raise ValueError(f"Student's t needs at least 1 degree of freedom, got {dof}")
    return _T975[dof - 1] if dof <= len(_T975) else 1.96 + 2.4 / dof


@dataclass
class GridGroup:
    """One tableau of a comparison over a grid of inner steps and seeds (``rkfast compare --inner-lr H,H,...
    --seeds S,S,...``).

    Attributes:
        tableau: the tableau.
        grid, seeds: the inner steps h tried and the training seeds (the first seed trains every h).
        search: ``{h: run}`` of the first seed (the selection runs).
        scores: ``{h: final held-out score or None}`` (``None``: diverged or no held-out result).
        selected: the selected h (``None`` when every h diverged: the tableau is reported as diverged).
        runs: ``{seed: run}`` with the selected h, every seed (the first seed's is its search run).
        folders: ``{(h, seed): folder relative to the comparison folder}``.
        select_steps: the held-out adaptation step count the scores are taken after (``None``: the domain's
            last evaluation step count).
    """

    tableau: Tableau
    grid: tuple[float, ...]
    seeds: tuple[int, ...]
    search: dict[float, RunResult] = field(default_factory=dict)
    scores: dict[float, float | None] = field(default_factory=dict)
    selected: float | None = None
    runs: dict[int, RunResult] = field(default_factory=dict)
    folders: dict[tuple[float, int], str] = field(default_factory=dict)
    select_steps: int | None = None

    def all_runs(self) -> Iterator[tuple[str, RunResult]]:
        """``(folder, run)`` of every run so far: the search runs in grid order, then the other seeds."""
        for h, run in self.search.items():
            yield self.folders.get((h, self.seeds[0]), ""), run
        for seed, run in self.runs.items():
            if seed != self.seeds[0]:  # run with the selected h
                yield "" if self.selected is None else self.folders.get((self.selected, seed), ""), run

    @property
    def tested(self) -> list[RunResult]:
        """The runs with the selected h that completed their meta-test, in seed order."""
        return [r for s in self.seeds if (r := self.runs.get(s)) is not None and r.test is not None]


def _metric_table(run: RunResult) -> torch.Tensor:
    """The primary metric of the run's meta-test per task, ``[steps, tasks]``."""
    source, test = run.domain.metric.source, run.meta_test()
    return test.losses if source == "loss" else test.metrics[source]


def pooled_summary(runs: Sequence[RunResult]) -> dict[int, dict[str, Any]]:
    """Per adaptation step count, the primary metric over the meta-test of every run (seed) given:
    ``mean`` and ``ci95`` over all seeds x test tasks (the normal 95% CI of :func:`~rkfast.results.mean_ci95`),
    ``n`` (seeds x tasks), and the seed-to-seed spread: ``seed_means``, ``seed_ci95`` (the Student-t 95% CI
    half-width of the mean of the seed means, n-1 dof; ``None`` with one seed), ``seed_min``, ``seed_max``;
    where some tasks are NaN or infinite (the mean is then non-finite), ``nonfinite``: their number."""
    if not runs:
        return {}
    return pooled_tables([_metric_table(r) for r in runs], runs[0].meta_test().steps)


def pooled_tables(tables: Sequence[torch.Tensor], steps: Sequence[int]) -> dict[int, dict[str, Any]]:
    """:func:`pooled_summary` of per-seed tables ``[len(steps), tasks]`` of the metric (row ``i``: after
    ``steps[i]`` adaptation steps)."""
    tables = [t.detach().double().cpu() for t in tables]
    out: dict[int, dict[str, Any]] = {}
    for i, n in enumerate(steps):
        pooled = torch.cat([t[i] for t in tables])
        mean, ci = mean_ci95(pooled)
        means = [float(t[i].mean()) for t in tables]
        out[int(n)] = {
            "mean": mean,
            "ci95": ci,
            "n": int(pooled.numel()),
            "seed_means": means,
            "seed_ci95": _seed_ci95(means),
            "seed_min": min(means),
            "seed_max": max(means),
        }
        nonfinite = count_nonfinite(pooled)
        if nonfinite:  # the tasks that make the mean non-finite
            out[int(n)]["nonfinite"] = nonfinite
    return out


def _seed_ci95(means: Sequence[float]) -> float | None:
    """The Student-t 95% CI half-width of the mean of per-seed means (n-1 dof); ``None`` with one seed."""
    if len(means) < 2:
        return None
    sd = float(torch.tensor(means, dtype=torch.float64).std())
    return t_quantile_975(len(means) - 1) * sd / math.sqrt(len(means))


def paired_tables(
    tables: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], steps: Sequence[int]
) -> dict[int, dict[str, Any]]:
    """The paired difference ``tables[s] - reference[s]``, task by task, of per-seed tables ``[len(steps),
    tasks]`` measured on the same test tasks (the same index is the same task), per adaptation step count.

    Only the tasks finite in both tables pair. Per step count: ``mean`` and ``ci95`` of the differences over
    seeds x tasks (the normal 95% CI of :func:`~rkfast.results.mean_ci95`; both ``None`` without a pair),
    ``n`` the pairs, ``nonfinite`` the tasks left out, and over the seeds: ``seed_means`` (each seed's mean
    difference, seeds with pairs) and ``seed_ci95`` (their Student-t 95% CI, as :func:`pooled_tables`'s;
    ``None`` with one seed). A table minus itself is exactly 0 with a CI of 0.

    Raises:
        ValueError: a different number of seeds, or tables of different shapes (not the same tasks).
    """
    if len(tables) != len(reference):
        raise ValueError(
            f"paired differences need a reference table per seed: {len(tables)} tables, "
            f"{len(reference)} reference tables"
        )
    pairs = []
    for table_, ref in zip(tables, reference, strict=True):
        if table_.shape != ref.shape:
            raise ValueError(
                f"paired differences need the same test tasks: tables of shapes {tuple(table_.shape)} "
                f"and {tuple(ref.shape)}"
            )
        table_, ref = table_.detach().double().cpu(), ref.detach().double().cpu()
        pairs.append((table_ - ref, torch.isfinite(table_) & torch.isfinite(ref)))
    out: dict[int, dict[str, Any]] = {}
    for i, n in enumerate(steps):
        per_seed = [diff[i][finite[i]] for diff, finite in pairs]
        pooled = torch.cat(per_seed)
        mean, ci = mean_ci95(pooled) if pooled.numel() else (None, None)
        means = [float(d.mean()) for d in per_seed if d.numel()]
        tasks = sum(int(diff[i].numel()) for diff, _ in pairs)
        out[int(n)] = {
            "mean": mean,
            "ci95": ci,
            "n": int(pooled.numel()),
            "nonfinite": tasks - int(pooled.numel()),
            "seed_means": means,
            "seed_ci95": _seed_ci95(means),
        }
    return out


PAIRED_NOTE = (
    "per test task, this tableau's primary metric minus the reference's (the first tableau) on the "
    "same task (same test_seed), after each adaptation step count, over the tasks finite in both "
    "(nonfinite: tasks left out); mean and 95% CI over seeds x tasks (normal), seed_ci95: the 95% CI "
    "of the per-seed mean differences (Student t, n-1 dof)"
)

_Pairs = Sequence[tuple[RunResult, RunResult]]  # (run, the reference's run) per seed, both meta-tested


def paired_summary(pairs: _Pairs) -> dict[int, dict[str, Any]]:
    """:func:`paired_tables` of the primary metric of runs minus their reference runs, one pair per seed,
    every pair meta-tested on the same test tasks (``ValueError`` otherwise)."""
    for run, ref in pairs:
        if run.test is None or ref.test is None:
            raise ValueError("paired differences need runs with a meta-test")
        if run.config.test_seed != ref.config.test_seed or run.test.steps != ref.test.steps:
            raise ValueError(
                f"paired differences need the same test tasks and step counts: test seeds "
                f"{run.config.test_seed} and {ref.config.test_seed}, steps {run.test.steps} and "
                f"{ref.test.steps}"
            )
    return paired_tables(
        [_metric_table(r) for r, _ in pairs], [_metric_table(ref) for _, ref in pairs], pairs[0][0].meta_test().steps
    )


def _paired_json(pairs: _Pairs, reference: str) -> dict[str, Any] | None:
    if not pairs:
        return None
    run = pairs[0][0]
    return {
        "reference": reference,
        "metric": run.domain.metric.name,
        "seeds": [r.config.seed for r, _ in pairs],
        "tasks_per_seed": int(_metric_table(run).shape[1]),
        "steps": {str(n): v for n, v in paired_summary(pairs).items()},
        "note": PAIRED_NOTE,
    }


def _single_pairs(runs: Sequence[RunResult]) -> list[tuple[str, list[tuple[RunResult, RunResult]]]]:
    """``(row name, pairs)`` of a comparison with one run per tableau; the reference is the first run."""
    if not runs:
        return []
    ref = runs[0]
    return [
        (r.opt.current_tableau().name, [(r, ref)] if r.test is not None and ref.test is not None else []) for r in runs
    ]


def _grid_pairs(groups: Sequence[GridGroup]) -> list[tuple[str, list[tuple[RunResult, RunResult]]]]:
    """``(row name, pairs)`` of a grid comparison: each seed's run with the selected h and the first
    tableau's run of the same seed, where both were meta-tested."""
    ref = groups[0].runs if groups else {}
    return [
        (
            g.tableau.name,
            [
                (g.runs[s], ref[s])
                for s in g.seeds
                if s in g.runs and s in ref and g.runs[s].test is not None and ref[s].test is not None
            ],
        )
        for g in groups
    ]


def _paired_cell(stats: Mapping[str, Any]) -> str:
    if stats["mean"] is None:
        return "no finite pair"
    cell = f"{stats['mean']:+.3f} ± {stats['ci95']:.3f}"
    return cell if stats["seed_ci95"] is None else f"{cell} (± {stats['seed_ci95']:.3f})"


def _paired_section(named: Sequence[tuple[str, _Pairs]], reference: str) -> str:
    """The table of each tableau's paired difference to ``reference`` (:func:`paired_summary`)."""
    first = next((pairs[0][0] for _, pairs in named if pairs), None)
    if first is None:
        return f"paired differences to {reference}: none ({reference} has no meta-test)"
    metric, steps = first.domain.metric, first.meta_test().steps
    headers = ["tableau", "pairs", *(f"Δ{metric.short} @{n}" for n in steps)]
    rows = []
    for name, pairs in named:
        if not pairs:
            rows.append([name, "", "no meta-test", *([""] * (len(steps) - 1))])
            continue
        stats = paired_summary(pairs)
        total = sum(int(_metric_table(r).shape[1]) for r, _ in pairs)
        rows.append([name, f"{min(v['n'] for v in stats.values())}/{total}", *(_paired_cell(stats[n]) for n in steps)])
    several = any(len(pairs) > 1 for _, pairs in named)
    over = "seeds x tasks (± the 95% CI of the per-seed mean differences, Student t, n-1 dof)" if several else "tasks"
    title = (
        f"paired difference to {reference} on the same test tasks: per task, tableau - {reference} "
        f"({metric.label}); mean ± 95% CI over {over}; pairs: tasks finite in both (the fewest over step counts)"
    )
    return "\n".join([title, table(headers, rows)])


def score_verdict(run: RunResult | None, steps: int) -> str:
    """Why a run has no validation score after ``steps`` adaptation steps, judged on that step count: ``"not
    run"``, the run's status (``"diverged"``: training itself diverged), ``"no held-out result"``, or
    ``"non-finite on k/N tasks"`` (training completed; the held-out metric after ``steps`` steps is not
    finite)."""
    if run is None:
        return "not run"
    if run.status != "complete":
        return run.status
    if not run.evals or run.evals[-1]["iteration"] != run.iteration:
        return "no held-out result"
    last = run.evals[-1]
    bad = last.get("nonfinite", {}).get(run.domain.metric.name, {}).get(str(steps))
    return f"non-finite on {bad}/{run.config.settings().eval_tasks} tasks" if bad else "non-finite"


def _no_selection(group: GridGroup, steps: int) -> str:
    """Why no h was selected: every run diverged, or (judged on the selecting step count) no held-out score
    after ``steps`` steps is finite, naming the step counts where one is."""
    if all(run.status == "diverged" for run in group.search.values()):
        return "every h diverged"
    name = next(iter(group.search.values())).domain.metric.name
    finite = sorted(
        {
            int(n)
            for run in group.search.values()
            if run.evals
            for n, v in run.evals[-1][name].items()
            if v is not None and math.isfinite(v) and int(n) in run.defaults.eval_steps
        }
    )
    hint = f" (finite after {', '.join(map(str, finite))}: select on that step count)" if finite else ""
    return f"no h has a finite held-out score after {steps} step{'s' * (steps != 1)}: none selected{hint}"


def selection_line(group: GridGroup, steps: int | None) -> str:
    """One line on how a tableau's h was selected: the validation score of each h after ``steps`` adaptation
    steps (``None``: the domain's last evaluation step count), and the choice; an h without a score says why
    (:func:`score_verdict`, judged on that step count)."""
    if not group.search:
        return f"{group.tableau.name}: no runs"
    first = next(iter(group.search.values()))
    metric = first.domain.metric
    steps = first.defaults.eval_steps[-1] if steps is None else steps
    scores = ", ".join(
        f"h={h:g} {score_verdict(group.search.get(h), steps) if v is None else f'{v:.4g}'}"
        for h, v in group.scores.items()
    )
    choice = _no_selection(group, steps) if group.selected is None else f"selected h={group.selected:g}"
    return (
        f"{group.tableau.name}: final held-out {metric.short} after {steps} step{'s' * (steps != 1)} "
        f"(seed {group.seeds[0]}): {scores}; {choice}"
    )


def _unselected(group: GridGroup) -> str:
    """A table's short word for a tableau without a selected h: ``"every h diverged"``, or ``"no finite
    score @n"`` (judged on the selecting step count n)."""
    steps = group.select_steps
    if steps is None and group.search:
        steps = next(iter(group.search.values())).defaults.eval_steps[-1]
    if not group.search or all(run.status == "diverged" for run in group.search.values()):
        return "every h diverged"
    return f"no finite score @{steps}"


def _cell(stats: Mapping[str, Any]) -> str:
    cell = f"{stats['mean']:.3f} ± {stats['ci95']:.3f}"
    if stats["seed_ci95"] is not None:
        cell += f" (± {stats['seed_ci95']:.3f})"
    return cell


def grid_report(groups: Sequence[GridGroup]) -> str:
    """What ``rkfast compare`` prints over a grid and seeds: one row per tableau with the selected h, the
    primary metric after each step count (mean over seeds x test tasks ± 95% CI, and in parentheses the
    seed-to-seed 95% t-interval), the runs that completed, and the training time per run and in all (the
    selection runs included). A tableau whose every h diverged is a diverged row. Below, each tableau's paired
    difference to the first (:func:`paired_summary`, seed by seed)."""
    first = next((r for g in groups for _, r in g.all_runs()), None)
    if first is None:
        return "no runs"
    domain, metric = first.domain, first.domain.metric
    steps = (0, *first.defaults.test_steps)
    headers = [
        "tableau",
        "order",
        "h",
        "test step",
        "seeds",
        *(f"{metric.short} @{n}" for n in steps),
        "train s/run",
        "train s all",
    ]
    rows = []
    for g in groups:
        every = [r for _, r in g.all_runs()]
        total = f"{sum(r.train_time_s for r in every):.1f}"
        tested = g.tested
        if not tested:
            why = "diverged" if g.selected is not None else _unselected(g)
            cells = [why, *([""] * (len(steps) - 1))]
            rows.append(
                [
                    g.tableau.name,
                    str(g.tableau.order),
                    "" if g.selected is None else f"{g.selected:g}",
                    "",
                    f"0/{len(g.seeds)}",
                    *cells,
                    "",
                    total,
                ]
            )
            continue
        pooled = pooled_summary(tested)
        s = tested[0].meta_test().summary()
        step = f"rates x {s['step_size']:.4g}" if _learned_rates_used(tested[0].config) else f"{s['step_size']:.4g}"
        cells = [_cell(pooled[n]) for n in s["steps"]]
        per_run = sum(r.train_time_s for r in tested) / len(tested)
        rows.append(
            [
                g.tableau.name,
                str(g.tableau.order),
                f"{g.selected:g}",
                step,
                f"{len(tested)}/{len(g.seeds)}",
                *cells,
                f"{per_run:.1f}",
                total,
            ]
        )
    tasks = first.config.settings().test_tasks
    seeds = groups[0].seeds
    lrs = groups[0].grid
    protocol = _protocol(domain, first.config, tasks)
    how = (
        f"h selected per tableau from {', '.join(f'{h:g}' for h in lrs)} on the final held-out "
        f"{metric.short} of seed {seeds[0]}"
        if len(lrs) > 1
        else f"h = {lrs[0]:g}"
    )
    return "\n".join(
        [
            f"{protocol}; {how}; seeds {', '.join(map(str, seeds))}",
            "cells: mean over seeds x test tasks ± 95% CI (± seed-to-seed spread: the 95% CI of the mean of the "
            "per-seed means, Student t, n-1 dof; per-seed min..max in compare.json)",
            table(headers, rows),
            _paired_section(_grid_pairs(groups), groups[0].tableau.name),
        ]
    )


def grid_rows(groups: Sequence[GridGroup]) -> list[dict[str, Any]]:
    """A grid comparison as JSON rows, one per tableau: status, the validation score of every h, the selected h,
    the seeds and their runs' statuses, every metric's pooled summary per step count (:func:`pooled_summary`
    for the primary metric, as ``{step: {...}}`` under its name), the paired difference to the first tableau
    over the seeds both meta-tested (``paired_difference``: :func:`paired_summary`, ``None`` without a pair),
    and the training times."""
    rows = []
    for g, (_, pairs) in zip(groups, _grid_pairs(groups), strict=True):
        tested = g.tested
        every = [r for _, r in g.all_runs()]
        if len(g.search) < len(g.grid) or (g.selected is not None and len(g.runs) < len(g.seeds)):
            status = "running"  # or interrupted: the comparison's own status says which
        else:
            status = "complete" if tested else ("diverged" if _unselected(g) == "every h diverged" else "not selected")
        row: dict[str, Any] = {
            "tableau": g.tableau.name,
            "order": g.tableau.order,
            "status": status,
            "validation": [
                {"inner_lr": h, "value": g.scores.get(h), "status": g.search[h].status if h in g.search else "not run"}
                for h in g.grid
            ],
            "selected_inner_lr": g.selected,
            "seeds": list(g.seeds),
            "seed_status": {str(s): g.runs[s].status for s in g.seeds if s in g.runs},
        }
        if tested:
            metric = tested[0].domain.metric
            pooled = pooled_summary(tested)
            test = tested[0].meta_test()
            row["test_step"] = test.step_size
            row["tasks_per_seed"] = int(test.losses.shape[1])
            row["metric"] = metric.name
            row[metric.name] = {str(n): v for n, v in pooled.items()}
            row["spread"] = SPREAD_NOTE
        row["paired_difference"] = _paired_json(pairs, groups[0].tableau.name)
        row["train_time_s_per_run"] = (sum(r.train_time_s for r in tested) / len(tested)) if tested else None
        row["train_time_s_total"] = sum(r.train_time_s for r in every)
        row["ms_per_meta_step"] = (sum(r.ms_per_step for r in tested) / len(tested)) if tested else None
        rows.append(row)
    return rows
