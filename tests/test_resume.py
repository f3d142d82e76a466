"""Runs never lose their work: checkpoints, resume bit for bit, SIGINT/SIGTERM, divergence, output checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rkfast.cli import main
from rkfast.runs import RunError, RunFolder, atomic_write, load_checkpoint, save_payload, write_json
from rkfast.train import RunDiverged, RunInterrupted, TrainConfig, load_result, resume_config, train

SMALL = dict(iterations=30, eval_every=10, eval_tasks=20, test_tasks=40, meta_batch=5)
TINY = ["--iterations", "30", "--eval-every", "10", "--eval-tasks", "20", "--test-tasks", "40", "--meta-batch", "5",
        "--quiet"]
TIMINGS = ("train_time_s", "wall_time_s", "ms_per_meta_step")


def interrupt_at(step: int):
    """An ``on_step`` hook that sends this process SIGINT after meta-step ``step``, as Ctrl-C would."""

    def hook(done: int, loss: torch.Tensor) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def without_timings(results: dict) -> dict:
    data = {k: v for k, v in results.items() if k not in TIMINGS}
    return json.loads(json.dumps(data))


@pytest.mark.parametrize("tableau,first_order", [("rk4", False), ("heun", True)])
def test_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path: Path, tableau: str, first_order: bool) -> None:
    cfg = TrainConfig(tableau=tableau, first_order=first_order, **SMALL)
    whole = train(cfg, out=tmp_path / "whole", progress=False)

    with pytest.raises(RunInterrupted) as stopped:
        train(cfg, out=tmp_path / "cut", checkpoint_every=7, progress=False, on_step=interrupt_at(13))
    assert stopped.value.result.iteration == 13 and stopped.value.result.status == "interrupted"
    partial = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert partial["status"] == "interrupted" and partial["iteration"] == 13 and partial["test"] is None
    assert len(partial["training"]["meta_loss"]) == 13 and [e["iteration"] for e in partial["training"]["eval"]] == [0, 10]

    resumed = train(resume_config(tmp_path / "cut"), out=tmp_path / "cut", resume=True, progress=False)
    for (name, a), (_, b) in zip(whole.opt.model.state_dict().items(), resumed.opt.model.state_dict().items()):
        assert torch.equal(a, b), name
    a_state, b_state = whole.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    for i in a_state:
        for key in a_state[i]:
            assert torch.equal(a_state[i][key], b_state[i][key]), (i, key)
    assert resumed.losses == whole.losses and resumed.evals == whole.evals
    assert torch.equal(resumed.test.losses, whole.test.losses)
    a = without_timings(json.loads((tmp_path / "whole" / "results.json").read_text()))
    b = without_timings(json.loads((tmp_path / "cut" / "results.json").read_text()))
    assert a == b and b["status"] == "complete"


def test_checkpoints_are_periodic_and_the_best_one_is_kept(tmp_path: Path) -> None:
    seen = []

    def hook(done: int, loss: torch.Tensor) -> None:
        if (tmp_path / "checkpoint.pt").exists():
            seen.append(load_checkpoint(tmp_path / "checkpoint.pt")["iteration"])

    run = train(TrainConfig(**SMALL), out=tmp_path, checkpoint_every=4, progress=False, on_step=hook)
    assert sorted(set(seen)) == [0, 4, 8, 12, 16, 20, 24, 28]
    final = load_checkpoint(tmp_path / "checkpoint.pt")
    assert final["status"] == "complete" and final["iteration"] == 30 and final["test"] is not None
    best = load_checkpoint(tmp_path / "best.pt")
    values = {e["iteration"]: e["mse"]["10"] for e in run.evals}
    assert best["iteration"] == min(values, key=values.get) == run.best["iteration"]
    assert run.best["value"] == min(values.values())
    # the result re-created from the checkpoint is the run's
    again = load_result(tmp_path)
    assert again.losses == run.losses and torch.equal(again.test.losses, run.test.losses)


def test_truncated_or_foreign_checkpoint_is_refused_and_nothing_is_overwritten(tmp_path: Path) -> None:
    with pytest.raises(RunInterrupted):
        train(TrainConfig(**SMALL), out=tmp_path, progress=False, on_step=interrupt_at(5))
    ckpt, results = tmp_path / "checkpoint.pt", tmp_path / "results.json"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    before = results.read_bytes()
    with pytest.raises(RunError, match="checkpoint.pt is not a readable rkfast checkpoint"):
        train(TrainConfig(**SMALL), out=tmp_path, resume=True, progress=False)
    torch.save({"model": {}}, ckpt)
    with pytest.raises(RunError, match="checkpoint.pt is not an rkfast run checkpoint"):
        train(TrainConfig(**SMALL), out=tmp_path, resume=True, progress=False)
    assert results.read_bytes() == before
    assert main(["train", "sinusoid", *TINY, "--resume", str(tmp_path)]) == 2


def test_resume_refuses_other_settings_and_a_new_run_refuses_an_occupied_folder(tmp_path: Path, capsys) -> None:
    with pytest.raises(RunInterrupted):
        train(TrainConfig(**SMALL), out=tmp_path, progress=False, on_step=interrupt_at(3))
    with pytest.raises(RunError, match=r"lr: 0.001 -> 0.01"):
        train(TrainConfig(**{**SMALL, "lr": 0.01}), out=tmp_path, resume=True, progress=False)
    with pytest.raises(RunError, match="holds an earlier run"):
        train(TrainConfig(**SMALL), out=tmp_path, progress=False)
    capsys.readouterr()
    assert main(["train", "sinusoid", *TINY, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    # the CLI resumes with the run's own settings, and may extend it
    assert main(["train", "sinusoid", "--resume", str(tmp_path), "--iterations", "40", "--quiet"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["iteration"] == 40


def test_overwrite_leaves_no_stale_results(tmp_path: Path) -> None:
    train(TrainConfig(**SMALL), out=tmp_path, progress=False)
    old = json.loads((tmp_path / "results.json").read_text())
    assert old["status"] == "complete"
    with pytest.raises(RunInterrupted):
        train(TrainConfig(**{**SMALL, "seed": 1}), out=tmp_path, overwrite=True, progress=False,
              on_step=interrupt_at(2))
    new = json.loads((tmp_path / "results.json").read_text())
    assert new["status"] == "interrupted" and new["config"]["seed"] == 1 and new["iteration"] == 2
    assert not (tmp_path / "training.png").exists()  # the earlier run's plots went with it


def test_output_paths_are_checked_before_training(tmp_path: Path, capsys) -> None:
    (tmp_path / "results.json").mkdir()
    steps = []
    with pytest.raises(RunError, match="results.json: a folder of that name is in the way"):
        train(TrainConfig(**SMALL), out=tmp_path, progress=False, on_step=lambda n, _: steps.append(n))
    assert steps == [] and not (tmp_path / "checkpoint.pt").exists()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = {
        "--out": [["--out", str(a_file)], "is an existing file"],
        "unwritable": [["--out", str(a_file / "sub")], "cannot create the output folder"],
        "seed": [["--seed", "-1"], "--seed: must be >= 0"],
        "device": [["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device: device"],
        "bad device": [["--device", "nonsense"], "--device: device 'nonsense' is not available"],
    }
    for name, (argv, message) in cases.items():
        capsys.readouterr()
        assert main(["train", "sinusoid", *TINY, *argv]) == 2, name
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (name, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "results.json"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_cannot_be_created_is_refused_before_training(capsys, monkeypatch) -> None:
    # /proc takes no new folders, even from root, whose permission bits say it may write anywhere: only
    # creating the folder tells
    import rkfast.train.loop

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(rkfast.train.loop, "_Training", no_training)
    out = Path("/proc/rkfast-no-such-folder/run")
    with pytest.raises(RunError, match=r"cannot create the output folder /proc/rkfast-no-such-folder/run: "):
        train(TrainConfig(**SMALL), out=out, progress=False)
    capsys.readouterr()
    assert main(["train", "sinusoid", *TINY, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"rkfast train: error: cannot create the output folder {out}: ")
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert main(["compare", "sinusoid", "--tableaus", "maml,heun", *TINY, "--out", str(out)]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err


def test_the_writability_check_leaves_no_trace(tmp_path: Path) -> None:
    # the check creates the missing folders and a probe file to be sure, then removes them again
    RunFolder(tmp_path / "a" / "b" / "c").check_writable()
    (tmp_path / "d").mkdir()
    RunFolder(tmp_path / "d").check_writable()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d"]
    with pytest.raises(RunError, match="no checkpoint"):  # refused after the check: no empty folder left behind
        train(TrainConfig(**SMALL), out=tmp_path / "e" / "f", resume=True, progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d"]


def test_atomic_write_that_fails_midway_keeps_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    write_json(target, {"old": True})
    before = target.read_bytes()

    def half_then_fail(f) -> None:
        f.write('{"new": ')
        f.flush()
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half_then_fail, "w")
    with pytest.raises(Exception):  # torch.save of something it cannot pickle fails while writing
        save_payload(target, {"format": "x", "model": lambda: None})

    def interrupted(f) -> None:
        f.write("{")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted, "w")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no .results.json.*.tmp left
    write_json(target, {"new": True})  # and a later write replaces it whole
    assert json.loads(target.read_text()) == {"new": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_without_a_folder_sigint_stops_training_at_once(capsys) -> None:
    # nothing to save: SIGINT is Ctrl-C as usual (KeyboardInterrupt), not a request to finish and save
    steps = []

    def hook(done: int, loss: torch.Tensor) -> None:
        steps.append(done)
        if done == 3:
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(**{**SMALL, "iterations": 1000}), progress=False, on_step=hook)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert steps[-1] == 3 and len(steps) == 3
    assert "received" not in capsys.readouterr().err  # no promise of a save


class Terminated(Exception):
    pass


def test_without_a_folder_sigterm_keeps_the_process_handler() -> None:
    # train() without out= installs no handler: SIGTERM does what the process says (here: raise Terminated)
    steps = []

    def hook(done: int, loss: torch.Tensor) -> None:
        steps.append(done)
        if done == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_term(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with pytest.raises(Terminated):
            train(TrainConfig(**{**SMALL, "iterations": 1000}), progress=False, on_step=hook)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert steps == [1, 2, 3, 4]


def test_without_a_folder_sigterm_ends_the_process_as_by_default() -> None:
    script = (
        "import os, signal\n"
        "from rkfast.train import TrainConfig, train\n"
        "def hook(done, loss):\n"
        "    if done == 3:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "train(TrainConfig(iterations=100000, eval_tasks=5, test_tasks=5), progress=False, on_step=hook)\n"
        "print('trained on')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "trained on" not in proc.stdout and "received" not in proc.stderr


@pytest.mark.filterwarnings("ignore::rkfast.tableau.InconsistentTableauWarning")
def test_divergence_saves_the_last_finite_state(tmp_path: Path, capsys) -> None:
    cfg = TrainConfig(tableau="rk2(1e-300)", **SMALL)
    with pytest.raises(RunDiverged) as diverged:
        train(cfg, out=tmp_path, progress=False)
    result = diverged.value.result
    assert result.status == "diverged" and result.iteration == 0 and "non-finite" in result.error
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["status"] == "diverged" and saved["iteration"] == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "diverged" and "non-finite" in data["error"]
    assert main(["train", "sinusoid", *TINY, "--tableau", "rk2(1e-300)", "--out", str(tmp_path / "cli")]) == 1
    assert "diverged" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::rkfast.tableau.InconsistentTableauWarning")
def test_compare_keeps_the_other_tableaus_when_one_diverges(tmp_path: Path, capsys) -> None:
    assert main(["compare", "sinusoid", "--tableaus", "maml,rk2(1e-300),heun", *TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "diverged at step 1" in out
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["status"] == "complete"
    assert [r["status"] for r in data["table"]] == ["complete", "diverged", "complete"]
    assert "loss" in data["table"][0] and "loss" in data["table"][2] and "error" in data["table"][1]
    assert (tmp_path / "compare.png").exists() and (tmp_path / "heun" / "checkpoint.pt").exists()


def test_interrupted_compare_resumes_without_redoing_finished_tableaus(tmp_path: Path, capsys, monkeypatch) -> None:
    import rkfast.compare as comparing

    calls = []
    real_train = comparing.train

    def train_then_stop_second(cfg, **kwargs):
        calls.append((cfg.tableau.name, kwargs["resume"]))
        if len(calls) == 2:
            kwargs["on_step"] = interrupt_at(4)
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(comparing, "train", train_then_stop_second)
    argv = ["compare", "sinusoid", "--tableaus", "maml,heun,rk4", *TINY, "--iterations", "12", "--out", str(tmp_path)]
    assert main(argv) == 130
    assert "resume the comparison with: rkfast compare sinusoid --resume" in capsys.readouterr().err
    assert json.loads((tmp_path / "compare.json").read_text())["status"] == "interrupted"
    assert main(["compare", "sinusoid", "--resume", str(tmp_path), "--quiet"]) == 0
    assert calls == [("maml", False), ("heun", False), ("heun", True), ("rk4", False)]
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["status"] == "complete" and [r["iteration"] for r in data["table"]] == [12, 12, 12]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_saves_and_exits_130(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rkfast", "train", "sinusoid", "--iterations", "100000", "--eval-every", "0",
         "--eval-tasks", "5", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():  # written once the loop (and its handlers) run
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert f"rkfast train sinusoid --resume {out}" in stderr and "Traceback" not in stderr
    saved = load_checkpoint(out / "checkpoint.pt")
    results = json.loads((out / "results.json").read_text())
    assert saved["status"] == results["status"] == "interrupted"
    assert saved["iteration"] == results["iteration"] == len(results["training"]["meta_loss"]) > 0


def test_eval_reads_the_best_checkpoint(tmp_path: Path, capsys) -> None:
    assert main(["train", "sinusoid", *TINY, "--out", str(tmp_path)]) == 0
    assert main(["eval", str(tmp_path), "--checkpoint", "best", "--test-tasks", "10", "--out",
                 str(tmp_path / "e.json")]) == 0
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["checkpoint"] == "best.pt"
    assert data["iteration" if "iteration" in data else "iterations"] == load_checkpoint(tmp_path / "best.pt")["iteration"]
