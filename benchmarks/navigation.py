"""Reinforcement-learning speed: the navigation meta-step, what its time goes to, and the environment alone.

    python benchmarks/navigation.py [--tableaus maml,rk4] [--repeats 5] [--json benchmarks/results/navigation-cpu.json]
                                    [--quick] [--device cuda]

The registered ``navigation`` domain at its published settings (Finn et al. 2017): 2-D point navigation,
20 tasks per meta-batch, 20 episodes per task and stage, horizon 100, Gaussian MLP policy (2 x 100, ReLU),
inner step 0.1, Adam outside. For every tableau of ``--tableaus`` (second order; maml also first order) and
for both of rkfast's paths, the tasks together under ``vmap`` (what ``vectorize="auto"`` picks for this MLP;
the table marks the default) and task by task (``vectorize=False``):

* ``ms/step``: one ``MetaOptimizer.step`` on a fresh ``RolloutTasks.sample(20, generator)`` (the rollouts of
  every stage happen inside the step), the median step of ``--repeats`` after one warm-up step (the lower
  median for an even count);
* the split of that same step: ``rollouts`` (time inside the environment's ``rollout``, the policy's
  action sampling included), ``baselines`` (the rest of ``rollout_data``: discounted returns and the
  per-task linear baseline fits), and ``gradients`` (the step's time minus both: the stage losses, their
  derivatives, the RK arithmetic and the outer update), each in ms and as a share of the step. The pieces
  are timed by wrapping them for the benchmark only (restored afterwards); on CUDA the wrappers synchronize
  around each piece, which costs the step a little overlap;
* ``x loop``: the step's time over the task-by-task path's, same tableau and order.

A second table gives the environment's raw speed: environment steps (``T * E * H`` per rollout) per second
of ``PointNavigation.rollout`` for ``T * E = 400`` episodes at once, with a trivial actor (zero actions:
the simulation alone) and with the policy's actor (``batched_actor`` over 20 task rows).

``--quick`` (CI smoke): one repeat, maml only. Compare only ratios from one run (a shared machine's speed
drifts between runs); the header reports how many cores other processes used meanwhile, and the JSON
(``--json``) keeps every row with the torch version, thread count and device name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import time
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

import rkfast
import rkfast.tasks.rollouts as rollouts_module
from rkfast.optim import resolve_vectorize
from rkfast.rl.navigation import Trajectories
from rkfast.rl.policy import batched_actor
from rkfast.tasks import RolloutTasks, get_domain

from _common import device_name, median_ms, other_load, sync  # benchmarks/ is on sys.path when run as a script

DOMAIN = get_domain("navigation")
OPTIONS = DOMAIN.resolve_options({})  # the published settings: 20 episodes, horizon 100, 2 x 100 policy
DEFAULTS = DOMAIN.defaults_for(OPTIONS)
NUM_TASKS = DEFAULTS.meta_batch  # 20
PATHS = (("vmap", True), ("loop", False))  # rkfast's two paths: (label, vectorize)


# -- timing the pieces of a stage's data ---------------------------------------------------------------------


class PieceTimes:
    """Seconds spent in each piece of the stage data since the last :meth:`reset`, and how many calls."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rollout_s = 0.0
        self.baseline_s = 0.0
        self.rollouts = 0


class _TimedEnvironment:
    """The sampler's environment with its ``rollout`` timed into ``times`` (everything else forwarded)."""

    def __init__(self, env: Any, times: PieceTimes, device: torch.device) -> None:
        self._env, self._times, self._device = env, times, device

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)

    def rollout(self, act: Callable[[Tensor], Tensor], tasks: Tensor, episodes: int,
                seed: int | None = None) -> Trajectories:
        sync(self._device)
        start = time.perf_counter()
        traj = self._env.rollout(act, tasks, episodes, seed=seed)
        sync(self._device)
        self._times.rollout_s += time.perf_counter() - start
        self._times.rollouts += 1
        return traj


@contextlib.contextmanager
def timed_pieces(sampler: RolloutTasks, device: torch.device) -> Iterator[PieceTimes]:
    """Within the block, ``sampler``'s rollouts and :func:`~rkfast.tasks.rollouts.rollout_data` (the returns
    and baseline fits) add their time to the yielded :class:`PieceTimes`; both are restored afterwards."""
    times = PieceTimes()
    plain_env, plain_rollout_data = sampler.env, rollouts_module.rollout_data

    def timed_rollout_data(traj: Trajectories, discount: float) -> dict[str, Tensor]:
        sync(device)
        start = time.perf_counter()
        data = plain_rollout_data(traj, discount)
        sync(device)
        times.baseline_s += time.perf_counter() - start
        return data

    # StageRollouts looks up both at call time: the sampler's env attribute and the module's global function
    sampler.env = _TimedEnvironment(plain_env, times, device)  # type: ignore[assignment]
    rollouts_module.rollout_data = timed_rollout_data
    try:
        yield times
    finally:
        sampler.env = plain_env
        rollouts_module.rollout_data = plain_rollout_data


# -- the meta-step ----------------------------------------------------------------------------------------------


def make_optimizer(tableau: str, first_order: bool, vectorize: bool, device: torch.device) -> rkfast.MetaOptimizer:
    """The domain's policy (the same initialization for every contender) and optimizer at its defaults."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DOMAIN.make_model(OPTIONS).to(device)
    return rkfast.MetaOptimizer(model, None, tableau=tableau, inner_lr=DEFAULTS.inner_lr, outer="adam",
                                lr=DEFAULTS.lr, first_order=first_order, vectorize=vectorize)


def step_row(sampler: RolloutTasks, tableau: str, first_order: bool, label: str, vectorize: bool, repeats: int,
             device: torch.device) -> dict[str, Any]:
    """One contender's meta-step: the median of ``repeats`` timed steps (after one warm-up) and its split."""
    opt = make_optimizer(tableau, first_order, vectorize, device)
    generator = torch.Generator().manual_seed(0)  # every contender sees the same tasks and rollouts
    steps: list[tuple[float, float, float, int]] = []  # (step, rollouts, baselines) seconds, rollout calls
    with timed_pieces(sampler, device) as times:
        for i in range(1 + repeats):
            taskset = sampler.sample(NUM_TASKS, generator)  # drawing goals and a seed: not part of the step
            times.reset()
            sync(device)
            start = time.perf_counter()
            opt.step(taskset)
            sync(device)
            if i > 0:  # the first step warms up (allocations, vmap's tracing of the policy)
                steps.append((time.perf_counter() - start, times.rollout_s, times.baseline_s, times.rollouts))
    step_s, rollout_s, baseline_s, rollouts = sorted(steps)[(len(steps) - 1) // 2]  # the lower median step
    rest_s = step_s - rollout_s - baseline_s
    return {"tableau": tableau, "order": "first" if first_order else "second", "path": label,
            "vectorize": opt.vectorize, "default": opt.vectorize == resolve_vectorize("auto", opt.model, device),
            "ms": 1e3 * step_s, "rollouts_per_step": rollouts,
            "rollouts_ms": 1e3 * rollout_s, "rollouts_share": rollout_s / step_s,
            "baselines_ms": 1e3 * baseline_s, "baselines_share": baseline_s / step_s,
            "gradients_ms": 1e3 * rest_s, "gradients_share": rest_s / step_s,
            "all_ms": [1e3 * s[0] for s in steps]}


def step_rows(sampler: RolloutTasks, tableaus: list[str], repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """Every tableau at second order (maml also at first order), both paths; ``x_loop`` within each pair."""
    configs = [(t, False) for t in tableaus] + [(t, True) for t in tableaus if t == "maml"]
    rows = []
    for tableau, first_order in configs:
        pair = [step_row(sampler, tableau, first_order, label, vectorize, repeats, device)
                for label, vectorize in PATHS]
        loop_ms = next(r["ms"] for r in pair if not r["vectorize"])
        for r in pair:
            r["x_loop"] = r["ms"] / loop_ms
        rows += pair
    return rows


# -- the environment alone --------------------------------------------------------------------------------------


def env_rows(sampler: RolloutTasks, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """Environment steps per second of one rollout of ``T * E`` episodes, with zero actions and with the
    policy's actor (every task row the policy's own parameters)."""
    env, episodes = sampler.env, sampler.episodes
    goals = env.sample_tasks(NUM_TASKS, torch.Generator().manual_seed(0), device=device, dtype=sampler.policy_dtype)
    row = sampler.layout.flatten([p.detach() for p in sampler.policy.parameters()])
    policy_actor = batched_actor(sampler.policy, sampler.layout, row.expand(NUM_TASKS, -1),
                                 torch.Generator().manual_seed(0))
    actors: dict[str, Callable[[Tensor], Tensor]] = {"zero actions": torch.zeros_like,
                                                     f"policy (batched_actor, {NUM_TASKS} rows)": policy_actor}
    steps = NUM_TASKS * episodes * env.horizon
    rows = []
    for label, act in actors.items():
        ms = median_ms(lambda: env.rollout(act, goals, episodes), max(repeats, 3), warmup=1, device=device)
        rows.append({"actor": label, "tasks": NUM_TASKS, "episodes": episodes, "horizon": env.horizon,
                     "env_steps": steps, "ms": ms, "steps_per_s": steps / (ms * 1e-3),
                     "us_per_time_step": 1e3 * ms / env.horizon})
    return rows


# -- the report ------------------------------------------------------------------------------------------------


def print_tables(steps: list[dict[str, Any]], envs: list[dict[str, Any]], header: str) -> None:
    print(header)
    print(f"{'tableau':<9}{'order':<8}{'path':<16}{'ms/step':>9}{'x loop':>8}{'rollouts':>9}"
          f"{'rollout ms':>11}{'%':>5}{'baseline ms':>12}{'%':>5}{'gradient ms':>12}{'%':>5}")
    for r in steps:
        path = r["path"] + (" (default)" if r["default"] else "")
        print(f"{r['tableau']:<9}{r['order']:<8}{path:<16}{r['ms']:>9.1f}{r['x_loop']:>8.2f}{r['rollouts_per_step']:>9}"
              f"{r['rollouts_ms']:>11.1f}{100 * r['rollouts_share']:>5.0f}{r['baselines_ms']:>12.1f}"
              f"{100 * r['baselines_share']:>5.0f}{r['gradients_ms']:>12.1f}{100 * r['gradients_share']:>5.0f}")
    e = envs[0]
    print(f"\nenvironment alone: one rollout of {e['tasks']} tasks x {e['episodes']} episodes x {e['horizon']} steps "
          f"({e['env_steps']} environment steps)")
    print(f"{'actor':<34}{'ms/rollout':>11}{'us/time step':>13}{'env steps/s':>14}")
    for r in envs:
        print(f"{r['actor']:<34}{r['ms']:>11.1f}{r['us_per_time_step']:>13.1f}{r['steps_per_s']:>14.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tableaus", default="maml,rk4", help="comma-separated tableau names")
    parser.add_argument("--repeats", type=int, default=5, help="timed meta-steps per contender")
    parser.add_argument("--quick", action="store_true", help="one repeat, maml only (CI smoke)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default="cpu", help="torch device (cuda: through benchmarks/gpu_check.sh)")
    args = parser.parse_args()
    tableaus = ["maml"] if args.quick else [t.strip() for t in args.tableaus.split(",") if t.strip()]
    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    device = torch.device(args.device)
    sampler = DOMAIN.make_tasks(OPTIONS, "train", device)
    # the other processes' load over the whole run: with the benchmark's own threads busy, any is noise
    with other_load(resource.RUSAGE_SELF) as load:
        steps = step_rows(sampler, tableaus, repeats, device)
        envs = env_rows(sampler, repeats, device)
    where = device_name(device)
    threads = torch.get_num_threads()
    header = (f"torch {torch.__version__}, {where}" + (f", {threads} threads" if device.type == "cpu" else "")
              + f"; other processes used {load['other_cores']:.1f} cores; navigation meta-steps of {NUM_TASKS} "
              f"tasks, {sampler.episodes} episodes x {sampler.env.horizon} steps per task and stage, "
              f"median of {repeats}")
    print_tables(steps, envs, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": where, "threads": threads,
                       "other_cores": load["other_cores"], "repeats": repeats, "options": OPTIONS,
                       "meta_batch": NUM_TASKS, "inner_lr": DEFAULTS.inner_lr, "lr": DEFAULTS.lr,
                       "step_rows": steps, "env_rows": envs}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
