"""Plain-text tables of runs: one run's meta-test, a comparison of tableaus, a re-evaluation."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .tableau import Tableau
from .tasks import Domain
from .train import RunResult, TrainConfig, describe_rates

__all__ = ["table", "train_report", "compare_report", "test_report", "compare_rows", "run_line", "step_source",
           "rates_line"]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, two spaces apart."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _protocol(domain: Domain, cfg: TrainConfig, tasks: int) -> str:
    described = domain.describe_test(cfg.options)
    return (f"meta-test on {tasks} tasks (test seed {cfg.test_seed}): {described + '; ' if described else ''}"
            f"{domain.metric.label} after n plain gradient steps on the support set")


def _learned_rates_used(cfg: TrainConfig) -> bool:
    """Whether the meta-test of ``cfg`` (its ``test_step`` the one used) adapts with the learned rates."""
    return getattr(cfg, "learn_rates", None) is not None and cfg.test_step is None


def _rates_name(cfg: TrainConfig) -> str:
    return f"{cfg.learn_rates}{', per stage' if cfg.per_stage_rates else ''}"


def rates_line(info: Mapping[str, Any] | None) -> str | None:
    """One line on the learned rates (:func:`~rkfast.train.rates_info`), or ``None`` when none are learned."""
    return describe_rates(info)


def test_report(domain: Domain, cfg: TrainConfig, summary: Mapping[str, Any], tasks: int, step_source: str) -> str:
    """The protocol, the step size and a table of every metric after each number of adaptation steps.

    With learned inner rates (and no ``test_step``) the step line says that the adaptation used them, times
    the tableau's test-step factor (``summary["step_size"]``)."""
    headers = ["test steps"]
    for m in domain.metrics:
        headers += [m.label, "95% CI"]
    rows = []
    for n in summary["steps"]:
        row = [str(n)]
        for m in domain.metrics:
            mean, ci = summary[m.source][n]
            row += [f"{mean:.4f}", f"± {ci:.4f}"]
        rows.append(row)
    step = (f"test step: the learned inner rates ({_rates_name(cfg)}) x {summary['step_size']:.4g} ({step_source})"
            if _learned_rates_used(cfg) else f"test step size {summary['step_size']:.4g} ({step_source})")
    return "\n".join([_protocol(domain, cfg, tasks), step, table(headers, rows)])


def step_source(run_cfg: TrainConfig, tableau: Tableau, test_step: float | None) -> str:
    """Where the meta-test step size came from, in words."""
    learned = getattr(run_cfg, "learn_rates", None) is not None
    if test_step is not None:
        return "--test-step, in place of the learned rates" if learned else "--test-step"
    if learned:
        return "the tableau's test-step factor, docs/method.md"
    return f"the tableau's own step at h = {run_cfg.inner_lr:g}, docs/method.md"


def train_report(run: RunResult) -> str:
    """What ``rkfast train`` prints: the tableau, the meta-test table, the learned rates and the training time."""
    cfg = run.config
    rates = rates_line(run.rates)
    return "\n".join([
        run.tableau.describe(),
        test_report(run.domain, cfg, run.test.summary(), run.test.losses.shape[1],  # type: ignore[union-attr]
                    step_source(cfg, run.tableau, cfg.test_step)),
        *([rates] if rates else []),
        f"training: {len(run.losses)} meta-steps in {run.train_time_s:.1f} s "
        f"({run.ms_per_step:.2f} ms per meta-step), wall time {run.wall_time_s:.1f} s",
    ])


def _mean_ci(mean_ci: tuple[float, float]) -> str:
    mean, ci = mean_ci
    return f"{mean:.3f} ± {ci:.3f}"


def _not_tested(run: RunResult) -> str:
    return f"{run.status} at step {run.iteration + (run.status == 'diverged')}"


def run_line(run: RunResult) -> str:
    """One line per finished (or diverged) run of a comparison."""
    if run.test is None:
        return f"{run.tableau.name}: {_not_tested(run)}: {run.error or ''} ({run.train_time_s:.1f} s)"
    metric, first = run.domain.metric, run.defaults.test_steps[0]
    mean, ci = run.test.summary()[metric.source][first]
    rates = rates_line(run.rates)
    return (f"{run.tableau.name}: test {metric.short} after {first} step {mean:.3f} ± {ci:.3f} "
            f"({run.train_time_s:.1f} s){'; ' + rates if rates else ''}")


def compare_report(runs: Sequence[RunResult]) -> str:
    """What ``rkfast compare`` prints: one row per tableau, the primary metric after each step count
    (a diverged tableau's row says where it diverged)."""
    domain = runs[0].domain
    metric, steps = domain.metric, (0, *runs[0].defaults.test_steps)
    headers = ["tableau", "order", "test step", *(f"{metric.short} @{n}" for n in steps), "train s", "ms/step"]
    rows = []
    for run in runs:
        if run.test is None:
            cells = [_not_tested(run), *([""] * (len(steps) - 1))]
            step = f"{run.tableau.test_step(run.config.inner_lr):.4g}"  # type: ignore[arg-type]
        else:
            s = run.test.summary()
            cells = [_mean_ci(s[metric.source][n]) for n in s["steps"]]
            step = f"rates x {s['step_size']:.4g}" if _learned_rates_used(run.config) else f"{s['step_size']:.4g}"
        rows.append([run.tableau.name, str(run.tableau.order), step, *cells,
                     f"{run.train_time_s:.1f}", f"{run.ms_per_step:.2f}"])
    tested = [r for r in runs if r.test is not None]
    tasks = tested[0].test.losses.shape[1] if tested else runs[0].config.test_tasks  # type: ignore[union-attr]
    protocol = _protocol(domain, runs[0].config, tasks)  # type: ignore[arg-type]
    return "\n".join([f"{protocol} (± 95% CI; each tableau's test step)", table(headers, rows)])


def compare_rows(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """The comparison as JSON rows: tableau, order, status, test step, every metric's summary, timings."""
    rows = []
    for r in runs:
        row: dict[str, Any] = {"tableau": r.tableau.name, "order": r.tableau.order, "status": r.status,
                               "iteration": r.iteration}
        if r.test is not None:
            s = r.test.summary()
            row["test_step"] = r.test.step_size
            row.update({m.source: s[m.source] for m in r.domain.metrics})
            row["loss"] = s["loss"]
        else:
            row["error"] = r.error
        row.update(train_time_s=r.train_time_s, ms_per_meta_step=r.ms_per_step)
        rows.append(row)
    return rows
