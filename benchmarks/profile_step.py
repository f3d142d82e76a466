"""Profile one warm meta-step of e2e.py's contenders: where the time goes, op by op.

    python benchmarks/profile_step.py                                  # sinusoid maml 2nd order: vmap vs rkfast
    python benchmarks/profile_step.py --workload conv4 --contenders rkfast-captured --rows 15
    python benchmarks/profile_step.py --tableau rk4 --order first --out prof.txt

Each contender is built on the same setup as in ``benchmarks/e2e.py`` (same model, batch, seed), warmed up
(``--warmup`` steps), then ``--steps`` steps run under ``torch.profiler`` (CPU and, on a GPU, CUDA
activity). Printed per contender: wall ms/step (synchronized), the number of operator calls and kernel
launches per step, and the top ``--rows`` operators by self CPU time and, on a GPU, by device time. Eager
small-model steps on a GPU are bound by the CPU issuing kernels: the call and launch counts and the CPU
column say where that time goes.
"""

from __future__ import annotations

import argparse
import io
import time

import torch
from torch.profiler import ProfilerActivity, profile

# benchmarks/ is on sys.path when run as a script
from _common import sync
from e2e_contenders import CONTENDERS, Unsupported
from e2e_peers import NotAvailable
from e2e_workloads import ORDERS, WORKLOADS, make_setup


def profile_contender(name: str, args: argparse.Namespace, device: torch.device) -> str:
    setup = make_setup(WORKLOADS[args.workload], args.tableau, args.order == "first", device, args.seed)
    step = CONTENDERS[name].build(setup)
    for _ in range(args.warmup):
        step()
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
    p.add_argument("--out", help="also append the report to this file")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONTENDERS]
    if unknown:
        p.error(f"unknown contenders: {', '.join(unknown)}")
    device = torch.device(args.device)
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
