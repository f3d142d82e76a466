"""The ``rkfast`` command line: tableau listing, train, compare, argument errors, and that training learns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import rkfast
from rkfast.cli import main
from rkfast.train import TrainConfig, train

TINY = ["--iterations", "30", "--eval-every", "10", "--eval-tasks", "20", "--test-tasks", "40", "--quiet"]


def test_tableaus_lists_every_named_tableau_with_its_order(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tableaus"]) == 0
    out = capsys.readouterr().out
    for name, tab in rkfast.named_tableaus().items():
        assert f"{name}: s={tab.stages}, order={tab.order}" in out


def test_train_writes_results_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "sinusoid", "--tableau", "rk2(0.75)", *TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "query MSE" in out and "40 tasks" in out and "test step size 0.0075" in out  # rk2(c): h * c = 0.01 * 0.75

    res = json.loads((tmp_path / "results.json").read_text())
    assert {"config", "tableau", "training", "test", "train_time_s", "wall_time_s", "ms_per_meta_step"} <= set(res)
    assert res["config"]["tableau"] == "rk2(0.75)" and res["config"]["iterations"] == 30
    assert res["tableau"]["order"] == 2
    assert res["config"]["backend"] == "auto"
    assert res["backend"] == ("cpp" if rkfast.kernels.available()["cpp"] else "torch")  # what "auto" chose
    assert len(res["training"]["meta_loss"]) == 30
    assert [e["iteration"] for e in res["training"]["eval"]] == [0, 10, 20, 30]
    test = res["test"]
    assert test["tasks"] == 40 and test["query_shots"] == 100 and test["step_size"] == pytest.approx(0.0075)
    assert set(test["loss"]) == {"0", "1", "5", "10"}
    assert all(len(v) == 2 and v[1] > 0 for v in test["loss"].values())  # (mean, ci95)
    for png in ("training.png", "test_tasks.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_same_seeds_one_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compare", "sinusoid", "--tableaus", "maml,maml_msl(0.5,0.5)", *TINY, "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ms/step" in out and "maml_msl(0.5, 0.5)" in out

    data = json.loads((tmp_path / "compare.json").read_text())
    assert [row["order"] for row in data["table"]] == [1, 2]
    assert all(set(row["loss"]) == {"0", "1", "5", "10"} and row["ms_per_meta_step"] > 0 for row in data["table"])
    runs = data["runs"]
    assert [r["tableau"]["name"] for r in runs] == ["maml", "maml_msl(0.5, 0.5)"]
    # the same init and test tasks: before adaptation both models start from the same loss
    first_eval = [r["training"]["eval"][0]["mse"]["0"] for r in runs]
    assert first_eval[0] == first_eval[1]
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_bad_tableau_is_a_clean_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "sinusoid", "--tableau", "rk5"]) == 2
    err = capsys.readouterr().err
    assert "unknown tableau 'rk5'" in err and "rk4" in err and "heun" in err
    assert "Traceback" not in err
    assert main(["compare", "sinusoid", "--tableaus", "maml,nope"]) == 2
    assert main(["train", "sinusoid", "--tableau", "rk2(-1)"]) == 2


def test_console_entry_point_exit_code() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rkfast", "train", "sinusoid", "--tableau", "bogus"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "valid names" in proc.stderr and "Traceback" not in proc.stderr


def test_short_training_run_learns_to_adapt() -> None:
    cfg = TrainConfig("sinusoid", iterations=300, lr=3e-3, meta_batch=10, eval_tasks=0, test_tasks=200, seed=1)
    run = train(cfg, progress=False)
    loss = run.test.summary()["loss"]
    pre, one, ten = loss[0][0], loss[1][0], loss[10][0]
    # adapting the untrained model: -4% (1 step), +3% (10 steps), 81% of tasks gain; here -36%, -61%, 97%
    assert one < 0.8 * pre
    assert ten < 0.5 * pre
    per_task = run.test.losses  # [steps, tasks]: most tasks must gain from a single step
    assert (per_task[1] < per_task[0]).float().mean() > 0.9


def test_eval_writes_what_evaluate_run_gives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rkfast.train import evaluate_run

    out = tmp_path / "run"
    assert main(["train", "sinusoid", "--tableau", "heun", *TINY, "--out", str(out)]) == 0
    assert main(["eval", str(out), "--test-tasks", "12", "--steps", "1,2", "--test-seed", "3"]) == 0
    written = json.loads((out / "eval.json").read_text())
    run = evaluate_run(out, test_tasks=12, steps=(1, 2), test_seed=3)
    assert run.iterations == 30 and run.tasks == 12 and run.checkpoint == "checkpoint.pt"
    assert run.config.test_seed == 3 and run.tableau.name == "heun"
    assert json.loads(json.dumps(run.to_json())) == written
    folder = tmp_path / "folder"
    folder.mkdir()
    capsys.readouterr()
    assert main(["eval", str(out), "--out", str(folder)]) == 2
    assert f"rkfast eval: error: cannot write {folder}: it is a folder" in capsys.readouterr().err
