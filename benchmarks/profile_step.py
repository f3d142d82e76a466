"""Profile one warm meta-step of e2e.py's contenders: where the time goes, op by op.

    python benchmarks/profile_step.py                                  # sinusoid maml 2nd order: vmap vs rkfast
    python benchmarks/profile_step.py --workload conv4 --contenders rkfast-captured --rows 15
    python benchmarks/profile_step.py --tableau rk4 --order first --out prof.txt

    python benchmarks/profile_step.py --tableau rk4 --threads 1 --interleave 30 --python 25

Each contender is built on the same setup as in ``benchmarks/e2e.py`` (same model, batch, seed), warmed up
(``--warmup`` steps), then ``--steps`` steps run under ``torch.profiler`` (CPU and, on a GPU, CUDA
activity). Printed per contender: wall ms/step (synchronized), the number of operator calls and kernel
launches per step, and the top ``--rows`` operators by self CPU time and, on a GPU, by device time. Eager
small-model steps on a GPU are bound by the CPU issuing kernels: the call and launch counts and the CPU
column say where that time goes.

``--python N`` adds the N Python functions with the most time of their own per step (``cProfile``; it slows
Python code more than operators, so compare it between contenders rather than with wall times).
``--interleave R`` first times the contenders against each other in this process: R rounds, each a block of
``--block`` steps of every contender in turn (the order reversed every other round), and prints each one's
median and fastest step and their ratios to the first contender. On a shared machine this same-run
comparison is what resolves a few percent; timings of separate runs drift by more.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# benchmarks/ is on sys.path when run as a script
from _common import sync, timed_calls
from e2e_contenders import CONTENDERS, Unsupported
from e2e_peers import NotAvailable
from e2e_workloads import ORDERS, WORKLOADS, make_setup


def build_step(name: str, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    """Contender ``name``'s meta-step on the common setup, warmed up."""
    setup = make_setup(WORKLOADS[args.workload], args.tableau, args.order == "first", device, args.seed)
    step = CONTENDERS[name].build(setup)
    for _ in range(args.warmup):
        step()
    return step


def interleaved(names: list[str], args: argparse.Namespace, device: torch.device) -> str:
    """The contenders timed against each other in this process (see the module docstring)."""
    steps = {name: build_step(name, args, device) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.interleave):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name] += timed_calls(steps[name], args.block, device)
    first = names[0]
    base_med, base_min = statistics.median(times[first]), min(times[first])
    out = io.StringIO()
    out.write(f"\n=== interleaved: {args.workload} {args.tableau} {args.order} order, "
              f"{torch.get_num_threads()} threads, {args.interleave} rounds of {args.block} steps each\n")
    for name in names:
        med, low = statistics.median(times[name]), min(times[name])
        out.write(f"  {name:<18} median {1e3 * med:8.3f} ms  min {1e3 * low:8.3f} ms  "
                  f"x {first}: median {med / base_med:.3f}, min {low / base_min:.3f}\n")
    return out.getvalue()


def python_profile(step: Callable[[], None], args: argparse.Namespace) -> str:
    """The ``--python`` functions with the most time of their own over ``--steps`` steps, per step."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        step()
    profiler.disable()
    out = io.StringIO()
    out.write(f"\nPython functions by own time (cProfile, {args.steps} steps; times are totals):\n")
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.python)
    return out.getvalue()


def profile_contender(name: str, args: argparse.Namespace, device: torch.device) -> str:
    step = build_step(name, args, device)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    wall_ms = (time.perf_counter() - start) / args.steps * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync(device)
    events = prof.key_averages()
    calls = sum(e.count for e in events if not e.key.startswith(("cuda", "ProfilerStep"))) / args.steps
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch",
                                                        "cuLaunchKernelEx", "cudaLaunchKernelExC")) / args.steps
    out = io.StringIO()
    out.write(f"\n=== {name}: {args.workload} {args.tableau} {args.order} order, {wall_ms:.3f} ms/step "
              f"(unprofiled, {args.steps} steps), {calls:.0f} profiled calls/step, "
              f"{launches:.0f} kernel/graph launches per step\n")
    out.write(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    if device.type == "cuda":
        out.write(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.python:
        out.write(python_profile(step, args))
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="sinusoid", choices=list(WORKLOADS))
    p.add_argument("--contenders", default="vmap,rkfast", help=f"from {','.join(CONTENDERS)}")
    p.add_argument("--tableau", default="maml")
    p.add_argument("--order", default="second", choices=ORDERS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    p.add_argument("--python", type=int, default=0, help="also list this many Python functions (cProfile)")
    p.add_argument("--interleave", type=int, default=0, help="rounds of the same-run timing (0: none)")
    p.add_argument("--block", type=int, default=5, help="steps per contender and round of --interleave")
    p.add_argument("--out", help="also append the report to this file")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONTENDERS]
    if unknown:
        p.error(f"unknown contenders: {', '.join(unknown)}")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.interleave:
        print(interleaved(names, args, device), flush=True)
    for name in names:
        try:
            report = profile_contender(name, args, device)
        except (Unsupported, NotAvailable) as err:
            report = f"\n=== {name}: not run ({err})\n"
        print(report, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(report)


if __name__ == "__main__":
    main()
