"""``rkfast compare`` over a grid of inner steps and several seeds: h is selected on the held-out (validation)
tasks with the first seed, the other seeds train with it; folders, resume, errors, the single-value path
unchanged; and the study driver ``benchmarks/study_learned.py`` on a tiny budget."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import refused_in_one_line

import rkfast.compare as comparing
from rkfast.cli import main
from rkfast.compare import select_inner_lr, validation_score
from rkfast.report import t_quantile_975
from rkfast.train import RunDiverged

TINY = ["--iterations", "3", "--meta-batch", "2", "--eval-tasks", "4", "--test-tasks", "4", "--quiet"]
ROOT = Path(__file__).resolve().parent.parent


def interrupt_at(step: int):
    """An ``on_step`` hook that sends this process SIGINT after meta-step ``step``, as Ctrl-C would."""

    def hook(done: int, loss: torch.Tensor) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def folders(out: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(out)) for p in out.rglob("results.json"))


def test_selection_uses_validation_not_test_and_other_seeds_use_the_selected_h(tmp_path: Path, monkeypatch,
                                                                                capsys) -> None:
    # validation prefers h=0.04 and the test tasks would prefer h=0.01: the grid must pick 0.04
    real_train = comparing.train
    val = {0.01: 3.0, 0.02: 2.0, 0.04: 1.0}
    test_scale = {0.01: 0.01, 0.02: 1.0, 0.04: 100.0}
    calls = []

    def rigged(cfg, **kwargs):
        calls.append((cfg.tableau.name, cfg.inner_lr, cfg.seed))
        run = real_train(cfg, **kwargs)
        if cfg.seed == 0:
            run.evals[-1]["mse"]["10"] = val[cfg.inner_lr]
            run.test.losses = run.test.losses * test_scale[cfg.inner_lr]
        return run

    monkeypatch.setattr(comparing, "train", rigged)
    out = tmp_path / "grid"
    assert main(["compare", "sinusoid", "--tableaus", "maml", "--inner-lr", "0.01,0.02,0.04", "--seeds", "0,1,2",
                 *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "selected h=0.04" in printed and "Student t, n-1 dof" in printed
    assert calls == [("maml", 0.01, 0), ("maml", 0.02, 0), ("maml", 0.04, 0), ("maml", 0.04, 1), ("maml", 0.04, 2)]

    data = json.loads((out / "compare.json").read_text())
    assert data["status"] == "complete" and data["grid"] == {"inner_lr": [0.01, 0.02, 0.04], "seeds": [0, 1, 2], "select_steps": 10}
    assert data["selection"]["metric"] == "mse" and data["selection"]["steps"] == 10 and data["selection"]["seed"] == 0
    row = data["table"][0]
    scores = {v["inner_lr"]: v["value"] for v in row["validation"]}
    assert scores == val and row["selected_inner_lr"] == min(scores, key=scores.get) == 0.04
    # what the test tasks would have chosen is another h
    test_at_10 = {r["config"]["inner_lr"]: r["test"]["loss"]["10"][0] for r in data["runs"] if r["config"]["seed"] == 0}
    assert min(test_at_10, key=test_at_10.get) == 0.01
    # folders: every h for the first seed, the selected h for the others
    assert folders(out) == ["maml/h0.01-s0", "maml/h0.02-s0", "maml/h0.04-s0", "maml/h0.04-s1", "maml/h0.04-s2"]
    assert [r["folder"] for r in data["runs"]] == folders(out)
    for folder in folders(out):
        saved = json.loads((out / folder / "results.json").read_text())["config"]
        assert folder == f"maml/h{saved['inner_lr']}-s{saved['seed']}"
    # pooled over seeds x tasks, and the seed spread as a Student-t interval of the seed means
    one = row["mse"]["1"]
    assert row["seed_status"] == {"0": "complete", "1": "complete", "2": "complete"} and one["n"] == 3 * 4
    means = one["seed_means"]
    sd = torch.tensor(means, dtype=torch.float64).std().item()
    assert one["seed_ci95"] == pytest.approx(t_quantile_975(2) * sd / math.sqrt(3))
    assert one["seed_min"] == min(means) and one["seed_max"] == max(means)
    assert (out / "compare.png").stat().st_size > 1000


def test_recorded_choice_is_the_argmin_of_the_recorded_validation_scores(tmp_path: Path, capsys) -> None:
    out = tmp_path / "c"
    assert main(["compare", "sinusoid", "--tableaus", "heun,maml", "--inner-lr", "0.01,0.04", "--seeds", "0,1",
                 *TINY, "--out", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    by_folder = {r["folder"]: r for r in data["runs"]}
    for row in data["table"]:
        scores = {v["inner_lr"]: v["value"] for v in row["validation"]}
        assert row["selected_inner_lr"] == min(scores, key=scores.get)
        for h, value in scores.items():  # the recorded score is the search run's final held-out evaluation
            run = by_folder[f"{row['tableau']}/h{h}-s0"]
            assert run["training"]["eval"][-1] == {**run["training"]["eval"][-1], "iteration": 3}
            assert run["training"]["eval"][-1]["mse"]["10"] == value
        assert f"{row['tableau']}/h{row['selected_inner_lr']}-s1" in by_folder
    printed = capsys.readouterr().out
    assert printed.count("selected h=") == 2


def test_selection_rules() -> None:
    assert select_inner_lr({0.01: 2.0, 0.02: 1.0, 0.04: None}, False) == 0.02
    assert select_inner_lr({0.01: 2.0, 0.02: 1.0}, True) == 0.01  # accuracy: higher is better
    assert select_inner_lr({0.01: 1.0, 0.02: 1.0}, False) == 0.01  # the first among equals
    assert select_inner_lr({0.01: None, 0.02: None}, False) is None
    assert validation_score(None) is None
    assert t_quantile_975(1) == 12.706 and t_quantile_975(200) == pytest.approx(1.972, abs=0.002)


def test_a_diverged_run_does_not_win(tmp_path: Path, monkeypatch, capsys) -> None:
    real_train = comparing.train

    def diverge_at_004(cfg, **kwargs):
        run = real_train(cfg, **kwargs)
        if cfg.inner_lr == 0.04 and cfg.seed == 0:  # the best held-out value, but diverged
            run.evals[-1]["mse"]["10"] = 0.0
            raise RunDiverged(replace(run, status="diverged", error="non-finite (rigged)", test=None), kwargs["out"])
        return run

    monkeypatch.setattr(comparing, "train", diverge_at_004)
    out = tmp_path / "d"
    assert main(["compare", "sinusoid", "--tableaus", "maml", "--inner-lr", "0.01,0.04", "--seeds", "0,1", *TINY,
                 "--out", str(out)]) == 0
    row = json.loads((out / "compare.json").read_text())["table"][0]
    assert row["validation"][1] == {"inner_lr": 0.04, "value": None, "status": "diverged"}
    assert row["selected_inner_lr"] == 0.01 and row["status"] == "complete"
    assert "h=0.04 diverged" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::rkfast.tableau.InconsistentTableauWarning")
def test_a_tableau_whose_every_h_diverges_is_a_diverged_row(tmp_path: Path, capsys) -> None:
    out = tmp_path / "dv"
    assert main(["compare", "sinusoid", "--tableaus", "rk2(1e-300),maml", "--inner-lr", "0.01,0.02", "--seeds", "0,1",
                 *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "every h diverged" in printed
    table = json.loads((out / "compare.json").read_text())["table"]
    assert table[0]["status"] == "diverged" and table[0]["selected_inner_lr"] is None
    assert table[1]["status"] == "complete"
    assert not any(p.name.endswith("-s1") for p in (out / "rk2-1e-300").iterdir())  # no other seed trained
    assert (out / "compare.png").stat().st_size > 1000


def test_one_h_several_seeds_trains_every_seed_with_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "s"
    assert main(["compare", "sinusoid", "--tableaus", "heun", "--seeds", "0,1", *TINY, "--out", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["grid"] == {"inner_lr": [0.01], "seeds": [0, 1], "select_steps": 10}  # the domain's default h
    assert folders(out) == ["heun/h0.01-s0", "heun/h0.01-s1"]
    assert data["table"][0]["selected_inner_lr"] == 0.01 and data["table"][0]["mse"]["1"]["n"] == 8
    assert "selected h=" not in capsys.readouterr().out  # nothing to select


def test_interrupted_grid_resumes_without_redoing_finished_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    real_train = comparing.train
    calls = []

    def train_then_stop_third(cfg, **kwargs):
        calls.append((cfg.inner_lr, cfg.seed, kwargs["resume"]))
        if len(calls) == 3:
            kwargs["on_step"] = interrupt_at(2)
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(comparing, "train", train_then_stop_third)
    out = tmp_path / "r"
    argv = ["compare", "sinusoid", "--tableaus", "maml", "--inner-lr", "0.01,0.02,0.04", "--seeds", "0,1", *TINY,
            "--out", str(out)]
    assert main(argv) == 130
    assert "resume the comparison with: rkfast compare sinusoid --resume" in capsys.readouterr().err
    data = json.loads((out / "compare.json").read_text())
    assert data["status"] == "interrupted" and data["grid"]["seeds"] == [0, 1]
    assert json.loads((out / "maml" / "h0.04-s0" / "results.json").read_text())["status"] == "interrupted"
    # a grid is resumed as it started
    refused_in_one_line(["compare", "sinusoid", "--resume", str(out), "--inner-lr", "0.01,0.02"], capsys,
                        "drop --inner-lr to resume it")
    refused_in_one_line(["compare", "sinusoid", "--resume", str(out), "--seeds", "0,1,2"], capsys,
                        "drop --seed/--seeds to resume it")
    assert main(["compare", "sinusoid", "--resume", str(out), "--quiet"]) == 0
    selected = json.loads((out / "compare.json").read_text())["table"][0]["selected_inner_lr"]
    assert calls == [(0.01, 0, False), (0.02, 0, False), (0.04, 0, False), (0.04, 0, True), (selected, 1, False)]
    data = json.loads((out / "compare.json").read_text())
    assert data["status"] == "complete" and [r["iteration"] for r in data["runs"]] == [3, 3, 3, 3]
    # resuming a finished comparison reads every run back
    assert main(["compare", "sinusoid", "--resume", str(out), "--quiet"]) == 0
    assert len(calls) == 5


@pytest.mark.parametrize("argv,message", [
    (["--inner-lr", "0.01,-1"], "argument --inner-lr: must be a finite number > 0, got -1"),
    (["--inner-lr", "0.01,nan"], "argument --inner-lr: must be a finite number > 0"),
    (["--inner-lr", "0.01,x"], "argument --inner-lr: not a number: 'x'"),
    (["--inner-lr", "0.01,0.02,0.01"], "argument --inner-lr: lists 0.01 more than once"),
    (["--inner-lr", ","], "argument --inner-lr: no inner step given"),
    (["--seeds", "0,1,0"], "argument --seeds: lists 0 more than once"),
    (["--seeds", "0,-1"], "argument --seeds: must be >= 0, got -1"),
    (["--seeds", "1.5"], "argument --seeds: not an integer: '1.5'"),
    (["--seed", "1", "--seeds", "0,1"], "give --seed (one training seed) or --seeds (several), not both"),
    (["--inner-lr", "0.01,0.02", "--eval-tasks", "0"], "--eval-tasks must be > 0"),
])
def test_bad_grid_values_are_one_line_errors(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    refused_in_one_line(["compare", "sinusoid", "--tableaus", "maml", *TINY, *argv, "--out", str(tmp_path / "x")],
                        capsys, message)
    assert not (tmp_path / "x").exists()


def test_the_single_value_path_is_unchanged(tmp_path: Path, capsys) -> None:
    out = tmp_path / "one"
    assert main(["compare", "sinusoid", "--tableaus", "maml,heun", "--inner-lr", "0.02", *TINY, "--out", str(out)]) == 0
    assert "ms/step" in capsys.readouterr().out
    data = json.loads((out / "compare.json").read_text())
    assert set(data) == {"status", "domain", "config", "tableaus", "table", "runs"}
    assert data["config"]["inner_lr"] == 0.02 and data["config"]["seed"] == 0
    assert folders(out) == ["heun", "maml"]
    assert [r["config"]["inner_lr"] for r in data["runs"]] == [0.02, 0.02]
    # one seed through --seeds is the same single run per tableau
    out3 = tmp_path / "seed3"
    assert main(["compare", "sinusoid", "--tableaus", "maml", "--seeds", "3", *TINY, "--out", str(out3)]) == 0
    data3 = json.loads((out3 / "compare.json").read_text())
    assert "grid" not in data3 and data3["config"]["seed"] == 3 and folders(out3) == ["maml"]
    # and it resumes as before (an --inner-lr of one value is laid over the saved one, as --iterations is)
    assert main(["compare", "sinusoid", "--resume", str(out3), "--quiet"]) == 0
    refused_in_one_line(["compare", "sinusoid", "--resume", str(out3), "--inner-lr", "0.01,0.02"], capsys,
                        "has one inner step, not a grid")


def _driver():
    spec = importlib.util.spec_from_file_location("study_learned", ROOT / "benchmarks" / "study_learned.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_learned"] = module
    spec.loader.exec_module(module)
    return module


def test_study_driver_on_a_tiny_budget(tmp_path: Path, capsys) -> None:
    study = _driver()
    out, js = tmp_path / "study", tmp_path / "results" / "study.json"
    argv = ["--shots", "5", "--iterations", "2", "--seeds", "0,1", "--grid", "0.01,0.02", "--test-tasks", "4",
            "--eval-tasks", "4", "--meta-batch", "2", "--variants", "heun,maml,meta-sgd", "--out", str(out),
            "--json", str(js), "--stage-eval", "heun"]
    assert study.main([*argv, "--dry-run"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 3 and all(c.startswith("python -m rkfast compare sinusoid") for c in commands)
    assert "--learn-rates element" in commands[1] and "--inner-lr 0.01,0.02" in commands[2]  # headline first
    assert not out.exists()

    assert study.main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(js.read_text())
    assert data["budget"] == {"iterations": 2, "meta_batch": 2, "training_tasks_per_run": 4}
    assert data["published"]["maml"]["5"] == [1.13, 0.18] and data["published"]["meta-sgd"]["20"] == [0.31, 0.05]
    assert [(r["shots"], r["variant"]) for r in data["results"]] == [(5, "maml"), (5, "meta-sgd"), (5, "heun"),
                                                                     (5, "heun (stages)")]
    # heun's last stage is one plain step of h from theta: its own stages adapt exactly as the default does
    heun, stages = data["results"][2], data["results"][3]
    assert stages["adaptation"] == "stages" and stages["tasks"]["1"]["mean"] == pytest.approx(heun["tasks"]["1"]["mean"])
    assert heun["tasks"]["1"]["tasks"] == 8 and heun["tasks"]["1"]["finite_tasks"] <= 8
    assert heun["tasks"]["1"]["mean"] == pytest.approx(heun["mse"]["1"]["mean"])
    assert data["results"][1]["learned"] and data["results"][1]["learned"][0]["rates"]["granularity"] == "element"
    for r in data["results"][:3]:
        assert r["status"] == "complete" and r["selected_inner_lr"] in (0.01, 0.02) and r["seeds"] == [0, 1]
        assert set(r["mse"]) == {"1", "10"}
        for stats in r["mse"].values():
            assert stats["ci95"] > 0 and stats["seed_ci95"] is not None and stats["n"] == 8
        assert r["train_time_s_per_run"] > 0 and r["train_time_s_total"] >= r["train_time_s_per_run"]
    assert len(data["results"][2]["validation"]) == 2  # heun: the grid
    md = (out / "study.md").read_text()
    assert md in printed and "| 5 | maml |" in md and "1.13 ± 0.18 (published)" in md and "Li et al. 2017" in md
    assert js.with_suffix(".png").stat().st_size > 1000
    # a rerun reads the finished comparisons back
    assert study.main(argv) == 0
    assert capsys.readouterr().out.count("finished earlier") == 3


def test_study_driver_skips_the_learned_tableaus_without_their_flags(monkeypatch, capsys, tmp_path: Path) -> None:
    study = _driver()
    assert isinstance(study.learned_flags_available(), bool)
    monkeypatch.setattr(study, "learned_flags_available", lambda: False)
    assert study.main(["--variants", "maml,learned-2,learned-4", "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines() == [
        f"python -m rkfast compare sinusoid --tableaus maml --inner-lr 0.01 --seeds 0,1,2 --iterations 10000 "
        f"--test-tasks 600 --shots {k} --out {tmp_path / 's' / f'shots{k}' / 'maml'} --quiet" for k in (5, 10, 20)]
    assert "notice: skipping learned-2" in captured.err and "notice: skipping learned-4" in captured.err
    args = study.build_parser().parse_args([])
    assert study.variant_args("learned-4", args)[:8] == ["--tableaus", "rk4", "--inner-lr", "0.01", "--learn-tableau",
                                                         "pattern", "--tableau-weights", "fixed"]


def test_select_steps_chooses_which_held_out_result_selects(tmp_path: Path, capsys) -> None:
    """--select-steps N selects h on the held-out result after N adaptation steps (one of the domain's)."""
    out = tmp_path / "c"
    argv = ["compare", "sinusoid", "--tableaus", "heun", "--inner-lr", "0.01,0.05", "--iterations", "3",
            "--meta-batch", "2", "--eval-tasks", "4", "--test-tasks", "4", "--select-steps", "1", "--quiet",
            "--out", str(out)]
    assert main(argv) == 0
    saved = json.loads((out / "compare.json").read_text())
    assert saved["grid"]["select_steps"] == 1 and saved["selection"]["steps"] == 1
    scores = {v["inner_lr"]: v["value"] for v in saved["table"][0]["validation"]}
    for h, folder in ((0.01, "heun/h0.01-s0"), (0.05, "heun/h0.05-s0")):
        evals = json.loads((out / folder / "results.json").read_text())["training"]["eval"]
        assert evals[-1]["mse"]["1"] == pytest.approx(scores[h]) and evals[-1]["mse"]["10"] != pytest.approx(scores[h])
    refused_in_one_line([*argv[:-2], "--select-steps", "5", "--out", str(tmp_path / "d")], capsys,
                        "--select-steps 5", "1, 10")
    refused_in_one_line(["compare", "sinusoid", "--resume", str(out), "--select-steps", "10"], capsys,
                        "selects h after 1 step")
