"""Few-shot classification speed: episode sampling against the meta-step, and the conv4 meta-step itself.

    python benchmarks/fewshot.py [--repeats 5] [--json benchmarks/results/fewshot-cpu.json] [--quick]
                                 [--device cuda]

Two workloads as published (Finn et al. 2017), on random images of the right shapes (no data needed):
Omniglot conv4 (64 filters, strided, 28x28, 1 channel), 5-way 1-shot, 32 tasks; MiniImageNet conv4 (32
filters, max-pool, 84x84 RGB), 5-way 1-shot, 15 query images per class, 4 tasks. For each, in one process:

* sampling: ms to draw one meta-batch with :class:`rkfast.tasks.fewshot.EpisodeSampler` (the target: under
  5% of a meta-step);
* the second-order MAML meta-step (``maml``: one inner step; MiniImageNet's protocol is ``maml(5)``, also
  timed): rkfast's ``MetaOptimizer.step`` with its default (``vectorize="auto"``: the per-task loop for
  convolutions on the CPU) and with ``vmap``, against a hand-written per-task loop (plain autograd, what most
  MAML code does) and the hand-written ``torch.func`` vmap step;
* the exact per-task batch norm of the ``vmap`` path (``rkfast._norms``: group norm over a channel-first
  view) against the same formulas in elementary ops (the earlier implementation, kept as the reference):
  the whole ``vmap`` meta-step with each, and the norm alone (second order under ``vmap`` on the first conv4
  layer's activations, PyTorch's fused batch norm beside it, whose result there is wrong);
* the loop's floating-point work (``torch.utils.flop_counter``) and the achieved GFLOP/s, against the CPU's
  float32 matrix-multiply rate measured here (a 2048^3 ``mm``), as a practical peak.

Compare only ratios from one run (the machine is noisy); the JSON keeps every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.utils.flop_counter import FlopCounterMode

import rkfast
import rkfast.taskmap
from rkfast._norms import exact_norms, reference_norms
from rkfast.data.images import ClassImages
from rkfast.tasks.fewshot import EpisodeSampler, conv4

from _common import median_ms  # benchmarks/ is on sys.path when run as a script


@dataclass(frozen=True)
class Workload:
    name: str
    channels: int
    size: int
    filters: int
    strided: bool
    tasks: int
    query: int
    inner_lr: float
    tableaus: tuple[str, ...]


WORKLOADS = (
    Workload("omniglot conv4 5-way 1-shot", 1, 28, 64, True, 32, 5, 0.4, ("maml",)),
    Workload("miniimagenet conv4 5-way 1-shot", 3, 84, 32, False, 4, 15, 0.01, ("maml", "maml(5)")),
)


def random_split(w: Workload, classes: int = 64, per_class: int = 20) -> ClassImages:
    images = np.random.default_rng(0).integers(0, 256, (classes, per_class, w.channels, w.size, w.size), np.uint8)
    return ClassImages(images, tuple(map(str, range(classes))), {"dataset": "random", "split": "train"})


def hand_loop(model: torch.nn.Module, batch: rkfast.TaskBatch, h: float, steps: int) -> Callable[[], object]:
    """Per-task second-order MAML with plain autograd: what most MAML code does."""
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]

    def step() -> None:
        total = 0.0
        for sx, sy, qx, qy in zip(*batch):
            fast = params
            for _ in range(steps):
                loss = F.cross_entropy(functional_call(model, dict(zip(names, fast)), (sx,)), sy)
                grads = torch.autograd.grad(loss, fast, create_graph=True)
                fast = [p - h * g for p, g in zip(fast, grads)]
            total = total + F.cross_entropy(functional_call(model, dict(zip(names, fast)), (qx,)), qy)
        torch.autograd.grad(total / batch.num_tasks, params)

    return step


def hand_vmap(model: torch.nn.Module, batch: rkfast.TaskBatch, h: float, steps: int) -> Callable[[], object]:
    """The torch.func MAML step: grad inside, vmap over tasks, backward outside (second order)."""
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}

    def task(sx, sy, qx, qy):
        fast = params
        for _ in range(steps):
            g = grad(lambda p: F.cross_entropy(functional_call(model, p, (sx,)), sy))(fast)
            fast = {k: fast[k] - h * g[k] for k in fast}
        return F.cross_entropy(functional_call(model, fast, (qx,)), qy)

    return lambda: torch.autograd.grad(vmap(task)(*batch).mean(), list(params.values()))


def peak_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    ms = median_ms(lambda: torch.mm(a, b), repeats=5, warmup=2)
    return 2 * 2048**3 / (ms * 1e-3) / 1e9


@contextlib.contextmanager
def norms_in_vmap(norms: Callable) -> object:
    """rkfast's vmap path with ``norms`` (exact_norms or reference_norms) as its norm rewrite."""
    saved = rkfast.taskmap.exact_norms
    rkfast.taskmap.exact_norms = norms
    try:
        yield
    finally:
        rkfast.taskmap.exact_norms = saved


def run(w: Workload, repeats: int, device: torch.device) -> list[dict]:
    sampler = EpisodeSampler(random_split(w), 5, 1, w.query, device=device)
    gen = torch.Generator().manual_seed(0)
    sample_ms = median_ms(lambda: sampler.sample(w.tasks, gen), repeats=max(repeats, 20), warmup=3, device=device)
    batch = sampler.sample(w.tasks, gen)
    rows = []
    for tableau in w.tableaus:
        steps = rkfast.get_tableau(tableau).stages - 1
        torch.manual_seed(0)
        model = conv4(w.channels, 5, w.filters, w.size, w.strided).to(device)
        loop = hand_loop(model, batch, w.inner_lr, steps)
        with FlopCounterMode(display=False) as counter:
            loop()
        flops = counter.get_total_flops()
        timings = {"hand-written loop": median_ms(loop, repeats, warmup=1, device=device),
                   "hand-written vmap": median_ms(hand_vmap(model, batch, w.inner_lr, steps), repeats, warmup=1,
                                                  device=device)}
        contenders = (("rkfast (auto)", "auto", exact_norms), ("rkfast vmap", True, exact_norms),
                      ("rkfast vmap, elementary norms", True, reference_norms))
        for label, vectorize, norms in contenders:
            opt = rkfast.MetaOptimizer(conv4(w.channels, 5, w.filters, w.size, w.strided).to(device), F.cross_entropy,
                                       tableau=tableau, inner_lr=w.inner_lr, lr=1e-6, vectorize=vectorize)
            if label == "rkfast (auto)":
                label += ": loop" if not opt.vectorize else ": vmap"
            with norms_in_vmap(norms):
                timings[label] = median_ms(lambda: opt.step(batch), repeats, warmup=1, device=device)
        loop_ms = timings["hand-written loop"]
        for impl, ms in timings.items():
            rows.append({"workload": w.name, "tableau": tableau, "impl": impl, "ms": ms, "x_loop": ms / loop_ms,
                         "gflops": flops / (ms * 1e-3) / 1e9, "sample_ms": sample_ms,
                         "sample_share": sample_ms / ms, "flops": flops})
    return rows


def norm_rows(w: Workload, repeats: int, device: torch.device) -> list[dict]:
    """The per-task batch norm alone, second order under vmap: the activations of conv4's first layer for a
    meta-batch (support and query images of every task), per-task affine rows, ``grad`` inside ``vmap``
    and a backward through the gradient, as a MAML support gradient sees it."""
    size = (w.size + 1) // 2 if w.strided else w.size
    x = torch.randn(w.tasks, 5 * (1 + w.query), w.filters, size, size, device=device)
    weight = torch.rand(w.tasks, w.filters, device=device, requires_grad=True)

    def task_loss(wt: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        return F.relu(F.batch_norm(xt, None, None, wt, None, training=True)).square().mean()

    def second_order(norms: Callable) -> Callable[[], object]:
        def step() -> object:
            with norms():
                g = vmap(grad(task_loss))(weight, x)
            return torch.autograd.grad(g.square().sum(), weight)

        return step

    implementations = {"exact (group norm)": exact_norms, "elementary ops (reference)": reference_norms,
                       "fused batch_norm (wrong under vmap)": contextlib.nullcontext}
    timings = {name: median_ms(second_order(norms), repeats, warmup=1, device=device)
               for name, norms in implementations.items()}
    base = timings["elementary ops (reference)"]
    return [{"workload": w.name, "shape": list(x.shape), "impl": impl, "ms": ms, "x_elementary": ms / base}
            for impl, ms in timings.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one repeat of the Omniglot workload (CI smoke)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default="cpu", help="torch device (cuda: through benchmarks/gpu_check.sh)")
    args = parser.parse_args()
    workloads = WORKLOADS[:1] if args.quick else WORKLOADS
    repeats = 1 if args.quick else args.repeats
    device = torch.device(args.device)
    peak = peak_gflops() if device.type == "cpu" else float("nan")
    rows = [r for w in workloads for r in run(w, repeats, device)]
    norms = [r for w in workloads for r in norm_rows(w, max(repeats, 5), device)]
    where = (f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}" if device.type == "cpu"
             else torch.cuda.get_device_name(device))
    print(f"torch {torch.__version__}, {where}; float32 mm rate (practical peak) {peak:.1f} GFLOP/s; "
          f"second-order meta-steps, median of {repeats}")
    print(f"{'workload':<33}{'tableau':<9}{'implementation':<31}{'ms/step':>9}{'x loop':>8}{'GFLOP/s':>9}"
          f"{'% peak':>8}{'sample ms':>10}{'sample %':>9}")
    for r in rows:
        print(f"{r['workload']:<33}{r['tableau']:<9}{r['impl']:<31}{r['ms']:>9.1f}{r['x_loop']:>8.2f}"
              f"{r['gflops']:>9.1f}{100 * r['gflops'] / peak:>8.0f}{r['sample_ms']:>10.2f}{100 * r['sample_share']:>9.1f}")
    print("\nper-task batch norm alone, second order under vmap (first conv4 layer's activations)")
    print(f"{'workload':<33}{'input [T, B, C, H, W]':<24}{'implementation':<37}{'ms':>8}{'x elementary':>13}")
    for r in norms:
        print(f"{r['workload']:<33}{str(r['shape']):<24}{r['impl']:<37}{r['ms']:>8.2f}{r['x_elementary']:>13.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": where, "threads": torch.get_num_threads(),
                       "peak_gflops": peak, "rows": rows, "norm_rows": norms}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
