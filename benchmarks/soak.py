"""Soak test: a long sinusoid run with periodic evaluation and checkpoints; memory and open files stay flat.

    python benchmarks/soak.py [--iterations 10000] [--sample-every 100] [--checkpoint-every 250]
                              [--json benchmarks/results/soak-cpu.json] [--plot benchmarks/results/soak-cpu.png]

The run is the library's own training loop (``rkfast.train.train`` with a run folder, so it checkpoints
atomically every ``--checkpoint-every`` steps, writes ``best.pt`` on each new best held-out result and
``results.json`` each time). Every ``--sample-every`` meta-steps it records this process's resident memory
(VmRSS, and its anonymous part) and the number of open file descriptors. After the warm-up (the first
``--warmup`` fraction of the run) the resident memory must stay within ``--max-growth-mib`` of its level at
the end of the warm-up, and the open files must not grow: the verdict says which held, and the exit code
is 1 if one did not (``--quick`` runs a short smoke version for CI, without a verdict on growth).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import RESULTS_DIR, anon_kb, proc_status_kb  # benchmarks/ is on sys.path when run as a script
from rkfast.train import TrainConfig, train


def open_files() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10000)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the run before memory must be flat")
    parser.add_argument("--max-growth-mib", type=float, default=8.0)
    parser.add_argument("--no-folder", action="store_true",
                        help="train without a run folder (no checkpoints or results files): the step loop alone")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI): 600 steps, no growth verdict")
    parser.add_argument("--json", default=str(RESULTS_DIR / "soak-cpu.json"))
    parser.add_argument("--plot", default=str(RESULTS_DIR / "soak-cpu.png"))
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.sample_every, args.checkpoint_every, args.eval_every = 600, 50, 100, 200
        args.json = args.plot = None

    samples: list[dict[str, float]] = []
    start = time.perf_counter()

    def sample(done: int, loss: torch.Tensor) -> None:
        if done % args.sample_every == 0 or done == 1:
            status = proc_status_kb()
            samples.append({"step": done, "seconds": time.perf_counter() - start, "rss_mib": status["VmRSS"] / 1024,
                            "anon_mib": anon_kb(status) / 1024, "open_files": open_files()})

    cfg = TrainConfig("sinusoid", iterations=args.iterations, eval_every=args.eval_every, eval_tasks=100,
                      test_tasks=100)
    with tempfile.TemporaryDirectory() as out:
        run = train(cfg, out=None if args.no_folder else out, checkpoint_every=args.checkpoint_every,
                    progress=sys.stderr.isatty(), on_step=sample)
        checkpoints = sorted(p.name for p in Path(out).iterdir()) or ["none"]

    warm = [s for s in samples if s["step"] >= args.warmup * args.iterations]
    base = warm[0]
    growth = max(s["rss_mib"] for s in warm) - base["rss_mib"]
    anon_growth = max(s["anon_mib"] for s in warm) - base["anon_mib"]
    files_growth = max(s["open_files"] for s in warm) - base["open_files"]
    print(f"{args.iterations} sinusoid meta-steps ({run.ms_per_step:.2f} ms each), evaluation every "
          f"{args.eval_every}, checkpoint every {args.checkpoint_every}; files left: {', '.join(checkpoints)}")
    print(f"{'step':>7} {'s':>7} {'RSS MiB':>9} {'anon MiB':>9} {'open files':>11}")
    every = max(1, len(samples) // 20)
    for s in samples[::every] + ([samples[-1]] if (len(samples) - 1) % every else []):
        print(f"{s['step']:>7} {s['seconds']:>7.1f} {s['rss_mib']:>9.1f} {s['anon_mib']:>9.1f} {s['open_files']:>11}")
    flat_memory = growth <= args.max_growth_mib
    flat_files = files_growth <= 0
    print(f"after warm-up (step {base['step']}): RSS grew {growth:+.1f} MiB (anonymous {anon_growth:+.1f} MiB; "
          f"limit {args.max_growth_mib:g}), open files {files_growth:+d}")
    if not args.quick:
        print(f"verdict: memory {'flat' if flat_memory else 'GROWS'}, open files {'flat' if flat_files else 'GROW'}")

    if args.json:
        result = {
            "benchmark": "soak", "machine": platform.node(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "iterations": args.iterations, "checkpoint_every": args.checkpoint_every,
            "eval_every": args.eval_every, "run_folder": not args.no_folder, "ms_per_meta_step": run.ms_per_step, "warmup_step": base["step"],
            "rss_growth_mib": growth, "anon_growth_mib": anon_growth, "open_files_growth": files_growth,
            "flat_memory": flat_memory, "flat_files": flat_files, "samples": samples,
        }
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        from rkfast.figures import new_figure, save_figure

        fig = new_figure(figsize=(8, 4))
        ax = fig.add_subplot(1, 1, 1)
        steps = [s["step"] for s in samples]
        ax.plot(steps, [s["rss_mib"] for s in samples], label="resident (VmRSS)")
        ax.plot(steps, [s["anon_mib"] for s in samples], label="anonymous")
        ax.axvline(base["step"], color="grey", ls=":", label="end of warm-up")
        ax.set(xlabel="meta-step", ylabel="MiB", title=f"soak: {args.iterations} sinusoid meta-steps with checkpoints")
        ax.legend(fontsize=8)
        save_figure(fig, args.plot)
        print(f"wrote {args.plot}")
    return 0 if args.quick or (flat_memory and flat_files) else 1


if __name__ == "__main__":
    sys.exit(main())
