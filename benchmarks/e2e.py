"""Time one whole meta-step (inner adaptation, meta-gradient, outer Adam update) against the peer libraries.

    python benchmarks/e2e.py                       # the full run on the default device (cuda if present)
    python benchmarks/e2e.py --quick               # sinusoid, maml, 2 steps, one process: a smoke test
    python benchmarks/e2e.py --workloads conv4 --contenders loop,vmap,rkfast --tableaus maml --repeats 5

Every contender starts from the same model initialization (one seed), sees the same task batch and does
the same meta-step: one inner SGD step (``inner_lr`` 0.01 on sinusoid, 0.4 on conv4) per task, the mean
query loss over the tasks, its gradient, and one outer ``Adam(lr=1e-3)`` step. Contenders:

* ``loop``: the per-task autograd loop most repositories write (``torch.autograd.grad(support_loss,
  params, create_graph=True)``, adapted parameters, ``functional_call`` on the query set, accumulate,
  one ``.backward()``, ``opt.step()``);
* ``higher`` (``innerloop_ctx`` with a differentiable SGD), ``torchopt`` (``MetaSGD`` with
  ``extract_state_dict``/``recover_state_dict``, its few-shot MAML example) and ``learn2learn``
  (``MAML(model, lr).clone().adapt(...)``): the peer libraries, each in its documented MAML pattern;
* ``vmap``: a hand-written ``torch.func`` step (``vmap`` over tasks of ``grad``-adapted ``functional_call``,
  ``.backward()`` outside), written for any tableau from its ``A`` and ``b``. Models with normalization
  layers compute their second-order support gradients under ``rkfast._norms.exact_norms`` (as rkfast
  does; first derivatives keep the fused norms): with PyTorch's fused batch norm the second-order
  vmap direction is wrong (0.6% relative on conv4; ``--contenders vmap-fused-norm`` shows the sanity check
  rejecting it);
* ``rkfast`` (``MetaOptimizer(..., outer="adam").step(batch)``, defaults: ``vectorize="auto"``, which runs
  conv4 task by task on the CPU and everything else under vmap), ``rkfast-vmap`` (``vectorize=True``) and
  ``rkfast-loop`` (``vectorize=False``) where they differ from that default, on CUDA
  ``rkfast-captured`` (``capture=True``), and, not in the default list, ``rkfast-torch``
  (``backend="torch"``: the pure-PyTorch kernels, with which a CPU step of a model without norm layers runs
  each task's stages in one ``vmap`` call, docs/method.md).

The peers run MAML only (second order; first order where the library offers it: ``loop`` and
``learn2learn``); ``loop`` also runs the other tableaus, untimed, as the sanity reference; ``vmap`` and the
rkfast contenders run every tableau in both orders.

Before timing, every contender's meta-gradient after one step from the common initialization is compared
with the per-task loop's of the same tableau and order (relative error in norm and in the largest entry):
in float32 on the full batch that is timed (``--rtol``, 1e-4; this step is also the first warm-up step),
and where that differs by more, in float64 on the first ``--check-tasks`` tasks (``--rtol64``, 1e-6),
which decides: rounding is ~1e-14 there, while float32 rounding through rk4's second-order stages reaches
~2e-3 on conv4 and the fused-norm vmap error is 1e-2 in either precision. A contender that fails is
reported as wrong and not timed. ``rkfast-captured`` warms up at least 4 steps (two eager steps, the
capture, a replay), so that only replays are timed. ms/step is the median of the timed steps (CUDA: synchronized): ``--repeats``
of them (sinusoid 100, conv4 3), but no more than fit in ``--cell-budget`` seconds (30) at the warm-up
step's pace, and at least one (a conv4 rk4 step takes ~30 s on a 2-core CPU; the "n" column says how many).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps, in one process, above what was
allocated before the contender was built. On CPU each (workload, contender, tableau, order) cell runs in its own
process (``--worker``): it runs a toy vmap/conv/Adam step first (the runtime's one-time allocations, ~75 MB,
then fall into the baseline), notes its anonymous RSS after imports, model and batch ("base MB"), resets
its peak RSS after the warm-up steps (``/proc/self/clear_refs``; the first steps also fault in ~150 MB of
library code, file-backed, which is not counted) and reports the peak RSS of the timed steps minus
file-backed pages minus that baseline ("peak MB"). The memory target allows 1 MB of RSS noise.
``--no-isolate`` (and ``--quick``) runs the cells in this process and reports no CPU memory.

Ratios: "rkfast x" is this row's time over rkfast's at the same tableau and order (how many times faster
rkfast is); "x loop" (rkfast rows) is loop's time over this row's. Compare numbers only within one run.
The machine is checked for other busy processes at the start and during every cell ("other" column: CPU
cores used by other processes while the cell ran; above 0.25 the cell runs once more, ``--retry-busy``, and
the least disturbed run is kept; rows still above are marked "!"). The JSON records where rkfast was
imported from and a hash of its sources, per row too, and the run warns when they changed mid-run. Output: a table per workload, the target verdicts, a
JSON (``--json``; default ``benchmarks/results/e2e-<device>.json``, none with ``--quick`` unless given) and a
bar chart (``--png``, likewise).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

import rkfast

from _common import ROOT, RESULTS_DIR, device_name, device_slug, other_cores  # benchmarks/ is on sys.path
from e2e_contenders import CAPTURE_WARMUP, CONTENDERS
from e2e_measure import BUSY_CORES, Cell, measure_cell, rkfast_source, worker_main
from e2e_peers import peer_status
from e2e_report import add_ratios, git_state, judge_targets, plot, print_legend, print_table, print_verdicts, write_json
from e2e_workloads import ORDERS, OUTER_LR, WORKLOADS, Workload
from targets import MEMORY_NOISE_MB

# The parts, one module each: e2e_workloads (models, batches, the common setup), e2e_peers (loading the peer
# libraries), e2e_contenders (each contender's step), e2e_measure (the cell: sanity check, timing, memory,
# worker processes, busy-machine retries), e2e_report (ratios, tables, verdicts, chart, JSON); the targets
# are declared in targets.py. This file is the command line and the run.


def plan(args: argparse.Namespace, device: torch.device) -> Iterator[tuple[Workload, str, str, list[str]]]:
    """(workload, tableau, order, contenders that run it); peers only at maml."""
    for wname in args.workloads:
        for tab in args.tableaus:
            for order in args.orders:
                names = [c for c in args.contenders
                         if not (CONTENDERS[c].maml_only and tab != "maml")
                         and not (order == "first" and not CONTENDERS[c].first_order)
                         and not (CONTENDERS[c].cuda_only and device.type != "cuda")]
                if names:
                    yield WORKLOADS[wname], tab, order, names


def cells_for(args: argparse.Namespace, device: torch.device, wl: Workload, tab: str, order: str, names: list[str],
              ref: str) -> list[Cell]:
    """The cells of one (workload, tableau, order), the per-task loop first: it writes the reference
    gradients the others are checked against (untimed when ``loop`` is not among ``names``)."""
    base = Cell(workload=wl.name, contender="loop", tableau=tab, order=order, device=str(device), seed=args.seed,
                threads=args.threads, rtol=args.rtol, rtol64=args.rtol64, check_tasks=args.check_tasks,
                exact_check=args.exact_check, cell_budget=args.cell_budget, isolated=args.isolate, ref=ref,
                warmup=max(1, wl.warmup if args.warmup is None else args.warmup),
                repeats=wl.repeats if args.repeats is None else args.repeats)
    cells = []
    for name in sorted(names, key=lambda n: n != "loop"):
        # a captured step is timed on replays only: after the eager warm-ups and the capture
        warmup = max(base.warmup, CAPTURE_WARMUP) if CONTENDERS[name].captured else base.warmup
        cells.append(dataclasses.replace(base, contender=name, warmup=warmup))
    if "loop" not in names:
        cells.insert(0, dataclasses.replace(base, repeats=0, warmup=1, reference_only=True))
    return cells


def check_peers(contenders: list[str], device: torch.device) -> tuple[dict[str, dict[str, Any]], list[dict[str, str]]]:
    """The peer libraries' status (printed) and the contenders that cannot run here, with the reason."""
    peers: dict[str, dict[str, Any]] = {}
    for c in contenders:
        peer = CONTENDERS[c].peer
        if peer and peer not in peers:
            peers[peer] = peer_status(peer)
            st = peers[peer]
            if st["available"]:
                print(f"{peer}: {st['version']}" + (f" (note: {st['note']})" if st.get("note") else ""))
            else:
                print(f"{peer}: not available ({st['reason']})")
    unavailable = [{"contender": c, "reason": peers[CONTENDERS[c].peer]["reason"]} for c in contenders
                   if CONTENDERS[c].peer and not peers[CONTENDERS[c].peer]["available"]]
    if device.type != "cuda":
        for c in contenders:
            if CONTENDERS[c].cuda_only:
                unavailable.append({"contender": c, "reason": "CUDA only"})
                print(f"{c}: not run (CUDA only)")
    return peers, unavailable


def run_all(args: argparse.Namespace, device: torch.device, skip: set[str]) -> list[dict[str, Any]]:
    """Every cell of the plan, measured, with a progress line each; the rows."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="e2e-ref-") as tmp:
        for wl, tab, order, names in plan(args, device):
            ref = os.path.join(tmp, f"{wl.name}-{tab}-{order}-")
            for cell in cells_for(args, device, wl, tab, order, [n for n in names if n not in skip], ref):
                row = measure_cell(cell, args.isolate, args.cell_timeout, args.retry_busy)
                if cell.reference_only:
                    row["reference_only"] = True
                    if row.get("status") != "ok":
                        print(f"  reference loop for {wl.name} {tab} {order} failed: {row.get('reason')}")
                    row.pop("ms", None)
                rows.append(row)
                if not cell.reference_only:
                    ms = f"{row['ms']:.2f} ms" if row.get("ms") is not None else row.get("status")
                    print(f"  {wl.name:<9}{cell.contender:<17}{tab:<6}{order:<7}{ms:>12}  ({row['wall_s']:.1f} s)",
                          flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = [c.name for c in CONTENDERS.values() if c.default]
    parser.add_argument("--workloads", default="sinusoid,conv4", help=f"from {','.join(WORKLOADS)}")
    parser.add_argument("--contenders", default=",".join(defaults), help=f"from {','.join(CONTENDERS)}")
    parser.add_argument("--tableaus", default="maml,heun,rk4", help="rkfast tableau names (peers run maml only)")
    parser.add_argument("--orders", default="second,first", help="second,first")
    parser.add_argument("--repeats", type=int, help="timed steps per cell (default: sinusoid 100, conv4 3)")
    parser.add_argument("--warmup", type=int, help="steps before timing, the sanity step included "
                                                   "(default: sinusoid 10, conv4 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=1e-4,
                        help="sanity check in float32 on the full batch against the per-task loop; beyond it, "
                             "the exact check decides")
    parser.add_argument("--rtol64", type=float, default=1e-6,
                        help="the exact sanity check (float64, --check-tasks tasks) against the per-task loop")
    parser.add_argument("--check-tasks", type=int, default=2, help="tasks of the float64 check")
    parser.add_argument("--exact-check", choices=("auto", "always"), default="auto",
                        help="run the float64 check only when float32 is beyond --rtol (auto), or always")
    parser.add_argument("--cell-budget", type=float, default=30.0,
                        help="at most this many seconds of timed steps per cell, judged from the warm-up step "
                             "(at least one timed step; 0: always --repeats)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="one process per cell (default on CPU, for peak RSS; off with --quick and on CUDA)")
    parser.add_argument("--cell-timeout", type=float, default=900.0, help="seconds per isolated cell")
    parser.add_argument("--retry-busy", type=int, default=1,
                        help="run a cell again (this many times at most) when other processes used more than "
                             f"{BUSY_CORES} cores during it; the least disturbed run is kept")
    parser.add_argument("--quick", action="store_true",
                        help="sinusoid, maml, 2 timed steps, in this process: a smoke test (about 20 s)")
    parser.add_argument("--json", help="write the results here (default benchmarks/results/e2e-<device>.json)")
    parser.add_argument("--png", help="write the bar chart here (default benchmarks/results/e2e-<device>.png)")
    parser.add_argument("--note", help="free text stored in the JSON (e.g. which rkfast version was measured)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        if args.workloads == parser.get_default("workloads"):
            args.workloads = "sinusoid"
        if args.tableaus == parser.get_default("tableaus"):
            args.tableaus = "maml"
        args.repeats = 2 if args.repeats is None else args.repeats
        args.warmup = 1 if args.warmup is None else args.warmup
    for name, known in (("workloads", WORKLOADS), ("contenders", CONTENDERS), ("orders", ORDERS)):
        items = [x.strip() for x in getattr(args, name).split(",") if x.strip()]
        bad = [x for x in items if x not in known]
        if bad:
            parser.error(f"unknown {name}: {', '.join(bad)} (known: {', '.join(known)})")
        setattr(args, name, items)
    args.tableaus = [t.strip() for t in args.tableaus.split(",") if t.strip()]
    for t in args.tableaus:
        rkfast.get_tableau(t)  # fails early on an unknown name
    if args.isolate is None:
        args.isolate = not args.quick and args.device == "cpu"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    started = time.perf_counter()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"device {device_name(device)} ({device.type}), torch {torch.__version__}, {args.threads} threads, "
          f"python {platform.python_version()}, rkfast {rkfast.__version__}")
    source = rkfast_source()
    inside = Path(source["path"]).is_relative_to(ROOT)
    print(f"rkfast imported from {source['path']} (sources sha256 {source['sha256']})"
          + ("" if inside else f", not from this checkout ({ROOT})"))

    busy = other_cores()
    load1 = os.getloadavg()[0]
    print(f"other processes at start: {busy:.2f} cores busy (1-min load average {load1:.2f}, {os.cpu_count()} cores)")
    if busy > BUSY_CORES:
        print(f"WARNING: the machine is busy ({busy:.2f} cores used by other processes); timings will be noisy. "
              f"Rows measured while others used more than {BUSY_CORES} cores are marked '!'.")

    peers, unavailable = check_peers(args.contenders, device)
    rows = run_all(args, device, {u["contender"] for u in unavailable})

    changed = sorted({r["rkfast_sha256"] for r in rows if r.get("rkfast_sha256")} - {source["sha256"]})
    if changed or rkfast_source()["sha256"] != source["sha256"]:
        print(f"WARNING: rkfast's sources changed during the run (sha256 {source['sha256']} at the start, also "
              f"{', '.join(changed) or rkfast_source()['sha256']}): rows may mix versions (see rkfast_sha256 per row)")
    add_ratios(rows)
    for name in args.workloads:
        print_table(WORKLOADS[name], [r for r in rows if not r.get("reference_only")])
    print_legend(device, args.isolate)
    verdicts = judge_targets(rows, device, args.workloads)
    print_verdicts(verdicts)
    wall = time.perf_counter() - started
    print(f"\ntotal wall time {wall:.0f} s")

    result = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "threads": args.threads, "python": platform.python_version(), "platform": platform.platform(),
        "rkfast": rkfast.__version__, "rkfast_source": source, "git": git_state(), "peers": peers, "unavailable": unavailable,
        "busy_at_start_cores": busy, "loadavg_at_start": load1,
        "workloads": {n: WORKLOADS[n].describe for n in args.workloads},
        "settings": {"outer": f"Adam lr {OUTER_LR:g}", "seed": args.seed, "rtol_float32": args.rtol,
                     "rtol_float64": args.rtol64, "check_tasks": args.check_tasks, "exact_check": args.exact_check,
                     "cell_budget_s": args.cell_budget, "memory_noise_mb": MEMORY_NOISE_MB, "isolated": args.isolate,
                     "repeats": args.repeats, "warmup": args.warmup, "tableaus": args.tableaus,
                     "orders": args.orders, "contenders": args.contenders},
        "rows": rows, "targets": verdicts, "wall_s": wall, "note": args.note,
    }
    slug = device_slug(device)
    out_json = args.json or (None if args.quick else str(RESULTS_DIR / f"e2e-{slug}.json"))
    out_png = args.png or (None if args.quick else str(RESULTS_DIR / f"e2e-{slug}.png"))
    if out_json:
        write_json(result, out_json)
    if out_png:
        plot([r for r in rows if not r.get("reference_only")], args.workloads, Path(out_png),
             f"one meta-step, {device_name(device)}, torch {torch.__version__}, {args.threads} threads")
        print(f"wrote {out_png}")


if __name__ == "__main__":
    main()
