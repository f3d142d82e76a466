"""Measuring one end-to-end benchmark cell: the sanity check, the timed steps and their peak memory.

A :class:`Cell` is one (workload, contender, tableau, order) with the settings it is measured under;
:func:`run_cell` measures it in this process and returns its result row (a dict, as the JSON stores it),
:func:`run_isolated` does the same in a fresh worker process (``e2e.py --worker <cell as JSON>``, for a
clean peak RSS), and :func:`measure_cell` runs it again while other processes disturbed it.

Sanity: the meta-gradient after one float32 step from the initialization on the full batch (the timed
configuration; this step is also the first warm-up step) against the per-task loop's, within ``rtol``.
Beyond that (float32 rounding through several second-order stages reaches ~2e-3 on conv4 rk4), or always
with ``exact_check="always"``, the exact check decides: the same in float64 on the first ``check_tasks``
tasks within ``rtol64`` (rounding is ~1e-14 there; the fused-norm vmap error 1e-2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import rkfast

from _common import (BENCH_DIR, ROOT, anon_kb, other_load, peak_rss_kb, proc_status_kb, reset_peak_rss, sync,
                     timed_calls)
from e2e_contenders import CONTENDERS, Contender, Unsupported
from e2e_peers import NotAvailable, load_peer
from e2e_workloads import WORKLOADS, Setup, flat_grad, make_setup

BUSY_CORES = 0.25  # other processes using more than this many cores make timings suspect
RESULT_TAG = "E2E-RESULT "  # marks the worker's result line on its stdout
WORKER_SCRIPT = BENCH_DIR / "e2e.py"  # run with --worker: the isolated cell


@dataclass(frozen=True)
class Cell:
    """One measurement: ``contender``'s meta-step on ``workload`` at ``tableau`` and ``order``, and the
    settings it runs under. Crosses to an isolated worker as JSON (:meth:`to_json`, :meth:`from_json`)."""

    workload: str
    contender: str
    tableau: str
    order: str  # "second" or "first"
    device: str
    seed: int  # the common initialization and batch
    threads: int
    rtol: float  # the float32 sanity check's tolerance
    rtol64: float  # the float64 (exact) check's
    check_tasks: int  # tasks of the float64 check
    exact_check: str  # "auto" (float64 only when float32 is beyond rtol) or "always"
    cell_budget: float  # at most this many seconds of timed steps, judged from the first step (0: no limit)
    isolated: bool  # in its own process: peak RSS is measured
    ref: str  # path prefix of the reference gradients, which the ``loop`` contender writes
    warmup: int  # steps before timing, the sanity step included
    repeats: int  # timed steps (at most)
    reference_only: bool = False  # the loop run for its reference gradients only, untimed

    @property
    def is_reference(self) -> bool:
        return self.contender == "loop"

    def key(self) -> dict[str, str]:
        """The fields a result row starts with."""
        return {"workload": self.workload, "contender": self.contender, "tableau": self.tableau, "order": self.order}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Cell:
        return cls(**json.loads(text))


def rkfast_source() -> dict[str, str]:
    """Where rkfast was imported from and a hash of its Python sources (a tree edited mid-run shows up)."""
    pkg = Path(rkfast.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        digest.update(str(path.relative_to(pkg)).encode() + b"\0" + path.read_bytes())
    return {"path": str(pkg), "sha256": digest.hexdigest()[:16]}


# -- the sanity check ------------------------------------------------------------------------------------------


def compare(g: Tensor, ref: Tensor, rtol: float) -> dict[str, Any]:
    """Relative error of a meta-gradient against the reference, in norm and in the largest entry."""
    g, ref = g.double().cpu(), ref.double().cpu()
    rel = float((g - ref).norm() / ref.norm().clamp_min(1e-300))
    worst = float((g - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
    return {"ok": rel <= rtol and worst <= rtol and bool(torch.isfinite(g).all()), "rel_err": rel, "max_err": worst,
            "rtol": rtol}


def first_step_grad(cont: Contender, s: Setup) -> tuple[Callable[[], None], Tensor]:
    """Build the contender on ``s``, take one step from the initialization, return (step, meta-gradient)."""
    params = s.params
    step = cont.build(s)
    step()
    sync(s.device)
    return step, flat_grad(params).cpu()


def check(row: dict[str, Any], key: str, g: Tensor, cell: Cell, rtol: float) -> bool:
    """Save (the loop: the reference) or compare ``g`` with the reference ``cell.ref + key``; False if wrong."""
    path = cell.ref + key
    if cell.is_reference:
        torch.save(g, path)
        row["sanity"][key] = {"ok": True, "reference": True}
    elif os.path.exists(path):
        row["sanity"][key] = compare(g, torch.load(path), rtol)
    else:
        row["sanity"][key] = {"ok": None, "reason": "no reference gradient"}
    return row["sanity"][key]["ok"] is not False


# -- memory ------------------------------------------------------------------------------------------------


def warm_runtime() -> None:
    """Exercise autograd, torch.func, conv/norm/pool kernels and both Adam flavours once on a toy model, so
    that the runtime's one-time allocations (~75 MB: thread pools, kernel caches) land in the memory
    baseline and not in the first contender step's peak."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x, y = torch.randn(3, 5, 4), torch.randn(3, 5, 1)

    def task(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        g = grad(lambda q: F.mse_loss(functional_call(mlp, q, (x,)), y))(p)
        return F.mse_loss(functional_call(mlp, {k: p[k] - 0.1 * g[k] for k in p}, (x,)), y)

    vmap(task, in_dims=(None, 0, 0))(dict(mlp.named_parameters()), x, y).mean().backward()
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2, track_running_stats=False), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2))
    loss = F.cross_entropy(conv(torch.randn(4, 1, 4, 4)), torch.tensor([0, 1, 0, 1]))
    torch.autograd.grad(torch.autograd.grad(loss, list(conv.parameters()), create_graph=True)[0].sum(),
                        list(conv.parameters())[0])
    for fused in (False, True):
        torch.optim.Adam(mlp.parameters(), lr=1e-3, fused=fused).step()


class MemoryProbe:
    """The timed steps' peak memory above the setup's: on CUDA ``max_memory_allocated``; on the CPU, in an
    isolated worker only, the peak anonymous RSS (in-process, other cells' memory would be in it)."""

    def __init__(self, device: torch.device, isolated: bool) -> None:
        self.device = device
        self.kind = "cuda" if device.type == "cuda" else "rss" if isolated else None

    def setup_done(self) -> None:
        """Notes the baseline: the model and batch are in place, no contender built yet."""
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
        elif self.kind == "rss":
            self.base_status = proc_status_kb()

    def warmup_done(self, timed: bool) -> dict[str, Any]:
        """Resets the peak before the timed steps (the float64 check's is not theirs); the row's fields."""
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "rss":
            # the first steps fault in library code (file-backed pages, ~150 MB of libtorch): reset the peak
            # here and count anonymous memory only, so that the timed steps' peak is the contender's data
            self.hwm_reset = reset_peak_rss() if timed else False
            return {"hwm_reset": self.hwm_reset}
        return {}

    def result(self) -> dict[str, Any]:
        """``peak_mb``, ``base_mb`` (and on the CPU the RSS they come from) and what ``memory`` means."""
        if self.kind == "cuda":
            return {"peak_mb": (torch.cuda.max_memory_allocated(self.device) - self.base_bytes) / 2**20,
                    "base_mb": self.base_bytes / 2**20, "memory": "cuda max_memory_allocated above the setup's"}
        if self.kind == "rss":
            end = proc_status_kb()
            peak_kb = peak_rss_kb(end)
            base_anon = anon_kb(self.base_status)
            # anonymous memory at the peak: the peak RSS minus file-backed pages (which only grow), minus the
            # anonymous memory after imports + model/batch setup
            peak_anon = peak_kb - end.get("RssFile", 0) if self.hwm_reset else peak_kb - base_anon
            return {"peak_mb": (peak_anon - base_anon) / 1024, "base_mb": base_anon / 1024,
                    "peak_rss_mb": peak_kb / 1024, "base_rss_mb": self.base_status.get("VmRSS", 0) / 1024,
                    "memory": "peak anonymous RSS during the timed steps above the anonymous RSS after imports + "
                              "model/batch setup (own process)"}
        return {}


# -- one cell ----------------------------------------------------------------------------------------------


def _timed_steps(cell: Cell, first_step_s: float) -> int:
    """``repeats``, but no more than fit in ``cell_budget`` seconds at the warm-up step's pace (at least 1)."""
    if not cell.cell_budget or cell.repeats == 0:
        return cell.repeats
    return max(1, min(cell.repeats, int(cell.cell_budget / max(first_step_s, 1e-9))))


def _sanity(cell: Cell, cont: Contender, s: Setup, row: dict[str, Any]) -> tuple[Callable[[], None], float] | None:
    """The first step, checked (see the module docstring): (step, its seconds), or None if it is wrong."""
    start = time.perf_counter()
    step, g32 = first_step_grad(cont, s)
    first_step_s = time.perf_counter() - start
    f32_ok = check(row, "float32", g32, cell, cell.rtol)
    if cell.is_reference or not f32_ok or cell.exact_check == "always":
        # float64 on a few tasks: the reference (loop), or the arbiter when float32 differs by more than
        # rounding should explain (not counted in the memory peak: that is reset after the warm-up)
        exact = make_setup(s.workload, cell.tableau, s.first_order, s.device, cell.seed, torch.float64,
                           cell.check_tasks)
        _, g64 = first_step_grad(cont, exact)
        del exact
        if not check(row, "float64", g64, cell, cell.rtol64):
            return None
        if not f32_ok:
            row["sanity"]["float32"]["ok"] = None  # beyond rtol, but the exact check passed: rounding
    return step, first_step_s


def run_cell(cell: Cell) -> dict[str, Any]:
    """Measures one cell in this process: sanity check, warm-up, timed steps, memory where possible."""
    wl, cont = WORKLOADS[cell.workload], CONTENDERS[cell.contender]
    device = torch.device(cell.device)
    row: dict[str, Any] = {**cell.key(), "sanity": {}}
    memory = MemoryProbe(device, cell.isolated)
    times: list[float] = []
    try:
        if cont.peer:
            load_peer(cont.peer)  # imported before the memory baseline (and NotAvailable before any work)
        if device.type == "cpu" and cell.isolated:
            warm_runtime()
        s = make_setup(wl, cell.tableau, cell.order == "first", device, cell.seed)
        memory.setup_done()
        checked = _sanity(cell, cont, s, row)
        if checked is None:
            row["status"] = "wrong"
            return row
        step, first_step_s = checked
        for _ in range(cell.warmup - 1):
            step()
        capture = getattr(getattr(step, "optimizer", None), "_capture", None)
        if capture is not None and capture.mode is not False and not capture.captured:
            raise RuntimeError(f"the step is not replayed from a graph after {cell.warmup} warm-up steps")
        row.update(memory.warmup_done(timed=cell.repeats > 0))
        times = timed_calls(step, _timed_steps(cell, first_step_s), device)
    except Unsupported as err:
        row.update(status="unsupported", reason=str(err))
        return row
    except NotAvailable as err:
        row.update(status="not available", reason=str(err))
        return row
    except Exception as err:  # noqa: BLE001 - one failing cell must not end the run
        row.update(status="error", reason=f"{type(err).__name__}: {err}"[:500])
        return row
    row["status"] = "ok"
    if times:
        row.update(ms=1e3 * statistics.median(times), ms_min=1e3 * min(times), ms_max=1e3 * max(times),
                   repeats=len(times), **memory.result())
    return row


# -- one cell in its own process ------------------------------------------------------------------------------


def worker_main(cell_json: str) -> None:
    """The isolated worker: measures the cell and prints its row (tagged) on stdout."""
    cell = Cell.from_json(cell_json)
    torch.set_num_threads(cell.threads)
    row = run_cell(cell)
    row["rkfast_sha256"] = rkfast_source()["sha256"]
    print(RESULT_TAG + json.dumps(row), flush=True)


def run_isolated(cell: Cell, timeout: float) -> dict[str, Any]:
    """Measures the cell in a fresh worker process; its row, or one that says why there is none."""
    cmd = [sys.executable, str(WORKER_SCRIPT), "--worker", cell.to_json()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**cell.key(), "status": "timeout", "reason": f"cell exceeded {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**cell.key(), "status": "error", "reason": f"worker exit {proc.returncode}: {' | '.join(tail)}"[:500]}


def measure_cell(cell: Cell, isolate: bool, timeout: float, retries: int) -> dict[str, Any]:
    """Measures the cell (in a worker process when ``isolate``) while watching the other processes' CPU use:
    while they used more than BUSY_CORES cores, it runs again (``retries`` times at most) and the least
    disturbed run is kept. The row gains ``other_cores``, ``wall_s``, ``warmup`` and ``attempts``."""
    who = resource.RUSAGE_CHILDREN if isolate else resource.RUSAGE_SELF
    row: dict[str, Any] | None = None
    for attempt in range(1 + retries):
        t0 = time.perf_counter()
        with other_load(who) as load:
            new = run_isolated(cell, timeout) if isolate else run_cell(cell)
        wall = time.perf_counter() - t0
        # /proc/stat counts in 10 ms ticks: too coarse for cells shorter than a second
        new.update(other_cores=load.get("other_cores") if wall >= 1.0 else None, wall_s=wall,
                   warmup=cell.warmup, attempts=attempt + 1)
        if row is None or (new.get("status") == "ok" and (new["other_cores"] or 0) < (row["other_cores"] or 0)):
            row = new
        busy_now = new.get("other_cores")
        if new.get("status") != "ok" or busy_now is None or busy_now <= BUSY_CORES:
            break
        print(f"  ({cell.workload} {cell.contender} {cell.tableau} {cell.order}: other processes used "
              f"{busy_now:.2f} cores during the cell; running it again)", flush=True)
        time.sleep(5.0)
    assert row is not None
    row["attempts"] = attempt + 1
    return row
