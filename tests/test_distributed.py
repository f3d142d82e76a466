"""Task-parallel meta-steps (rkfast.distributed): 2 gloo processes on the CPU, started by the tests.

Each job runs a module-level function of this file in ``world_size`` fresh Python processes (this file is
also the workers' entry point, see the bottom) joined in a gloo process group, and returns what each rank
returned. :func:`run_ranks` is the reusable part: it raises, printing every failed child's traceback and
output, when a child fails; :func:`launch_ranks` returns every rank's outcome (for jobs where a rank is
meant to fail or die). Several checks share one job, so that the startup (importing torch twice) is paid a
few times per module instead of once per check.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the workers run this file as a script; helpers.py lives next to it
    sys.path.insert(0, str(HERE))

from helpers import assert_unchanged, same_bits, smooth_mlp, snapshot  # noqa: E402

import rkfast  # noqa: E402
from rkfast import LearnedTableau, MetaOptimizer, NonFiniteLossError, Rates, TaskBatch, TaskSet  # noqa: E402
from rkfast.distributed import InconsistentParametersError, RankFailedError, TaskParallel  # noqa: E402

WORLD = 2
JOB_SECONDS = 60.0  # what a job that fails on one rank must end within (start-up included)


# -- the multi-process harness ----------------------------------------------------------------------------


@dataclass
class RankOutcome:
    """What one worker process left behind."""

    rank: int
    returncode: int | None  # None: killed at the job's deadline
    value: Any = None  # what the target returned
    error: str | None = None  # the child's traceback, if the target (or the group's setup) raised
    output: str = ""  # the child's stdout and stderr

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.error is None

    def describe(self) -> str:
        status = "killed at the deadline" if self.returncode is None else f"exit code {self.returncode}"
        text = f"--- rank {self.rank}: {status} ---\n"
        if self.error:
            text += f"traceback:\n{self.error}\n"
        if self.output.strip():
            text += f"output:\n{self.output.rstrip()}\n"
        return text


class ChildFailed(AssertionError):
    """A worker process of :func:`run_ranks` raised, exited abnormally or missed the deadline."""


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(target: Callable[..., Any], *args: Any, world_size: int = WORLD, timeout: float = 120.0,
                 group_timeout: float = 30.0, finalize: bool = True) -> tuple[list[RankOutcome], float]:
    """Run ``target(rank, world_size, *args)`` in ``world_size`` new processes in one gloo process group.

    ``target`` is a module-level function of this file; ``args`` are pickled (tensors included). Each process
    uses one thread and ``init_process_group("gloo", timeout=group_timeout seconds)`` on 127.0.0.1 and a
    free port. ``finalize``: the ranks meet at a barrier and destroy the group after the target (leave it
    off for jobs where a rank dies or stalls). Processes still running after ``timeout`` seconds are killed.
    Returns every rank's :class:`RankOutcome` and the job's wall time in seconds.
    """
    workdir = Path(tempfile.mkdtemp(prefix="rkfast-dist-"))
    spec = workdir / "spec.pt"
    torch.save({"target": target.__name__, "args": args, "world_size": world_size,
                "group_timeout": group_timeout, "finalize": finalize}, spec)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world_size),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if sys.platform.startswith("linux"):  # containers: the hostname may not resolve to a usable interface
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    package_root = str(Path(rkfast.__file__).resolve().parent.parent)  # the children import this rkfast
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), package_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    procs, logs = [], []
    start = time.monotonic()
    for rank in range(world_size):
        log = open(workdir / f"rank{rank}.log", "wb")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(spec), str(rank), str(workdir / f"rank{rank}.pt")],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=log, stderr=subprocess.STDOUT,
        ))
    codes: list[int | None] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, timeout - (time.monotonic() - start))))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append(None)
    elapsed = time.monotonic() - start
    for log in logs:
        log.close()
    outcomes = []
    for rank, code in enumerate(codes):
        result_path = workdir / f"rank{rank}.pt"
        result = torch.load(result_path, weights_only=False) if result_path.exists() else {}
        output = (workdir / f"rank{rank}.log").read_text(errors="replace")
        outcomes.append(RankOutcome(rank, code, result.get("value"), result.get("error"), output))
    return outcomes, elapsed


def run_ranks(target: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
    """:func:`launch_ranks`, then every rank's return value (in rank order); if any rank failed, prints
    each failed child's traceback and output and raises :class:`ChildFailed` with them."""
    outcomes, _ = launch_ranks(target, *args, **kwargs)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        report = "\n".join(o.describe() for o in failed)
        print(report, file=sys.stderr)
        raise ChildFailed(f"{len(failed)} of {len(outcomes)} ranks failed:\n{report}")
    return [o.value for o in outcomes]


def _worker_main(spec_path: str, rank: int, result_path: str) -> None:
    """A worker process: join the group, run the target, save its result (or traceback)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    spec = torch.load(spec_path, weights_only=False)
    result: dict[str, Any] = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=spec["world_size"],
                                timeout=timedelta(seconds=spec["group_timeout"]))
        result["value"] = globals()[spec["target"]](rank, spec["world_size"], *spec["args"])
    except BaseException:
        result["error"] = traceback.format_exc()
        traceback.print_exc()
    if spec["finalize"] and dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:
            result.setdefault("error", traceback.format_exc())
    torch.save(result, result_path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if "error" not in result else 1)  # a dead or stalled peer must not hold up the exit


# -- models and data (the same in the parent and every rank) ------------------------------------------------


def initial_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in smooth_mlp().state_dict().items()}


def make_batches(tasks: int, count: int = 3, seed: int = 1) -> list[TaskBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.rand(tasks, 10, 1, generator=g, dtype=torch.float64) * 10 - 5
        amplitude = torch.rand(tasks, 1, 1, generator=g, dtype=torch.float64) * 4.9 + 0.1
        phase = torch.rand(tasks, 1, 1, generator=g, dtype=torch.float64) * math.pi
        y = amplitude * torch.sin(x + phase)
        out.append(TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:]))
    return out


def model_from(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = smooth_mlp()
    model.load_state_dict(state)
    return model


def share(batch: Any, dp: TaskParallel | None) -> Any:
    """This rank's contiguous share of ``batch`` (a TaskBatch or TaskSet with pytree data)."""
    if dp is None:
        return batch
    n = batch.num_tasks if isinstance(batch, TaskBatch) else batch.support_data[0].shape[0]
    start, length = dp.split(n)
    cut = lambda pair: tuple(t[start:start + length] for t in pair)  # noqa: E731
    if isinstance(batch, TaskBatch):
        return TaskBatch(*cut(batch))
    return TaskSet(batch.support_loss, batch.query_loss, cut(batch.support_data), cut(batch.query_data))


def _mse_task_loss(model: Callable[..., torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(data[0]), data[1])


def as_task_set(batch: TaskBatch) -> TaskSet:
    return TaskSet(_mse_task_loss, _mse_task_loss, batch.support, batch.query)


# -- 1. two ranks with T/2 tasks each == one process with all T tasks ---------------------------------------

CONFIGS = [
    dict(tableau=tableau, first_order=first_order, vectorize=vectorize, tasks=4)
    for tableau in ("maml", "rk4") for first_order in (False, True) for vectorize in (True, False)
] + [
    dict(tableau="rk4", first_order=False, vectorize=True, tasks=5),  # uneven: 3 + 2 tasks
    dict(tableau="maml", first_order=True, vectorize=False, tasks=5),
    dict(tableau="heun", first_order=False, vectorize=True, tasks=4, task_set=True),
    dict(tableau="heun", first_order=False, vectorize=True, tasks=4, two_phase=True, outer="sgd"),
    # learned coefficients: their directions ride in the same all-reduce
    dict(tableau="maml", first_order=False, vectorize=True, tasks=4, rates=Rates("element")),
    dict(tableau=LearnedTableau("rk4", "pattern", "order"), first_order=True, vectorize=True, tasks=5,
         rates=Rates("tensor", per_stage=True)),
    dict(tableau=LearnedTableau("heun", "full"), first_order=False, vectorize=False, tasks=4, two_phase=True,
         rates=Rates("scalar")),
    # memory levers: chunked, recomputed steps on each rank equal the plain step of one process
    dict(tableau="rk4", first_order=False, vectorize=True, tasks=5, memory=rkfast.Memory(task_chunk=2, recompute=True),
         rates=Rates("tensor")),
    dict(tableau="heun", first_order=True, vectorize=True, tasks=4, task_set=True, memory=rkfast.Memory(task_chunk=1)),
]


def config_id(config: dict[str, Any]) -> str:
    tableau = config["tableau"]
    parts = [f"{tableau.name}={tableau.pattern}" if isinstance(tableau, LearnedTableau) else tableau,
             "fo" if config["first_order"] else "so", "vmap" if config["vectorize"] else "loop", f"T{config['tasks']}"]
    parts += [name for name in ("task_set", "two_phase") if config.get(name)]
    parts += [f"rates={config['rates'].granularity}"] if config.get("rates") else []
    parts += [f"chunk={config['memory'].task_chunk}"] if config.get("memory") else []
    return "-".join(parts)


def train(config: dict[str, Any], state: dict[str, torch.Tensor], parallel: Any) -> dict[str, Any]:
    """Three meta-steps of ``config`` from ``state``; with a group each rank steps on its share of every batch."""
    model = model_from(state)
    opt = MetaOptimizer(model, F.mse_loss, tableau=config["tableau"], inner_lr=0.1, outer=config.get("outer", "adam"),
                        lr=0.05, first_order=config["first_order"], vectorize=config["vectorize"],
                        parallel=parallel, rates=config.get("rates"), memory=config.get("memory"))
    losses, stage_losses = [], []
    for batch in make_batches(config["tasks"]):
        tasks = share(as_task_set(batch) if config.get("task_set") else batch, opt.distributed)
        if config.get("two_phase"):
            out = opt.compute(tasks)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.apply()
        else:
            out = opt.step(tasks)
        losses.append(out.loss.clone())
        stage_losses.append(torch.stack([v.clone() for _, v in sorted(out.stage_losses.items())]))
    coefficients = [t for c in opt.coefficients for t in c.tensors]
    return {"params": opt.meta_parameters(), "losses": torch.stack(losses), "stage_losses": torch.stack(stage_losses),
            "grad": torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone(),
            "coefficients": torch.cat([t.detach().reshape(-1) for t in coefficients] + [torch.zeros(0, dtype=torch.float64)]),
            "coefficient_grads": torch.cat([t.grad.reshape(-1) for t in coefficients] + [torch.zeros(0, dtype=torch.float64)]),
            "distributed": repr(opt.distributed)}


def job_equality(rank: int, world: int, configs: list[dict[str, Any]], state: dict[str, torch.Tensor]) -> list[dict]:
    return [train(config, state, "auto") for config in configs]


@pytest.fixture(scope="module")
def equality_job() -> list[list[dict[str, Any]]]:
    return run_ranks(job_equality, CONFIGS, initial_state())


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[config_id(c) for c in CONFIGS])
def test_two_ranks_equal_one_process(equality_job, index):
    config = CONFIGS[index]
    ranks = [equality_job[r][index] for r in range(WORLD)]
    assert all("world_size=2" in r["distributed"] for r in ranks)
    # this (undistributed) process, all T tasks, without the memory levers
    reference = train({**config, "memory": None}, initial_state(), parallel=None)
    for name in ("params", "losses", "stage_losses", "grad", "coefficients", "coefficient_grads"):
        assert same_bits(ranks[0][name], ranks[1][name]), f"{name} differ between the ranks"
        torch.testing.assert_close(ranks[0][name], reference[name], rtol=0, atol=1e-12)
    start = torch.cat([v.reshape(-1) for v in initial_state().values()])
    assert (reference["params"] - start).abs().max() > 1e-3  # the steps moved the parameters


# -- 2, 3, 6, 7: construction, helpers, consistency check, refusals, parallel=None --------- ---------------------


def _error(fn: Callable[[], Any]) -> dict[str, Any] | None:
    """What ``fn()`` raised: type name, message, and ``ranks`` if the error has them; None if nothing."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - reported to the parent
        return {"type": type(err).__name__, "message": str(err), "ranks": getattr(err, "ranks", None)}
    return None


def job_misc(rank: int, world: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    out: dict[str, Any] = {}
    # 2. construction broadcasts rank 0's meta-parameters: rank 1 starts from other values
    model = model_from(state if rank == 0 else initial_state(seed=123))
    out["before"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    opt = MetaOptimizer(model, F.mse_loss, lr=0.05)
    out["after"] = opt.meta_parameters()
    out["model_after"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    dp = opt.distributed
    out["dp"] = (type(dp).__name__, dp.rank, dp.world_size, dp.group is dist.group.WORLD)

    # the helpers
    out["split"] = {n: dp.split(n) for n in (2, 4, 5, 7)}
    out["split_error"] = _error(lambda: dp.split(1))
    out["seeds"] = (dp.rank_seed(0), dp.rank_seed(0), dp.rank_seed(1))
    out["gathered"] = dp.all_gather_object({"rank": rank})
    out["broadcast"] = dp.broadcast_object(f"from rank {rank}")
    out["broadcast_1"] = dp.broadcast_object(f"from rank {rank}", src=1)
    dp.barrier()

    # an explicit (non-default) group, and evaluate stays local
    group = dist.new_group(list(range(world)))
    opt2 = MetaOptimizer(model_from(state), F.mse_loss, lr=0.05, parallel=group)
    out["explicit_group"] = opt2.distributed.group is group
    batch = share(make_batches(4, count=1)[0], opt2.distributed)
    opt2.step(batch)
    out["explicit_params"] = opt2.meta_parameters()
    out["evaluate_tasks"] = opt2.evaluate(batch, steps=(1,)).losses.shape[1]

    # 6. refusals: a DDP-wrapped model, capture with a group
    ddp = DistributedDataParallel(model_from(state))
    out["ddp_error"] = _error(lambda: MetaOptimizer(ddp, F.mse_loss))
    out["ddp_error_none"] = _error(lambda: MetaOptimizer(ddp, F.mse_loss, parallel=None))
    out["capture_error"] = _error(lambda: MetaOptimizer(model_from(state), F.mse_loss, capture=True))
    out["bad_group_error"] = _error(lambda: MetaOptimizer(model_from(state), F.mse_loss, parallel="world"))

    # 7. parallel=None inside an initialized group: each rank steps alone, on its own data; rank 0
    # takes one more step than rank 1 (a collective inside would hang and time out)
    alone = MetaOptimizer(model_from(state), F.mse_loss, lr=0.05, parallel=None)
    out["alone_distributed"] = alone.distributed
    for batch in make_batches(2, count=3 if rank == 0 else 2, seed=10 + rank):
        alone.step(batch)
    out["alone_params"] = alone.meta_parameters()
    dist.barrier()

    # 3. check_consistency: passes while identical, catches a one-ulp difference on rank 1
    checked = MetaOptimizer(model_from(state), F.mse_loss, lr=0.05, parallel=TaskParallel(check_consistency=True))
    batches = [share(b, checked.distributed) for b in make_batches(4, count=3, seed=5)]
    checked.step(batches[0])
    checked.compute(batches[1])
    checked.apply()
    out["consistent_error"] = None
    if rank == 1:
        with torch.no_grad():
            flat = checked.flat_parameters
            flat[3] = torch.nextafter(flat[3], flat[3] + 1)
    out["inconsistent_error"] = _error(lambda: checked.step(batches[2]))
    # .grad edited differently on one rank between compute() and apply()
    checked2 = MetaOptimizer(model_from(state), F.mse_loss, lr=0.05,
                             parallel=TaskParallel.auto(check_consistency=True))
    out["auto_checks"] = checked2.distributed.check_consistency and not TaskParallel.auto().check_consistency
    checked2.compute(batches[0])
    if rank == 1:
        next(iter(checked2.model.parameters())).grad.mul_(2)
    out["grad_edit_error"] = _error(checked2.apply)
    return out


@pytest.fixture(scope="module")
def misc_job() -> list[dict[str, Any]]:
    return run_ranks(job_misc, initial_state())


def test_parameters_broadcast_at_construction(misc_job):
    r0, r1 = misc_job
    assert not torch.equal(r0["before"], r1["before"])
    for r in (r0, r1):
        assert same_bits(r["after"], r0["before"]) and same_bits(r["model_after"], r0["before"])


def test_task_parallel_helpers(misc_job):
    r0, r1 = misc_job
    assert r0["dp"] == ("TaskParallel", 0, 2, True) and r1["dp"] == ("TaskParallel", 1, 2, True)
    assert r0["split"] == {2: (0, 1), 4: (0, 2), 5: (0, 3), 7: (0, 4)}
    assert r1["split"] == {2: (1, 1), 4: (2, 2), 5: (3, 2), 7: (4, 3)}
    for r in (r0, r1):
        assert r["split_error"]["type"] == "ValueError" and "cannot split 1 task(s) over 2 ranks" in r["split_error"]["message"]
        assert r["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert r["broadcast"] == "from rank 0" and r["broadcast_1"] == "from rank 1"
        assert r["seeds"][0] == r["seeds"][1] != r["seeds"][2] and all(0 <= s < 2**32 for s in r["seeds"])
    assert r0["seeds"][0] != r1["seeds"][0]  # rank-dependent
    probe = TaskParallel.__new__(TaskParallel)  # the seed is a pure function of (seed, rank)
    probe.rank = 1
    assert probe.rank_seed(0) == r1["seeds"][0]


def test_explicit_group_and_local_evaluate(misc_job):
    r0, r1 = misc_job
    assert r0["explicit_group"] and r1["explicit_group"]
    assert same_bits(r0["explicit_params"], r1["explicit_params"])
    reference = MetaOptimizer(model_from(initial_state()), F.mse_loss, lr=0.05)
    reference.step(make_batches(4, count=1)[0])
    torch.testing.assert_close(r0["explicit_params"], reference.meta_parameters(), rtol=0, atol=1e-12)
    assert r0["evaluate_tasks"] == r1["evaluate_tasks"] == 2  # each rank evaluates its own 2 of 4 tasks


def test_ddp_and_capture_refused(misc_job):
    for r in misc_job:
        for key in ("ddp_error", "ddp_error_none"):
            assert r[key]["type"] == "ValueError"
            assert "DistributedDataParallel" in r[key]["message"] and "model.module" in r[key]["message"]
        assert r["capture_error"]["type"] == "ValueError"
        assert r["capture_error"]["message"].startswith("capture=True with a process group is not supported: ")
        assert r["bad_group_error"]["type"] == "ValueError"


def test_parallel_none_steps_alone(misc_job):
    for rank, r in enumerate(misc_job):
        assert r["alone_distributed"] is None
        reference = MetaOptimizer(model_from(initial_state()), F.mse_loss, lr=0.05, parallel=None)
        for batch in make_batches(2, count=3 if rank == 0 else 2, seed=10 + rank):
            reference.step(batch)
        torch.testing.assert_close(r["alone_params"], reference.meta_parameters(), rtol=0, atol=1e-12)
    assert not torch.allclose(misc_job[0]["alone_params"], misc_job[1]["alone_params"])


def test_check_consistency_catches_a_perturbed_rank(misc_job):
    for r in misc_job:
        assert r["consistent_error"] is None and r["auto_checks"]
        for key in ("inconsistent_error", "grad_edit_error"):
            err = r[key]
            assert err is not None and err["type"] == "InconsistentParametersError", err
            assert err["ranks"] == (1,) and "rank(s) [1] differ from rank 0" in err["message"]


# -- 4, 5: a rank that raises, a rank with non-finite data -------------------------------------------------


class Boom(Exception):
    """A user error raised inside the meta-step on one rank."""


def job_failures(rank: int, world: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    started = time.monotonic()
    armed = {"boom": False}

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if armed["boom"]:
            raise Boom(f"the loss raised on rank {rank}")
        return F.mse_loss(out, y)

    model = model_from(state)
    opt = MetaOptimizer(model, loss_fn, tableau="heun", inner_lr=0.1, outer="adam", lr=0.05)
    batches = [share(b, opt.distributed) for b in make_batches(4, count=3, seed=7)]
    opt.step(batches[0])  # Adam's state exists from here on
    out: dict[str, Any] = {"unchanged": {}}

    def attempt(name: str, call: Callable[[], Any]) -> None:
        snap = snapshot(model, opt)
        out[name] = _error(call)
        try:
            assert_unchanged(model, opt, snap)
            out["unchanged"][name] = True
        except AssertionError as err:
            out["unchanged"][name] = str(err)

    # 4. a rank that raises inside step: before any work (a malformed batch), inside the computation (its loss)
    bad = TaskBatch(*(t.float() for t in batches[1])) if rank == 1 else batches[1]
    attempt("malformed", lambda: opt.step(bad))
    armed["boom"] = rank == 1
    attempt("loss_raises", lambda: opt.step(batches[1]))
    attempt("loss_raises_compute", lambda: opt.compute(batches[1]))
    armed["boom"] = False
    # 5. non-finite data on rank 1 only
    nan = batches[1]
    if rank == 1:
        qy = nan.query_y.clone()
        qy[0, 0] = float("nan")
        nan = nan._replace(query_y=qy)
    attempt("non_finite", lambda: opt.step(nan))
    attempt("non_finite_compute", lambda: opt.compute(nan))
    # the group and the optimizer go on
    opt.step(batches[2])
    out["params"] = opt.meta_parameters()
    out["seconds"] = time.monotonic() - started
    return out


def test_failing_rank_raises_everywhere_and_changes_nothing():
    outcomes, elapsed = launch_ranks(job_failures, initial_state(), timeout=JOB_SECONDS)
    failed = [o for o in outcomes if not o.ok]
    assert not failed, "\n".join(o.describe() for o in failed)
    assert elapsed < JOB_SECONDS
    r0, r1 = (o.value for o in outcomes)
    for r in (r0, r1):
        assert all(v is True for v in r["unchanged"].values()), r["unchanged"]
    # the rank that failed raises its own exception, the other a RankFailedError naming it
    assert r1["malformed"]["type"] in ("TypeError", "ValueError")
    for name in ("loss_raises", "loss_raises_compute"):
        assert r1[name]["type"] == "Boom" and "rank 1" in r1[name]["message"]
    for name in ("malformed", "loss_raises", "loss_raises_compute"):
        assert r0[name]["type"] == "RankFailedError" and r0[name]["ranks"] == (1,)
        assert "failed on rank(s) [1] of 2" in r0[name]["message"]
    # non-finite on rank 1: every rank raises NonFiniteLossError, naming it
    for r in (r0, r1):
        for name in ("non_finite", "non_finite_compute"):
            assert r[name]["type"] == "NonFiniteLossError" and "non-finite on rank(s) [1]" in r[name]["message"]
    assert same_bits(r0["params"], r1["params"])


# -- a rank that dies, a rank that stops stepping: bounded by the process group -----------------------------


def job_rank_dies(rank: int, world: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    opt = MetaOptimizer(model_from(state), F.mse_loss, lr=0.05)
    batch = share(make_batches(4, count=1)[0], opt.distributed)
    if rank == 1:
        os._exit(3)
    before = opt.meta_parameters()
    started = time.monotonic()
    err = _error(lambda: opt.step(batch))
    return {"error": err, "seconds": time.monotonic() - started, "unchanged": same_bits(opt.meta_parameters(), before)}


def test_rank_that_dies_ends_the_step_with_an_error():
    outcomes, elapsed = launch_ranks(job_rank_dies, initial_state(), timeout=JOB_SECONDS, group_timeout=20.0,
                                     finalize=False)
    assert outcomes[1].returncode == 3
    assert outcomes[0].ok, outcomes[0].describe()
    r0 = outcomes[0].value
    assert r0["error"] is not None and r0["error"]["type"] == "RankFailedError", r0
    assert "all-reduce over 2 ranks failed" in r0["error"]["message"] and r0["unchanged"]
    assert elapsed < JOB_SECONDS


def job_rank_stalls(rank: int, world: int, state: dict[str, torch.Tensor], signal: str) -> dict[str, Any]:
    import torch.distributed as dist

    group = dist.new_group(list(range(world)), timeout=timedelta(seconds=3))  # a short timeout for this group
    opt = MetaOptimizer(model_from(state), F.mse_loss, lr=0.05, parallel=TaskParallel(group))
    batch = share(make_batches(4, count=1)[0], opt.distributed)
    if rank == 1:  # stops stepping (until rank 0 is done), without dying
        deadline = time.monotonic() + 40
        while not os.path.exists(signal) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {}
    started = time.monotonic()
    err = _error(lambda: opt.step(batch))
    Path(signal).touch()
    return {"error": err, "seconds": time.monotonic() - started}


def test_rank_that_stops_stepping_times_out():
    signal = os.path.join(tempfile.mkdtemp(prefix="rkfast-dist-signal-"), "done")
    outcomes, elapsed = launch_ranks(job_rank_stalls, initial_state(), signal, timeout=JOB_SECONDS, finalize=False)
    assert all(o.ok for o in outcomes), "\n".join(o.describe() for o in outcomes)
    r0 = outcomes[0].value
    assert r0["error"] is not None and r0["error"]["type"] == "RankFailedError", r0
    assert 2.0 < r0["seconds"] < 30.0, r0["seconds"]  # the group's 3 s timeout, not the default 30 s
    assert elapsed < JOB_SECONDS


# -- without a process group: nothing changes ------------------------------------------------------------------


def test_no_group_no_distribution():
    assert not torch.distributed.is_initialized()
    opt = MetaOptimizer(smooth_mlp(), F.mse_loss)
    assert opt.distributed is None and not hasattr(opt, "check_consistency")
    assert TaskParallel.auto() is None and TaskParallel.auto(check_consistency=True) is None
    with pytest.raises(ValueError, match="parallel must be"):
        MetaOptimizer(smooth_mlp(), F.mse_loss, parallel="gloo")
    with pytest.raises(TypeError, match="parallel must be"):
        MetaOptimizer(smooth_mlp(), F.mse_loss, parallel=3)
    assert rkfast.RankFailedError is RankFailedError and issubclass(RankFailedError, RuntimeError)
    assert rkfast.InconsistentParametersError is InconsistentParametersError
    assert issubclass(NonFiniteLossError, FloatingPointError)


if __name__ == "__main__":  # a worker process of launch_ranks
    _worker_main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
