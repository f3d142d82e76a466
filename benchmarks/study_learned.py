"""A study of fixed, learned-rate and learned-tableau meta-learners on sinusoid regression, by shots.

    python benchmarks/study_learned.py [--shots 5,10,20] [--grid 0.01,0.02,0.04] [--seeds 0,1,2]
        [--iterations 10000] [--test-tasks 600] [--out runs/study-learned] [--variants heun,maml,...]
        [--json benchmarks/results/study-learned-cpu.json] [--dry-run]

For every shots value (the sinusoid domain's ``--shots`` option), second order, it runs one ``rkfast compare
sinusoid`` per variant, in ``<out>/shots<K>/<variant>`` (in this process, through :func:`rkfast.cli.main`):

* ``heun``, ``ralston``, ``rk4``, ``midpoint``: the fixed tableau over the grid of inner steps (``--grid``),
  h selected on the held-out (validation) tasks with the first seed, then every seed with that h;
* ``maml``: MAML at the domain's default inner step (0.01), every seed;
* ``meta-sgd``: the same with learned per-element inner rates (``--learn-rates element``, Li et al. 2017);
* ``learned-2``, ``learned-4``: a learned tableau of the Heun / RK4 pattern (``--learn-tableau pattern
  --tableau-weights fixed``; ``order`` with ``--tableau-weights order``) at the default inner step; skipped,
  with a notice, where the command line has no such flags.

Every comparison is resumable: a rerun reads the finished comparisons, resumes the unfinished ones (from
their runs' checkpoints) and starts the missing ones. It then reads every ``compare.json`` and writes one
table (markdown: printed and saved as ``<out>/study.md``), a JSON (``--json``) and a plot beside it (``.png``):
per shots and variant the selected h, the test MSE after 1 and 10 adaptation steps (mean over seeds x test
tasks ± 95% CI), the seed-to-seed spread (± the Student-t 95% CI of the seed means, n-1 dof), and the training
seconds; beside them the published 1-step numbers of Li et al. 2017 (Meta-SGD, table 1), labelled as such,
and our training budget (meta-steps x tasks per meta-step).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rkfast.cli import main as rkfast_main
from rkfast.runs import write_json
from rkfast.tasks import get_domain

DOMAIN = "sinusoid"
FIXED = ("heun", "ralston", "rk4", "midpoint")
VARIANTS = ("maml", "meta-sgd", "learned-2", "learned-4", *FIXED)  # the headline variants first
LEARNED = {"learned-2": "heun", "learned-4": "rk4"}  # the pattern each learned tableau starts from
LEARNED_FLAGS = ("--learn-tableau", "--tableau-weights")
REPORTED_STEPS = (1, 10)
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "study-learned-cpu.json"

# Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", table 1:
# sinusoid regression, test MSE after one adaptation step, mean ± 95% CI, by shots
PUBLISHED = {
    "source": "Li et al. 2017 (Meta-SGD), table 1, sinusoid regression, MSE after 1 step (published, not run here)",
    "steps": 1,
    "maml": {"5": [1.13, 0.18], "10": [0.77, 0.11], "20": [0.48, 0.08]},
    "meta-sgd": {"5": [0.90, 0.16], "10": [0.53, 0.09], "20": [0.31, 0.05]},
}


def _list(kind: type, what: str):
    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(kind(p) for p in text.split(",") if p.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {what}: {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"no {what} given")
        return values

    return parse


def _variants(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {','.join(VARIANTS)}")
    return tuple(v for v in VARIANTS if v in names)  # the study's order


def build_parser() -> argparse.ArgumentParser:
    """The driver's options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shots", type=_list(int, "integers"), default=(5, 10, 20), help="support shots (default: 5,10,20)")
    p.add_argument("--grid", type=_list(float, "numbers"), default=(0.01, 0.02, 0.04),
                   help="inner steps h of the fixed tableaus (default: 0.01,0.02,0.04)")
    p.add_argument("--seeds", type=_list(int, "integers"), default=(0, 1, 2), help="training seeds (default: 0,1,2)")
    p.add_argument("--iterations", type=int, default=10000, help="meta-steps per run (default: 10000)")
    p.add_argument("--test-tasks", type=int, default=600, help="meta-test tasks (default: 600)")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-step (default: the domain's, 25)")
    p.add_argument("--eval-tasks", type=int, default=None,
                   help="held-out (validation) tasks that select h (default: the domain's, 100)")
    p.add_argument("--out", type=Path, default=Path("runs/study-learned"), help="where the comparisons go")
    p.add_argument("--variants", type=_variants, default=VARIANTS, help=f"a subset of {','.join(VARIANTS)}")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="the results JSON (the plot goes beside it)")
    p.add_argument("--tableau-weights", choices=("fixed", "order"), default="fixed",
                   help="b of the learned tableaus: the starting tableau's (fixed, default) or tied to A by the "
                        "order conditions (order; docs/method.md says why it can leave the region where the "
                        "meta-loss is bounded below)")
    p.add_argument("--stage-eval", type=_variants, default=("rk4", "learned-2", "learned-4"),
                   help="variants also meta-tested with the tableau's own stages (rkfast eval --adaptation stages), "
                        "as extra rows (default: rk4,learned-2,learned-4)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def learned_flags_available() -> bool:
    """Whether ``rkfast train sinusoid --help`` lists the learned-tableau flags (``--learn-tableau``,
    ``--tableau-weights``)."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(io.StringIO()):
        rkfast_main(["train", DOMAIN, "--help"])
    return all(flag in text.getvalue() for flag in LEARNED_FLAGS)


def variant_args(variant: str, args: argparse.Namespace) -> list[str]:
    """The ``rkfast compare sinusoid`` arguments of one variant, shots and output folder aside."""
    seeds = ["--seeds", ",".join(map(str, args.seeds))]
    default_h = str(get_domain(DOMAIN).defaults.inner_lr)
    if variant in FIXED:
        spec = ["--tableaus", variant, "--inner-lr", ",".join(f"{h:g}" for h in args.grid)]
    elif variant == "maml":
        spec = ["--tableaus", "maml", "--inner-lr", default_h]
    elif variant == "meta-sgd":
        spec = ["--tableaus", "maml", "--inner-lr", default_h, "--learn-rates", "element"]
    else:
        spec = ["--tableaus", LEARNED[variant], "--inner-lr", default_h, "--learn-tableau", "pattern",
                "--tableau-weights", args.tableau_weights]
    budget = ["--iterations", str(args.iterations), "--test-tasks", str(args.test_tasks)]
    if args.meta_batch is not None:
        budget += ["--meta-batch", str(args.meta_batch)]
    if args.eval_tasks is not None:
        budget += ["--eval-tasks", str(args.eval_tasks)]
    return [*spec, *seeds, *budget]


def command(variant: str, shots: int, args: argparse.Namespace) -> tuple[list[str], Path]:
    """The ``rkfast`` argv of one comparison (resuming it when its folder holds one) and its folder."""
    folder = args.out / f"shots{shots}" / variant
    if (folder / "compare.json").is_file():
        return ["compare", DOMAIN, "--resume", str(folder), "--quiet"], folder
    return ["compare", DOMAIN, *variant_args(variant, args), "--shots", str(shots), "--out", str(folder),
            "--quiet"], folder


def _finished(folder: Path) -> bool:
    try:
        return json.loads((folder / "compare.json").read_text())["status"] == "complete"
    except (OSError, ValueError, KeyError):
        return False


def _number(value: Any) -> float:
    """A number read back from ``compare.json``: ``null`` (strict JSON's non-finite value) as NaN."""
    return math.nan if value is None else float(value)


def _numbers(stats: dict[str, Any]) -> dict[str, Any]:
    """A pooled summary read back from ``compare.json``, its ``null`` means and intervals as NaN (``seed_ci95``
    stays ``None`` with one seed)."""
    out = dict(stats)
    for key in ("mean", "ci95", "seed_min", "seed_max"):
        out[key] = _number(stats[key])
    out["seed_means"] = [_number(v) for v in stats["seed_means"]]
    return out


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """One comparison's ``compare.json`` (one tableau) as the study's entry: status, selected h, the primary
    metric after :data:`REPORTED_STEPS` (mean, ci95, seed spread), training seconds and budget."""
    domain = get_domain(data["domain"])
    cfg = data["config"]
    defaults = domain.defaults
    iterations = cfg.get("iterations") or defaults.iterations
    meta_batch = cfg.get("meta_batch") or defaults.meta_batch
    row = data["table"][0]
    entry: dict[str, Any] = {"status": row["status"], "tableau": row["tableau"],
                             "budget": {"iterations": iterations, "meta_batch": meta_batch,
                                        "tasks": iterations * meta_batch}}
    metric = domain.metric
    if "grid" in data:  # rkfast compare over a grid of h and/or several seeds
        entry["selected_inner_lr"] = row["selected_inner_lr"]
        entry["validation"] = row["validation"]
        entry["seeds"] = row["seeds"]
        stats = row.get(metric.name, {})
        keys = ("mean", "ci95", "n", "seed_ci95", "seed_min", "seed_max", "seed_means", "nonfinite")
        entry[metric.name] = {str(n): {k: v for k, v in _numbers(stats[str(n)]).items() if k in keys}
                              for n in REPORTED_STEPS if str(n) in stats}
        entry["train_time_s_per_run"] = row["train_time_s_per_run"]
        entry["train_time_s_total"] = row["train_time_s_total"]
    else:  # one h, one seed: the plain comparison's row
        entry["selected_inner_lr"] = cfg.get("inner_lr") or defaults.inner_lr
        entry["seeds"] = [cfg.get("seed", 0)]
        stats = {n: (_number(mean), _number(ci)) for n, (mean, ci) in row.get(metric.source, {}).items()}
        nonfinite = row.get("nonfinite", {}).get(metric.source, {})
        entry[metric.name] = {str(n): {"mean": stats[str(n)][0], "ci95": stats[str(n)][1], "seed_ci95": None,
                                       "seed_min": stats[str(n)][0], "seed_max": stats[str(n)][0],
                                       "seed_means": [stats[str(n)][0]],
                                       **({"nonfinite": nonfinite[str(n)]} if nonfinite.get(str(n)) else {})}
                              for n in REPORTED_STEPS if str(n) in stats}
        entry["train_time_s_per_run"] = entry["train_time_s_total"] = row.get("train_time_s")
    return entry


def learned_values(folders: list[Path]) -> list[dict[str, Any]]:
    """Per run: the learned coefficients at the end of training (results.json's ``rates`` and
    ``learned_tableau``), for the runs that learned any."""
    out = []
    for f in folders:
        res = json.loads((f / "results.json").read_text())
        if res.get("learned_tableau") or (res.get("rates") and res["rates"].get("granularity")):
            out.append({"seed": res["config"]["seed"], "rates": res.get("rates"),
                        "learned_tableau": res.get("learned_tableau")})
    return out


def selected_runs(folder: Path, data: dict[str, Any]) -> list[Path]:
    """The run folders of a comparison's selected h, one per seed (finished ones only)."""
    h = data["table"][0].get("selected_inner_lr")
    if h is None and "grid" not in data:
        h = data["config"].get("inner_lr") or get_domain(DOMAIN).defaults.inner_lr
    return [folder / r["folder"] for r in data.get("runs", [])
            if r.get("folder") and r["config"].get("inner_lr") == h and r["status"] == "complete"]


def pooled(losses: list[Any], steps: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per reported step count, over the seeds' test tasks pooled (:func:`rkfast.report.pooled_tables`): mean ±
    95% CI, and beside them the number of tasks whose loss is finite (an adaptation that diverged on some tasks
    makes the mean non-finite) and the median of those."""
    import torch

    from rkfast.report import pooled_tables

    stats = pooled_tables(losses, steps)
    out: dict[str, dict[str, Any]] = {}
    for n in REPORTED_STEPS:
        if n not in stats:
            continue
        values = torch.cat([l[list(steps).index(n)].double().reshape(-1) for l in losses])
        finite = torch.isfinite(values)
        mean, ci = (stats[n]["mean"], stats[n]["ci95"]) if bool(finite.all()) else (math.nan, math.nan)
        out[str(n)] = {"mean": float(mean), "ci95": float(ci), "tasks": stats[n]["n"],
                       "finite_tasks": int(finite.sum()), "nonfinite": int((~finite).sum()),
                       "median": float(values[finite].median()) if bool(finite.any()) else float("nan")}
    return out


def task_statistics(folders: list[Path]) -> dict[str, dict[str, Any]]:
    """:func:`pooled` over the meta-test losses the runs saved in their checkpoints (the default protocol)."""
    from rkfast.runs import load_checkpoint

    tests = [load_checkpoint(f / "checkpoint.pt")["test"] for f in folders]
    return pooled([t["losses"] for t in tests], list(tests[0]["steps"])) if tests else {}


def stage_statistics(folders: list[Path], test_tasks: int) -> dict[str, dict[str, Any]]:
    """The runs meta-tested again on the same test tasks with the tableau's own stages
    (``evaluate(adaptation="stages")``, docs/method.md), pooled as :func:`pooled`."""
    from rkfast.train import evaluate_tasks, load_run, task_chunks, task_generator

    losses, steps = [], list(get_domain(DOMAIN).defaults.test_steps)
    for f in folders:
        cfg, opt, _ = load_run(f)
        domain = get_domain(cfg.domain)
        defaults = domain.defaults_for(cfg.options)
        chunks = task_chunks(domain.make_tasks(cfg.options, "test", opt.device), test_tasks, defaults.eval_chunk,
                             task_generator(cfg.test_seed, "test"))
        losses.append(evaluate_tasks(opt, chunks, steps, None, "stages").losses.cpu())
    return pooled(losses, [0, *steps]) if losses else {}  # the losses' rows: before adaptation, then each count


def _fmt(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "—"
    return f"{stats['mean']:.3f} ± {stats['ci95']:.3f}"


def _spread(stats: dict[str, Any] | None) -> str:
    if not stats or stats.get("seed_ci95") is None:
        return "—"
    return f"± {stats['seed_ci95']:.3f} ({stats['seed_min']:.3f}..{stats['seed_max']:.3f})"


def markdown(results: list[dict[str, Any]], skipped: list[str], settings: dict[str, Any]) -> str:
    """The study's table in markdown, with its protocol, our budget and the published numbers labelled."""
    lines = [
        "# Learned meta-learners on sinusoid regression",
        "",
        f"Second order; {settings['iterations']} meta-steps x {settings['meta_batch']} tasks per meta-step "
        f"(= {settings['iterations'] * settings['meta_batch']} training tasks) per run; seeds "
        f"{', '.join(map(str, settings['seeds']))}; {settings['test_tasks']} test tasks (100 query points each). "
        f"Fixed tableaus: h selected from {', '.join(f'{h:g}' for h in settings['grid'])} on the held-out "
        "(validation) tasks with the first seed, never on the test tasks; the others at h = "
        f"{settings['default_inner_lr']:g}.",
        "",
        "MSE: mean over seeds x test tasks ± 95% CI. Seed spread: ± the 95% CI of the mean of the per-seed means "
        "(Student t, n-1 dof), and the per-seed min..max. Train s: mean training seconds of one run with the "
        "selected h (all runs of the variant, h selection included, in the JSON).",
        "",
        "| shots | variant | h | MSE @1 | MSE @10 | median @1 / @10 | finite tasks @10 | seed spread @1 | train s/run "
        "| published MSE @1 (Li et al. 2017) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        mse = r.get("mse", {})
        h = r.get("selected_inner_lr")
        published = PUBLISHED.get(r["variant"], {}).get(str(r["shots"])) if r["variant"] in ("maml", "meta-sgd") else None
        tasks = r.get("tasks", {})
        medians = " / ".join(f"{tasks[n]['median']:.3f}" if n in tasks else "—" for n in ("1", "10"))
        finite = f"{tasks['10']['finite_tasks']}/{tasks['10']['tasks']}" if "10" in tasks else "—"
        cells = [str(r["shots"]), r["variant"], "—" if h is None else f"{h:g}",
                 _fmt(mse.get("1")) if r["status"] == "complete" else r["status"], _fmt(mse.get("10")),
                 medians, finite, _spread(mse.get("1")),
                 "—" if r.get("train_time_s_per_run") is None else f"{r['train_time_s_per_run']:.1f}",
                 "—" if published is None else f"{published[0]:.2f} ± {published[1]:.2f} (published)"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Published: {PUBLISHED['source']}; their training budget is theirs, not the one above."]
    if skipped:
        lines += ["", f"Skipped: {'; '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """MSE after 1 step per variant and shots with 95% CI bars, the published numbers as open markers."""
    from rkfast.figures import new_figure, save_figure

    fig = new_figure(figsize=(9, 4.5))
    ax = fig.add_subplot()
    shots = sorted({r["shots"] for r in results})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs, ys, es = [], [], []
        for k, s in enumerate(shots):
            r = next((r for r in results if r["variant"] == v and r["shots"] == s), None)
            stats = None if r is None else r.get("mse", {}).get("1")
            if stats and r["status"] == "complete":
                xs.append(k + (i - (len(variants) - 1) / 2) * width)
                ys.append(stats["mean"])
                es.append(stats["ci95"])
        ax.errorbar(xs, ys, yerr=es, marker="o", ls="", capsize=3, color=f"C{i % 10}", label=v)
        if v in ("maml", "meta-sgd"):
            pub = [(k + (i - (len(variants) - 1) / 2 + 0.35) * width, PUBLISHED[v][str(s)]) for k, s in enumerate(shots)
                   if str(s) in PUBLISHED[v]]
            if pub:
                ax.errorbar([x for x, _ in pub], [p[0] for _, p in pub], yerr=[p[1] for _, p in pub], marker="D",
                            mfc="none", ls="", capsize=3, color=f"C{i % 10}", alpha=0.6,
                            label=f"{v}, published (Li et al. 2017)")
    ax.set_xticks(range(len(shots)))
    ax.set_xticklabels([f"{s}-shot" for s in shots])
    ax.set_yscale("log")  # a variant far above the others (a learned tableau's meta-test) would flatten the rest
    ax.set(ylabel="test MSE after 1 step (log scale)", title="sinusoid, MSE after 1 adaptation step (95% CI)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) every comparison of the study, then write its table, JSON and plot; the exit code."""
    args = build_parser().parse_args(argv)
    if any(s < 1 for s in args.shots) or args.iterations < 1 or args.test_tasks < 1:
        print("study_learned: --shots, --iterations and --test-tasks must be >= 1", file=sys.stderr)
        return 2
    domain = get_domain(DOMAIN)
    missing = [n for n in REPORTED_STEPS if n not in domain.defaults.test_steps]
    if missing:  # rkfast compare meta-tests after the domain's own step counts
        print(f"study_learned: the {DOMAIN} test steps {domain.defaults.test_steps} lack {missing}", file=sys.stderr)
        return 2
    skipped: list[str] = []
    variants = list(args.variants)
    if any(v in LEARNED for v in variants) and not learned_flags_available():
        for v in [v for v in variants if v in LEARNED]:
            variants.remove(v)
            skipped.append(f"{v} (this rkfast's command line has no {' / '.join(LEARNED_FLAGS)})")
            print(f"notice: skipping {v}: `rkfast train {DOMAIN} --help` lists no {' / '.join(LEARNED_FLAGS)}",
                  file=sys.stderr)
    plan = [(s, v, *command(v, s, args)) for s in args.shots for v in variants]
    if args.dry_run:
        for _, _, argv_, _ in plan:
            print(shlex.join(["python", "-m", "rkfast", *argv_]))
        return 0
    started = time.perf_counter()
    for shots, variant, argv_, folder in plan:
        if _finished(folder):
            print(f"[{shots}-shot {variant}] finished earlier: {folder / 'compare.json'}", flush=True)
            continue
        print(f"[{shots}-shot {variant}] python -m rkfast {shlex.join(argv_)}", flush=True)
        code = rkfast_main(argv_)
        if code == 130:
            print("study_learned: interrupted; run the same command again to resume", file=sys.stderr)
            return 130
        if code != 0:
            print(f"study_learned: rkfast compare failed (exit {code}) for {shots}-shot {variant}", file=sys.stderr)
            return code
    results = []
    for shots, variant, argv_, folder in plan:
        data = json.loads((folder / "compare.json").read_text())
        runs = selected_runs(folder, data)
        entry = {"shots": shots, "variant": variant, "compare": str(folder / "compare.json"),
                 "command": shlex.join(["python", "-m", "rkfast", *argv_]), **summarize(data),
                 "tasks": task_statistics(runs), "learned": learned_values(runs)}
        results.append(entry)
        if variant in args.stage_eval and runs:
            print(f"[{shots}-shot {variant}] meta-test with the tableau's stages", flush=True)
            stats = stage_statistics(runs, args.test_tasks)
            results.append({**entry, "variant": f"{variant} (stages)", "adaptation": "stages",
                            "mse": {n: {**v, "seed_ci95": None, "seed_min": v["mean"], "seed_max": v["mean"]}
                                    for n, v in stats.items()}, "tasks": stats})
    settings = {"domain": DOMAIN, "order": "second", "shots": list(args.shots), "grid": list(args.grid),
                "seeds": list(args.seeds), "iterations": args.iterations,
                "meta_batch": args.meta_batch or domain.defaults.meta_batch, "test_tasks": args.test_tasks,
                "eval_tasks": args.eval_tasks or domain.defaults.eval_tasks,
                "default_inner_lr": domain.defaults.inner_lr, "variants": variants, "out": str(args.out)}
    md = markdown(results, skipped, settings)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.md").write_text(md)
    budget = {"iterations": args.iterations, "meta_batch": settings["meta_batch"],
              "training_tasks_per_run": args.iterations * settings["meta_batch"]}
    write_json(args.json, {  # strict JSON: a non-finite mean is null, its count of non-finite tasks beside it
        "study": "learned meta-learners, sinusoid, by shots", "settings": settings, "budget": budget,
        "reported_steps": list(REPORTED_STEPS),
        "spread": "seed_ci95: the Student-t 95% CI half-width (n-1 dof) of the mean of the per-seed means",
        "published": PUBLISHED, "skipped": skipped, "results": results,
        "driver_wall_time_s": time.perf_counter() - started})
    png = args.json.with_suffix(".png")
    plot(results, png)
    print(f"wrote {args.out / 'study.md'}, {args.json}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
