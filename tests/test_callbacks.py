"""The training loop's callbacks and loggers: every step and evaluation reported once and in order,
``metrics.jsonl`` (strict JSON lines) and TensorBoard scalars, and resumed runs that continue both."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from rkfast.train import (Callback, CheckpointEvent, EndEvent, EvaluationEvent, JsonLinesLogger, RunInterrupted,
                          RunStart, StepEvent, TensorBoardLogger, TrainConfig, resume_config, train)

SMALL = dict(iterations=30, eval_every=10, eval_tasks=20, test_tasks=40, meta_batch=5)


def interrupt_at(step: int):
    """An ``on_step`` hook that sends this process SIGINT after meta-step ``step``, as Ctrl-C would."""

    def hook(done: int, loss: torch.Tensor) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def strict_lines(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, parsed as strict JSON (NaN or Infinity fail)."""

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value)]}`` of a TensorBoard log, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class Recorder(Callback):
    """Every hook call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_start(self, start: RunStart) -> None:
        self.calls.append(("start", start.iteration))

    def on_meta_step(self, iteration: int) -> None:
        self.calls.append(("meta_step", iteration))

    def on_step(self, step: StepEvent) -> None:
        assert isinstance(step.loss, float) and step.time_s >= 0.0
        assert step.stage_losses and all(isinstance(v, float) for v in step.stage_losses.values())
        self.calls.append(("step", step.iteration, step.loss))

    def on_evaluation(self, evaluation: EvaluationEvent) -> None:
        self.calls.append(("evaluation", evaluation.iteration, evaluation.scores))

    def on_checkpoint(self, checkpoint: CheckpointEvent) -> None:
        self.calls.append(("checkpoint", checkpoint.iteration, checkpoint.path.name, checkpoint.status))

    def on_end(self, end: EndEvent) -> None:
        self.calls.append(("end", end.status, end.result))

    def of(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]


@pytest.mark.parametrize("settings", [dict(SMALL, tableau="heun"),  # evaluations every 10 steps
                                      dict(SMALL, iterations=120, eval_every=0, eval_tasks=5)])  # LOG_EVERY reads
def test_a_callback_sees_every_step_and_evaluation_in_order(tmp_path: Path, settings: dict) -> None:
    rec = Recorder()
    run = train(TrainConfig(**settings), out=tmp_path, checkpoint_every=7, progress=False, callbacks=[rec])
    n = settings["iterations"]
    assert rec.calls[0] == ("start", 0) and rec.calls[-1] == ("end", "complete", run)
    assert [c[1] for c in rec.of("meta_step")] == list(range(1, n + 1))
    assert [c[1] for c in rec.of("step")] == list(range(1, n + 1))
    assert [c[2] for c in rec.of("step")] == run.losses  # the very numbers the run recorded
    evals = [0, 10, 20, 30] if settings["eval_every"] else [0, n]
    assert [c[1] for c in rec.of("evaluation")] == [e["iteration"] for e in run.evals] == evals
    assert [c[2]["mse"] for c in rec.of("evaluation")] == [e["mse"] for e in run.evals]
    saved = [(c[1], c[2]) for c in rec.of("checkpoint") if c[3] != "best"]
    assert saved == [(i, "checkpoint.pt") for i in [*range(0, n, 7), n]]
    assert ("checkpoint", run.best["iteration"], "best.pt", "best") in rec.calls
    # in run order: a step's numbers after the step itself, and before an evaluation or checkpoint at that step
    done_at = {c[1]: i for i, c in enumerate(rec.calls) if c[0] == "meta_step"}
    last_step = 0
    for i, call in enumerate(rec.calls):
        if call[0] == "step":
            assert done_at[call[1]] < i and call[1] == last_step + 1, call
            last_step = call[1]
        elif call[0] in ("evaluation", "checkpoint"):
            assert call[1] == last_step, call


def test_metrics_jsonl_is_written_for_every_run_with_a_folder(tmp_path: Path) -> None:
    run = train(TrainConfig(**SMALL), out=tmp_path, checkpoint_every=7, progress=False)
    events = strict_lines(tmp_path / "metrics.jsonl")
    assert {e["event"] for e in events} == {"step", "evaluation", "checkpoint", "end"}
    steps = [e for e in events if e["event"] == "step"]
    assert [e["iteration"] for e in steps] == list(range(1, 31)) and [e["loss"] for e in steps] == run.losses
    assert all(set(e["stage_losses"]) == {"2"} for e in steps)  # maml: b weighs its second stage only
    assert [e["iteration"] for e in events if e["event"] == "evaluation"] == [0, 10, 20, 30]
    assert events[-1]["event"] == "end" and events[-1]["status"] == "complete" and events[-1]["iteration"] == 30
    assert events[-1]["test"]["mse"]["10"][0] == pytest.approx(run.test_summary()["mse"][10][0])
    iterations = [e["iteration"] for e in events]
    assert iterations == sorted(iterations)  # events in run order


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    logger = JsonLinesLogger(tmp_path / "m.jsonl")
    logger.on_start(RunStart(0, 1, TrainConfig().resolved(), None, None, None))  # type: ignore[arg-type]
    logger.on_step(StepEvent(1, float("nan"), {1: float("inf")}, 0.1))
    logger.on_evaluation(EvaluationEvent(1, {"mse": {"0": float("-inf"), "1": 2.0}}))
    logger.close()
    step, evaluation = strict_lines(tmp_path / "m.jsonl")
    assert step["loss"] is None and step["stage_losses"] == {"1": None}
    assert evaluation["scores"] == {"mse": {"0": None, "1": 2.0}}


def test_tensorboard_holds_the_meta_loss_and_the_held_out_scores(tmp_path: Path) -> None:
    run = train(TrainConfig(tableau="heun", **SMALL), progress=False, callbacks=[TensorBoardLogger(tmp_path)])
    logged = scalars(tmp_path)
    assert [s for s, _ in logged["train/meta_loss"]] == list(range(1, 31))
    assert [v for _, v in logged["train/meta_loss"]] == pytest.approx(run.losses)
    assert {"train/stage_loss/1", "train/stage_loss/2"} <= set(logged)
    for steps in ("0", "1", "10"):
        held_out = logged[f"held_out/mse/{steps}_steps"]
        assert held_out == [(e["iteration"], pytest.approx(e["mse"][steps])) for e in run.evals]


def test_tensorboard_missing_names_the_extra_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it now fails
    with pytest.raises(ImportError, match=r"pip install rkfast\[tensorboard\]"):
        TensorBoardLogger("unused")


def _steps_logged_once(run_dir: Path, tb_dir: Path, losses: list[float]) -> None:
    events = strict_lines(run_dir / "metrics.jsonl")
    steps = [e for e in events if e["event"] == "step"]
    assert [e["iteration"] for e in steps] == list(range(1, 31))  # none twice, none missing
    assert [e["loss"] for e in steps] == losses
    assert [e["iteration"] for e in events if e["event"] == "evaluation"] == [0, 10, 20, 30]
    logged = scalars(tb_dir)
    assert [s for s, _ in logged["train/meta_loss"]] == list(range(1, 31))
    assert [v for _, v in logged["train/meta_loss"]] == pytest.approx(losses)
    assert [s for s, _ in logged["held_out/mse/10_steps"]] == [0, 10, 20, 30]


def test_an_interrupted_and_resumed_run_logs_every_step_once(tmp_path: Path) -> None:
    out, tb = tmp_path / "run", tmp_path / "tb"
    with pytest.raises(RunInterrupted):
        train(TrainConfig(**SMALL), out=out, checkpoint_every=7, progress=False, on_step=interrupt_at(13),
              callbacks=[TensorBoardLogger(tb)])
    events = strict_lines(out / "metrics.jsonl")
    assert events[-1]["event"] == "end" and events[-1]["status"] == "interrupted" and events[-1]["iteration"] == 13
    rec = Recorder()
    resumed = train(resume_config(out), out=out, resume=True, progress=False, callbacks=[TensorBoardLogger(tb), rec])
    assert rec.calls[0] == ("start", 13) and [c[1] for c in rec.of("step")] == list(range(14, 31))
    _steps_logged_once(out, tb, resumed.losses)


class CrashAt(Callback):
    """Fails the run at a held-out evaluation, after the loggers before it wrote it (a crash, not a clean stop)."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def on_evaluation(self, evaluation: EvaluationEvent) -> None:
        if evaluation.iteration == self.iteration:
            raise RuntimeError("crash")


def test_a_run_resumed_after_a_crash_drops_what_was_logged_past_its_checkpoint(tmp_path: Path) -> None:
    out, tb = tmp_path / "run", tmp_path / "tb"
    with pytest.raises(RuntimeError, match="crash"):
        train(TrainConfig(**SMALL), out=out, checkpoint_every=8, progress=False,
              callbacks=[TensorBoardLogger(tb), CrashAt(20)])
    logged = [e["iteration"] for e in strict_lines(out / "metrics.jsonl") if e["event"] == "step"]
    assert logged == list(range(1, 21))  # steps 17 to 20 were logged after the checkpoint at 16
    assert max(s for s, _ in scalars(tb)["train/meta_loss"]) == 20
    resumed = train(resume_config(out), out=out, resume=True, progress=False, callbacks=[TensorBoardLogger(tb)])
    _steps_logged_once(out, tb, resumed.losses)
    whole = train(TrainConfig(**SMALL), progress=False)
    assert resumed.losses == whole.losses and not any(math.isnan(x) for x in whole.losses)


def test_callbacks_must_be_callbacks() -> None:
    with pytest.raises(TypeError, match="rkfast.train.Callback"):
        train(TrainConfig(**SMALL), progress=False, callbacks=[print])  # type: ignore[list-item]


def test_the_command_line_logs_to_tensorboard(tmp_path: Path, capsys) -> None:
    """``rkfast train|compare ... --tensorboard DIR``: the run's scalars in DIR, a comparison's per run folder."""
    from rkfast.cli import main

    small = ["--iterations", "6", "--eval-every", "3", "--eval-tasks", "5", "--test-tasks", "10", "--quiet"]
    assert main(["train", "sinusoid", *small, "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]) == 0
    logged = scalars(tmp_path / "tb")
    assert [step for step, _ in logged["train/meta_loss"]] == list(range(1, 7))
    assert any(tag.startswith("held_out/") for tag in logged)
    assert "metrics.jsonl" in capsys.readouterr().out  # the "wrote ..." line names the event log
    assert main(["compare", "sinusoid", "--tableaus", "maml,heun", *small, "--out", str(tmp_path / "cmp"),
                 "--tensorboard", str(tmp_path / "tb-cmp")]) == 0
    for run in ("maml", "heun"):
        assert len(scalars(tmp_path / "tb-cmp" / run)["train/meta_loss"]) == 6
