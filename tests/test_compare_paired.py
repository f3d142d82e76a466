"""Paired differences of a comparison: every tableau is meta-tested on the same test tasks, so each tableau's
difference to the first is taken task by task (``rkfast.report.paired_tables``); and ``rkfast.compare.compare``
called from Python as the command line calls it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rkfast.cli import main
from rkfast.compare import CompareResult, compare, load_settings
from rkfast.report import paired_tables, t_quantile_975
from rkfast.results import mean_ci95
from rkfast.train import TrainConfig, load_result

TINY = ["--iterations", "3", "--meta-batch", "2", "--eval-tasks", "4", "--test-tasks", "4", "--quiet"]
SMALL = dict(iterations=3, meta_batch=2, eval_tasks=4, test_tasks=4)


def correlated_tables(seeds: int, tasks: int = 200) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per seed, ``[2 steps, tasks]`` losses of a reference and of a tableau that is the reference plus a small
    shift and noise: tasks differ widely, the two tableaus on one task barely."""
    gen = torch.Generator().manual_seed(0)
    ref, other = [], []
    for _ in range(seeds):
        hard = torch.rand(2, tasks, generator=gen, dtype=torch.float64) * 10.0  # the task's difficulty
        ref.append(hard)
        other.append(hard + 0.05 + 0.01 * torch.randn(2, tasks, generator=gen, dtype=torch.float64))
    return other, ref


def test_the_paired_ci_is_narrower_than_the_independent_cis_when_the_losses_are_correlated() -> None:
    other, ref = correlated_tables(1)
    paired = paired_tables(other, ref, (0, 1))
    for i, n in enumerate((0, 1)):
        stats = paired[n]
        independent = min(mean_ci95(other[0][i])[1], mean_ci95(ref[0][i])[1])
        assert stats["ci95"] < independent / 20
        expected = mean_ci95(other[0][i] - ref[0][i])
        assert (stats["mean"], stats["ci95"]) == pytest.approx(expected) and stats["mean"] == pytest.approx(0.05, abs=0.01)
        assert stats["n"] == 200 and stats["nonfinite"] == 0 and stats["seed_ci95"] is None


def test_over_several_seeds_the_seed_ci_is_a_student_t_interval_of_the_per_seed_mean_differences() -> None:
    other, ref = correlated_tables(3, tasks=50)
    stats = paired_tables(other, ref, (0, 1))[1]
    means = [float((o[1] - r[1]).mean()) for o, r in zip(other, ref)]
    assert stats["seed_means"] == pytest.approx(means) and stats["n"] == 150
    sd = torch.tensor(means, dtype=torch.float64).std().item()
    assert stats["seed_ci95"] == pytest.approx(t_quantile_975(2) * sd / math.sqrt(3))
    assert (stats["mean"], stats["ci95"]) == pytest.approx(mean_ci95(torch.cat([o[1] - r[1] for o, r in zip(other, ref)])))


def test_a_table_minus_itself_is_exactly_zero_with_a_ci_of_zero() -> None:
    tables, _ = correlated_tables(2, tasks=30)
    tables[0][1, 3] = math.nan  # a non-finite task pairs with nothing, even with itself
    paired = paired_tables(tables, tables, (0, 5))
    for n, stats in paired.items():
        assert stats["mean"] == 0.0 and stats["ci95"] == 0.0 and stats["seed_ci95"] == 0.0
        assert stats["seed_means"] == [0.0, 0.0]
    assert paired[0]["n"] == 60 and paired[5]["n"] == 59 and paired[5]["nonfinite"] == 1


def test_only_the_tasks_finite_in_both_pair() -> None:
    other, ref = correlated_tables(1, tasks=10)
    ref[0][1, 2], other[0][1, 7], other[0][1, 2] = math.nan, math.inf, math.nan
    stats = paired_tables(other, ref, (0, 1))
    assert stats[0]["n"] == 10 and stats[0]["nonfinite"] == 0
    assert stats[1]["n"] == 8 and stats[1]["nonfinite"] == 2
    keep = [i for i in range(10) if i not in (2, 7)]
    assert (stats[1]["mean"], stats[1]["ci95"]) == pytest.approx(mean_ci95(other[0][1, keep] - ref[0][1, keep]))
    ref[0][0, :] = math.nan
    assert paired_tables(other, ref, (0, 1))[0] == {"mean": None, "ci95": None, "n": 0, "nonfinite": 10,
                                                    "seed_means": [], "seed_ci95": None}


def test_paired_tables_need_the_same_tasks() -> None:
    other, ref = correlated_tables(1, tasks=10)
    with pytest.raises(ValueError, match="same test tasks"):
        paired_tables(other, [ref[0][:, :9]], (0, 1))
    with pytest.raises(ValueError, match="a reference table per seed"):
        paired_tables(other, [], (0, 1))


def test_the_cli_table_and_compare_json_give_the_paired_difference(tmp_path: Path, capsys) -> None:
    out = tmp_path / "c"
    assert main(["compare", "sinusoid", "--tableaus", "maml,heun", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "paired difference to maml on the same test tasks" in printed
    lines = printed.splitlines()
    heun_row = next(line for line in lines if line.startswith("heun ") and "4/4" in line)
    table = json.loads((out / "compare.json").read_text())["table"]
    own = table[0]["paired_difference"]
    assert own["reference"] == "maml" and own["metric"] == "mse" and own["tasks_per_seed"] == 4
    assert all(s["mean"] == 0.0 and s["ci95"] == 0.0 and s["n"] == 4 for s in own["steps"].values())
    # heun's recorded difference is the mean and CI of its per-task losses minus maml's on the same tasks
    maml, heun = load_result(out / "maml"), load_result(out / "heun")
    diff = heun.test.losses - maml.test.losses
    recorded = table[1]["paired_difference"]["steps"]
    for i, n in enumerate(heun.test.steps):
        assert (recorded[str(n)]["mean"], recorded[str(n)]["ci95"]) == pytest.approx(mean_ci95(diff[i]))
        assert recorded[str(n)]["n"] == 4 and recorded[str(n)]["nonfinite"] == 0
    assert f"{recorded['1']['mean']:+.3f} ± {recorded['1']['ci95']:.3f}" in heun_row


@pytest.mark.filterwarnings("ignore::rkfast.tableau.InconsistentTableauWarning")
def test_a_diverged_tableau_has_no_paired_difference(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d"
    assert main(["compare", "sinusoid", "--tableaus", "maml,rk2(1e-300)", *TINY, "--out", str(out)]) == 0
    assert "no meta-test" in capsys.readouterr().out
    table = json.loads((out / "compare.json").read_text())["table"]
    assert table[0]["paired_difference"] is not None and table[1]["paired_difference"] is None


def test_compare_from_python_over_seeds(tmp_path: Path) -> None:
    out = tmp_path / "py"
    lines: list[str] = []
    result = compare(TrainConfig("sinusoid", **SMALL), ["maml", "heun"], out=out, seeds=[0, 1], progress=False,
                     log=lines.append)
    assert isinstance(result, CompareResult) and result.status == "complete" and result.is_grid
    assert [line.split("]")[0] for line in lines] == ["[h=0.01, seed 0", "[h=0.01, seed 1"] * 2
    assert "paired difference to maml" in result.report() and (out / "compare.png").stat().st_size > 1000
    data = json.loads((out / "compare.json").read_text())
    assert data == json.loads(json.dumps(result.to_json()))
    paired = data["table"][1]["paired_difference"]
    assert paired["seeds"] == [0, 1] and paired["steps"]["10"]["n"] == 8
    heun, maml = result.groups[1].runs, result.groups[0].runs
    means = [float((heun[s].test.losses[-1] - maml[s].test.losses[-1]).mean()) for s in (0, 1)]
    sd = torch.tensor(means, dtype=torch.float64).std().item()
    assert paired["steps"]["10"]["seed_ci95"] == pytest.approx(t_quantile_975(1) * sd / math.sqrt(2))
    # resumed with its saved settings, the finished runs are read back
    saved = load_settings(out)
    assert [t.name for t in saved.tableaus] == ["maml", "heun"] and saved.seeds == [0, 1]
    again = compare(saved.config, saved.tableaus, out=out, inner_lrs=saved.inner_lrs, seeds=saved.seeds,
                    select_steps=saved.select_steps, resume=True, log=None)
    assert [r.losses for r in again.runs] == [r.losses for r in result.runs]
    with pytest.raises(ValueError, match="other tableaus, inner steps or seeds"):
        compare(saved.config, ["maml"], out=out, seeds=[0, 1], resume=True, log=None)


def test_compare_from_python_refuses_bad_settings(tmp_path: Path) -> None:
    cfg = TrainConfig("sinusoid", **SMALL)
    with pytest.raises(ValueError, match="tableaus lists maml more than once"):
        compare(cfg, ["maml", "maml"], out=tmp_path / "a")
    with pytest.raises(ValueError, match="select_steps=5: .* adapt 1, 10 step"):
        compare(cfg, ["maml"], out=tmp_path / "b", inner_lrs=[0.01, 0.02], select_steps=5)
    with pytest.raises(ValueError, match="eval_tasks must be > 0"):
        compare(TrainConfig("sinusoid", **{**SMALL, "eval_tasks": 0}), ["maml"], out=tmp_path / "c",
                inner_lrs=[0.01, 0.02])
    with pytest.raises(ValueError, match="inner_lr"):
        compare(cfg, ["maml"], out=tmp_path / "d", inner_lrs=[0.01, -1.0])
    assert not any(tmp_path.iterdir())
