"""Training over torch.distributed, as a user starts it: 2-process gloo jobs launched with torchrun
(``python -m torch.distributed.run --standalone --nproc-per-node 2 -m rkfast train ...``).

The run completes with rank 0 alone reporting and writing, its meta-test covers every test task once (the
tasks and order of one process), an interrupted run resumes bit for bit with the same number of processes
(and is refused with another), a rank that fails ends the job with an error naming it, and a meta-batch
smaller than the number of processes is refused. The in-process tests cover what needs no second process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rkfast import TaskBatch, TaskSet
from rkfast.cli import main
from rkfast.runs import load_checkpoint
from rkfast.tasks import get_domain
from rkfast.train import TrainConfig, eval_pieces, evaluate_tasks, load_run, task_chunks, task_generator, train

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

TINY = ["--iterations", "6", "--eval-every", "3", "--eval-tasks", "4", "--test-tasks", "8", "--meta-batch", "4",
        "--quiet"]
JOB_TIMEOUT_S = 240  # one tiny job: two interpreters importing torch on a busy 2-core machine, with margin
TIMINGS = ("train_time_s", "wall_time_s", "ms_per_meta_step")


def torchrun(*args: str, script: Path | None = None) -> list[str]:
    """The torchrun command line of a 2-process job on this machine (a free port picked by torchrun)."""
    target = [str(script)] if script is not None else ["-m", "rkfast"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *args]


def job_env() -> dict[str, str]:
    # one thread per process (2 processes on a 2-core machine); collectives give up after 60 s, not 300
    return {**os.environ, "OMP_NUM_THREADS": "1", "RKFAST_DIST_TIMEOUT": "60", "PYTHONUNBUFFERED": "1"}


def run_job(command: list[str], timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=job_env(), timeout=timeout)


def without_timings(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in TIMINGS}


def test_a_two_process_run_completes_with_rank_0_alone_reporting(tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = run_job(torchrun("train", "sinusoid", *TINY, "--out", str(out)))
    assert job.returncode == 0, job.stderr
    # rank 0 alone prints: one table, one line of written files, one distributed summary
    assert job.stdout.count("wrote ") == 1 and job.stdout.count("test steps") == 1, job.stdout
    assert job.stdout.count("task-parallel over 2 processes (gloo): tasks per meta-step and process 2, 2") == 1
    assert "Traceback" not in job.stderr, job.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete" and results["iteration"] == 6
    assert results["world_size"] == 2
    assert results["distributed"] == {"world_size": 2, "backend": "gloo", "meta_batch_per_rank": [2, 2]}
    assert results["test"]["tasks"] == 8
    assert [e["iteration"] for e in results["training"]["eval"]] == [0, 3, 6]
    for name in ("checkpoint.pt", "best.pt", "training.png", "test_tasks.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no stray temporary files
    # rank 0 alone logs: every step once, every evaluation once
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in events if e["event"] == "step"] == list(range(1, 7))
    assert [e["iteration"] for e in events if e["event"] == "evaluation"] == [0, 3, 6]
    assert [e["status"] for e in events if e["event"] == "end"] == ["complete"]

    # the gathered meta-test is every test task once, in the order one process evaluates them
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["random"]["world_size"] == 2 and len(saved["random"]["ranks"]) == 2
    assert not torch.equal(saved["random"]["ranks"][0]["train_tasks"], saved["random"]["ranks"][1]["train_tasks"])
    cfg, opt, _ = load_run(out)
    assert opt.distributed is None
    domain = get_domain("sinusoid")
    defaults = domain.defaults_for(cfg.options)
    sampler = domain.make_tasks(cfg.options, "test", opt.device)
    chunks = task_chunks(sampler, cfg.test_tasks, defaults.eval_chunk, task_generator(cfg.test_seed, "test"))
    alone = evaluate_tasks(opt, chunks, defaults.test_steps, cfg.test_step)
    assert saved["test"]["losses"].shape == alone.losses.shape == (len(saved["test"]["steps"]), 8)
    torch.testing.assert_close(saved["test"]["losses"], alone.losses.cpu(), rtol=1e-4, atol=1e-6)


def test_learned_rates_and_tableau_train_over_two_processes(tmp_path: Path) -> None:
    """Learned coefficients under torchrun (their directions ride in the same all-reduce as the parameters';
    tests/test_distributed.py checks that the ranks agree bit for bit and equal one process)."""
    learned = ["--tableau", "heun", "--learn-rates", "tensor", "--learn-tableau", "pattern", "--tableau-weights",
               "order", "--tableau-lr", "0.05", "--rate-lr", "0.01"]
    out = tmp_path / "run"
    job = run_job(torchrun("train", "sinusoid", *TINY, *learned, "--out", str(out)))
    assert job.returncode == 0, job.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["status"] == "complete"
    info = results["learned_tableau"]
    assert info["A"][1][0] != 1.0 and abs(sum(info["b"]) - 1) < 1e-6  # moved, and still consistent
    assert any(v != [0.01] for v in results["rates"]["values"].values())
    assert (out / "tableau.png").is_file() and (out / "rates.png").is_file()


def test_an_interrupted_two_process_run_resumes_bit_for_bit(tmp_path: Path, capsys) -> None:
    common = ["--eval-every", "0", "--eval-tasks", "4", "--test-tasks", "8", "--meta-batch", "4", "--quiet"]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(torchrun("train", "sinusoid", "--iterations", "100000", "--checkpoint-every", "2",
                                     *common, "--out", str(cut)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=job_env())
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (cut / "checkpoint.pt").exists():  # written once the loop and its signal handlers run
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # to torchrun, which forwards it to every worker
        _, stderr = proc.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode != 0
    # rank 0 alone announces the signal and says how to resume; every rank stopped after the same step
    assert stderr.count("SIGINT received") == 1, stderr
    assert stderr.count("interrupted after meta-step") == 1, stderr
    assert f"resume with: torchrun --nproc-per-node 2 -m rkfast train sinusoid --resume {cut}" in stderr
    saved = load_checkpoint(cut / "checkpoint.pt")
    partial = json.loads((cut / "results.json").read_text())
    assert saved["status"] == partial["status"] == "interrupted" and partial["world_size"] == 2
    done = saved["iteration"]
    assert done >= 1 and partial["iteration"] == done

    # another number of processes is refused, naming both
    capsys.readouterr()
    assert main(["train", "sinusoid", "--resume", str(cut), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "trained by 2 processes and this run has 1 process" in err and "torchrun --nproc-per-node 2" in err

    total = str(done + 4)
    resumed = run_job(torchrun("train", "sinusoid", "--resume", str(cut), "--iterations", total, "--quiet"))
    assert resumed.returncode == 0, resumed.stderr
    whole_dir = tmp_path / "whole"
    whole = run_job(torchrun("train", "sinusoid", "--iterations", total, *common, "--out", str(whole_dir)))
    assert whole.returncode == 0, whole.stderr

    a, b = load_checkpoint(whole_dir / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == done + 4 and a["status"] == b["status"] == "complete"
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        assert value.dtype == b["model"][name].dtype and torch.equal(value, b["model"][name]), name
    for i, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][key]), (i, key)
    for r in range(2):  # each rank's stream of training tasks went on as if never interrupted
        assert torch.equal(a["random"]["ranks"][r]["train_tasks"], b["random"]["ranks"][r]["train_tasks"]), r
    assert torch.equal(a["test"]["losses"], b["test"]["losses"])
    whole_results = without_timings(json.loads((whole_dir / "results.json").read_text()))
    resumed_results = without_timings(json.loads((cut / "results.json").read_text()))
    assert whole_results == resumed_results


def test_compare_runs_every_tableau_over_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "compare"
    job = run_job(torchrun("compare", "sinusoid", "--tableaus", "maml,heun", "--iterations", "4", "--eval-every", "2",
                           "--eval-tasks", "4", "--test-tasks", "8", "--meta-batch", "4", "--quiet", "--out", str(out)))
    assert job.returncode == 0, job.stderr
    assert job.stdout.count("wrote ") == 1 and job.stdout.count("maml: test MSE") == 1, job.stdout
    data = json.loads((out / "compare.json").read_text())
    assert data["status"] == "complete" and data["tableaus"] == ["maml", "heun"]
    assert [r["world_size"] for r in data["runs"]] == [2, 2] and [r["test"]["tasks"] for r in data["runs"]] == [8, 8]
    # resuming a finished comparison reads the runs on rank 0 and reports them again
    again = run_job(torchrun("compare", "sinusoid", "--resume", str(out), "--quiet"))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("wrote ") == 1 and again.stdout.count("heun: test MSE") == 1


FLAKY_DOMAIN = textwrap.dedent('''
    """A user's own domain whose training data fails on rank 1 alone (a file that machine lacks) at its third
    meta-batch; the rest is the sinusoid domain."""
    import os
    from dataclasses import replace

    from rkfast.cli import main
    from rkfast.tasks import get_domain, register

    base = get_domain("sinusoid")


    class Flaky:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def sample(self, num_tasks, generator=None):
            self.calls += 1
            if os.environ["RANK"] == "1" and self.calls == 3:
                raise FileNotFoundError("task file missing on this machine: /data/tasks-rank1.npz")
            return self.inner.sample(num_tasks, generator)


    def make_tasks(options, split, device):
        inner = base.make_tasks(options, split, device)
        return Flaky(inner) if split == "train" else inner


    register(replace(base, name="flaky", make_tasks=make_tasks))
    raise SystemExit(main())
''')


def test_a_failing_rank_ends_the_job_with_an_error_naming_it(tmp_path: Path) -> None:
    script = tmp_path / "flaky.py"
    script.write_text(FLAKY_DOMAIN)
    out = tmp_path / "run"
    start = time.monotonic()
    job = run_job(torchrun("train", "flaky", "--iterations", "20", "--eval-every", "0", "--eval-tasks", "2",
                           "--test-tasks", "4", "--meta-batch", "4", "--quiet", "--out", str(out), script=script),
                  timeout=180)
    elapsed = time.monotonic() - start
    assert job.returncode != 0
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end"
    # rank 1 shows its own error; rank 0 names rank 1 (no rank waits for a collective that never comes)
    assert "FileNotFoundError: task file missing on this machine" in job.stderr, job.stderr
    assert "rkfast train: error: the distributed meta-step failed on rank(s) [1] of 2" in job.stderr, job.stderr
    assert "lost contact" not in job.stderr and "timed out" not in job.stderr.lower()
    saved = load_checkpoint(out / "checkpoint.pt")  # the last checkpoint stays as it was
    assert saved["status"] == "running" and saved["iteration"] == 0


def test_a_meta_batch_smaller_than_the_processes_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = run_job(torchrun("train", "sinusoid", "--iterations", "2", "--meta-batch", "1", "--quiet",
                           "--out", str(out)))
    assert job.returncode != 0
    message = "rkfast train: error: --meta-batch 1 is smaller than the 2 processes of the run"
    assert job.stderr.count(message) == 1, job.stderr  # said once, by rank 0
    assert "rkfast/cli.py" not in job.stderr and "rkfast/train.py" not in job.stderr  # no traceback of ours
    assert not out.exists()


# -- in one process ---------------------------------------------------------------------------------------


def _batch(tasks: int, start: int = 0) -> TaskBatch:
    ids = torch.arange(start, start + tasks, dtype=torch.float64).reshape(-1, 1, 1)
    return TaskBatch(ids.expand(-1, 2, 1), ids.expand(-1, 2, 1), ids.expand(-1, 3, 1), ids.expand(-1, 3, 1))


def test_eval_pieces_hold_every_task_once_in_order() -> None:
    def ids(pieces: list) -> list[int]:
        return [int(i) for p in pieces for i in p.support_x[:, 0, 0]]

    chunks = [_batch(5), _batch(5, 5), _batch(2, 10)]
    kept = eval_pieces(chunks, 1)  # one rank: kept whole
    assert len(kept) == 3 and all(a is b for a, b in zip(kept, chunks))
    for parts in (2, 3, 4, 8, 64):
        pieces = eval_pieces(chunks, parts)
        assert ids(pieces) == list(range(12)) and all(p.num_tasks >= 1 for p in pieces)
    # every rank gets a slice of every chunk (round robin): equal work
    assert [p.num_tasks for p in eval_pieces(chunks, 2)] == [3, 2, 3, 2, 1, 1]
    assert [p.num_tasks for p in eval_pieces([_batch(100)] * 6, 4)] == [25] * 24
    # tasks that may share data (a TaskSet: one rollout seed for all, say) are never cut
    taskset = TaskSet(lambda m, d: d, lambda m, d: d, torch.zeros(3, 1), torch.zeros(3, 1))
    kept = eval_pieces([taskset], 4)
    assert len(kept) == 1 and kept[0] is taskset


def test_a_one_process_run_records_its_world_size(tmp_path: Path) -> None:
    run = train(TrainConfig(iterations=2, eval_every=0, eval_tasks=2, test_tasks=4, meta_batch=2), out=tmp_path,
                progress=False)
    assert run.world_size == 1 and run.distributed is None
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 1 and results["distributed"] is None
    assert "world_size" not in load_checkpoint(tmp_path / "checkpoint.pt")["random"]


def test_eval_refuses_a_launcher_and_other_ranks_stay_quiet(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "rkfast eval: error: rkfast eval meta-tests in one process" in err
    monkeypatch.setenv("RANK", "1")
    assert main(["eval", str(tmp_path)]) == 2
    assert capsys.readouterr() == ("", "")
    assert main(["train", "sinusoid", "--no-such-option"]) == 2  # usage errors: rank 0's alone
    assert capsys.readouterr() == ("", "")


def test_a_bad_collective_timeout_is_refused(capsys, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("RKFAST_DIST_TIMEOUT", "soon")
    assert main(["train", "sinusoid", "--iterations", "2", "--quiet"]) == 2
    assert "RKFAST_DIST_TIMEOUT='soon': must be a number of seconds > 0" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_launch_reads_the_launchers_environment(monkeypatch) -> None:
    from datetime import timedelta

    from rkfast.train import LaunchError, dist_timeout, launched_process_group, launched_world

    for name in ("WORLD_SIZE", "RANK", "RKFAST_DIST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    assert launched_world() == (1, 0) and dist_timeout() == timedelta(seconds=300)
    with launched_process_group("cpu") as parallel:
        assert parallel is None and not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("RKFAST_DIST_TIMEOUT", "7.5")
    assert launched_world() == (3, 2) and dist_timeout() == timedelta(seconds=7.5)
    monkeypatch.setenv("RKFAST_DIST_TIMEOUT", "-1")
    with pytest.raises(LaunchError, match="must be a number of seconds > 0"):
        dist_timeout()
