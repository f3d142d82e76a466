"""Which held-out evaluation picks best.pt (``--select-steps``, its default per run), the warnings when that
score or the test adaptation is NaN or infinite, and ``rkfast eval --checkpoint best`` naming its evaluation."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from rkfast.cli import main
from rkfast import report
from rkfast.results import AdaptationOutput
from rkfast.runs import load_checkpoint, save_payload
from rkfast.tableau import get_tableau
from rkfast.tasks import get_domain
from rkfast.train import RunInterrupted, TrainConfig, default_select_steps, resume_config, train

# Meta-SGD on sinusoid: its element-wise rates are trained for one step; with a fast rate_lr the 10-step
# held-out adaptation already diverges at the first evaluation after iteration 0 (and the 5- and 10-step test)
META_SGD = ["--learn-rates", "element", "--rate-lr", "0.01", "--iterations", "100", "--eval-every", "50",
            "--eval-tasks", "20", "--test-tasks", "50", "--quiet"]
TINY = ["--iterations", "20", "--eval-every", "10", "--eval-tasks", "10", "--test-tasks", "20", "--meta-batch", "5",
        "--quiet"]


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def meta_sgd(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("meta_sgd") / "run"
    text = io.StringIO()  # capsys is function-scoped: a module fixture captures by hand
    with contextlib.redirect_stdout(text):
        assert main(["train", "sinusoid", *META_SGD, "--out", str(out)]) == 0
    return out, text.getvalue()


def test_meta_sgd_picks_best_on_the_one_step_it_trains(meta_sgd) -> None:
    out, printed = meta_sgd
    r = _results(out)
    evals = r["training"]["eval"]
    assert any(e["mse"]["10"] is None for e in evals[1:]), "the settings no longer make 10 steps diverge"
    assert r["config"]["select_steps"] == 1
    best = r["training"]["best"]
    assert best["steps"] == 1 and best["metric"] == "mse" and best["iteration"] > 0
    assert best["value"] == min(e["mse"]["1"] for e in evals)
    assert load_checkpoint(out / "best.pt")["iteration"] == best["iteration"]
    assert "picks best.pt" not in printed  # every 1-step score was finite: nothing to warn of


def test_the_table_gives_finite_counts_and_medians_with_one_warning(meta_sgd) -> None:
    out, printed = meta_sgd
    lines = printed.splitlines()
    header = next(line for line in lines if line.startswith("test steps"))
    assert header.split()[-2:] == ["finite", "median"]
    row = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in ("1", "10")}
    assert row["1"][-2] == "50/50" and row["10"][1] == "nan"
    finite, total = map(int, row["10"][-2].split("/"))
    assert total == 50 and finite < 50
    nonfinite = _results(out)["test"]["nonfinite"]["loss"]
    assert finite == 50 - nonfinite["10"]
    warnings = [line for line in lines if line.startswith("warning: the test adaptation diverged")]
    assert len(warnings) == 1 and "learned rates are trained for 1 step" in warnings[0]
    assert "--test-step" in warnings[0]


def test_eval_of_best_names_its_iteration_and_metric(meta_sgd, capsys) -> None:
    out, _ = meta_sgd
    best = _results(out)["training"]["best"]
    assert main(["eval", str(out), "--checkpoint", "best", "--test-tasks", "10", "--out", str(out / "e.json")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"{best['iteration']} meta-steps (best.pt: chosen at iteration {best['iteration']} by the held-out mse " \
           f"after 1 step = {best['value']:.4g})" in first
    assert json.loads((out / "e.json").read_text())["selected_by"] == best


def test_select_steps_is_honoured_recorded_and_warns_when_best_is_untrained(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "sinusoid", *META_SGD, "--select-steps", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    r = _results(out)
    assert r["config"]["select_steps"] == 10
    assert r["training"]["best"]["steps"] == 10 and r["training"]["best"]["iteration"] == 0
    warning = [line for line in printed.splitlines() if "picks best.pt" in line]
    assert len(warning) == 1
    assert "best.pt holds iteration 0 (the untrained model)" in warning[0] and "--select-steps" in warning[0]


def test_a_selection_that_is_never_finite_writes_no_best_and_says_so(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"  # held-out tasks adapted with a step of 5: 10 steps are never finite
    assert main(["train", "sinusoid", *TINY, "--test-step", "5", "--select-steps", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert _results(out)["training"]["best"] is None and not (out / "best.pt").exists()
    warning = [line for line in printed.splitlines() if "picks best.pt" in line]
    assert len(warning) == 1 and "best.pt was not written" in warning[0] and "--select-steps" in warning[0]
    assert "best.pt" not in printed.splitlines()[-1]  # the files written


def test_a_finite_run_keeps_its_table_and_the_domain_s_selection(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "sinusoid", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("test steps"))
    assert header.split() == ["test", "steps", "query", "MSE", "95%", "CI"] and "warning" not in printed
    assert _results(out)["config"]["select_steps"] == 10 and _results(out)["training"]["best"]["steps"] == 10


def test_default_select_steps() -> None:
    maml, maml3, maml5, rk4 = (get_tableau(n) for n in ("maml", "maml(3)", "maml(5)", "rk4"))
    assert default_select_steps(maml, False, (1, 10)) == 10  # the domain's own
    assert default_select_steps(maml, True, (1, 10)) == 1  # learned rates: the step they are trained for
    assert default_select_steps(rk4, True, (1, 10)) == 1
    assert default_select_steps(maml3, False, (1, 3)) == 3 and default_select_steps(maml3, True, (1, 3)) == 3
    assert default_select_steps(maml5, False, (1, 10)) == 10  # 5 is not evaluated: the domain's own
    assert TrainConfig("sinusoid").resolved().select_steps == 10
    assert TrainConfig("sinusoid", learn_rates="element").resolved().select_steps == 1
    assert TrainConfig("sinusoid", select_steps=1).resolved().select_steps == 1
    with pytest.raises(ValueError, match="select_steps 3: .* adapt 1, 10 step"):
        TrainConfig("sinusoid", select_steps=3).resolved()


def test_select_steps_on_the_command_line_must_be_evaluated(tmp_path: Path, capsys) -> None:
    assert main(["train", "sinusoid", *TINY, "--select-steps", "3", "--out", str(tmp_path / "x")]) == 2
    assert "select_steps 3" in capsys.readouterr().err


def test_a_checkpoint_from_before_select_steps_resumes_with_the_last_count(tmp_path: Path) -> None:
    cfg = TrainConfig(iterations=20, eval_every=10, eval_tasks=10, test_tasks=20, meta_batch=5,
                      learn_rates="scalar")

    def stop(done: int, loss: torch.Tensor) -> None:
        if done == 12:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(RunInterrupted):
        train(cfg, out=tmp_path, checkpoint_every=100, progress=False, on_step=stop)
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    del payload["config"]["select_steps"]
    first = min(payload["history"]["evals"], key=lambda e: e["mse"]["10"])  # as the run picked best.pt then
    payload["history"]["best"] = {"iteration": first["iteration"], "value": first["mse"]["10"], "steps": 10,
                                  "metric": "mse"}
    save_payload(tmp_path / "checkpoint.pt", payload)
    assert resume_config(tmp_path).select_steps == 10  # how best.pt was picked before select_steps
    run = train(resume_config(tmp_path), out=tmp_path, resume=True, progress=False)
    assert run.status == "complete" and run.best is not None and run.best["steps"] == 10


def test_the_table_without_per_task_values_and_the_checkpoint_line() -> None:
    domain = get_domain("sinusoid")
    cfg = TrainConfig("sinusoid").resolved()
    losses = torch.tensor([[1.0, 2.0, 3.0], [0.5, float("nan"), 1.5]])
    out = AdaptationOutput((0, 1), 0.01, losses, {})
    text = report.test_report(domain, cfg, out.summary(), 3, "x", output=out)
    # torch.median, as the study driver: the lower of the two middle values
    assert "2/3" in text and "0.5000" in text and "the step is too large" in text
    assert "-" in report.test_report(domain, cfg, out.summary(), 3, "x").splitlines()[-2]
    assert report.checkpoint_line("checkpoint.pt", None) == "checkpoint.pt"
    assert report.checkpoint_line("best.pt", {"iteration": 7, "value": 0.5, "steps": 10, "metric": "mse"}) == (
        "best.pt: chosen at iteration 7 by the held-out mse after 10 steps = 0.5"
    )
