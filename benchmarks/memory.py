"""Peak memory and time of second-order meta-steps over tableaus, meta-batch sizes, backbones and memory levers.

    python benchmarks/memory.py [--backbones conv4-28,conv4-84,resnet12-84] [--tableaus maml,heun,rk4,maml(5)]
                                [--tasks 1,2,4,8] [--levers plain,default,...] [--paths loop,vmap]
                                [--steps 2] [--threads 2] [--limit-gib 20] [--min-free-gib 1] [--timeout-s S]
                                [--device cpu]
                                [--resume] [--dry-run] [--report] [--quick]
                                [--json benchmarks/results/memory-cpu.json] [--plot benchmarks/results/memory-cpu.png]

Each cell of the grid runs in a fresh Python process (this script with ``--cell JSON``): it builds the
model, a ``MetaOptimizer`` and one random meta-batch (5-way 5-shot, 15 query images per class; the values
do not matter to memory or time), runs the model forward on one image (a warm-up that does not touch the
step), then runs ``--steps`` meta-steps (default 2; 1 for resnet12-84), each timed. A step's peak
memory is the process's peak resident memory over the step minus its resident memory before it: the peak
(``VmHWM``) is reset to the current resident memory through ``/proc/self/clear_refs`` before each step,
so a transient peak while importing or building cannot hide the step's, and file-backed pages the kernel
reclaimed during the step are added back (where the kernel refuses the
reset, ``ru_maxrss`` after the steps minus ``ru_maxrss`` before them, as ``peak_method`` says). On CUDA:
``torch.cuda.max_memory_allocated`` over each step, after ``reset_peak_memory_stats``, minus the bytes
allocated before it.

The backbones: ``conv4-28`` (Omniglot-shaped: 1 channel, 28x28, strided conv4 of 64 filters), ``conv4-84``
(MiniImageNet-shaped: RGB 84x84, conv4 of 32 filters with max-pooling) and ``resnet12-84``
(``rkfast.models.resnet12``, 12.4 M parameters). The levers (``rkfast.Memory``), on the task-by-task path
(``loop``: ``vectorize=False``, what ``vectorize="auto"`` picks for these models on the CPU) or all tasks
under ``vmap`` (``vmap``: ``vectorize=True``, conv4-28 only):

* ``plain``: ``Memory(task_chunk=T)``, every task's stage graphs kept until one backward (the behaviour
  before the levers);
* ``default``: ``Memory()`` (loop: one task at a time; vmap: all at once, the same as ``plain``, so vmap
  cells use ``chunk`` instead);
* ``chunk``: ``Memory(task_chunk=1)`` (vmap: one task at a time; on the loop it is the default);
* ``recompute``: ``Memory(recompute=True)`` (loop: per task and recomputed; vmap: all at once, recomputed);
* ``plain+recompute``: ``Memory(task_chunk=T, recompute=True)`` (loop: recomputation alone);
* ``chunk+recompute``: ``Memory(task_chunk=1, recompute=True)`` (vmap);
* ``amp``: ``Memory(amp="bf16")`` (with the path's default chunks).

The default grid (``--dry-run`` lists it, with an estimate of its time): conv4-28 on both paths with each
path's levers, every tableau (maml, heun, rk4, maml(5)) and ``T`` in 1, 2, 4, 8; conv4-84 on the loop,
every lever for rk4 and ``plain``/``default`` for the other tableaus (which the fit needs); resnet12-84,
whose step takes minutes here, only maml ``T=1`` plain, rk4 ``T=1`` plain and recompute, rk4 ``T=4``
default, recompute and plain (the last expected to run out of memory). ``--backbones``, ``--paths``,
``--levers``, ``--tableaus`` and ``--tasks`` select from it.

Memory is protected: the child limits its address space (``RLIMIT_AS``, ``--limit-gib``, default 20 GiB on
the CPU; on CUDA ``set_per_process_memory_fraction`` when the flag is given), so that a cell that does not
fit fails with an allocation error, recorded as ``"status": "out of memory"``; and the parent kills a
child when the machine's available memory falls below ``--min-free-gib`` (recorded the same way, with the
reason). Any other failure is ``"failed"`` (the error's last lines kept) and the exit code is 1. The limit
is on virtual memory, which torch's libraries and threads keep about 0.6 GiB above the resident memory, so
a cell fits when its resident peak stays about that much under the limit. ``--threads`` (default 2; 1 with
``--quick``) sets each cell's torch and OpenMP threads: on a machine that other processes share, one thread
times far more steadily (two OpenMP threads wait on each other whenever a core is taken).

After the cells, per (backbone, path, lever), peak bytes are fitted by least squares as
``fixed + per_unit * units``, ``units = chunk_tasks * graphs``: ``chunk_tasks`` the tasks one chunk holds,
``graphs`` the stage graphs a task keeps (support-gradient evaluations + query-loss evaluations of the
tableau, ``Tableau.needs_support_grad`` and ``needs_query_loss``), or 1 with recomputation (one stage's
graph at a time). From the fit, per (backbone, path, lever, tableau), the largest meta-batch ``T`` that
fits 24 GiB on this CPU (the whole process: the baseline, fitted over ``T``, plus the peak over it), and
80 GB on a GPU as an extrapolation from the CPU bytes (the peak over the baseline plus the float32
parameters and the meta-batch; not measured on a GPU); ``"any"`` where a chunk's size does not grow with
``T``. The JSON says which numbers were measured and which predicted.

The JSON (``--json``) is written after every cell (atomically), so that ``--resume`` skips the cells it
already holds with the same settings (and reruns failed ones). Times are noisy on a shared machine: each
cell records the load average at its start and end. ``--quick`` (CI) runs a tiny grid into a temporary
folder (or ``--json``/``--plot`` if given) and fails if a cell fails for another reason than memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import rkfast
from rkfast.models import resnet12
from rkfast.runs import write_json
from rkfast.tasks.fewshot import conv4

from _common import (RESULTS_DIR, available_memory_bytes, device_name, device_slug,  # benchmarks/ on path
                     proc_status_kb, read_proc_kb, reset_peak_rss)

GIB = 2**30
GB = 1e9
CPU_BUDGET = 24 * GIB  # the budget of the project's target: a 24 GiB machine
GPU_BUDGET = 80 * GB  # an 80 GB GPU (extrapolated from the CPU bytes)
RESULT_MARK = "MEMORY-CELL-RESULT "  # the child's result line on stdout
# what an allocation refused under the limit says: torch's allocators, Python, C++, and a lazy import's mmap
OOM_TEXTS = ("can't allocate memory", "cannot allocate memory", "out of memory", "bad_alloc", "memoryerror",
             "failed to map segment")

BACKBONES: dict[str, dict[str, Any]] = {
    "conv4-28": {"model": "conv4", "channels": 1, "image_size": 28, "filters": 64, "strided": True},
    "conv4-84": {"model": "conv4", "channels": 3, "image_size": 84, "filters": 32, "strided": False},
    "resnet12-84": {"model": "resnet12", "channels": 3, "image_size": 84, "filters": None, "strided": False},
}
TABLEAUS = ("maml", "heun", "rk4", "maml(5)")
TASKS = (1, 2, 4, 8)
LEVERS: dict[str, dict[str, Any]] = {  # task_chunk "T": the whole meta-batch
    "plain": {"task_chunk": "T"},
    "default": {},
    "chunk": {"task_chunk": 1},
    "recompute": {"recompute": True},
    "plain+recompute": {"task_chunk": "T", "recompute": True},
    "chunk+recompute": {"task_chunk": 1, "recompute": True},
    "amp": {"amp": "bf16"},
}
PATH_LEVERS = {
    "loop": ("plain", "default", "recompute", "plain+recompute", "amp"),
    "vmap": ("plain", "chunk", "recompute", "chunk+recompute", "amp"),
}
INNER_LR = 0.01

# -- one cell, in its own process ---------------------------------------------------------------------------


def lever_memory(lever: str, tasks: int) -> rkfast.Memory:
    """The ``rkfast.Memory`` of a lever for a meta-batch of ``tasks``."""
    settings = {k: (tasks if v == "T" else v) for k, v in LEVERS[lever].items()}
    return rkfast.Memory(**settings)


def stage_graphs(tableau: str) -> int:
    """The per-task graphs a tableau's second-order step keeps: support gradients + query losses."""
    tab = rkfast.get_tableau(tableau)
    return sum(tab.needs_support_grad) + sum(tab.needs_query_loss)


def chunk_tasks(cell: dict[str, Any]) -> int:
    """The tasks one chunk of the cell's step holds (``Memory.chunk_size``)."""
    memory = lever_memory(cell["lever"], cell["tasks"])
    return memory.chunk_size(cell["tasks"], cell["path"] == "vmap", False)


def units(cell: dict[str, Any]) -> int:
    """The fit's ``units``: tasks per chunk times the graphs a task keeps (1 with recomputation)."""
    recompute = bool(LEVERS[cell["lever"]].get("recompute"))
    return chunk_tasks(cell) * (1 if recompute else stage_graphs(cell["tableau"]))


def build_model(cell: dict[str, Any]) -> torch.nn.Module:
    b = BACKBONES[cell["backbone"]]
    size = cell.get("image_size") or b["image_size"]
    if b["model"] == "resnet12":
        return resnet12(in_channels=b["channels"], num_classes=cell["ways"], image_size=size)
    filters = cell.get("filters") or b["filters"]
    return conv4(b["channels"], cell["ways"], filters, size, b["strided"])


def random_batch(cell: dict[str, Any], device: torch.device) -> rkfast.TaskBatch:
    """A meta-batch of random images and labels of the cell's shapes."""
    b = BACKBONES[cell["backbone"]]
    size = cell.get("image_size") or b["image_size"]
    t, ways = cell["tasks"], cell["ways"]
    shape = (b["channels"], size, size)
    support, query = ways * cell["shots"], ways * cell["query"]
    return rkfast.TaskBatch(
        torch.randn(t, support, *shape, device=device), torch.randint(0, ways, (t, support), device=device),
        torch.randn(t, query, *shape, device=device), torch.randint(0, ways, (t, query), device=device))


def limit_memory(cell: dict[str, Any], device: torch.device) -> None:
    """The cell's memory budget: the address space on the CPU, the allocator's share on CUDA."""
    limit = cell["limit_gib"]
    if not limit:
        return
    if device.type == "cpu":
        resource.setrlimit(resource.RLIMIT_AS, (int(limit * GIB), int(limit * GIB)))
    else:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit * GIB / total), device)


class CpuPeak:
    """The peak resident memory of this process over a stretch of work, in bytes.

    Where ``/proc/self/clear_refs`` accepts it, the peak (``VmHWM``) is reset to the current resident memory
    at :meth:`start`, and the stretch's peak is ``VmHWM`` minus the resident memory then: an earlier transient
    peak (importing, building, a warm-up) cannot hide a smaller step's. File-backed pages (torch's libraries,
    about a third of the baseline) that the kernel reclaimed during the stretch, under memory pressure, are
    added back, so that they do not hide the step's own growth either. Elsewhere it falls back to the growth
    of ``ru_maxrss``, which such an earlier peak can hide (it then reads 0)."""

    def __init__(self) -> None:
        self.resets = reset_peak_rss()
        self.method = (
            "VmHWM reset before each step, minus VmRSS then, plus file pages reclaimed during it"
            if self.resets
            else "ru_maxrss growth"
        )
        self.before = 0
        self.file_before = 0

    @staticmethod
    def resident_bytes() -> int:
        return proc_status_kb().get("VmRSS", 0) * 1024

    def start(self) -> int:
        """Starts a stretch; the bytes it is measured from (the resident memory, or ``ru_maxrss``)."""
        if self.resets and reset_peak_rss():
            status = proc_status_kb()
            self.before, self.file_before = status.get("VmRSS", 0) * 1024, status.get("RssFile", 0) * 1024
        else:
            self.resets = False
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self.before

    def peak(self) -> int:
        """The stretch's peak over :meth:`start`'s bytes."""
        if self.resets:
            status = proc_status_kb()
            reclaimed = max(0, self.file_before - status.get("RssFile", 0) * 1024)
            return status.get("VmHWM", 0) * 1024 - self.before + reclaimed
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.before


def is_out_of_memory(text: str) -> bool:
    return any(t in text.lower() for t in OOM_TEXTS)


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Build, warm up, record the baseline, run the steps; the measurements (``"status"`` says how it ended)."""
    device = torch.device(cell["device"])
    limit_memory(cell, device)
    torch.set_num_threads(cell["threads"])
    torch.manual_seed(0)
    out: dict[str, Any] = {"status": "failed"}
    cpu_peak = CpuPeak()
    try:
        model = build_model(cell).to(device)
        opt = rkfast.MetaOptimizer(model, F.cross_entropy, tableau=cell["tableau"], inner_lr=INNER_LR, lr=1e-4,
                                   first_order=cell["first_order"], vectorize=cell["path"] == "vmap",
                                   memory=lever_memory(cell["lever"], cell["tasks"]))
        batch = random_batch(cell, device)
        out["parameters"] = sum(p.numel() for p in model.parameters())
        out["batch_bytes"] = sum(t.numel() * t.element_size() for t in batch)
        out["vectorize"] = bool(opt.vectorize)
        with torch.no_grad():
            model(batch.support_x[0, :1])  # warm-up that does not touch the step
        measure_steps(opt, batch, cell["steps"], device, out, cpu_peak)
        out["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - every failure is recorded; its text tells memory from the rest
        text = f"{type(err).__name__}: {err}"
        out["status"] = "out of memory" if isinstance(err, MemoryError) or is_out_of_memory(text) else "failed"
        out["error"] = text[-2000:]
    if out["status"] != "ok" and device.type == "cpu" and "baseline_bytes" in out:
        out["peak_before_failure_bytes"] = cpu_peak.peak()
    return out


def measure_steps(opt: rkfast.MetaOptimizer, batch: rkfast.TaskBatch, steps: int, device: torch.device,
                  out: dict[str, Any], cpu_peak: CpuPeak) -> None:
    """Runs and times ``steps`` meta-steps, filling ``out`` with the baseline, peaks and times."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        out["baseline_bytes"] = torch.cuda.memory_allocated(device)
        out["peak_method"] = "max_memory_allocated over the step minus memory_allocated before it"
    else:
        out["baseline_bytes"] = CpuPeak.resident_bytes() if cpu_peak.resets else cpu_peak.start()
        out["peak_method"] = cpu_peak.method
    out["step_peak_bytes"], out["step_seconds"] = [], []
    for _ in range(steps):
        if cuda:
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        elif cpu_peak.resets:  # ru_maxrss cannot be reset: without the reset, every step counts from the baseline
            cpu_peak.start()
        start = time.perf_counter()
        opt.step(batch)
        if cuda:
            torch.cuda.synchronize(device)
        out["step_seconds"].append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) - before if cuda else cpu_peak.peak()
        out["step_peak_bytes"].append(peak)
    out["peak_bytes"] = max(out["step_peak_bytes"])
    out["median_step_s"] = statistics.median(out["step_seconds"])


def cell_main(text: str) -> int:
    cell = json.loads(text)
    out = run_cell(cell)
    print(RESULT_MARK + json.dumps(out), flush=True)
    return 0 if out["status"] in ("ok", "out of memory") else 1


# -- running cells from the parent ------------------------------------------------------------------------


def child_env(threads: int) -> dict[str, str]:
    """The child's environment: this rkfast first on its path, OpenMP's pool the cell's thread count."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    here = str(Path(rkfast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    return env


def launch(cell: dict[str, Any], min_free_gib: float, timeout_s: float) -> dict[str, Any]:
    """Runs one cell in a fresh process, watching the machine's available memory; its record."""
    record: dict[str, Any] = {"settings": cell, "loadavg_start": list(os.getloadavg())}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--cell", json.dumps(cell)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(cell["threads"]))
    killed = None
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            available = available_memory_bytes()
            if available is not None and available < min_free_gib * GIB and killed is None:
                killed = f"the machine's available memory fell below {min_free_gib:g} GiB: child killed"
                proc.kill()
            elif time.perf_counter() - start > timeout_s and killed is None:
                killed = f"timed out after {timeout_s:g} s: child killed"
                proc.kill()
    record["wall_s"] = time.perf_counter() - start
    record["loadavg_end"] = list(os.getloadavg())
    result = [line for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    if result:
        record.update(json.loads(result[-1][len(RESULT_MARK):]))
    elif killed:
        record["status"] = "out of memory" if "memory" in killed else "timed out"
        record["error"] = killed
    elif proc.returncode == -signal.SIGKILL:  # not by this process: the kernel's out-of-memory killer
        record["status"] = "out of memory"
        record["error"] = "killed by SIGKILL (the kernel's out-of-memory killer, most likely)"
    else:
        record["status"] = "out of memory" if is_out_of_memory(stderr) else "failed"
        record["error"] = f"exit code {proc.returncode}: {stderr[-2000:]}"
    if record["status"] == "out of memory":
        record["limit_gib"] = cell["limit_gib"]
    try:
        record["chunk_tasks"], record["stage_graphs"], record["units"] = (
            chunk_tasks(cell), stage_graphs(cell["tableau"]), units(cell))
    except ValueError:  # a tableau rkfast does not know: the child's error says so
        record["chunk_tasks"] = record["stage_graphs"] = record["units"] = None
    return record


# -- the grid --------------------------------------------------------------------------------------------


def make_cell(args: argparse.Namespace, backbone: str, path: str, lever: str, tableau: str, tasks: int,
              **overrides: Any) -> dict[str, Any]:
    steps = args.steps if args.steps is not None else (1 if backbone.startswith("resnet12") else 2)
    cell = {"backbone": backbone, "path": path, "lever": lever, "tableau": tableau, "tasks": tasks,
            "steps": steps, "threads": args.threads, "limit_gib": args.limit_gib, "device": args.device,
            "ways": 5, "shots": 5, "query": 15, "filters": None, "image_size": None, "first_order": False}
    cell.update(overrides)
    return cell


def default_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The full grid: conv4-28 on both paths, conv4-84 on the loop (every lever for rk4, plain and default
    for the other tableaus, which the fit needs), and a few resnet12-84 cells (module docstring)."""
    cells = []
    for path in ("loop", "vmap"):
        for lever in PATH_LEVERS[path]:
            cells += [make_cell(args, "conv4-28", path, lever, tab, t) for tab in TABLEAUS for t in TASKS]
    for lever in PATH_LEVERS["loop"]:
        tableaus = TABLEAUS if lever in ("plain", "default") else ("rk4",)
        cells += [make_cell(args, "conv4-84", "loop", lever, tab, t) for tab in tableaus for t in TASKS]
    resnet = [("maml", 1, "plain"), ("rk4", 1, "plain"), ("rk4", 1, "recompute"), ("rk4", 4, "default"),
              ("rk4", 4, "recompute"), ("rk4", 4, "plain")]  # the last one is expected to run out of memory
    cells += [make_cell(args, "resnet12-84", "loop", lever, tab, t) for tab, t, lever in resnet]
    return cells


def quick_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """CI: conv4-28 with 16 filters, maml and rk4, T in 1, 2, three levers on the loop, one step."""
    return [make_cell(args, "conv4-28", "loop", lever, tab, t, filters=16, steps=1)
            for lever in ("plain", "default", "recompute") for tab in ("maml", "rk4") for t in (1, 2)]


def select(cells: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cells of the grid that every selecting flag allows."""
    chosen = {"backbone": args.backbones, "path": args.paths, "lever": args.levers, "tableau": args.tableaus}
    out = [c for c in cells if all(v is None or c[k] in v for k, v in chosen.items())]
    return [c for c in out if args.tasks is None or c["tasks"] in args.tasks]


# Rough seconds per meta-step and per task-graph unit at one thread (measured on this machine's CPU), a
# second thread's speed-up on an idle machine, the levers' costs (bf16 autocast is slow on this CPU) and a
# process's start: only for the estimate printed before a grid starts.
SECONDS_PER_UNIT = {"conv4-28": 0.04, "conv4-84": 0.8, "resnet12-84": 31.0}
MORE_THREADS = 0.6
LEVER_COST = {"recompute": 1.3, "plain+recompute": 1.3, "chunk+recompute": 1.3, "amp": 3.5}
VMAP_COST = 1.2
START_S = 4.0


def estimate_s(cell: dict[str, Any]) -> float:
    """Rough seconds a cell takes (see the constants above)."""
    graphs = stage_graphs(cell["tableau"]) * cell["tasks"]
    scale = (cell.get("filters") or 64) / 64 if cell["backbone"] == "conv4-28" else 1.0
    step = SECONDS_PER_UNIT[cell["backbone"]] * scale * graphs * LEVER_COST.get(cell["lever"], 1.0)
    step *= (VMAP_COST if cell["path"] == "vmap" else 1.0) * (MORE_THREADS if cell["threads"] > 1 else 1.0)
    return START_S + step * (cell["steps"] + 0.5)  # + building and the warm-up


# -- the fit and what it predicts ---------------------------------------------------------------------------


def linear_fit(x: list[float], y: list[float]) -> dict[str, Any]:
    """``y ~ fixed + slope * x`` by least squares (``slope`` None when ``x`` takes one value), with the
    largest relative error of the fitted points."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    if len(set(x)) < 2:
        fixed, slope = float(ys.mean()), None
        pred = np.full_like(ys, fixed)
    else:
        (fixed, slope), *_ = np.linalg.lstsq(np.stack([np.ones_like(xs), xs], 1), ys, rcond=None)
        fixed, slope = float(fixed), float(slope)
        pred = fixed + slope * xs
    rel = float(np.max(np.abs(pred - ys) / np.maximum(np.abs(ys), 1.0)))
    return {"fixed_bytes": fixed, "per_unit_bytes": slope, "cells": len(x), "max_relative_error": rel,
            "max_error_bytes": float(np.max(np.abs(pred - ys)))}


def variant(cell: dict[str, Any]) -> str:
    """The backbone's name, with any size that differs from its default (``conv4-28/16f``)."""
    sizes = (f"/{cell['filters']}f" if cell.get("filters") else "") + (
        f"/{cell['image_size']}px" if cell.get("image_size") else "")
    return cell["backbone"] + sizes


def group_key(cell: dict[str, Any]) -> tuple[str, str, str]:
    return variant(cell), cell["path"], cell["lever"]


def fits(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per (backbone, path, lever): peak bytes over units, from two finished cells or more (or one, where a
    chunk is one task whatever ``T``)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["status"] == "ok":
            groups[group_key(r["settings"])].append(r)
    out = {}
    for key, rs in sorted(groups.items()):
        if len(rs) < 2 and grows_with_tasks(key[1], key[2]):
            continue  # a chunk that grows with T needs two sizes at least; a per-task chunk is one number
        fit = linear_fit([units(r["settings"]) for r in rs], [r["peak_bytes"] for r in rs])
        fit["baseline"] = linear_fit([r["settings"]["tasks"] for r in rs], [r["baseline_bytes"] for r in rs])
        fit["parameters"] = rs[0]["parameters"]
        fit["batch_bytes_per_task"] = rs[0]["batch_bytes"] / rs[0]["settings"]["tasks"]
        if not LEVERS[key[2]].get("recompute"):
            fit["split"] = split_fit(rs)
        out[" ".join(key)] = fit
    return out


def split_fit(rs: list[dict[str, Any]]) -> dict[str, float] | None:
    """A finer fit, beside the one the predictions use: ``fixed + a * support_grads + b * query_losses``
    (per chunk), where the tableaus mix the two kinds of graph in enough ratios to tell them apart (a
    support gradient's graph holds the support set's forward and backward, a query loss's the query set's
    forward); None where they do not."""
    rows, ys = [], []
    for r in rs:
        tab = rkfast.get_tableau(r["settings"]["tableau"])
        chunk = chunk_tasks(r["settings"])
        rows.append([1.0, chunk * sum(tab.needs_support_grad), chunk * sum(tab.needs_query_loss)])
        ys.append(r["peak_bytes"])
    x, y = np.asarray(rows), np.asarray(ys, float)
    if np.linalg.matrix_rank(x) < 3:
        return None
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    err = np.abs(x @ coef - y)
    return {"fixed_bytes": float(coef[0]), "per_support_grad_bytes": float(coef[1]),
            "per_query_loss_bytes": float(coef[2]), "max_error_bytes": float(err.max()),
            "max_relative_error": float((err / np.maximum(y, 1.0)).max())}


def grows_with_tasks(path: str, lever: str) -> bool:
    """Whether a chunk's task count grows with ``T`` (else the chunk is one task whatever ``T``)."""
    return lever_memory(lever, 2).chunk_size(2, path == "vmap", False) == 2


def predicted_total(fit: dict[str, Any], cell_units: float, tasks: int, gpu: bool) -> float:
    """Predicted bytes of a step: on the CPU the process (baseline + peak over it); on a GPU (extrapolated)
    the peak over the baseline + the float32 parameters + the meta-batch."""
    per_unit = fit["per_unit_bytes"] or 0.0
    over = fit["fixed_bytes"] + per_unit * cell_units
    if gpu:
        return over + 4 * fit["parameters"] + fit["batch_bytes_per_task"] * tasks
    base = fit["baseline"]
    return over + base["fixed_bytes"] + (base["per_unit_bytes"] or 0.0) * tasks


def largest_tasks(fit: dict[str, Any], graphs: int, path: str, lever: str, budget: float, gpu: bool) -> Any:
    """The largest ``T`` whose predicted step fits ``budget``: ``"any"`` when a chunk holds one task
    whatever ``T`` (and one fits), 0 when not even one task fits."""
    per_task_units = 1 if LEVERS[lever].get("recompute") else graphs
    if predicted_total(fit, per_task_units, 1, gpu) > budget:
        return 0
    if not grows_with_tasks(path, lever):
        return "any"
    per_unit = fit["per_unit_bytes"]
    if not per_unit or per_unit <= 0:
        return None  # the fit cannot tell
    # the prediction is linear in T: at T = 0 it is the intercept, and each task adds the same bytes
    at_zero = predicted_total(fit, 0, 0, gpu)
    per_task = predicted_total(fit, per_task_units, 1, gpu) - at_zero
    return int((budget - at_zero) // per_task)


def capacity(records: list[dict[str, Any]], fitted: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (backbone, path, lever, tableau) measured: the largest measured ``T`` that ran, the smallest that
    ran out of memory, and the predicted largest ``T`` for the CPU and GPU budgets."""
    seen: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        s = r["settings"]
        seen[(*group_key(s), s["tableau"])].append(r)
    rows = []
    for (backbone, path, lever, tableau), rs in sorted(seen.items()):
        ok = [r["settings"]["tasks"] for r in rs if r["status"] == "ok"]
        oom = [r["settings"]["tasks"] for r in rs if r["status"] == "out of memory"]
        row = {"backbone": backbone, "path": path, "lever": lever, "tableau": tableau,
               "measured_largest_ok_tasks": max(ok, default=None),
               "measured_smallest_oom_tasks": min(oom, default=None),
               "measured_limit_gib": rs[0]["settings"]["limit_gib"]}
        fit = fitted.get(f"{backbone} {path} {lever}")
        graphs = stage_graphs(tableau)
        row["cpu_24gib_tasks"] = largest_tasks(fit, graphs, path, lever, CPU_BUDGET, False) if fit else None
        row["gpu_80gb_tasks"] = largest_tasks(fit, graphs, path, lever, GPU_BUDGET, True) if fit else None
        row["how"] = (f"measured: the cells that ran (ok) or ran out of memory under {row['measured_limit_gib']} GiB; "
                      + ("predicted: the fit of " + f"{backbone} {path} {lever}" + " (cpu: baseline + peak; gpu: "
                         "EXTRAPOLATED from the CPU bytes: peak over baseline + float32 parameters + batch)"
                         if fit else "no fit (too few cells)"))
        rows.append(row)
    return rows


# -- reporting --------------------------------------------------------------------------------------------


def gb(x: float | None) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def print_cells(records: list[dict[str, Any]]) -> None:
    print(f"{'backbone':<12}{'path':<5}{'lever':<16}{'tableau':<8}{'T':>3}{'units':>6}  {'status':<14}"
          f"{'peak GB':>8}{'base GB':>8}{'s/step':>8}  load start-end")
    for r in records:
        s = r["settings"]
        step = f"{r['median_step_s']:.2f}" if "median_step_s" in r else "-"
        print(f"{variant(s):<12}{s['path']:<5}{s['lever']:<16}{s['tableau']:<8}{s['tasks']:>3}{r['units']!s:>6}  "
              f"{r['status']:<14}{gb(r.get('peak_bytes', r.get('peak_before_failure_bytes'))):>8}"
              f"{gb(r.get('baseline_bytes')):>8}{step:>8}  {r['loadavg_start'][0]:.1f}-{r['loadavg_end'][0]:.1f}"
              )


def print_fits(fitted: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    print("\nfit: peak bytes over the baseline ~ fixed + per_unit * units (units = tasks per chunk x stage graphs "
          "per task, 1 with recompute)")
    print(f"{'backbone path lever':<36}{'cells':>6}{'fixed GB':>10}{'per unit MB':>13}{'max err MB':>12}"
          f"{'max rel err':>13}")
    for key, f in fitted.items():
        per = "-" if f["per_unit_bytes"] is None else f"{f['per_unit_bytes'] / 1e6:.1f}"
        print(f"{key:<36}{f['cells']:>6}{f['fixed_bytes'] / GB:>10.3f}{per:>13}{f['max_error_bytes'] / 1e6:>12.1f}"
              f"{f['max_relative_error']:>13.3f}")
    print("\nfiner fit (not used for the predictions): fixed + a * support gradients + b * query losses per chunk")
    print(f"{'backbone path lever':<36}{'fixed GB':>10}{'a MB':>9}{'b MB':>9}{'max err MB':>12}{'max rel err':>13}")
    for key, f in fitted.items():
        sp = f.get("split")
        if sp:
            print(f"{key:<36}{sp['fixed_bytes'] / GB:>10.3f}{sp['per_support_grad_bytes'] / 1e6:>9.1f}"
                  f"{sp['per_query_loss_bytes'] / 1e6:>9.1f}{sp['max_error_bytes'] / 1e6:>12.1f}"
                  f"{sp['max_relative_error']:>13.3f}")
    print("\nlargest meta-batch T: measured (ran / out of memory) and predicted by the fit for 24 GiB (this CPU) "
          "and 80 GB (GPU, EXTRAPOLATED from CPU bytes)")
    print(f"{'backbone':<12}{'path':<5}{'lever':<16}{'tableau':<8}{'ran':>5}{'oom':>5}{'24 GiB':>8}{'80 GB*':>8}")
    for r in rows:
        print(f"{r['backbone']:<12}{r['path']:<5}{r['lever']:<16}{r['tableau']:<8}"
              f"{r['measured_largest_ok_tasks'] or '-'!s:>5}{r['measured_smallest_oom_tasks'] or '-'!s:>5}"
              f"{r['cpu_24gib_tasks'] if r['cpu_24gib_tasks'] is not None else '-'!s:>8}"
              f"{r['gpu_80gb_tasks'] if r['gpu_80gb_tasks'] is not None else '-'!s:>8}")


LEVER_COLORS = {"plain": "tab:red", "default": "tab:blue", "chunk": "tab:blue", "recompute": "tab:green",
                "plain+recompute": "tab:orange", "chunk+recompute": "tab:olive", "amp": "tab:purple"}


def plot(records: list[dict[str, Any]], path: str) -> None:
    """Peak memory over the baseline against T, one panel per backbone (and path, where it has two): rk4
    bold, other tableaus light; out-of-memory cells marked at the top edge."""
    from rkfast.figures import mark_nonfinite, new_figure, readable_log_axis, save_figure

    order = list(BACKBONES)
    panels = sorted({(variant(r["settings"]), r["settings"]["path"]) for r in records},
                    key=lambda p: (order.index(p[0].split("/")[0]), p))
    paths_of = defaultdict(set)
    for name, pathname in panels:
        paths_of[name].add(pathname)
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig = new_figure(figsize=(6.0 * cols, 4.6 * rows))
    for i, (name, pathname) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        lines: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            s = r["settings"]
            if (variant(s), s["path"]) == (name, pathname) and r["status"] in ("ok", "out of memory"):
                lines[(s["lever"], s["tableau"])].append(r)
        oom_labelled = False
        for (lever, tableau), rs in sorted(lines.items(), key=lambda kv: kv[0][1] == "rk4"):
            rs.sort(key=lambda r: r["settings"]["tasks"])
            x = [r["settings"]["tasks"] for r in rs]
            y = [r["peak_bytes"] / GB if r["status"] == "ok" else None for r in rs]
            bold = tableau == "rk4"
            ax.plot([xi for xi, yi in zip(x, y, strict=True) if yi is not None], [yi for yi in y if yi is not None],
                    color=LEVER_COLORS[lever], marker="o" if bold else ".", lw=2 if bold else 0.8,
                    alpha=1.0 if bold else 0.3, label=lever if bold else None)
            # an out-of-memory cell at the peak it had reached when refused, else at the top edge
            refused = [(xi, r["peak_before_failure_bytes"] / GB) for xi, r in zip(x, rs, strict=True)
                       if r["status"] != "ok" and r.get("peak_before_failure_bytes")]
            if refused:
                ax.plot(*zip(*refused, strict=True), ls="", marker="x", ms=9, mew=2, color=LEVER_COLORS[lever],
                        label=None if oom_labelled else "out of memory (its peak when refused)")
                oom_labelled = True
            rest = [(xi, yi) for xi, yi in zip(x, y, strict=True) if xi not in dict(refused)]
            if rest and mark_nonfinite(ax, *zip(*rest, strict=True), LEVER_COLORS[lever],
                                       label=None if oom_labelled else "out of memory"):
                oom_labelled = True
        tasks = sorted({r["settings"]["tasks"] for rs in lines.values() for r in rs})
        ax.set_xscale("log", base=2)
        ax.set_xticks(tasks, [str(t) for t in tasks])
        ax.minorticks_off()
        readable_log_axis(ax, "y")
        others = sorted({tableau for _, tableau in lines} - {"rk4"})
        where = f" ({pathname})" if len(paths_of[name]) > 1 else (" (vmap)" if pathname == "vmap" else "")
        ax.set(xlabel="meta-batch T (tasks)", ylabel="peak memory over the baseline (GB)",
               title=f"{name}{where}: rk4" + (f"; light: {', '.join(others)}" if others else ""))
        ax.legend(fontsize=7)
    save_figure(fig, path)


# -- main -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = lambda text: [s for s in text.split(",") if s]  # noqa: E731
    parser.add_argument("--backbones", type=names, help=f"of {','.join(BACKBONES)}")
    parser.add_argument("--tableaus", type=names, help=f"of {','.join(TABLEAUS)}")
    parser.add_argument("--tasks", type=lambda s: [int(x) for x in s.split(",")], help="of 1,2,4,8")
    parser.add_argument("--levers", type=names, help=f"of {','.join(LEVERS)}")
    parser.add_argument("--paths", type=names, help="of loop,vmap")
    parser.add_argument("--steps", type=int, help="meta-steps per cell (default 2; 1 for resnet12-84)")
    parser.add_argument("--threads", type=int, help="torch threads in each cell (default 2; 1 with --quick)")
    parser.add_argument("--limit-gib", type=float, help="a cell's memory limit (default 20 on the CPU, none on CUDA)")
    parser.add_argument("--min-free-gib", type=float, default=1.0,
                        help="kill a cell when the machine's available memory falls below this")
    parser.add_argument("--timeout-s", type=float, default=4 * 3600.0, help="kill a cell after this long")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resume", action="store_true", help="keep the JSON's cells, skip those of equal settings")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and the estimate, run nothing")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: fit, print and plot the cells already in the JSON")
    parser.add_argument("--quick", action="store_true", help="a tiny grid for CI, into a temporary folder")
    parser.add_argument("--json", help="default benchmarks/results/memory-<device>.json")
    parser.add_argument("--plot", help="default: the JSON's path with .png")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # one cell, in the child process
    return parser


def load_records(path: Path, resume: bool, report: bool) -> list[dict[str, Any]]:
    """The JSON's cells: all of them for a report, the finished ones to resume (failed ones run again)."""
    if not (resume or report) or not path.exists():
        return []
    cells = json.loads(path.read_text())["cells"]
    return cells if report else [r for r in cells if r["status"] in ("ok", "out of memory")]


def cell_name(cell: dict[str, Any]) -> str:
    return f"{variant(cell)} {cell['path']} {cell['lever']} {cell['tableau']} T={cell['tasks']}"


def settings_key(cell: dict[str, Any]) -> str:
    return json.dumps(cell, sort_keys=True)


def save(path: Path, records: list[dict[str, Any]], args: argparse.Namespace, grid: list[dict[str, Any]]
         ) -> dict[str, Any]:
    fitted = fits(records)
    finished = {settings_key(r["settings"]) for r in records if r["status"] in ("ok", "out of memory")}
    data = {
        "benchmark": "memory", "machine": platform.node(), "torch": torch.__version__, "device": args.device,
        "device_name": device_name(torch.device(args.device)), "cpu_count": os.cpu_count(),
        "memory_total_bytes": read_proc_kb("/proc/meminfo", ("MemTotal",)).get("MemTotal", 0) * 1024,
        "inner_lr": INNER_LR, "outer": "adam", "threads": sorted({r["settings"]["threads"] for r in records}),
        "how": {
            "peak_bytes": "measured in a fresh process per cell, each cell's peak_method: the peak resident memory "
                          "over a step (VmHWM, reset before it) minus the resident memory before it, plus the file "
                          "pages reclaimed during it; cells "
                          "without peak_method: ru_maxrss after the steps minus ru_maxrss after building and a "
                          "warm-up forward; CUDA: max_memory_allocated over a step minus allocated before",
            "median_step_s": "measured: the median of the cell's steps (load average at the cell's start and end "
                             "recorded: other processes share the CPU, so times are noisy)",
            "fits": "least squares over the ok cells of each (backbone, path, lever) of default sizes",
            "capacity": "measured_* from the cells; cpu_24gib_tasks and gpu_80gb_tasks PREDICTED from the fits "
                        "(gpu: an extrapolation from CPU bytes, not measured on a GPU)",
            "missing": "the cells of the grid (at these settings) not in this file yet: --resume runs them",
        },
        "missing": [cell_name(c) for c in grid if settings_key(c) not in finished], "cells": records, "fits": fitted, "capacity": capacity(records, fitted),
    }
    write_json(path, data)
    return data


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cell:
        return cell_main(args.cell)
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    if args.limit_gib is None:
        args.limit_gib = 20.0 if args.device == "cpu" else 0.0
    if args.quick:
        folder = Path(tempfile.mkdtemp(prefix="rkfast-memory-"))
        args.json = args.json or str(folder / "memory-quick.json")
    json_path = Path(args.json or RESULTS_DIR / f"memory-{device_slug(torch.device(args.device))}.json")
    plot_path = args.plot or str(json_path.with_suffix(".png"))
    grid = quick_grid(args) if args.quick else default_grid(args)
    cells = select(grid, args)
    records = load_records(json_path, args.resume, args.report)
    done = {settings_key(r["settings"]) for r in records}
    todo = [] if args.report else [c for c in cells if settings_key(c) not in done]
    total = sum(estimate_s(c) for c in todo)
    print(f"{len(todo)} cells to run ({len(cells) - len(todo)} already in {json_path}); estimate "
          f"{total / 60:.0f} min at {args.threads} threads on an idle machine; limit {args.limit_gib:g} GiB per cell")
    if args.dry_run:
        for c in todo:
            print(json.dumps(c))
        return 0
    failures = 0
    for i, cell in enumerate(todo):
        record = launch(cell, args.min_free_gib, args.timeout_s)
        failures += record["status"] not in ("ok", "out of memory")
        records.append(record)
        save(json_path, records, args, grid)
        peak = record.get("peak_bytes")
        print(f"[{i + 1}/{len(todo)}] {cell_name(cell)}: {record['status']}"
              + (f", {peak / GB:.2f} GB" if peak is not None else "") + f", {record['wall_s']:.0f} s", flush=True)
    data = save(json_path, records, args, grid)
    print()
    print_cells(records)
    print_fits(data["fits"], data["capacity"])
    if data["missing"]:
        print(f"\nmissing from the grid ({len(data['missing'])}): {', '.join(data['missing'])}")
    print(f"wrote {json_path}")
    if records:
        plot(records, plot_path)
        print(f"wrote {plot_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
