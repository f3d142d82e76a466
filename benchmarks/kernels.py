"""Time rkfast's fused kernels against plain PyTorch, as memory bandwidth and as a fraction of a copy.

    python benchmarks/kernels.py                      # the full run on the default device (cuda if present)
    python benchmarks/kernels.py --quick              # tiny sizes, few repeats: a smoke test (seconds)
    python benchmarks/kernels.py --device cpu --json benchmarks/results/kernels-cpu.json
    python benchmarks/kernels.py --ops combine --sizes 20,23 --max-gb 8 --threads 2

For every op (``stage_point``, ``combine``, ``axpy_``; ``sp_elem`` and ``sp_elem_bwd``: the forward and the
backward kernel of ``stage_point_elementwise``, per-element coefficient vectors), every backend that runs on
the device (cpu: ``torch``, ``cpp``; cuda: ``torch``, ``triton``) and every size ``N``, task count ``T`` and
stream count ``s'``, the script times the op (median of many calls), and the naive PyTorch code it replaces:

* ``chain``: one ``add_`` per input (stage_point: ``out.copy_(theta.expand(T, N))`` then one ``add_`` per
  slope; combine: ``out.zero_()`` then one ``add_`` per task row of every gradient; axpy_: ``theta.add_``,
  the same single op);
* for ``sp_elem``: ``out.copy_(theta.expand(T, N))`` then one ``out.addcmul_(c_l, K_l, value=-1)`` per slope;
  for ``sp_elem_bwd`` what autograd runs for ``theta - sum_l c_l * K_l``: ``g.sum(0)``, ``-g``, then per
  slope ``(-g) * c_l`` and ``((-g) * K_l).sum(0)`` (into preallocated buffers). The fused backward is timed as
  the backend's kernel (``stage_point_elementwise_backward_``) writing theta's, the slopes' and the
  coefficients' gradients into preallocated buffers;
* ``gemv`` (combine only): ``out.addmv_(G_l.T, w_l * ones(T))`` per gradient, the best one-pass reduction
  over tasks stock PyTorch offers. (A ``torch._foreach_add_`` variant does not fit combine: every row
  accumulates into the same ``out``, and a foreach list that repeats one tensor races in the CUDA fast path;
  stage_point's chain is already one op per slope over the whole ``[T, N]`` buffer.)

Bandwidth is bytes moved (the fused kernel's minimal traffic: every input read once, every output written
once) over the time. ``% floor`` compares with ``dst.copy_(src)`` on a large buffer, measured in the same
run (on CPU within each cell, taking turns with the variants, since a shared machine's bandwidth drifts;
the ``floor`` column): 100% means the op moves its bytes as fast as a copy does. Cells whose working set fits in the last
level cache can exceed 100% (marked ``~``). ``x chain`` / ``x torch`` are speedups over the chain and over
the ``torch`` backend; ``ideal`` is the chain's traffic over the fused traffic, the speedup a purely
bandwidth-bound pair would show. Every variant's output is checked once against the ``torch`` backend
before it is timed; a cell that does not fit in ``--max-gb`` (cpu; cuda: 60% of free memory) is skipped
with the reason printed.

CPU timings use ``time.perf_counter`` around each call, the variants of a cell taking turns over a few
rounds (a shared machine's drifts then hit them alike); CUDA timings ``triton.testing.do_bench`` (median,
L2 flushed between calls) or CUDA events when Triton is missing. Compare numbers only within one run. The
header also gives the bandwidth of reads alone (``src.sum()``): ops that mostly read (combine) can beat the
copy floor by up to that ratio. The JSON (device, torch version, threads, bandwidths, rows, skipped cells,
target verdicts) goes to ``--json``; ``--quick`` writes none unless ``--json`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from rkfast import kernels
from rkfast.kernels.registry import backend_module

# benchmarks/ is on sys.path when run as a script
from _common import RESULTS_DIR, available_memory_bytes, device_name, other_cores, slug, timed_calls
from targets import KERNEL_TARGETS, KernelTarget

GB = 1e9
BUSY_FRACTION = 0.15  # other processes using more of the CPUs than this distort CPU timings: warn


# -- the ops under test ---------------------------------------------------------------------------------


@dataclass
class Case:
    """One cell's buffers: ``theta`` ([N], or None), ``streams`` (the s' inputs), ``scalars`` (their
    coefficients), ``out`` (where the result lands; ``theta`` itself for in-place ops)."""

    theta: Tensor | None
    streams: list[Tensor]
    scalars: list[float]
    out: Tensor
    snapshot: Tensor | None = None  # the initial value of an in-place output, to undo a call
    extra: dict[str, Tensor] = field(default_factory=dict)  # baseline-specific constants
    vectors: list[Tensor] = field(default_factory=list)  # per-element coefficient vectors (sp_elem*)
    grads: tuple = ()  # sp_elem_bwd: (grad_theta, grad_slopes, grad_coefs), views of ``out``


@dataclass(frozen=True)
class OpSpec:
    """How to build, run and account for one op; the benchmark loop is the same for every op."""

    name: str
    tasks: tuple[int, ...]  # the T values that apply
    streams: tuple[int, ...]  # the s' values that apply
    bytes_moved: Callable[[int, int, int], int]  # (n, tasks, streams) -> elements moved by the fused op
    chain_moved: Callable[[int, int, int], int]  # the same for the chain
    elements: Callable[[int, int, int], int]  # elements allocated by one cell, checks included
    make: Callable[[int, int, int, torch.dtype, torch.device], Case]
    fused: Callable[[Case, str], None]
    baselines: dict[str, Callable[[Case], None]]


def _random(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Values in [-1, 1): the pages are touched (allocated) before any timing."""
    return torch.empty(shape, dtype=dtype, device=device).uniform_(-1.0, 1.0)


def _coefs(count: int) -> list[float]:
    return [0.1 / (l + 1) for l in range(count)]


def _make_stage_point(n: int, tasks: int, streams: int, dtype: torch.dtype, device: torch.device) -> Case:
    slopes = [_random((tasks, n), dtype, device) for _ in range(streams)]
    return Case(theta=_random((n,), dtype, device), streams=slopes, scalars=_coefs(streams),
                out=torch.empty((tasks, n), dtype=dtype, device=device))


def _stage_point_chain(c: Case) -> None:
    c.out.copy_(c.theta.expand_as(c.out))
    for k, coef in zip(c.streams, c.scalars):
        c.out.add_(k, alpha=-coef)


def _make_combine(n: int, tasks: int, streams: int, dtype: torch.dtype, device: torch.device) -> Case:
    scalars = [w / tasks for w in _coefs(streams)]
    ones = [torch.full((tasks,), w, dtype=dtype, device=device) for w in scalars]
    return Case(theta=None, streams=[_random((tasks, n), dtype, device) for _ in range(streams)], scalars=scalars,
                out=torch.empty((n,), dtype=dtype, device=device), extra={f"w{l}": v for l, v in enumerate(ones)})


def _combine_chain(c: Case) -> None:
    c.out.zero_()
    for g, w in zip(c.streams, c.scalars):
        for row in g:
            c.out.add_(row, alpha=w)


def _combine_gemv(c: Case) -> None:
    c.out.zero_()
    for l, g in enumerate(c.streams):
        c.out.addmv_(g.t(), c.extra[f"w{l}"])


def _make_stage_point_elementwise(n: int, tasks: int, streams: int, dtype: torch.dtype,
                                  device: torch.device) -> Case:
    case = _make_stage_point(n, tasks, streams, dtype, device)
    case.vectors = [_random((n,), dtype, device).mul_(c) for c in case.scalars]
    return case


def _stage_point_elementwise_chain(c: Case) -> None:
    c.out.copy_(c.theta.expand_as(c.out))
    for k, v in zip(c.streams, c.vectors):
        c.out.addcmul_(v, k, value=-1)


def _make_stage_point_elementwise_backward(n: int, tasks: int, streams: int, dtype: torch.dtype,
                                           device: torch.device) -> Case:
    slopes = [_random((tasks, n), dtype, device) for _ in range(streams)]
    vectors = [_random((n,), dtype, device).mul_(c) for c in _coefs(streams)]
    out = torch.empty((n + streams * tasks * n + streams * n,), dtype=dtype, device=device)  # every gradient
    grad_theta, rest = out[:n], out[n:]
    grad_slopes = [rest[l * tasks * n:(l + 1) * tasks * n].view(tasks, n) for l in range(streams)]
    rest = rest[streams * tasks * n:]
    grad_coefs = [rest[l * n:(l + 1) * n] for l in range(streams)]
    extra = {"grad_out": _random((tasks, n), dtype, device),
             "negated": torch.empty((tasks, n), dtype=dtype, device=device),
             "product": torch.empty((tasks, n), dtype=dtype, device=device)}
    return Case(theta=None, streams=slopes, scalars=_coefs(streams), out=out, extra=extra, vectors=vectors,
                grads=(grad_theta, grad_slopes, grad_coefs))


def _stage_point_elementwise_backward_fused(c: Case, backend: str) -> None:
    backend_module(backend).stage_point_elementwise_backward_(c.extra["grad_out"], c.streams, c.vectors, *c.grads)


def _stage_point_elementwise_backward_chain(c: Case) -> None:
    grad_theta, grad_slopes, grad_coefs = c.grads
    g, negated, product = c.extra["grad_out"], c.extra["negated"], c.extra["product"]
    torch.sum(g, 0, out=grad_theta)
    torch.neg(g, out=negated)
    for k, v, gk, gc in zip(c.streams, c.vectors, grad_slopes, grad_coefs):
        torch.mul(negated, v, out=gk)
        torch.sum(torch.mul(negated, k, out=product), 0, out=gc)


def _make_axpy(n: int, tasks: int, streams: int, dtype: torch.dtype, device: torch.device) -> Case:
    theta = _random((n,), dtype, device)
    return Case(theta=theta, streams=[_random((n,), dtype, device)], scalars=[-1e-3], out=theta,
                snapshot=theta.clone())


def _axpy_chain(c: Case) -> None:
    c.theta.add_(c.streams[0], alpha=c.scalars[0])


OPS: tuple[OpSpec, ...] = (
    OpSpec(
        name="stage_point", tasks=(1, 32), streams=(1, 3),
        bytes_moved=lambda n, t, s: n + s * t * n + t * n,
        chain_moved=lambda n, t, s: n + t * n + 3 * s * t * n,
        elements=lambda n, t, s: n + s * t * n + 2 * t * n,  # + the reference output
        make=_make_stage_point,
        fused=lambda c, b: kernels.stage_point(c.theta, c.streams, c.scalars, out=c.out, backend=b),
        baselines={"chain": _stage_point_chain},
    ),
    OpSpec(
        name="sp_elem", tasks=(1, 32), streams=(1, 3),
        bytes_moved=lambda n, t, s: n + s * n + s * t * n + t * n,
        chain_moved=lambda n, t, s: n + t * n + s * (3 * t * n + n),
        elements=lambda n, t, s: n + s * n + s * t * n + 2 * t * n,  # + the reference output
        make=_make_stage_point_elementwise,
        fused=lambda c, b: kernels.stage_point_elementwise(c.theta, c.streams, c.vectors, out=c.out, backend=b),
        baselines={"chain": _stage_point_elementwise_chain},
    ),
    OpSpec(
        name="sp_elem_bwd", tasks=(1, 32), streams=(1, 3),
        # reads grad_out, the slopes, the coefficients; writes theta's, the slopes', the coefficients' gradients
        bytes_moved=lambda n, t, s: t * n + 2 * s * t * n + 2 * s * n + n,
        chain_moved=lambda n, t, s: n + 3 * t * n + s * (6 * t * n + 2 * n),
        elements=lambda n, t, s: 3 * t * n + s * t * n + s * n + 2 * (n + s * t * n + s * n),  # + the reference
        make=_make_stage_point_elementwise_backward,
        fused=_stage_point_elementwise_backward_fused,
        baselines={"chain": _stage_point_elementwise_backward_chain},
    ),
    OpSpec(
        name="combine", tasks=(1, 32), streams=(1, 3, 4),
        bytes_moved=lambda n, t, s: s * t * n + n,
        chain_moved=lambda n, t, s: n + 3 * s * t * n,
        elements=lambda n, t, s: s * t * n + 3 * n,  # + the reference output and torch's temporary sum
        make=_make_combine,
        fused=lambda c, b: kernels.combine(c.streams, c.scalars, out=c.out, backend=b),
        baselines={"chain": _combine_chain, "gemv": _combine_gemv},
    ),
    OpSpec(
        name="axpy_", tasks=(1,), streams=(1,),
        bytes_moved=lambda n, t, s: 3 * n,
        chain_moved=lambda n, t, s: 3 * n,
        elements=lambda n, t, s: 4 * n,  # theta, d, the snapshot, the reference
        make=_make_axpy,
        fused=lambda c, b: kernels.axpy_(c.theta, c.streams[0], c.scalars[0], backend=b),
        baselines={"chain": _axpy_chain},
    ),
)


# -- timing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """How long to time each variant: ``target_s`` of calls, at least ``min_reps``, at most ``max_reps``;
    on CPU the variants of a cell take turns over ``rounds`` rounds, so drifts of a shared machine hit all
    of them alike."""

    target_s: float
    min_reps: int
    max_reps: int
    warmup_s: float
    rounds: int = 5


def _warm_cpu(fn: Callable[[], None], timing: Timing) -> float:
    """Runs ``fn`` for ``warmup_s`` (at least 3 calls); its estimated seconds per call."""
    fn()  # first call: lazy initialisation, page faults of temporaries
    start = time.perf_counter()
    calls = 0
    while calls < 2 or time.perf_counter() - start < timing.warmup_s:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def time_cpu(fns: dict[str, Callable[[], None]], timing: Timing) -> dict[str, tuple[float, int]]:
    """{name: (median seconds per call, calls timed)}: ``time.perf_counter`` around every call, the
    variants interleaved round by round."""
    reps = {}
    for name, fn in fns.items():
        per_call = _warm_cpu(fn, timing)
        reps[name] = max(timing.min_reps, min(timing.max_reps, math.ceil(timing.target_s / max(per_call, 1e-9))))
    rounds = max(1, min(timing.rounds, *reps.values()))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            times[name].extend(timed_calls(fn, reps[name] // rounds + (r < reps[name] % rounds)))
    return {name: (statistics.median(t), len(t)) for name, t in times.items()}


def time_cuda(fn: Callable[[], None], timing: Timing) -> tuple[float, int]:
    """(median seconds per call, calls timed): ``triton.testing.do_bench`` if importable, else CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        warmup_ms, rep_ms = 1e3 * timing.warmup_s, 1e3 * timing.target_s
        try:
            ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        except TypeError:  # older Triton: no return_mode
            ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])
        return float(ms) / 1e3, -1  # do_bench chooses the count itself
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    deadline = time.perf_counter() + timing.target_s
    while len(times) < timing.min_reps or (time.perf_counter() < deadline and len(times) < timing.max_reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(times), len(times)


def measure(fns: dict[str, Callable[[], None]], device: torch.device, timing: Timing) -> dict[str, tuple[float, int]]:
    """{name: (median seconds per call, calls timed)} for every callable."""
    if device.type == "cuda":
        return {name: time_cuda(fn, timing) for name, fn in fns.items()}
    return time_cpu(fns, timing)


def memory_bandwidth(numel: int, dtype: torch.dtype, device: torch.device, timing: Timing) -> dict[str, float]:
    """GB/s of ``dst.copy_(src)`` (2 * size bytes per call: the floor every op is compared with; median and
    best of 5 measurements) and, for reference, of ``src.sum()`` (size bytes: reads only)."""
    src = _random((numel,), dtype, device)
    dst = torch.empty_like(src)
    size = numel * src.element_size()
    runs = [measure({"copy": lambda: dst.copy_(src)}, device, timing)["copy"][0] for _ in range(5)]
    read = measure({"sum": lambda: src.sum()}, device, timing)["sum"][0]
    del src, dst
    return {"elements": numel, "bytes_per_call": 2 * size, "gbps_median": 2 * size / statistics.median(runs) / GB,
            "gbps_best": 2 * size / min(runs) / GB, "read_gbps": size / read / GB}


# -- one cell ---------------------------------------------------------------------------------------------


def tolerance(dtype: torch.dtype) -> float:
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def run_variant(spec: OpSpec, case: Case, variant: str, backends: Sequence[str]) -> Callable[[], None]:
    """The call that runs one variant: a backend name or a baseline name."""
    if variant in backends:
        return lambda: spec.fused(case, variant)
    baseline = spec.baselines[variant]
    return lambda: baseline(case)


def reference_output(spec: OpSpec, case: Case) -> Tensor:
    """The ``torch`` backend's result for the case's initial inputs (in-place outputs are restored)."""
    spec.fused(case, "torch")
    ref = case.out.clone()
    if case.snapshot is not None:
        case.out.copy_(case.snapshot)
    return ref


def max_rel_error(out: Tensor, ref: Tensor, chunk: int = 2**24) -> float:
    """max |out - ref| / (max |ref| + 1), in float64 over chunks (the largest cells leave no room for a
    float64 copy of the whole output)."""
    out, ref = out.reshape(-1), ref.reshape(-1)
    err = scale = 0.0
    for start in range(0, out.numel(), chunk):
        a, b = out[start:start + chunk].double(), ref[start:start + chunk].double()
        err = max(err, (a - b).abs().max().item())
        scale = max(scale, b.abs().max().item())
    return err / (scale + 1.0)


def check(fn: Callable[[], None], case: Case, ref: Tensor) -> float:
    """Runs ``fn`` once on the case's initial inputs; the max abs error relative to max |ref| (+1)."""
    if case.snapshot is not None:  # undo the calls of the previous variant's timing
        case.out.copy_(case.snapshot)
    fn()
    err = max_rel_error(case.out, ref)
    if case.snapshot is not None:
        case.out.copy_(case.snapshot)
    return err


def bench_cell(spec: OpSpec, n: int, tasks: int, streams: int, dtype: torch.dtype, device: torch.device,
               backends: Sequence[str], timing: Timing, floor_copy: tuple[Callable[[], None], int] | None = None
               ) -> list[dict]:
    """Every variant of one (op, N, T, s') cell, checked, then timed; rows without the speedups yet.

    ``floor_copy`` = (a large ``dst.copy_(src)``, its bytes): timed in the same rounds as the variants, so
    the cell's floor is measured under the same machine state (a shared VM's memory bandwidth drifts by up
    to 1.5x between minutes); each row then carries ``floor_gbps`` of its own cell.
    """
    case = spec.make(n, tasks, streams, dtype, device)
    ref = reference_output(spec, case)
    fns = {variant: run_variant(spec, case, variant, backends) for variant in (*backends, *spec.baselines)}
    errors = {}
    for variant, fn in fns.items():
        errors[variant] = check(fn, case, ref)
        if not errors[variant] <= tolerance(dtype):
            raise AssertionError(f"{spec.name} {variant} N=2^{int(math.log2(n))} T={tasks} s'={streams}: relative "
                                 f"error {errors[variant]:.3g} against the torch backend (> {tolerance(dtype):g})")
    timings = measure({**fns, **({"_copy": floor_copy[0]} if floor_copy else {})}, device, timing)
    cell_floor = {}
    if floor_copy:
        copy_seconds, _ = timings.pop("_copy")
        cell_floor = {"floor_gbps": floor_copy[1] / copy_seconds / GB}
    moved = spec.bytes_moved(n, tasks, streams) * case.out.element_size()
    ideal = spec.chain_moved(n, tasks, streams) / spec.bytes_moved(n, tasks, streams)
    del case, ref
    return [{"op": spec.name, "variant": variant, "n": n, "log2n": int(math.log2(n)), "tasks": tasks,
             "streams": streams, "dtype": str(dtype).removeprefix("torch."), "bytes": moved, "ms": 1e3 * seconds,
             "gbps": moved / seconds / GB, "reps": reps, "max_rel_err": errors[variant], "ideal_x_chain": ideal,
             **cell_floor}
            for variant, (seconds, reps) in timings.items()]


def add_ratios(rows: list[dict], floor_gbps: float, llc_bytes: int | None) -> None:
    """Fills ``pct_floor``, ``x_chain``, ``x_torch`` and ``in_cache`` into one cell's rows (against the
    cell's own copy floor when it was measured, else the run's)."""
    by_variant = {r["variant"]: r for r in rows}
    for r in rows:
        r["pct_floor"] = 100.0 * (r["bytes"] / (r.get("floor_gbps", floor_gbps) * GB)) / (r["ms"] / 1e3)
        r["x_chain"] = by_variant["chain"]["ms"] / r["ms"]
        r["x_torch"] = by_variant["torch"]["ms"] / r["ms"]
        r["in_cache"] = llc_bytes is not None and r["bytes"] <= llc_bytes


# -- the run ----------------------------------------------------------------------------------------------


def last_level_cache_bytes(device: torch.device) -> int | None:
    """The L3 (CPU, from sysfs) or L2 (CUDA) size, to flag cache-resident cells; None if unknown."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.fullmatch(r"(\d+)([KMG]?)", entry.read_text().strip())
        if m:
            sizes.append(int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])
    return max(sizes) if sizes else None


def memory_budget(device: torch.device, max_gb: float | None) -> float:
    """Bytes one cell may allocate: ``--max-gb``, else 6 GB on CPU and 60% of free memory on CUDA."""
    if max_gb is not None:
        return max_gb * GB
    if device.type == "cuda":
        return 0.6 * torch.cuda.mem_get_info(device)[0]
    return 6 * GB


def available_memory(device: torch.device) -> float | None:
    """Free bytes on the device: CUDA's free memory, or the system's available memory."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return available_memory_bytes()


def warn_if_busy(device: torch.device, seconds: float = 0.25) -> None:
    """CPU timings are only meaningful on an idle machine: a busy core stalls every OpenMP barrier."""
    if device.type != "cpu":
        return
    busy = other_cores(seconds) / (os.cpu_count() or 1)  # the share of all cpus
    if busy > BUSY_FRACTION:
        print(f"warning: the cpus were {100 * busy:.0f}% busy with other work just before the run; "
              "CPU timings will be distorted", file=sys.stderr)


def default_sizes(device: torch.device, quick: bool, large: bool) -> list[int]:
    if quick:
        return [10, 14]
    sizes = [16, 20, 24, 26] if device.type == "cuda" else [16, 20, 23]
    if large and 26 not in sizes:
        sizes.append(26)
    return sizes


def device_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The registered backends that run ``dtype`` on this device, ``torch`` first (it is the reference)."""
    fused = []
    for name, device_type in kernels.runnable_targets():
        if device_type != device.type:
            continue
        try:
            kernels.resolve_backend(name, device, dtype)
        except (RuntimeError, TypeError) as exc:
            print(f"note: backend {name!r} not benchmarked: {exc}", file=sys.stderr)
            continue
        fused.append(name)
    return ["torch", *fused]


def cells(ops: Sequence[OpSpec], sizes: Sequence[int], quick: bool) -> Iterator[tuple[OpSpec, int, int, int]]:
    """(op, N, T, s') for every cell to run; --quick caps T at 4."""
    for spec in ops:
        for log2n in sizes:
            for tasks in spec.tasks:
                for streams in spec.streams:
                    yield spec, 2**log2n, (min(tasks, 4) if quick else tasks), streams


def fmt_row(r: dict) -> str:
    cache = "~" if r.get("in_cache") else " "
    return (f"{r['op']:<12}{r['variant']:<8}{'2^' + str(r['log2n']):>5}{r['tasks']:>4}{r['streams']:>4}"
            f"{r['ms']:>11.4f}{r['gbps']:>9.1f}{r['pct_floor']:>8.1f}{cache}{r['x_chain']:>8.2f}"
            f"{r['x_torch']:>8.2f}{r['ideal_x_chain']:>7.2f}"
            + (f"{r['floor_gbps']:>8.1f}" if "floor_gbps" in r else ""))


HEADER = (f"{'op':<12}{'backend':<8}{'N':>5}{'T':>4}{'s' + chr(39):>4}{'ms':>11}{'GB/s':>9}{'% floor':>9}"
          f"{'x chain':>8}{'x torch':>8}{'ideal':>7}{'floor':>8}")


def targets(device: torch.device, rows: list[dict]) -> list[dict]:
    """The verdicts of the targets (benchmarks/targets.py) for this device: one per row a target judges,
    with the measured numbers and whether it is met, or one saying no such row ran."""
    out = []
    for t in KERNEL_TARGETS:
        if not t.applies_to(device.type):
            continue
        judged = [_judge(t, r) for r in rows if t.matches(r)]
        out.extend(judged or [{"target": f"{t.label}: {t.describe()}", "met": None, "why": t.if_missing}])
    return out


def _judge(t: KernelTarget, r: dict) -> dict:
    name = f"{t.label}: {r['variant']} {r['op']} s'={r['streams']} N=2^{r['log2n']} T={r['tasks']}"
    met = r["pct_floor"] >= t.pct_floor and r["x_chain"] >= t.x_chain
    why = (f"{r['pct_floor']:.1f}% of floor (need >= {t.pct_floor:g}), {r['x_chain']:.2f}x chain (need >= "
           f"{t.x_chain:g}; traffic model allows {r['ideal_x_chain']:.2f}x)")
    return {"target": name, "met": met, "why": why, "pct_floor": r["pct_floor"], "x_chain": r["x_chain"]}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--ops", default=",".join(s.name for s in OPS), help="comma-separated subset of the ops")
    p.add_argument("--sizes", help="comma-separated log2(N) values (default: 16,20,23 on cpu; 16,20,24,26 on cuda)")
    p.add_argument("--large", action="store_true", help="add N=2^26 on cpu (cuda runs it by default)")
    p.add_argument("--max-gb", type=float, help="skip cells allocating more (default 6 on cpu, 60%% of free on cuda)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (the cpp kernels follow it)")
    p.add_argument("--target-s", type=float, default=0.3, help="seconds of timed calls per row (default 0.3)")
    p.add_argument("--min-reps", type=int, default=5, help="timed calls per row at least (default 5)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke test")
    p.add_argument("--json", help="results file (default benchmarks/results/kernels-<device>.json; "
                   "--quick writes none unless given)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = [s for s in OPS if s.name in args.ops.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else default_sizes(device, args.quick, args.large)
    timing = (Timing(target_s=0.01, min_reps=3, max_reps=50, warmup_s=0.002, rounds=3) if args.quick else
              Timing(target_s=args.target_s, min_reps=args.min_reps, max_reps=100_000, warmup_s=0.05))
    backends = device_backends(device, dtype)
    name = device_name(device)
    llc = last_level_cache_bytes(device)

    warn_if_busy(device)
    copy_numel = 2**20 if args.quick else (2**28 if device.type == "cuda" else 2**26)
    floor = memory_bandwidth(copy_numel, dtype, device, timing)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the budget below counts the copy buffers as free again
    floor_copy = None
    if device.type == "cpu":  # GPU bandwidth is steady; a shared CPU's is not: measure it in every cell
        copy_src = _random((copy_numel,), dtype, device)
        copy_dst = torch.empty_like(copy_src)
        floor_copy = (lambda: copy_dst.copy_(copy_src), 2 * copy_src.numel() * copy_src.element_size())
    budget = memory_budget(device, args.max_gb)
    avail = available_memory(device)
    print(f"{name} | {device} | torch {torch.__version__} | {torch.get_num_threads()} threads | {args.dtype} | "
          f"backends {', '.join(backends)} + baselines | last-level cache "
          f"{'?' if llc is None else f'{llc / 2**20:.0f} MiB'}")
    print(f"copy floor: {floor['gbps_median']:.1f} GB/s median ({floor['gbps_best']:.1f} best), dst.copy_(src) of "
          f"{copy_numel} elements; reads alone (src.sum()) {floor['read_gbps']:.1f} GB/s | "
          f"cell budget {budget / GB:.1f} GB"
          + ("" if avail is None else f" (available {avail / GB:.1f} GB)"))
    if avail is not None and budget > avail:
        print("warning: the cell budget exceeds available memory; large cells may swap or fail", file=sys.stderr)
    print("'% floor' = (bytes / copy bandwidth) / time" + (", the copy timed within each cell ('floor' GB/s)"
          if floor_copy else "") + "; '~' = the bytes fit in the last-level cache; 'ideal' = chain traffic / "
          "fused traffic\n")
    print(HEADER)

    rows: list[dict] = []
    skipped: list[dict] = []
    itemsize = torch.empty((), dtype=dtype).element_size()
    for spec, n, tasks, streams in cells(ops, sizes, args.quick):
        need = spec.elements(n, tasks, streams) * itemsize
        if need > budget:
            reason = f"needs {need / GB:.3g} GB > budget {budget / GB:.3g} GB"
            skipped.append({"op": spec.name, "n": n, "log2n": int(math.log2(n)), "tasks": tasks, "streams": streams,
                            "skipped": reason})
            print(f"{spec.name:<12}{'-':<8}{'2^' + str(int(math.log2(n))):>5}{tasks:>4}{streams:>4}  skipped: {reason}")
            continue
        cell_rows = bench_cell(spec, n, tasks, streams, dtype, device, backends, timing, floor_copy)
        add_ratios(cell_rows, floor["gbps_median"], llc)
        for r in cell_rows:
            print(fmt_row(r), flush=True)
        rows.extend(cell_rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    verdicts = targets(device, rows)
    print("\ntargets")
    for v in verdicts:
        status = "n/a (quick run)" if args.quick else {True: "MET", False: "NOT MET", None: "NOT RUN"}[v["met"]]
        print(f"  {v['target']}: {status} - {v['why']}")

    if args.quick and not args.json:
        print("\n(quick run: no results file; pass --json to write one)")
        return 0
    path = Path(args.json or RESULTS_DIR / f"kernels-{slug(name)}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": name, "device_type": device.type, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "dtype": args.dtype, "backends": backends, "cpp_openmp": _cpp_openmp(), "quick": args.quick,
              "last_level_cache_bytes": llc, "copy": floor, "floor_gbps": floor["gbps_median"],
              "budget_bytes": budget, "timing": vars(timing), "rows": rows, "skipped": skipped, "targets": verdicts,
              "argv": sys.argv[1:]}
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


def _cpp_openmp() -> bool | None:
    try:
        from rkfast import _C
    except ImportError:
        return None
    return bool(_C.has_openmp())


if __name__ == "__main__":
    sys.exit(main())
