"""The memory levers (rkfast.Memory): task chunks and stage recomputation give the plain step to 1e-12 in
float64 on every path (vmap and loop, first and second order, learned rates and tableaus, per-stage data,
per-step norms, dropout); mixed precision stays within a stated tolerance of float32; bad settings are
refused with errors that name them. The process-group case is in tests/test_distributed.py."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_batch, refused_in_one_line, regression_batch, smooth_mlp
from test_navigation import small_tasks
from torch import nn

import rkfast
from rkfast import LearnedTableau, Memory, MetaOptimizer, Rates
from rkfast import functional as RF
from rkfast.memory import task_ranges
from rkfast.models import conv4, sinusoid_mlp
from rkfast.rl.policy import GaussianMLPPolicy

EXACT = dict(rtol=0, atol=1e-12)


def assert_same_step(out: RF.MetaStepOutput, ref: RF.MetaStepOutput, **tol) -> None:
    """Direction, loss, per-stage losses and metrics, coefficient directions equal within ``tol``."""
    tol = tol or EXACT
    torch.testing.assert_close(out.direction, ref.direction, **tol)
    torch.testing.assert_close(out.loss, ref.loss, **tol)
    assert out.stage_losses.keys() == ref.stage_losses.keys()
    for j in ref.stage_losses:
        torch.testing.assert_close(out.stage_losses[j], ref.stage_losses[j], **tol)
    assert out.stage_metrics.keys() == ref.stage_metrics.keys()
    for name, by_stage in ref.stage_metrics.items():
        for j, value in by_stage.items():  # metrics are float32 means
            torch.testing.assert_close(out.stage_metrics[name][j], value, rtol=0, atol=1e-6)
    assert len(out.coefficient_directions) == len(ref.coefficient_directions)
    for a, b in zip(out.coefficient_directions, ref.coefficient_directions, strict=True):
        torch.testing.assert_close(a, b, **tol)


def plain(**options) -> Memory:
    """The unchunked, unrecomputed step (one chunk of every task, also on the task-by-task path)."""
    return Memory(task_chunk=10**6, **options)


# -- settings and errors --------------------------------------------------------------------------------


def test_task_ranges_cover_the_tasks_in_order():
    assert task_ranges(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert task_ranges(4, 4) == [(0, 4)]
    assert task_ranges(3, 7) == [(0, 3)]


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        (dict(task_chunk=0), ValueError, "task_chunk"),
        (dict(task_chunk=2.0), TypeError, "task_chunk"),
        (dict(task_chunk=True), TypeError, "task_chunk"),
        (dict(recompute=1), TypeError, "recompute"),
        (dict(amp="fp8"), ValueError, "amp"),
    ],
)
def test_bad_settings_are_named(kwargs, error, text):
    with pytest.raises(error, match=text):
        Memory(**kwargs)


def test_default_chunks():
    m = Memory()
    assert m.chunk_size(8, vectorize=True, callable_data=False) == 8
    assert m.chunk_size(8, vectorize=False, callable_data=False) == 1  # the per-task backward
    assert m.chunk_size(8, vectorize=False, callable_data=True) == 8  # no extra pass by default
    assert Memory(task_chunk=3).chunk_size(8, vectorize=True, callable_data=True) == 3


def test_recompute_needs_second_order_and_no_capture():
    model = smooth_mlp()
    with pytest.raises(ValueError, match="recompute=True.*second order"):
        MetaOptimizer(model, F.mse_loss, first_order=True, memory=Memory(recompute=True))
    with pytest.raises(ValueError, match="recompute=True.*capture"):
        MetaOptimizer(model, F.mse_loss, capture="auto", memory=Memory(recompute=True))
    with pytest.raises(TypeError, match="memory must be a rkfast.Memory"):
        MetaOptimizer(model, F.mse_loss, memory={"task_chunk": 2})
    theta = torch.zeros(RF.ParamLayout.from_module(model).numel, dtype=torch.float64)
    loss = RF.module_task_loss(model, F.mse_loss)
    batch = regression_batch()
    with pytest.raises(ValueError, match="second order"):
        RF.rk_meta_step(
            theta, loss, loss, batch.support, batch.query, "maml", 0.1, first_order=True, memory=Memory(recompute=True)
        )
    with pytest.raises(ValueError, match="--recompute.*second order"):  # the training settings say the same
        rkfast.train.TrainConfig(recompute=True, first_order=True).resolved()


# -- exactness: the functional core -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "tableau, first_order, vectorize", list(itertools.product(["maml", "rk4", "maml(3)"], [False, True], [True, False]))
)
def test_chunks_and_recomputation_equal_the_plain_step(tableau, first_order, vectorize):
    model = smooth_mlp()
    theta = RF.ParamLayout.from_module(model).flatten(list(model.parameters())).detach()
    batch = regression_batch(tasks=5)

    def step(memory):
        return RF.meta_step(model, F.mse_loss, theta, batch, tableau, 0.1, first_order=first_order,
                            vectorize=vectorize, memory=memory)

    ref = step(plain())
    levers = [Memory(task_chunk=2), Memory(task_chunk=1), None]  # None: the default (per task on the loop path)
    if not first_order:
        levers += [Memory(recompute=True), Memory(task_chunk=3, recompute=True)]
    for memory in levers:
        assert_same_step(step(memory), ref)
    assert ref.direction.abs().max() > 1e-3


@pytest.mark.parametrize("vectorize", [True, False])
def test_classification_metrics_per_stage_norms_and_dropout(vectorize):
    """conv4 with MAML++'s per-step batch norm (recomputed stages use their own step's row) and dropout
    (recomputed stages draw the masks they drew the first time)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        *conv4(1, 3, hidden=4, image_size=16, per_step_norm=4)[:-1], nn.Dropout(0.3), nn.Linear(4, 3)
    ).double()
    opt = lambda memory: MetaOptimizer(
        model,
        F.cross_entropy,
        tableau="rk4",
        inner_lr=0.1,  # noqa: E731
        vectorize=vectorize,
        memory=memory,
    )
    batch = classification_batch(tasks=4)

    def step(memory: Memory):
        torch.manual_seed(5)  # the dropout masks of one step
        return opt(memory).compute(batch)

    ref = step(plain())
    assert "accuracy" in ref.stage_metrics
    assert_same_step(step(plain(recompute=True)), ref)
    # chunks draw random masks in another order (the docs say so): without dropout they are exact too
    model.eval()
    assert_same_step(step(Memory(task_chunk=3, recompute=True)), step(plain()))


# -- exactness: learned coefficients, per-stage data, the optimizer -------------------------------------------


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", [True, False])
def test_learned_rates_and_tableau(first_order, vectorize):
    model = smooth_mlp()
    batch = regression_batch(tasks=5)
    settings = [
        dict(rates=Rates("tensor", per_stage=True)),
        dict(tableau=LearnedTableau("rk4", "pattern", "order"), rates=Rates("element")),
        dict(tableau=LearnedTableau("heun", "full")),
    ]
    for setting in settings:

        def step(memory: Memory):
            opt = MetaOptimizer(
                model,
                F.mse_loss,
                inner_lr=0.1,
                first_order=first_order,
                vectorize=vectorize,
                memory=memory,
                **{"tableau": "rk4", **setting},
            )
            return opt.compute(batch)

        ref = step(plain())
        assert ref.coefficient_directions
        assert_same_step(step(Memory(task_chunk=2)), ref)
        if not first_order:
            assert_same_step(step(Memory(task_chunk=3, recompute=True)), ref)


class CountedStages:
    """A stage callable that counts its calls."""

    def __init__(self, data):
        self.data, self.calls = data, []

    def __call__(self, stage, params):
        self.calls.append((stage, params.shape[0]))
        return self.data(stage, params)


@pytest.mark.parametrize("first_order", [False, True])
def test_per_stage_rollouts(first_order):
    """Reinforcement learning: a TaskSet whose data are rollouts of each stage's policy. Chunks call the
    rollouts once per stage for the whole meta-batch, as the plain step does."""
    tasks = small_tasks()

    def step(memory: Memory, vectorize: bool = True):
        taskset = tasks.sample(5, torch.Generator().manual_seed(2))
        support, query = CountedStages(taskset.support_data), CountedStages(taskset.query_data)
        torch.manual_seed(0)
        model = GaussianMLPPolicy(2, 2, hidden=(8, 8)).double()
        opt = MetaOptimizer(
            model, None, tableau="rk4", inner_lr=0.1, first_order=first_order, vectorize=vectorize, memory=memory
        )
        out = opt.compute(rkfast.TaskSet(taskset.support_loss, taskset.query_loss, support, query, num_tasks=5))
        return out, support.calls, query.calls

    ref, support_calls, query_calls = step(plain())
    assert support_calls and all(n == 5 for _, n in support_calls + query_calls)
    levers = [Memory(task_chunk=2)] + ([] if first_order else [Memory(task_chunk=2, recompute=True)])
    for memory in levers:
        out, s, q = step(memory)
        assert (s, q) == (support_calls, query_calls)
        assert_same_step(out, ref)
    out, s, q = step(Memory(task_chunk=2), vectorize=False)
    assert (s, q) == (support_calls, query_calls)
    assert_same_step(out, ref, rtol=1e-9, atol=1e-12)  # vmap and loop agree to this (tests/test_navigation.py)


def test_optimizer_steps_and_state_match():
    """Three chunked, recomputed steps move the parameters and the Adam state as the plain steps do."""
    batches = [regression_batch(tasks=6) for _ in range(3)]

    def run(memory: Memory):
        torch.manual_seed(0)
        model = smooth_mlp()
        opt = MetaOptimizer(model, F.mse_loss, tableau="rk4", inner_lr=0.1, lr=0.01, memory=memory)
        for batch in batches:
            opt.step(batch)
        return opt.meta_parameters(), opt.state_dict()["state"][0]["exp_avg_sq"]

    params, state = run(plain())
    params2, state2 = run(Memory(task_chunk=4, recompute=True))
    torch.testing.assert_close(params2, params, **EXACT)
    torch.testing.assert_close(state2, state, rtol=1e-10, atol=0)


# -- mixed precision ----------------------------------------------------------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


# the stated tolerances of an autocast step against float32 (sinusoid MLP, heun, learned per-tensor rates):
# the direction's and the rates' direction's cosine with float32's, and the meta-loss's relative error.
# Over 40 seeds the worst were 0.9964 / 0.9985 / 5.6e-4 (bf16) and 0.99951 / 0.999997 / 2.2e-4 (fp16).
AMP_TOLERANCE = {"bf16": (0.99, 2e-3), "fp16": (0.998, 1e-3)}


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_step_is_close_to_float32(amp):
    """bf16/fp16 activations (the CPU has both under torch.autocast): the meta-direction, the learned rates'
    direction and the losses stay within :data:`AMP_TOLERANCE` of float32's; parameters, direction and
    losses stay float32."""
    model = sinusoid_mlp()
    batch = regression_batch(tasks=4, shots=10, query=10, dtype=torch.float32)

    def step(memory: Memory):
        opt = MetaOptimizer(model, F.mse_loss, tableau="heun", inner_lr=0.1, rates=Rates("tensor"), memory=memory)
        return opt.compute(batch)

    ref, out = step(Memory()), step(Memory(amp=amp))
    least_cosine, loss_rtol = AMP_TOLERANCE[amp]
    assert out.direction.dtype == torch.float32 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=loss_rtol, atol=0)
    for j in ref.stage_losses:
        torch.testing.assert_close(out.stage_losses[j], ref.stage_losses[j], rtol=loss_rtol, atol=0)
    assert cosine(out.direction, ref.direction) > least_cosine
    (rate_dir,), (rate_ref,) = out.coefficient_directions, ref.coefficient_directions
    assert cosine(rate_dir.flatten(), rate_ref.flatten()) > least_cosine
    assert not torch.equal(out.direction, ref.direction)  # autocast did change the arithmetic


def test_autocast_losses_keep_their_checks():
    """A loss under autocast is still refused when it is not a scalar per task, naming the problem."""
    model = smooth_mlp(dtype=torch.float32)
    opt = MetaOptimizer(model, lambda out, y: F.mse_loss(out, y, reduction="none"), memory=Memory(amp="bf16"))
    with pytest.raises(ValueError, match="scalar"):
        opt.compute(regression_batch(dtype=torch.float32))


# -- the command line -----------------------------------------------------------------------------------------


def test_cli_flags_reach_the_run_and_its_config(tmp_path, capsys):
    import json

    from rkfast.cli import main

    out = tmp_path / "run"
    main(
        [
            "train",
            "sinusoid",
            "--iterations",
            "2",
            "--meta-batch",
            "3",
            "--eval-tasks",
            "2",
            "--test-tasks",
            "2",
            "--task-chunk",
            "2",
            "--recompute",
            "--amp",
            "bf16",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    config = json.loads((out / "config.json").read_text())
    assert (config["task_chunk"], config["recompute"], config["amp"]) == (2, True, "bf16")
    refused_in_one_line(
        ["train", "sinusoid", "--task-chunk", "0", "--out", str(tmp_path / "x")], capsys, "--task-chunk"
    )
    refused_in_one_line(
        ["train", "sinusoid", "--recompute", "--first-order", "--out", str(tmp_path / "y")],
        capsys,
        "(--recompute) needs second order",
    )
    bad = dict(config, task_chunk="4")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    refused_in_one_line(
        ["train", "sinusoid", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "z")],
        capsys,
        "task_chunk",
    )


@pytest.mark.parametrize("task_set", [False, True])
def test_evaluate_in_chunks_equals_all_at_once(task_set):
    """Meta-test adaptation of independent tasks: chunks give every task's result as before."""
    model = smooth_mlp()
    batch = regression_batch(tasks=5)
    if task_set:
        loss = lambda model, data: F.mse_loss(model(data[0]), data[1])  # noqa: E731
        batch = rkfast.TaskSet(loss, loss, batch.support, batch.query)

    def evaluate(memory: Memory):
        opt = MetaOptimizer(model, F.mse_loss, tableau="rk4", inner_lr=0.1, memory=memory)
        return opt.evaluate(batch, steps=(1, 3), keep_params=True)

    ref, out = evaluate(Memory()), evaluate(Memory(task_chunk=2))
    assert out.losses.shape == ref.losses.shape == (3, 5)
    torch.testing.assert_close(out.losses, ref.losses, **EXACT)
    torch.testing.assert_close(out.params, ref.params, **EXACT)


def test_memory_round_trips_through_json():
    memory = Memory(task_chunk=3, recompute=True, amp="bf16")
    assert Memory.from_json(memory.to_json()) == memory
    assert Memory().to_json() == {"task_chunk": None, "recompute": False, "amp": None}


def test_recomputation_is_not_bypassed_by_the_one_pass_step(monkeypatch):
    """The one-vmap step of the CPU (rkfast.taskmap.stage_query_losses) keeps every stage's graph: with
    recompute=True it must not run."""

    def refuse(*args, **kwargs):
        raise AssertionError("the one-pass step ran with recompute=True")

    monkeypatch.setattr(RF, "stage_query_losses", refuse)
    model = smooth_mlp()
    # the pure-PyTorch kernels: where the one-pass step would otherwise run (tests/test_one_pass.py)
    opt = MetaOptimizer(
        model, F.mse_loss, tableau="rk4", inner_lr=0.1, vectorize=True, memory=Memory(recompute=True), backend="torch"
    )
    assert opt.compute(regression_batch(tasks=3)).direction.abs().max() > 0
