"""Every acceptance target of the benchmarks, declared as data: the one place a threshold is written.

``benchmarks/e2e.py`` judges its meta-step rows against :data:`STEP_TARGETS`, ``benchmarks/kernels.py`` its
kernel rows against :data:`KERNEL_TARGETS`; neither script holds a threshold of its own. A target's name (as
printed and stored in the results JSON) is built from its fields, so the text cannot drift from the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# -- end to end: one meta-step (benchmarks/e2e.py) -----------------------------------------------------------

# A contender name for the targets only: rkfast under vmap, the same computation as the hand-written vmap
# step. That is the ``rkfast-vmap`` row where it ran (the default, vectorize="auto", chose the task loop),
# else the ``rkfast`` row.
RKFAST_VECTORIZED = "rkfast, vectorized"

# Peak-RSS differences below this are page/allocator noise: the CPU memory target's tolerance (CUDA's
# max_memory_allocated is exact and gets none).
MEMORY_NOISE_MB = 1.0

# What the verdicts say in place of the CUDA targets on any other device.
CUDA_TARGETS_ELSEWHERE = "GPU targets (captured vs loop / vmap)"


@dataclass(frozen=True)
class StepTarget:
    """An end-to-end target: ``contender``'s meta-step against ``baseline``'s at the same workload, tableau
    and order. ``compare`` says what is compared and which way the verdict's ``value`` must go:

    * ``"speedup"``: value = baseline ms / contender ms, met when >= ``limit``;
    * ``"time"``: value = contender ms / baseline ms, met when <= ``limit``;
    * ``"memory"``: value = contender peak MB / baseline peak MB (``limit`` 1); met when the contender's
      peak is at most the baseline's, plus ``rss_noise_mb`` on the CPU.

    Where it applies: ``device`` ("cpu", "cuda" or "any"); ``workloads`` (None: each workload of the run);
    ``every_tableau`` (each tableau and order rkfast ran, else maml second order only).
    ``name`` is a template: ``{workload}``, ``{tableau}``, ``{order}``, ``{contender}`` (the row's contender;
    for :data:`RKFAST_VECTORIZED` the one used), ``{limit}`` and ``{percent_over}`` (``limit`` - 1 in %).
    """

    name: str
    device: str
    contender: str
    baseline: str
    compare: str
    limit: float
    workloads: tuple[str, ...] | None = None
    every_tableau: bool = False
    listed_when_not_run: bool = False  # judged (n/a) even when the run leaves its workload out
    rss_noise_mb: float = 0.0
    label: str | None = None  # how the verdict's detail names the contender (default: its name)

    def applies_to(self, device_type: str) -> bool:
        return self.device in ("any", device_type)

    def title(self, workload: str, tableau: str, order: str, contender: str) -> str:
        return self.name.format(workload=workload, tableau=tableau, order=order, contender=contender,
                                limit=self.limit, percent_over=round((self.limit - 1.0) * 100))


STEP_TARGETS: tuple[StepTarget, ...] = (
    StepTarget("CPU {workload}: {contender} maml 2nd order >= {limit:g}x the per-task loop", device="cpu",
               contender="rkfast", baseline="loop", compare="speedup", limit=7.0, workloads=("sinusoid",)),
    StepTarget("CPU {workload}: {contender} maml 2nd order >= {limit:g}x the per-task loop", device="cpu",
               contender="rkfast", baseline="loop", compare="speedup", limit=1.8, workloads=("conv4",)),
    StepTarget("CPU {workload}: {contender} maml 2nd order within {percent_over}% of the hand-written vmap",
               device="cpu", contender=RKFAST_VECTORIZED, baseline="vmap", compare="time", limit=1.1),
    StepTarget("{workload} {tableau} {order}: {contender} <= {limit:g}x hand-written vmap (time)", device="any",
               contender=RKFAST_VECTORIZED, baseline="vmap", compare="time", limit=1.1, every_tableau=True),
    StepTarget("{workload} {tableau} {order}: {contender} peak memory <= hand-written vmap's", device="any",
               contender=RKFAST_VECTORIZED, baseline="vmap", compare="memory", limit=1.0, every_tableau=True,
               rss_noise_mb=MEMORY_NOISE_MB),
    StepTarget("GPU {workload}: {contender} maml >= {limit:g}x loop", device="cuda", contender="rkfast-captured",
               baseline="loop", compare="speedup", limit=200.0, workloads=("sinusoid",), listed_when_not_run=True,
               label="captured"),
    StepTarget("GPU {workload}: {contender} maml >= {limit:g}x eager hand-written vmap", device="cuda",
               contender="rkfast-captured", baseline="vmap", compare="speedup", limit=12.0,
               workloads=("sinusoid",), listed_when_not_run=True, label="captured"),
    StepTarget("GPU {workload}: {contender} maml >= {limit:g}x loop", device="cuda", contender="rkfast-captured",
               baseline="loop", compare="speedup", limit=60.0, workloads=("conv4",), listed_when_not_run=True,
               label="captured"),
)


# -- kernels: the fused ops against a copy and the add_ chain (benchmarks/kernels.py) ------------------------


@dataclass(frozen=True)
class KernelTarget:
    """A kernel target: every row of ``backend`` running one of ``ops`` at ``min_log2n`` <= log2(N) <=
    ``max_log2n`` (None: no bound), ``tasks`` tasks (None: any) and, for the ops named in ``streams``, that
    many streams, must reach >= ``pct_floor`` % of the copy floor and >= ``x_chain`` times the chain's speed.
    ``device``: "cpu", or "cuda" for every other device; ``if_missing``: the verdict when no such row ran."""

    device: str
    backend: str
    ops: tuple[str, ...]
    min_log2n: int
    max_log2n: int | None
    tasks: int | None
    streams: tuple[tuple[str, int], ...]  # (op, s') pairs
    pct_floor: float
    x_chain: float
    if_missing: str

    @property
    def label(self) -> str:
        return "gpu" if self.device == "cuda" else self.device

    def applies_to(self, device_type: str) -> bool:
        return self.device == ("cpu" if device_type == "cpu" else "cuda")

    def matches(self, row: dict[str, Any]) -> bool:
        streams = dict(self.streams)
        return (row["variant"] == self.backend and row["op"] in self.ops and row["log2n"] >= self.min_log2n
                and (self.max_log2n is None or row["log2n"] <= self.max_log2n)
                and (self.tasks is None or row["tasks"] == self.tasks)
                and streams.get(row["op"], row["streams"]) == row["streams"])

    def describe(self) -> str:
        """The cells it judges: ``cpp combine s'=4 N=2^23 T=32``, ``triton combine s'=4 / stage_point at N >= 2^24``."""
        streams = dict(self.streams)
        ops = " / ".join(op + (f" s'={streams[op]}" if op in streams else "") for op in self.ops)
        if self.max_log2n == self.min_log2n:
            return f"{self.backend} {ops} N=2^{self.min_log2n}" + ("" if self.tasks is None else f" T={self.tasks}")
        return f"{self.backend} {ops} at N >= 2^{self.min_log2n}"


KERNEL_TARGETS: tuple[KernelTarget, ...] = (
    KernelTarget(device="cpu", backend="cpp", ops=("combine",), min_log2n=23, max_log2n=23, tasks=32,
                 streams=(("combine", 4),), pct_floor=85.0, x_chain=1.25,
                 if_missing="cell not run (size not selected or skipped)"),
    KernelTarget(device="cuda", backend="triton", ops=("combine", "stage_point"), min_log2n=24, max_log2n=None,
                 tasks=None, streams=(("combine", 4),), pct_floor=90.0, x_chain=1.8,
                 if_missing="no such cell run (Triton unavailable, sizes not selected, or skipped)"),
)
