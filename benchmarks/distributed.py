"""Task-parallel meta-steps over torch.distributed on the CPU: what 2 ranks buy, what the all-reduce costs, and
where task parallelism stops paying.

    python benchmarks/distributed.py [--tasks 8] [--repeats 10] [--json benchmarks/results/distributed-cpu.json]
                                     [--quick]

The processes are spawned here (``torch.multiprocessing``, gloo over loopback, one thread each; no torchrun).
The workload is benchmarks/fewshot.py's Omniglot conv4 5-way 1-shot (64 filters, strided, 28x28, 5 query
images per class; random images of the right shapes), second-order MAML, Adam, ``--tasks`` tasks per
meta-step in all:

1. ms per meta-step with 1 rank (all T tasks, ``parallel=None``) and with 2 ranks (T/2 each, the
   ``MetaOptimizer`` reducing over the gloo group): the median over ``--repeats`` steps, per rank (the slower
   rank's is the step's: a step ends with the all-reduce). Scaling efficiency = t1 / (2 t2).
2. where the 2-rank step's time goes: the same step without the process group on T/2 tasks, run on both
   ranks at once (the compute a rank does, under the same contention for the cores), the rest being the
   distribution's cost (the all-reduce, waiting for the slower rank, one host synchronization); and the
   all-reduce alone on the step's buffer (N parameters plus the loss, stage, count and flag slots that
   rkfast.distributed reduces), its share of the step.
3. gloo's all-reduce time on 2 ranks at a few sizes, fitted as ``t = a + bytes * b``: for 2 ranks the ring
   model ``t(p) = 2 (p-1)/p * bytes / bandwidth + 2 (p-1) * latency`` is ``bytes / bandwidth + 2 latency``, so
   bandwidth = 1/b and latency = a/2. Projected with the ring model to N in {1e5, 1e7, 1e8} float32 parameters
   over {8, 16, 32, 64} ranks: from the measured figures (loopback gloo on this machine), and from assumed
   interconnects (stated, not measured: NVLink inside one 8-GPU node, InfiniBand NDR between nodes).
4. where task parallelism stops paying: with p ranks a step takes about (T/p) c + AR(p, N) (c: compute per
   task), so the efficiency is (T/p) c / ((T/p) c + AR). The tables give the compute a rank must do per step
   for 90% efficiency, 9 AR (any device), and for the measured profile that compute in tasks of this CPU:
   c = t1 / T of the 1-rank run, scaled by N / N_conv4 for other model sizes (an assumption: compute per task
   grows with the parameter count), k90 = 9 AR / c_N.

``--quick`` is a correctness smoke run (4 tasks, one repeat, small sizes): its numbers mean nothing. Real
numbers want an otherwise idle machine (the table reports how busy the other processes kept the cores).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from _common import device_name, other_cores  # benchmarks/ is on sys.path when run as a script

WORLD_SIZES = (1, 2)
PROJECT_PARAMS = (1e5, 1e7, 1e8)
PROJECT_RANKS = (8, 16, 32, 64)
# Assumed interconnects (not measured here): per-rank all-reduce bandwidth in bytes/s and latency per ring step
ASSUMED = {
    "NVLink 4 in one 8-GPU node (assumed: 300 GB/s, 5 us per step)": (300e9, 5e-6),
    "InfiniBand NDR 400 Gb/s between nodes (assumed: 50 GB/s, 10 us per step)": (50e9, 10e-6),
}


@dataclass(frozen=True)
class Spec:
    """What one spawned job measures."""

    tasks: int
    repeats: int
    warmup: int
    sizes: tuple[int, ...]  # float32 elements of the all-reduce fit
    reduce_repeats: int
    port: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ring_allreduce_s(params: float, ranks: int, bandwidth: float, latency: float, bytes_per: int = 4) -> float:
    """The ring all-reduce model: ``2 (p-1)/p * bytes / bandwidth + 2 (p-1) * latency`` seconds."""
    size = params * bytes_per
    return 2 * (ranks - 1) / ranks * size / bandwidth + 2 * (ranks - 1) * latency


def fit_latency_bandwidth(sizes_bytes: list[float], seconds: list[float]) -> tuple[float, float]:
    """``(latency s, bandwidth bytes/s)`` from 2-rank all-reduce times: a least-squares ``t = a + b * bytes``,
    read with the ring model for 2 ranks (``bytes / bandwidth + 2 latency``). Noise can spoil the fit: a
    non-positive slope falls back to the largest size's rate (``bytes / t``, latency included: a lower
    bound), a negative intercept to half the smallest time measured."""
    b, a = np.polyfit(np.asarray(sizes_bytes, float), np.asarray(seconds, float), 1)
    largest = int(np.argmax(sizes_bytes))
    bandwidth = 1.0 / b if b > 0 else sizes_bytes[largest] / seconds[largest]
    latency = a / 2 if a > 0 else min(seconds) / 2
    return float(latency), float(bandwidth)


# -- the spawned processes -------------------------------------------------------------------------------


def _median_ms(fn: Any, repeats: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), times


def _measure(rank: int, world: int, spec: Spec) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.nn.functional as F

    import rkfast
    from fewshot import WORKLOADS, random_split
    from rkfast.tasks.fewshot import EpisodeSampler, conv4

    w = WORKLOADS[0]  # Omniglot conv4 5-way 1-shot
    sampler = EpisodeSampler(random_split(w), 5, 1, w.query)
    batch = sampler.sample(spec.tasks, torch.Generator().manual_seed(0))  # the same T tasks on every rank

    def optimizer(group: Any) -> rkfast.MetaOptimizer:
        torch.manual_seed(0)
        model = conv4(w.channels, 5, w.filters, w.size, w.strided)
        return rkfast.MetaOptimizer(model, F.cross_entropy, tableau="maml", inner_lr=w.inner_lr, lr=1e-3,
                                    parallel=group)

    out: dict[str, Any] = {"rank": rank, "world": world}
    if world == 1:
        opt = optimizer(None)
        out["step_ms"], out["step_times_ms"] = _median_ms(lambda: opt.step(batch), spec.repeats, spec.warmup)
        out["params"] = opt.flat_parameters.numel()
        out["vectorize"] = bool(opt.vectorize)
        return out

    opt = optimizer("auto")
    start, length = opt.distributed.split(spec.tasks)
    mine = rkfast.TaskBatch(*(t[start:start + length] for t in batch))
    out["tasks"] = length
    dist.barrier()
    out["step_ms"], out["step_times_ms"] = _median_ms(lambda: opt.step(mine), spec.repeats, spec.warmup)
    # the same step on this rank's tasks without the process group, on both ranks at once: the compute alone
    alone = optimizer(None)
    dist.barrier()
    out["local_ms"], _ = _median_ms(lambda: alone.step(mine), spec.repeats, spec.warmup)
    # the all-reduce alone on the meta-step's buffer (rkfast.distributed: N + loss + stages + count + 2 W flags)
    n = opt.flat_parameters.numel()
    buf = torch.zeros(n + 1 + opt.tableau.stages + 1 + 2 * world)
    out["step_buffer_elements"] = buf.numel()
    dist.barrier()
    out["allreduce_step_buffer_ms"], _ = _median_ms(lambda: dist.all_reduce(buf), spec.reduce_repeats, 3)
    # the fit: gloo all-reduce at several sizes
    fit = []
    for size in spec.sizes:
        data = torch.zeros(size)
        dist.barrier()
        ms, _ = _median_ms(lambda: dist.all_reduce(data), spec.reduce_repeats, 2)
        fit.append({"elements": size, "bytes": 4 * size, "ms": ms})
    out["fit"] = fit
    out["params"] = n
    return out


def _worker(rank: int, world: int, spec: Spec, queue: Any) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    code = 0
    try:
        if world > 1:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec.port}", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=300))
        result = _measure(rank, world, spec)
        if world > 1:
            results = [None] * world
            dist.all_gather_object(results, result)
        else:
            results = [result]
        if rank == 0:
            queue.put(("ok", results))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        queue.put(("error", f"rank {rank}: {type(err).__name__}: {err}"))
        traceback.print_exc()
        code = 1
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        # the optimizers' last references to the group (in reference cycles) go now, while the interpreter is
        # whole: a gloo group destroyed during interpreter shutdown can abort the process ("terminate called
        # without an active exception", exit -6; seen in CI after the measurements were sent)
        gc.collect()
    queue.close()
    queue.join_thread()  # the message is written before the process ends
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as tests/test_distributed.py's ranks: no interpreter shutdown to abort in


def run_world(world: int, spec: Spec) -> list[dict[str, Any]]:
    """Every rank's measurements of one job of ``world`` spawned processes."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, spec, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        status, value = queue.get(timeout=1800)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    if status != "ok":
        raise RuntimeError(f"the {world}-rank job failed: {value}")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"the {world}-rank job's processes exited with {bad}")
    return value


# -- the report ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8, help="tasks per meta-step in all (default: 8)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a correctness smoke run (CI): 4 tasks, one repeat")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.tasks < 2:
        parser.error("--tasks must be >= 2 (one task per rank at least)")
    if args.quick:
        spec = Spec(tasks=4, repeats=1, warmup=1, sizes=(1_000, 100_000, 1_000_000), reduce_repeats=3, port=0)
    else:
        spec = Spec(tasks=args.tasks, repeats=args.repeats, warmup=2,
                    sizes=(1_000, 10_000, 100_000, 1_000_000, 4_000_000, 16_000_000), reduce_repeats=20, port=0)
    busy = other_cores(0.5)
    one = run_world(1, spec)[0]
    two = run_world(2, Spec(**{**asdict(spec), "port": free_port()}))

    n, tasks = one["params"], spec.tasks
    t1 = one["step_ms"]
    t2 = max(r["step_ms"] for r in two)  # a step ends with the all-reduce: the slower rank's time is the step's
    local = max(r["local_ms"] for r in two)
    reduce_ms = max(r["allreduce_step_buffer_ms"] for r in two)
    efficiency = t1 / (2 * t2)
    per_task_ms = t1 / tasks
    sizes = [f["bytes"] for f in two[0]["fit"]]
    fit_s = [max(r["fit"][i]["ms"] for r in two) / 1e3 for i in range(len(sizes))]
    latency, bandwidth = fit_latency_bandwidth(sizes, fit_s)

    print(f"torch {torch.__version__}, {device_name(torch.device('cpu'))} ({platform.machine()}), 1 thread per "
          f"rank, gloo over loopback; other processes used {busy:.2f} cores before the run"
          f"{'; --quick: a smoke run, the numbers mean nothing' if args.quick else ''}")
    print(f"Omniglot conv4 5-way 1-shot, second-order MAML, {tasks} tasks per meta-step in all, N = {n} parameters "
          f"({'vmap' if one['vectorize'] else 'task-by-task loop'}); median of {spec.repeats} step(s)")
    print(f"\n{'ranks':>5}{'tasks/rank':>12}{'ms/step':>10}{'speed-up':>10}{'efficiency':>12}")
    print(f"{1:>5}{tasks:>12}{t1:>10.1f}{1.0:>10.2f}{1.0:>12.2f}")
    print(f"{2:>5}{'/'.join(str(r['tasks']) for r in two):>12}{t2:>10.1f}{t1 / t2:>10.2f}{efficiency:>12.2f}")
    print(f"\n2-rank step {t2:.1f} ms = compute on a rank's tasks {local:.1f} ms (the same step without the process "
          f"group, both ranks at once) + distribution {t2 - local:.1f} ms ({100 * (t2 - local) / t2:.1f}%: "
          f"all-reduce, waiting for the slower rank, one host sync)")
    print(f"the all-reduce alone on the step's buffer ({two[0]['step_buffer_elements']} float32): {reduce_ms:.3f} ms, "
          f"{100 * reduce_ms / t2:.2f}% of the 2-rank step")
    print(f"compute per task (1 rank): {per_task_ms:.1f} ms")

    print("\ngloo all-reduce on 2 ranks (the slower rank's median):")
    print(f"{'float32':>12}{'bytes':>14}{'ms':>10}{'GB/s (algbw)':>14}")
    for size, seconds in zip(sizes, fit_s):
        print(f"{size // 4:>12}{size:>14}{1e3 * seconds:>10.3f}{size / seconds / 1e9:>14.2f}")
    print(f"fit t = a + bytes/bw, read with the ring model for 2 ranks: latency {1e6 * latency:.1f} us per step, "
          f"bandwidth {bandwidth / 1e9:.2f} GB/s")

    profiles = {"measured here (gloo, loopback, 2 ranks; fitted)": (bandwidth, latency), **ASSUMED}
    projection = []
    for label, (bw, lat) in profiles.items():
        measured = label.startswith("measured")
        print(f"\nring all-reduce projection, {label}:")
        print(f"{'parameters':>12}{'ranks':>7}{'all-reduce ms':>15}{'90% needs ms/rank':>19}"
              + (f"{'= tasks/rank here':>19}" if measured else ""))
        for params in PROJECT_PARAMS:
            per_task_s = per_task_ms / 1e3 * params / n  # assumption: compute per task grows with N
            for ranks in PROJECT_RANKS:
                seconds = ring_allreduce_s(params, ranks, bw, lat)
                row = {"profile": label, "measured": measured, "params": params, "ranks": ranks,
                       "allreduce_ms": 1e3 * seconds, "compute_ms_per_rank_for_90pct": 9e3 * seconds}
                line = f"{params:>12.0e}{ranks:>7}{1e3 * seconds:>15.3f}{9e3 * seconds:>19.2f}"
                if measured:
                    row.update(per_task_ms=1e3 * per_task_s, tasks_per_rank_for_90pct=9 * seconds / per_task_s)
                    line += f"{9 * seconds / per_task_s:>19.2f}"
                projection.append(row)
                print(line)
    print(f"\n(90% needs: the compute each rank must do per step for the all-reduce to stay under a tenth of the "
          f"step, 9 x all-reduce; task parallelism stops paying where a rank's share of the meta-batch takes less. "
          f"tasks/rank here: that compute in tasks of this CPU, {per_task_ms:.1f} ms per conv4 task measured at "
          f"N = {n}, scaled by N / {n} for the other sizes (assumed). For a GPU interconnect compare the threshold "
          "with the GPU's own time per task, which is far shorter than this CPU's)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "cpu": device_name(torch.device("cpu")), "threads_per_rank": 1,
                       "quick": args.quick, "other_cores_before": busy, "workload": "omniglot conv4 5-way 1-shot",
                       "tableau": "maml", "tasks": tasks, "params": n, "spec": asdict(spec),
                       "one_rank": one, "two_ranks": two, "t1_ms": t1, "t2_ms": t2, "speedup": t1 / t2,
                       "efficiency": efficiency, "local_ms": local, "allreduce_step_buffer_ms": reduce_ms,
                       "allreduce_share": reduce_ms / t2, "per_task_ms": per_task_ms,
                       "fit": {"latency_s": latency, "bandwidth_bytes_s": bandwidth,
                               "points": [{"bytes": b, "s": s} for b, s in zip(sizes, fit_s)]},
                       "assumed_profiles": {k: {"bandwidth_bytes_s": bw, "latency_s": lat}
                                            for k, (bw, lat) in ASSUMED.items()},
                       "projection": projection}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
