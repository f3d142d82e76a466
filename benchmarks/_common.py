"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, benchmarks/ on sys.path).

What more than one script needs, written once: where results go, naming the device (and a file-name slug
of it), reading this process's memory from /proc, telling how busy the other processes keep the CPUs, and
timing calls.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent  # the checkout
RESULTS_DIR = BENCH_DIR / "results"

# -- naming the device ----------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (else what ``platform`` knows)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    """``text`` as a file-name part: lower case, every run of other characters one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    """``cpu``, or the GPU's name as a slug (``nvidia-h100-80gb-hbm3``): the e2e results' file names."""
    return "cpu" if device.type != "cuda" else slug(torch.cuda.get_device_name(device))


# -- this process's memory, from /proc --------------------------------------------------------------------


def read_proc_kb(path: str, keys: Iterable[str]) -> dict[str, int]:
    """The ``Key:  value kB`` lines of a /proc file (status, meminfo) whose key is in ``keys``, in kB."""
    wanted = set(keys)
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                out[key] = int(value.split()[0])
    return out


def proc_status_kb() -> dict[str, int]:
    """VmHWM (peak RSS), VmRSS, RssAnon, RssFile, RssShmem of this process, in kB."""
    return read_proc_kb("/proc/self/status", ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"))


def anon_kb(status: dict[str, int]) -> int:
    """Anonymous (+ shared) resident memory from a :func:`proc_status_kb` reading: data, not mapped code."""
    return status.get("RssAnon", status.get("VmRSS", 0)) + status.get("RssShmem", 0)


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS (VmHWM, which ``ru_maxrss`` reports) to its current RSS; False if the
    kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kb(status: dict[str, int]) -> int:
    """The peak RSS since the last reset, in kB (``ru_maxrss`` or the reading's VmHWM, whichever is larger)."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, status.get("VmHWM", 0))


def available_memory_bytes() -> float | None:
    """MemAvailable of /proc/meminfo in bytes; None where there is no such file."""
    try:
        return read_proc_kb("/proc/meminfo", ("MemAvailable",))["MemAvailable"] * 1024.0
    except (OSError, KeyError):
        return None


# -- how busy other processes keep the CPUs -----------------------------------------------------------------
# CPU timings are only meaningful on an otherwise idle machine: a core taken by another process stalls every
# OpenMP barrier. /proc/stat gives the busy time of all processes; this process's (or its children's) own
# share comes from getrusage, and the difference is what the others used.


def cpu_busy_s() -> float:
    """Seconds of busy CPU time since boot, summed over all cores (NaN where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s(who: int) -> float:
    """CPU seconds used by ``who`` (``resource.RUSAGE_SELF`` or ``RUSAGE_CHILDREN``)."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


@contextlib.contextmanager
def other_load(who: int = resource.RUSAGE_SELF) -> Iterator[dict[str, float]]:
    """Measures the CPU cores other processes used during the block (all busy time minus ``who``'s own):
    the yielded dict gets ``other_cores`` (NaN where /proc/stat is missing)."""
    out: dict[str, float] = {}
    busy0, own0, t0 = cpu_busy_s(), own_cpu_s(who), time.perf_counter()
    yield out
    wall = time.perf_counter() - t0
    others = (cpu_busy_s() - busy0) - (own_cpu_s(who) - own0)
    out["other_cores"] = max(0.0, others / wall) if wall > 0 and math.isfinite(others) else float("nan")


def other_cores(seconds: float = 1.0) -> float:
    """CPU cores other processes use now: measured over ``seconds`` of this process sleeping."""
    with other_load() as load:
        time.sleep(seconds)
    return load["other_cores"]


# -- timing -----------------------------------------------------------------------------------------------


def sync(device: torch.device | None) -> None:
    """Waits for the device's queued work (CUDA); nothing on the CPU."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn: Callable[[], object], count: int, device: torch.device | None = None) -> list[float]:
    """Seconds of each of ``count`` calls of ``fn`` (``time.perf_counter``; on CUDA synchronized before and
    after every call, so that each time is the call's own work)."""
    times = []
    for _ in range(count):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 10, device: torch.device | None = None) -> float:
    """Milliseconds per call of ``fn``: the median of ``repeats`` timed calls after ``warmup`` untimed ones
    (on a CUDA ``device``, synchronized around each call)."""
    for _ in range(warmup):
        fn()
    return 1e3 * statistics.median(timed_calls(fn, repeats, device))
