"""Time one MetaOptimizer meta-step on the sinusoid MLP, per tableau and order (median of warm steps).

    python benchmarks/meta_step.py [--tasks 25] [--shots 10] [--repeats 200] [--json out.json]

A hand-written ``torch.func`` vmap MAML step (second order) runs in the same process as the yardstick;
compare speeds only as ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import platform
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import rkfast

from _common import median_ms  # benchmarks/ is on sys.path when run as a script


def hand_written_maml(model: torch.nn.Module, batch: rkfast.TaskBatch, inner_lr: float) -> Callable[[], object]:
    """The torch.func MAML step most vmap users write: grad inside, vmap over tasks, backward outside."""
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}

    def task(sx, sy, qx, qy):
        g = grad(lambda p: F.mse_loss(functional_call(model, p, (sx,)), sy))(params)
        adapted = {k: params[k] - inner_lr * g[k] for k in params}
        return F.mse_loss(functional_call(model, adapted, (qx,)), qy)

    return lambda: torch.autograd.grad(vmap(task)(*batch).mean(), list(params.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=25)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--tableaus", default="maml,heun,rk4")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    batch = rkfast.tasks.SinusoidTasks(shots=args.shots).sample(args.tasks, torch.Generator().manual_seed(0))
    rows = []
    model = rkfast.models.sinusoid_mlp()
    hand = median_ms(hand_written_maml(model, batch, 0.01), args.repeats)
    rows.append({"impl": "hand-written vmap", "tableau": "maml", "order": "second", "ms": hand})
    for name in args.tableaus.split(","):
        for first_order in (False, True):
            opt = rkfast.MetaOptimizer(rkfast.models.sinusoid_mlp(), F.mse_loss, tableau=name, inner_lr=0.01, lr=1e-5,
                                       first_order=first_order)
            ms = median_ms(lambda: opt.step(batch), args.repeats)
            rows.append({"impl": "rkfast MetaOptimizer.step", "tableau": name,
                         "order": "first" if first_order else "second", "ms": ms})
    print(f"sinusoid MLP, {args.tasks} tasks x {args.shots} shots, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'implementation':<28}{'tableau':<9}{'order':<8}{'ms/step':>9}{'x hand maml':>13}")
    for r in rows:
        print(f"{r['impl']:<28}{r['tableau']:<9}{r['order']:<8}{r['ms']:>9.2f}{r['ms'] / hand:>13.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tasks": args.tasks, "shots": args.shots, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
