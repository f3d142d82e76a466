"""What learned coefficients cost per meta-step: learned inner rates and learned tableaus against the same
tableau with fixed coefficients (sinusoid MLP, median of warm ``MetaOptimizer.step`` calls).

    python benchmarks/learned_cost.py [--device cpu|cuda] [--tasks 25] [--shots 10] [--repeats 100] [--json out.json]

Every variant runs in this one process, interleaved in rounds (each round times every variant once), so the
ratios to the fixed-coefficient step of the same tableau (``x fixed``) are what to read; absolute times on
a shared machine are noisy. On CUDA the rows with ``capture`` replay the whole step as a CUDA graph
(``capture=True``; a learned tableau is captured in second order).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from typing import Any

import torch
import torch.nn.functional as F

import rkfast

from _common import device_name, sync, timed_calls  # benchmarks/ is on sys.path when run as a script

# (label, tableau, options: "rates" a Rates and "learned" a LearnedTableau of the tableau, both in their JSON
# form, "capture"); the first row of each tableau is its fixed baseline
ORDER = {"pattern": "pattern", "weights": "order"}
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("fixed", "maml", {}),
    ("rates: scalar", "maml", {"rates": {"granularity": "scalar"}}),
    ("rates: tensor", "maml", {"rates": {"granularity": "tensor"}}),
    ("rates: element (Meta-SGD)", "maml", {"rates": {"granularity": "element"}}),
    ("fixed", "heun", {}),
    ("tableau: pattern, b fixed", "heun", {"learned": {"pattern": "pattern"}}),
    ("tableau: pattern, b by order", "heun", {"learned": ORDER}),
    ("fixed", "rk4", {}),
    ("tableau: pattern, b by order", "rk4", {"learned": ORDER}),
    ("tableau: full, b by order", "rk4", {"learned": {"pattern": "full", "weights": "order"}}),
    ("rates: element + tableau", "rk4", {"rates": {"granularity": "element"}, "learned": ORDER}),
]


def optimizer_arguments(tableau: str, options: dict[str, Any]) -> dict[str, Any]:
    """The MetaOptimizer keyword arguments of a variant's options."""
    learned = options.get("learned")
    return {"tableau": rkfast.LearnedTableau.from_json({"tableau": tableau, **learned}) if learned else tableau,
            "rates": rkfast.Rates.from_json(options["rates"]) if "rates" in options else None,
            "capture": options.get("capture", False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", type=int, default=25)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=100, help="timed steps per variant")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds the repeats are split into")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    batch = rkfast.tasks.SinusoidTasks(shots=args.shots).sample(args.tasks, torch.Generator().manual_seed(0))
    batch = rkfast.TaskBatch(*(t.to(device) for t in batch))
    variants = list(VARIANTS)
    if device.type == "cuda":  # whole-step CUDA graphs: fixed and learned rates
        variants += [("fixed, capture", "maml", {"capture": True}),
                     ("rates: element, capture", "maml", {"rates": {"granularity": "element"}, "capture": True}),
                     ("fixed, capture", "heun", {"capture": True}),
                     ("tableau: pattern, b by order, capture", "heun", {"learned": ORDER, "capture": True}),
                     ("fixed, capture", "rk4", {"capture": True}),
                     ("tableau: pattern, b by order, capture", "rk4", {"learned": ORDER, "capture": True})]
    steppers = []
    for label, tableau, kwargs in variants:
        torch.manual_seed(0)
        model = rkfast.models.sinusoid_mlp().to(device)
        opt = rkfast.MetaOptimizer(model, F.mse_loss, inner_lr=0.01, lr=1e-6, **optimizer_arguments(tableau, kwargs))
        for _ in range(5):  # warm-up (and the capture)
            opt.step(batch)
        sync(device)
        steppers.append(lambda opt=opt: opt.step(batch))
    times: list[list[float]] = [[] for _ in variants]
    per_round = max(1, args.repeats // args.rounds)
    for _ in range(args.rounds):
        for i, step in enumerate(steppers):
            times[i] += timed_calls(step, per_round, device)
    rows = []
    baseline: dict[str, float] = {}
    for (label, tableau, kwargs), t in zip(variants, times):
        ms = statistics.median(t) * 1e3
        key = tableau + (", capture" if kwargs.get("capture") else "")
        if label.startswith("fixed"):
            baseline[key] = ms
        rows.append({"tableau": tableau, "variant": label, "options": kwargs, "ms": ms,
                     "x_fixed": ms / baseline[key] if key in baseline else None})
    print(f"sinusoid MLP, {args.tasks} tasks x {args.shots} shots, second order, {device_name(device)}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'tableau':<8}{'variant':<40}{'ms/step':>9}{'x fixed':>9}")
    for r in rows:
        ratio = f"{r['x_fixed']:.3f}" if r["x_fixed"] is not None else "-"
        print(f"{r['tableau']:<8}{r['variant']:<40}{r['ms']:>9.3f}{ratio:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "tasks": args.tasks, "shots": args.shots,
                       "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
