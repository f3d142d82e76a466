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
  layers compute their second-order support gradients under ``rkfast._norms.elementary_norms`` (as rkfast
  does; first derivatives keep the fused norms): with PyTorch's fused batch norm the second-order
  vmap direction is wrong (0.6% relative on conv4; ``--contenders vmap-fused-norm`` shows the sanity check
  rejecting it);
* ``rkfast`` (``MetaOptimizer(..., outer="adam").step(batch)``, defaults: ``vectorize="auto"``, which runs
  conv4 task by task on the CPU and everything else under vmap), ``rkfast-vmap`` (``vectorize=True``) and
  ``rkfast-loop`` (``vectorize=False``) where they differ from that default, and, on CUDA,
  ``rkfast-captured`` (``capture=True``).

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
import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import rkfast

from _common import device_name  # benchmarks/ is on sys.path when run as a script
from rkfast._norms import elementary_norms
from rkfast.optim import resolve_vectorize

ROOT = Path(__file__).resolve().parent.parent
RESULT_TAG = "E2E-RESULT "
OUTER_LR = 1e-3
ORDERS = ("second", "first")
BUSY_CORES = 0.25  # other processes using more than this many cores make timings suspect
CAPTURE_WARMUP = 4  # StepCapture's two eager warm-up steps, the capture step, one replay
MEMORY_NOISE_MB = 1.0  # peak-RSS differences below this are page/allocator noise (memory target tolerance)

# -- workloads ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    describe: str
    make_model: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    inner_lr: float
    make_batch: Callable[[int], rkfast.TaskBatch]  # seed -> batch (on the CPU)
    warmup: int  # steps before timing, the sanity step included
    repeats: int  # timed steps


def _sinusoid_batch(seed: int) -> rkfast.TaskBatch:
    return rkfast.tasks.SinusoidTasks(shots=10, query_shots=10).sample(25, torch.Generator().manual_seed(seed))


def _conv4_batch(seed: int, tasks: int = 32, ways: int = 5, shots: int = 1, queries: int = 15) -> rkfast.TaskBatch:
    gen = torch.Generator().manual_seed(seed)
    support_x = torch.randn(tasks, ways * shots, 1, 28, 28, generator=gen)
    query_x = torch.randn(tasks, ways * queries, 1, 28, 28, generator=gen)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return rkfast.TaskBatch(support_x, support_y, query_x, query_y)


WORKLOADS: dict[str, Workload] = {
    "sinusoid": Workload("sinusoid", "sinusoid MLP 1-40-40-1, 25 tasks x 10 support / 10 query, MSE, inner lr 0.01",
                         rkfast.models.sinusoid_mlp, F.mse_loss, 0.01, _sinusoid_batch, warmup=10, repeats=100),
    "conv4": Workload("conv4", "conv4(1, 5, 64, 28), 32 tasks, 5-way 1-shot, 15 query/class, cross-entropy, "
                      "inner lr 0.4", lambda: rkfast.models.conv4(1, 5, 64, 28), F.cross_entropy, 0.4,
                      _conv4_batch, warmup=1, repeats=3),
}


def has_norm_layers(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm)) for m in model.modules())


@dataclass
class Setup:
    """What every contender gets: a fresh model at the common initialization, the batch and the step."""

    workload: Workload
    model: nn.Module
    batch: rkfast.TaskBatch
    tableau: rkfast.Tableau
    first_order: bool
    device: torch.device

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.model.named_parameters()]

    def loss(self, params: dict[str, Tensor] | None, x: Tensor, y: Tensor) -> Tensor:
        """The task loss of ``x, y`` at ``params`` (``None``: the module's own parameters)."""
        out = self.model(x) if params is None else functional_call(self.model, params, (x,))
        return self.workload.loss_fn(out, y)

    def adam(self, params: Any) -> torch.optim.Optimizer:
        """The outer optimizer every non-rkfast contender uses: what a user writes."""
        return torch.optim.Adam(params, lr=OUTER_LR)


def make_setup(workload: Workload, tableau: str, first_order: bool, device: torch.device, seed: int,
               dtype: torch.dtype = torch.float32, tasks: int | None = None) -> Setup:
    """The common initialization (``seed``) and batch; ``tasks``: only the first ones (the exact check)."""
    torch.manual_seed(seed)
    model = workload.make_model().to(device=device, dtype=dtype)
    batch = workload.make_batch(seed)
    batch = rkfast.TaskBatch(*(t[:tasks].to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                               for t in batch))
    return Setup(workload, model, batch, rkfast.get_tableau(tableau), first_order, device)


def flat_grad(params: list[Tensor]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in params])


# -- one RK meta-loss per task, from the tableau's A and b (shared by ``loop`` and ``vmap``) ----------------


def rk_task_loss(theta: dict[str, Tensor], support_grad: Callable[[dict[str, Tensor]], dict[str, Tensor]],
                 query_loss: Callable[[dict[str, Tensor]], Tensor], tab: rkfast.Tableau, h: float) -> Tensor:
    """``sum_j b_j L_Q(theta_j)`` with ``theta_j = theta - h sum_l A[j][l] k_l`` and ``k_l`` the support
    gradient at ``theta_l``; only the slopes a later stage reads and the query losses with ``b_j != 0``."""
    s, A, b = tab.stages, tab.A, tab.b
    slopes: list[dict[str, Tensor] | None] = [None] * s
    meta: Tensor | float = 0.0
    for j in range(s):
        need_slope = any(A[l][j] != 0.0 for l in range(j + 1, s))
        if not (need_slope or b[j] != 0.0):
            continue
        coefs = [(l, A[j][l]) for l in range(j) if A[j][l] != 0.0]
        point = theta if not coefs else {
            n: theta[n] - sum(h * a * slopes[l][n] for l, a in coefs) for n in theta  # type: ignore[index]
        }
        if need_slope:
            slopes[j] = support_grad(point)
        if b[j] != 0.0:
            meta = meta + b[j] * query_loss(point)
    return meta  # type: ignore[return-value]


# -- contenders: each builds a zero-argument step from a Setup ------------------------------------------


class Unsupported(Exception):
    """This contender does not run this tableau/order (not an error)."""


def build_loop(s: Setup) -> Callable[[], None]:
    params = dict(s.model.named_parameters())
    opt = s.adam(params.values())
    h, create_graph = s.workload.inner_lr, not s.first_order

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        total: Tensor | float = 0.0
        for sx, sy, qx, qy in zip(*s.batch):
            def support_grad(point: dict[str, Tensor], sx: Tensor = sx, sy: Tensor = sy) -> dict[str, Tensor]:
                grads = torch.autograd.grad(s.loss(point, sx, sy), list(point.values()), create_graph=create_graph)
                return dict(zip(point, grads))

            total = total + rk_task_loss(params, support_grad, lambda p, qx=qx, qy=qy: s.loss(p, qx, qy), s.tableau, h)
        (total / s.batch.num_tasks).backward()  # type: ignore[union-attr]
        opt.step()

    return step


def _vmap_builder(exact_norms: bool) -> Callable[[Setup], Callable[[], None]]:
    def build(s: Setup) -> Callable[[], None]:
        params = dict(s.model.named_parameters())
        opt = s.adam(params.values())
        h, first_order = s.workload.inner_lr, s.first_order

        # only a gradient that is itself differentiated (second-order support gradients) needs the exact
        # norms; first derivatives through the fused norms are exact under vmap, and faster
        norms = elementary_norms if exact_norms and has_norm_layers(s.model) else contextlib.nullcontext

        def task(theta: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            def support_grad(point: dict[str, Tensor]) -> dict[str, Tensor]:
                if first_order:  # constant slopes: no graph through the inner gradient at all
                    return grad(lambda p: s.loss(p, sx, sy))({n: t.detach() for n, t in point.items()})
                with norms():
                    return grad(lambda p: s.loss(p, sx, sy))(point)

            return rk_task_loss(theta, support_grad, lambda p: s.loss(p, qx, qy), s.tableau, h)

        mapped = vmap(task, in_dims=(None, 0, 0, 0, 0))

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = mapped(params, *s.batch).mean()
            loss.backward()
            opt.step()

        return step

    return build


def _maml_only(s: Setup) -> None:
    if s.tableau.name != "maml":
        raise Unsupported("peers run maml only")


def build_higher(s: Setup) -> Callable[[], None]:
    _maml_only(s)
    if s.first_order:
        raise Unsupported("higher has no first-order mode (track_higher_grads=False cuts the meta-gradient)")
    higher = load_peer("higher")
    opt = s.adam(s.model.parameters())
    inner = torch.optim.SGD(s.model.parameters(), lr=s.workload.inner_lr)
    T = s.batch.num_tasks

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for sx, sy, qx, qy in zip(*s.batch):
            with higher.innerloop_ctx(s.model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                diffopt.step(s.workload.loss_fn(fmodel(sx), sy))
                (s.workload.loss_fn(fmodel(qx), qy) / T).backward()
        opt.step()

    return step


def build_torchopt(s: Setup) -> Callable[[], None]:
    _maml_only(s)
    if s.first_order:
        raise Unsupported("torchopt's MetaSGD always differentiates through the inner step")
    torchopt = load_peer("torchopt")
    opt = s.adam(s.model.parameters())
    inner = torchopt.MetaSGD(s.model, lr=s.workload.inner_lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        net_state = torchopt.extract_state_dict(s.model, by="reference", detach_buffers=True)
        inner_state = torchopt.extract_state_dict(inner, by="reference")
        losses = []
        for sx, sy, qx, qy in zip(*s.batch):
            inner.step(s.loss(None, sx, sy))
            losses.append(s.loss(None, qx, qy))
            torchopt.recover_state_dict(s.model, net_state)
            torchopt.recover_state_dict(inner, inner_state)
        torch.stack(losses).mean().backward()
        opt.step()

    return step


def build_learn2learn(s: Setup) -> Callable[[], None]:
    _maml_only(s)
    l2l = load_peer("learn2learn")
    maml = l2l.algorithms.MAML(s.model, lr=s.workload.inner_lr, first_order=s.first_order)
    opt = s.adam(maml.parameters())
    T = s.batch.num_tasks

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for sx, sy, qx, qy in zip(*s.batch):
            learner = maml.clone()
            learner.adapt(s.workload.loss_fn(learner(sx), sy))
            (s.workload.loss_fn(learner(qx), qy) / T).backward()
        opt.step()

    return step


def _rkfast_builder(**kwargs: Any) -> Callable[[Setup], Callable[[], None]]:
    def build(s: Setup) -> Callable[[], None]:
        if kwargs.get("capture") and s.device.type != "cuda":
            raise Unsupported("CUDA only")
        if "vectorize" in kwargs and kwargs["vectorize"] == resolve_vectorize("auto", s.model, s.device):
            raise Unsupported(f"the same as rkfast here (vectorize='auto' chose {kwargs['vectorize']})")
        try:
            opt = rkfast.MetaOptimizer(s.model, s.workload.loss_fn, tableau=s.tableau, inner_lr=s.workload.inner_lr,
                                       outer="adam", lr=OUTER_LR, first_order=s.first_order, **kwargs)
        except TypeError as err:
            if kwargs and any(k in str(err) for k in kwargs):
                raise NotAvailable(f"{type(err).__name__}: {err}") from err
            raise
        def step() -> None:
            opt.step(s.batch)

        step.optimizer = opt  # type: ignore[attr-defined]
        return step

    return build


@dataclass(frozen=True)
class Contender:
    name: str
    build: Callable[[Setup], Callable[[], None]]
    peer: str | None = None  # the library it needs
    maml_only: bool = False
    first_order: bool = True  # runs first order too (where the tableau is supported)
    cuda_only: bool = False
    captured: bool = False  # replays a CUDA graph after warm-up steps (at least CAPTURE_WARMUP before timing)
    default: bool = True  # in the default --contenders list


CONTENDERS: dict[str, Contender] = {c.name: c for c in [
    Contender("loop", build_loop, maml_only=True),
    Contender("higher", build_higher, peer="higher", maml_only=True, first_order=False),
    Contender("torchopt", build_torchopt, peer="torchopt", maml_only=True, first_order=False),
    Contender("learn2learn", build_learn2learn, peer="learn2learn", maml_only=True),
    Contender("vmap", _vmap_builder(exact_norms=True)),
    Contender("vmap-fused-norm", _vmap_builder(exact_norms=False), default=False),
    Contender("rkfast", _rkfast_builder()),
    Contender("rkfast-vmap", _rkfast_builder(vectorize=True)),
    Contender("rkfast-loop", _rkfast_builder(vectorize=False)),
    Contender("rkfast-captured", _rkfast_builder(capture=True), cuda_only=True, captured=True),
]}


# -- the peer libraries -------------------------------------------------------------------------------


class NotAvailable(Exception):
    """A contender's library (or feature) is not installed or cannot be imported."""


_PEERS: dict[str, tuple[Any, str | None, str | None]] = {}  # name -> (module, version, note)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _learn2learn_algorithms_only(err: Exception) -> Any:
    """learn2learn's ``__init__`` imports its vision/gym/text modules (torchvision, gym, ...); MAML needs
    none of them. Load ``learn2learn.utils`` and ``learn2learn.algorithms.maml`` alone, same code."""
    spec = importlib.util.find_spec("learn2learn")
    if spec is None or not spec.submodule_search_locations:
        raise err
    for name in [m for m in sys.modules if m == "learn2learn" or m.startswith("learn2learn.")]:
        del sys.modules[name]  # the half-imported package
    root = list(spec.submodule_search_locations)[0]
    for pkg, path in (("learn2learn", root), ("learn2learn.algorithms", os.path.join(root, "algorithms"))):
        module = types.ModuleType(pkg)
        module.__path__ = [path]  # a bare package: its __init__ does not run
        sys.modules[pkg] = module
    importlib.import_module("learn2learn.utils")
    maml = importlib.import_module("learn2learn.algorithms.maml")
    sys.modules["learn2learn.algorithms"].MAML = maml.MAML  # type: ignore[attr-defined]
    sys.modules["learn2learn"].algorithms = sys.modules["learn2learn.algorithms"]  # type: ignore[attr-defined]
    return sys.modules["learn2learn"]


def load_peer(name: str) -> Any:
    """Import a peer library (once): its module, or raise NotAvailable with the reason."""
    if name in _PEERS:
        module = _PEERS[name][0]
        if module is None:
            raise NotAvailable(_PEERS[name][2])
        return module
    note = None
    try:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any import failure makes the peer unavailable
            if name != "learn2learn":
                raise
            module = _learn2learn_algorithms_only(err)
            note = (f"package import failed ({type(err).__name__}: {err}); its MAML loaded from "
                    "learn2learn/algorithms/maml.py + learn2learn/utils without the package __init__")
    except Exception as err:  # noqa: BLE001
        _PEERS[name] = (None, _version(name), f"{type(err).__name__}: {err}")
        raise NotAvailable(_PEERS[name][2]) from err
    _PEERS[name] = (module, _version(name), note)
    return module


def peer_status(name: str) -> dict[str, Any]:
    try:
        load_peer(name)
    except NotAvailable:
        pass
    module, version, note = _PEERS[name]
    out: dict[str, Any] = {"available": module is not None, "version": version}
    out["note" if module is not None else "reason"] = note
    return out


# -- measuring ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def proc_status_kb() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of this process, in kB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    return out


def _anon_kb(st: dict[str, int]) -> int:
    return st.get("RssAnon", st.get("VmRSS", 0)) + st.get("RssShmem", 0)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, which ru_maxrss reports
        return True
    except OSError:
        return False


def cpu_busy() -> tuple[float, float]:
    """(seconds of busy CPU time summed over all cores, seconds since boot-ish counter) from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan"), float("nan")
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields) - idle) / hz, sum(fields) / hz


def own_cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


@contextlib.contextmanager
def other_load(who: int) -> Iterator[dict[str, float]]:
    """Measures the CPU cores other processes used during the block (busy time minus ``who``'s own)."""
    out: dict[str, float] = {}
    busy0, own0, t0 = cpu_busy()[0], own_cpu(who), time.perf_counter()
    yield out
    wall = time.perf_counter() - t0
    others = (cpu_busy()[0] - busy0) - (own_cpu(who) - own0)
    out["other_cores"] = max(0.0, others / wall) if wall > 0 and math.isfinite(others) else float("nan")


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
    _sync(s.device)
    return step, flat_grad(params).cpu()


def check(row: dict[str, Any], key: str, g: Tensor, spec: dict[str, Any], rtol: float) -> bool:
    """Save (the loop: the reference) or compare ``g`` with the reference ``spec["ref"] + key``."""
    path = spec["ref"] + key
    if spec["contender"] == "loop":
        torch.save(g, path)
        row["sanity"][key] = {"ok": True, "reference": True}
    elif os.path.exists(path):
        row["sanity"][key] = compare(g, torch.load(path), rtol)
    else:
        row["sanity"][key] = {"ok": None, "reason": "no reference gradient"}
    return row["sanity"][key]["ok"] is not False


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


def _timed_steps(spec: dict[str, Any], first_step_s: float) -> int:
    """``repeats``, but no more than fit in ``cell_budget`` seconds at the warm-up step's pace (at least 1)."""
    budget = spec.get("cell_budget")
    if not budget or spec["repeats"] == 0:
        return spec["repeats"]
    return max(1, min(spec["repeats"], int(budget / max(first_step_s, 1e-9))))


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """One (workload, contender, tableau, order): sanity check, warm-up, timed steps, memory where possible.

    ``spec``: workload, contender, tableau, order, device, seed, warmup, repeats, cell_budget, rtol (float32),
    rtol64, check_tasks, exact_check ("auto" or "always"), ref (path prefix of the reference gradients, which
    the ``loop`` contender writes), isolated.

    Sanity: the meta-gradient after one float32 step from the initialization on the full batch (the timed
    configuration; this step is also the first warm-up step) against the per-task loop's, within ``rtol``.
    Beyond that (float32 rounding through several second-order stages reaches ~2e-3 on conv4 rk4), or
    always with ``exact_check="always"``, the exact check decides: the same in float64 on the first
    ``check_tasks`` tasks within ``rtol64`` (rounding is ~1e-14 there; the fused-norm vmap error 1e-2).
    """
    wl, cont = WORKLOADS[spec["workload"]], CONTENDERS[spec["contender"]]
    device = torch.device(spec["device"])
    first_order = spec["order"] == "first"
    is_ref = spec["contender"] == "loop"
    row: dict[str, Any] = {k: spec[k] for k in ("workload", "contender", "tableau", "order")}
    row["sanity"] = {}
    times: list[float] = []
    try:
        if cont.peer:
            load_peer(cont.peer)  # imported before the memory baseline (and NotAvailable before any work)
        if device.type == "cpu" and spec["isolated"]:
            warm_runtime()
        s = make_setup(wl, spec["tableau"], first_order, device, spec["seed"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        elif spec["isolated"]:
            base_status = proc_status_kb()
        start = time.perf_counter()
        step, g32 = first_step_grad(cont, s)
        first_step_s = time.perf_counter() - start
        f32_ok = check(row, "float32", g32, spec, spec["rtol"])
        if is_ref or not f32_ok or spec.get("exact_check") == "always":
            # float64 on a few tasks: the reference (loop), or the arbiter when float32 differs by more than
            # rounding should explain (not counted in the memory peak: that is reset after the warm-up)
            exact = make_setup(wl, spec["tableau"], first_order, device, spec["seed"], torch.float64,
                               spec["check_tasks"])
            _, g64 = first_step_grad(cont, exact)
            del exact
            if not check(row, "float64", g64, spec, spec["rtol64"]):
                row["status"] = "wrong"
                return row
            if not f32_ok:
                row["sanity"]["float32"]["ok"] = None  # beyond rtol, but the exact check passed: rounding
        for _ in range(spec["warmup"] - 1):
            step()
        capture = getattr(getattr(step, "optimizer", None), "_capture", None)
        if capture is not None and not capture.captured:
            raise RuntimeError(f"the step is not replayed from a graph after {spec['warmup']} warm-up steps")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)  # the timed steps' peak (not the float64 check's)
        elif spec["isolated"]:
            # the first steps fault in library code (file-backed pages, ~150 MB of libtorch): reset the peak
            # here and count anonymous memory only, so that the timed steps' peak is the contender's data
            row["hwm_reset"] = _reset_peak_rss() if spec["repeats"] > 0 else False
        for _ in range(_timed_steps(spec, first_step_s)):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
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
    if not times:
        return row
    row.update(ms=1e3 * statistics.median(times), ms_min=1e3 * min(times), ms_max=1e3 * max(times),
               repeats=len(times))
    if device.type == "cuda":
        row.update(peak_mb=(torch.cuda.max_memory_allocated(device) - base) / 2**20, base_mb=base / 2**20,
                   memory="cuda max_memory_allocated above the setup's")
    elif spec["isolated"]:
        end = proc_status_kb()
        peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, end.get("VmHWM", 0))
        # anonymous memory at the peak: the peak RSS minus file-backed pages (which only grow), minus the
        # anonymous memory after imports + model/batch setup
        peak_anon = peak_kb - end.get("RssFile", 0) if row["hwm_reset"] else peak_kb - _anon_kb(base_status)
        base_anon = _anon_kb(base_status)
        row.update(peak_mb=(peak_anon - base_anon) / 1024, base_mb=base_anon / 1024,
                   peak_rss_mb=peak_kb / 1024, base_rss_mb=base_status.get("VmRSS", 0) / 1024,
                   memory="peak anonymous RSS during the timed steps above the anonymous RSS after imports + "
                          "model/batch setup (own process)")
    return row


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    row = run_cell(spec)
    row["rkfast_sha256"] = rkfast_source()["sha256"]
    print(RESULT_TAG + json.dumps(row), flush=True)


# -- the driver ------------------------------------------------------------------------------------------


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(device).lower()).strip("-")


def rkfast_source() -> dict[str, str]:
    """Where rkfast was imported from and a hash of its Python sources (a tree edited mid-run shows up)."""
    pkg = Path(rkfast.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        digest.update(str(path.relative_to(pkg)).encode() + b"\0" + path.read_bytes())
    return {"path": str(pkg), "sha256": digest.hexdigest()[:16]}


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": git("status", "--porcelain").splitlines()}


def run_isolated(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**{k: spec[k] for k in ("workload", "contender", "tableau", "order")}, "status": "timeout",
                "reason": f"cell exceeded {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**{k: spec[k] for k in ("workload", "contender", "tableau", "order")}, "status": "error",
            "reason": f"worker exit {proc.returncode}: {' | '.join(tail)}"[:500]}


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


def fmt(x: float | None, spec: str = ".2f", width: int = 9) -> str:
    return f"{'-' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec):>{width}}"


def lookup(rows: list[dict[str, Any]], **key: str) -> dict[str, Any] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in key.items()) and r.get("status") == "ok" and r.get("ms") is not None:
            return r
    return None


def add_ratios(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r.get("ms") is None:
            continue
        ref = lookup(rows, workload=r["workload"], contender="rkfast", tableau=r["tableau"], order=r["order"])
        r["x_rkfast"] = r["ms"] / ref["ms"] if ref else None
        loop = lookup(rows, workload=r["workload"], contender="loop", tableau=r["tableau"], order=r["order"])
        r["x_loop"] = loop["ms"] / r["ms"] if loop and r["contender"].startswith("rkfast") else None


def sanity_text(san: dict[str, Any]) -> str:
    """``ok 1.7e-07`` (float32 relative error), ``ok 1.7e-03 (f64 4.4e-14)`` when the exact check decided."""
    f32, f64 = san.get("float32") or {}, san.get("float64") or {}
    if f32.get("reference"):
        return "reference"
    if not f32 and not f64:
        return "-"
    if "rel_err" not in f32:
        return f32.get("reason", "unchecked")
    text = f"{f32['rel_err']:.1e}"
    if "rel_err" in f64:
        text += f" (f64 {f64['rel_err']:.1e})"
    ok = f64.get("ok") if f64 else f32.get("ok")
    return f"{ {True: 'ok', False: 'WRONG', None: 'unchecked'}[ok] } {text}"


def print_table(wl: Workload, rows: list[dict[str, Any]]) -> None:
    print(f"\n== {wl.name}: {wl.describe}")
    print(f"{'contender':<17}{'tableau':<8}{'order':<7}{'ms/step':>10}{'n':>4}{'peak MB':>9}{'base MB':>9}"
          f"{'rkfast x':>9}{'x loop':>8}{'other':>7}  sanity")
    for r in rows:
        if r["workload"] != wl.name:
            continue
        head = f"{r['contender']:<17}{r['tableau']:<8}{r['order']:<7}"
        check = sanity_text(r.get("sanity") or {})
        if r.get("status") == "wrong":
            print(f"{head}WRONG, not timed: meta-gradient vs the loop's {check.split(' ', 1)[-1]}")
            continue
        if r.get("status") == "unsupported" and r.get("reason", "").startswith("the same as rkfast"):
            continue  # rkfast-vmap / rkfast-loop where the default already is that (the rkfast row)
        if r.get("status") != "ok":
            print(f"{head}{r['status'].upper()}: {r.get('reason', '') or check}")
            continue
        if r.get("ms") is None:
            continue
        busy = r.get("other_cores")
        flag = "!" if busy is not None and busy > BUSY_CORES else ""
        print(f"{head}{fmt(r['ms'], '.2f', 10)}{r.get('repeats', 0):>4}{fmt(r.get('peak_mb'), '.1f')}{fmt(r.get('base_mb'), '.0f')}"
              f"{fmt(r.get('x_rkfast'), '.2f')}{fmt(r.get('x_loop'), '.2f', 8)}{fmt(busy, '.2f', 6)}{flag:1} {check}")


def targets(rows: list[dict[str, Any]], device: torch.device, workloads: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, higher_is_better: bool, detail: str) -> None:
        met = None if value is None else (value >= limit if higher_is_better else value <= limit)
        out.append({"target": name, "value": value, "limit": limit, "met": met, "detail": detail})

    def ms(wl: str, contender: str, tab: str = "maml", order: str = "second") -> float | None:
        r = lookup(rows, workload=wl, contender=contender, tableau=tab, order=order)
        return r["ms"] if r else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None else None

    def vectorized(wl: str, tab: str, order: str) -> dict[str, Any] | None:
        """rkfast under vmap, the same computation as the hand-written vmap: rkfast-vmap where the default
        (vectorize='auto') chose the loop, else rkfast."""
        return (lookup(rows, workload=wl, contender="rkfast-vmap", tableau=tab, order=order)
                or lookup(rows, workload=wl, contender="rkfast", tableau=tab, order=order))

    if device.type == "cpu":
        for wl, need in (("sinusoid", 7.0), ("conv4", 1.8)):
            if wl in workloads:
                loop, rk = ms(wl, "loop"), ms(wl, "rkfast")
                add(f"CPU {wl}: rkfast maml 2nd order >= {need:g}x the per-task loop", ratio(loop, rk), need, True,
                    f"loop {fmt(loop).strip()} ms / rkfast {fmt(rk).strip()} ms")
        for wl in workloads:
            rk, hand = vectorized(wl, "maml", "second"), ms(wl, "vmap")
            name = rk["contender"] if rk else "rkfast"
            add(f"CPU {wl}: {name} maml 2nd order within 10% of the hand-written vmap", ratio(rk and rk["ms"], hand),
                1.1, False, f"{name} {fmt(rk and rk['ms']).strip()} ms / vmap {fmt(hand).strip()} ms")
    tabs = sorted({(r["workload"], r["tableau"], r["order"]) for r in rows if r["contender"] == "rkfast"},
                  key=lambda k: (workloads.index(k[0]), k[1] != "maml", k[1], k[2] != "second"))

    for wl, tab, order in tabs:
        rk, hand = vectorized(wl, tab, order), ms(wl, "vmap", tab, order)
        name = rk["contender"] if rk else "rkfast"
        add(f"{wl} {tab} {order}: {name} <= 1.1x hand-written vmap (time)", ratio(rk and rk["ms"], hand), 1.1,
            False, f"{name} {fmt(rk and rk['ms']).strip()} ms / vmap {fmt(hand).strip()} ms")
    for wl, tab, order in tabs:
        rk = vectorized(wl, tab, order)
        hand = lookup(rows, workload=wl, contender="vmap", tableau=tab, order=order)
        name = rk["contender"] if rk else "rkfast"
        a = rk.get("peak_mb") if rk else None
        b = hand.get("peak_mb") if hand else None
        met = None if a is None or b is None else a <= b + (MEMORY_NOISE_MB if device.type == "cpu" else 0.0)
        out.append({"target": f"{wl} {tab} {order}: {name} peak memory <= hand-written vmap's", "value": ratio(a, b),
                    "limit": 1.0, "met": met,
                    "detail": f"{name} {fmt(a, '.1f').strip()} MB / vmap {fmt(b, '.1f').strip()} MB"
                              + (f" (difference {a - b:+.1f} MB; CPU tolerance {MEMORY_NOISE_MB:g} MB of RSS noise)"
                                 if met is not None and device.type == "cpu" else "")})
    if device.type == "cuda":
        cap, loop, hand = ms("sinusoid", "rkfast-captured"), ms("sinusoid", "loop"), ms("sinusoid", "vmap")
        add("GPU sinusoid: rkfast-captured maml >= 200x loop", ratio(loop, cap), 200.0, True,
            f"loop {fmt(loop).strip()} ms / captured {fmt(cap).strip()} ms")
        add("GPU sinusoid: rkfast-captured maml >= 12x eager hand-written vmap", ratio(hand, cap), 12.0, True,
            f"vmap {fmt(hand).strip()} ms / captured {fmt(cap).strip()} ms")
        cap, loop = ms("conv4", "rkfast-captured"), ms("conv4", "loop")
        add("GPU conv4: rkfast-captured maml >= 60x loop", ratio(loop, cap), 60.0, True,
            f"loop {fmt(loop).strip()} ms / captured {fmt(cap).strip()} ms")
    else:
        out.append({"target": "GPU targets (captured vs loop / vmap)", "value": None, "limit": None, "met": None,
                    "detail": "CUDA only: not measured on this device"})
    return out


def plot(rows: list[dict[str, Any]], workloads: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(wl, [r for r in rows if r["workload"] == wl and r.get("ms") is not None]) for wl in workloads]
    groups = [(wl, rs) for wl, rs in groups if rs]
    if not groups:
        return
    names = list(CONTENDERS)
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    heights = [max(2.0, 0.28 * len(rs) + 1.0) for _, rs in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, sum(heights)), gridspec_kw={"height_ratios": heights},
                             squeeze=False)
    for ax, (wl, rs) in zip(axes[:, 0], groups):
        rs = sorted(rs, key=lambda r: (r["order"] != "second", r["tableau"] != "maml", r["tableau"],
                                       names.index(r["contender"])))
        labels = [f"{r['contender']} {r['tableau']} {'2nd' if r['order'] == 'second' else '1st'}" for r in rs]
        y = range(len(rs))
        ax.barh(list(y), [r["ms"] for r in rs], color=[colors[r["contender"]] for r in rs])
        for i, r in enumerate(rs):
            ax.text(r["ms"], i, f" {r['ms']:.3g}", va="center", fontsize=7)
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms per meta-step (median, log scale)")
        ax.set_title(f"{wl}: {WORKLOADS[wl].describe}", fontsize=8)
        ax.margins(x=0.15)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / sum(heights)))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def busy_check(seconds: float = 1.0) -> float:
    busy0, _ = cpu_busy()
    own0 = own_cpu(resource.RUSAGE_SELF)
    time.sleep(seconds)
    return max(0.0, (cpu_busy()[0] - busy0 - (own_cpu(resource.RUSAGE_SELF) - own0)) / seconds)


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
    slug = device_slug(device)
    header = (f"device {device_name(device)} ({device.type}), torch {torch.__version__}, {args.threads} threads, "
              f"python {platform.python_version()}, rkfast {rkfast.__version__}")
    print(header)
    source = rkfast_source()
    inside = Path(source["path"]).is_relative_to(ROOT)
    print(f"rkfast imported from {source['path']} (sources sha256 {source['sha256']})"
          + ("" if inside else f", not from this checkout ({ROOT})"))

    busy = busy_check()
    load1 = os.getloadavg()[0]
    print(f"other processes at start: {busy:.2f} cores busy (1-min load average {load1:.2f}, {os.cpu_count()} cores)")
    if busy > BUSY_CORES:
        print(f"WARNING: the machine is busy ({busy:.2f} cores used by other processes); timings will be noisy. "
              f"Rows measured while others used more than {BUSY_CORES} cores are marked '!'.")

    peers: dict[str, dict[str, Any]] = {}
    for c in args.contenders:
        peer = CONTENDERS[c].peer
        if peer and peer not in peers:
            peers[peer] = peer_status(peer)
            st = peers[peer]
            if st["available"]:
                print(f"{peer}: {st['version']}" + (f" (note: {st['note']})" if st.get("note") else ""))
            else:
                print(f"{peer}: not available ({st['reason']})")
    unavailable = [{"contender": c, "reason": peers[CONTENDERS[c].peer]["reason"]} for c in args.contenders
                   if CONTENDERS[c].peer and not peers[CONTENDERS[c].peer]["available"]]
    if device.type != "cuda":
        for c in args.contenders:
            if CONTENDERS[c].cuda_only:
                unavailable.append({"contender": c, "reason": "CUDA only"})
                print(f"{c}: not run (CUDA only)")
    skip = {u["contender"] for u in unavailable}

    rows: list[dict[str, Any]] = []
    tmp = tempfile.TemporaryDirectory(prefix="e2e-ref-")
    who = resource.RUSAGE_CHILDREN if args.isolate else resource.RUSAGE_SELF
    for wl, tab, order, names in plan(args, device):
        ref = os.path.join(tmp.name, f"{wl.name}-{tab}-{order}-")
        names = [n for n in names if n not in skip]
        base = {"workload": wl.name, "tableau": tab, "order": order, "device": str(device), "seed": args.seed,
                "threads": args.threads, "rtol": args.rtol, "rtol64": args.rtol64, "check_tasks": args.check_tasks,
                "exact_check": args.exact_check, "cell_budget": args.cell_budget,
                "isolated": args.isolate, "ref": ref,
                "warmup": max(1, wl.warmup if args.warmup is None else args.warmup),
                "repeats": wl.repeats if args.repeats is None else args.repeats}
        cells = [{**base, "contender": n} for n in sorted(names, key=lambda n: n != "loop")]  # the reference first
        for cell in cells:
            if CONTENDERS[cell["contender"]].captured:  # time replays only: after the eager warm-ups and the capture
                cell["warmup"] = max(cell["warmup"], CAPTURE_WARMUP)
        if "loop" not in names:  # the reference still comes from the per-task loop, untimed
            cells.insert(0, {**base, "contender": "loop", "repeats": 0, "warmup": 1, "reference_only": True})
        for spec in cells:
            row = None
            for attempt in range(1 + args.retry_busy):
                t0 = time.perf_counter()
                with other_load(who) as load:
                    new = run_isolated(spec, args.cell_timeout) if args.isolate else run_cell(spec)
                wall = time.perf_counter() - t0
                # /proc/stat counts in 10 ms ticks: too coarse for cells shorter than a second
                new.update(other_cores=load.get("other_cores") if wall >= 1.0 else None, wall_s=wall,
                           warmup=spec["warmup"], attempts=attempt + 1)
                if row is None or (new.get("status") == "ok" and (new["other_cores"] or 0) < (row["other_cores"] or 0)):
                    row = new
                busy_now = new.get("other_cores")
                if new.get("status") != "ok" or busy_now is None or busy_now <= BUSY_CORES:
                    break
                print(f"  ({wl.name} {spec['contender']} {tab} {order}: other processes used {busy_now:.2f} cores "
                      "during the cell; running it again)", flush=True)
                time.sleep(5.0)
            row["attempts"] = attempt + 1
            if spec.get("reference_only"):
                row["reference_only"] = True
                if row.get("status") != "ok":
                    print(f"  reference loop for {wl.name} {tab} {order} failed: {row.get('reason')}")
                row.pop("ms", None)
            rows.append(row)
            if not spec.get("reference_only"):
                ms = f"{row['ms']:.2f} ms" if row.get("ms") is not None else row.get("status")
                print(f"  {wl.name:<9}{spec['contender']:<17}{tab:<6}{order:<7}{ms:>12}  ({row['wall_s']:.1f} s)",
                      flush=True)
    tmp.cleanup()

    changed = sorted({r["rkfast_sha256"] for r in rows if r.get("rkfast_sha256")} - {source["sha256"]})
    if changed or rkfast_source()["sha256"] != source["sha256"]:
        print(f"WARNING: rkfast's sources changed during the run (sha256 {source['sha256']} at the start, also "
              f"{', '.join(changed) or rkfast_source()['sha256']}): rows may mix versions (see rkfast_sha256 per row)")
    add_ratios(rows)
    for name in args.workloads:
        print_table(WORKLOADS[name], [r for r in rows if not r.get("reference_only")])
    print("\n'rkfast x' = this row's ms / rkfast's (same tableau, order); 'x loop' = loop's ms / this row's; "
          "'other' = CPU cores used by other processes during the cell; peak MB = "
          + ("CUDA max allocated above setup" if device.type == "cuda" else
             "peak anonymous RSS of the timed steps above that after imports+setup, own process per cell"
             if args.isolate else
             "not measured (in-process run)"))

    verdicts = targets(rows, device, args.workloads)
    print("\nTargets:")
    for t in verdicts:
        state = {True: "met", False: "NOT MET", None: "n/a"}[t["met"]]
        value = "" if t["value"] is None else f" = {t['value']:.2f} (limit {t['limit']:g})"
        print(f"  [{state:^7}] {t['target']}{value}: {t['detail']}")
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
    out_json = args.json or (None if args.quick else str(ROOT / "benchmarks" / "results" / f"e2e-{slug}.json"))
    out_png = args.png or (None if args.quick else str(ROOT / "benchmarks" / "results" / f"e2e-{slug}.png"))
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out_json}")
    if out_png:
        plot([r for r in rows if not r.get("reference_only")], args.workloads, Path(out_png),
             f"one meta-step, {device_name(device)}, torch {torch.__version__}, {args.threads} threads")
        print(f"wrote {out_png}")


if __name__ == "__main__":
    main()
