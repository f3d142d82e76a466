"""TaskBatch adapters for batches of loaders people already have: torchmeta dicts and per-task tuples."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import classification_batch, same_bits, smooth_mlp
from rkfast import MetaOptimizer, TaskBatch, models


def per_task(batch: TaskBatch) -> list[tuple[torch.Tensor, ...]]:
    """The batch as a loader that yields one task at a time would: ``(sx, sy, qx, qy)`` per task."""
    return [tuple(t[i] for t in batch) for i in range(batch.num_tasks)]


def torchmeta_dict(batch: TaskBatch) -> dict:
    """The batch as torchmeta's BatchMetaDataLoader yields it (lists, from its default collate)."""
    return {"train": [batch.support_x, batch.support_y], "test": [batch.query_x, batch.query_y]}


def assert_same_batch(adapted: TaskBatch, expected: TaskBatch) -> None:
    assert isinstance(adapted, TaskBatch)
    for a, e in zip(adapted, expected, strict=True):
        assert same_bits(a, e)


def test_from_torchmeta_is_the_hand_built_batch():
    batch = classification_batch()
    adapted = TaskBatch.from_torchmeta({**torchmeta_dict(batch), "extra": "ignored"})
    assert_same_batch(adapted, batch)
    assert adapted.support_x is batch.support_x  # nothing copied


def test_from_tasks_stacks_the_tasks():
    batch = classification_batch(tasks=4)
    assert_same_batch(TaskBatch.from_tasks(per_task(batch)), batch)
    assert_same_batch(TaskBatch.from_tasks(iter(per_task(batch))), batch)  # any iterable of tasks


@pytest.mark.parametrize("adapter", ["torchmeta", "tasks"])
@pytest.mark.parametrize("first_order", [False, True])
def test_a_step_on_the_adapted_batch_equals_the_hand_built_one(adapter, first_order):
    model = models.conv4(in_channels=1, num_classes=3, hidden=4, image_size=16).double()
    batch = classification_batch()
    adapted = (TaskBatch.from_torchmeta(torchmeta_dict(batch)) if adapter == "torchmeta"
               else TaskBatch.from_tasks(per_task(batch)))
    results = []
    for b in (batch, adapted):
        m = copy.deepcopy(model)
        opt = MetaOptimizer(m, F.cross_entropy, tableau="maml", inner_lr=0.1, first_order=first_order)
        out = opt.step(b)
        results.append((out.loss, opt.meta_parameters()))
    assert same_bits(results[0][0], results[1][0])
    assert same_bits(results[0][1], results[1][1])


def test_from_tasks_refuses_unequal_shot_counts_and_says_how_to_group():
    tasks = per_task(classification_batch(tasks=4, shots=1))
    sx, sy, qx, qy = tasks[3]
    tasks[3] = (torch.cat([sx] * 5), torch.cat([sy] * 5), qx, qy)  # 5 support examples, the others 3 (3-way 1-shot)
    with pytest.raises(ValueError, match=r"task 3 has 15 support examples, task 0 has 3: .*group tasks by shot count"):
        TaskBatch.from_tasks(tasks)
    tasks[3] = (sx, sy, qx[:2], qy[:2])
    with pytest.raises(ValueError, match="task 3 has 2 query examples, task 0 has 12"):
        TaskBatch.from_tasks(tasks)


@pytest.mark.parametrize(("field", "change", "error", "message"), [
    (0, lambda t: t.float(), TypeError, "task 2's support_x has dtype torch.float32, task 0's torch.float64"),
    (1, lambda t: t.int(), TypeError, "task 2's support_y has dtype torch.int32"),
    (2, lambda t: t[:, :, :8], ValueError,
     r"task 2's query_x has examples of shape \(1, 8, 16\), task 0's \(1, 16, 16\)"),
    (3, lambda t: t[:3], ValueError, "task 2 has 12 query inputs but 3 query targets"),
    (0, lambda t: t.to("meta"), RuntimeError, "task 2's support_x is on meta, task 0's on cpu"),
])
def test_from_tasks_names_the_task_that_does_not_fit(field, change, error, message):
    tasks = [list(t) for t in per_task(classification_batch(tasks=3))]
    tasks[2][field] = change(tasks[2][field])
    with pytest.raises(error, match=message):
        TaskBatch.from_tasks(tasks)


def test_from_tasks_refuses_what_is_not_tasks():
    batch = classification_batch()
    with pytest.raises(ValueError, match="at least one task"):
        TaskBatch.from_tasks([])
    with pytest.raises(TypeError, match="task 1 must be"):
        TaskBatch.from_tasks([per_task(batch)[0], per_task(batch)[1][:3]])
    with pytest.raises(TypeError, match="task 0 must be"):
        TaskBatch.from_tasks([torch.zeros(4, 2)])
    with pytest.raises(ValueError, match="task 0's support_y needs an example dimension"):
        TaskBatch.from_tasks([(torch.zeros(2, 1), torch.tensor(0), torch.zeros(2, 1), torch.zeros(2))])


def test_from_torchmeta_refuses_other_layouts():
    batch = classification_batch()
    with pytest.raises(KeyError, match="no 'test' split"):
        TaskBatch.from_torchmeta({"train": batch.support})
    with pytest.raises(TypeError, match="dict"):
        TaskBatch.from_torchmeta(tuple(batch))
    with pytest.raises(TypeError, match=r"batch\['train'\] must be an \(inputs, targets\) pair"):
        TaskBatch.from_torchmeta({"train": batch.support_x, "test": batch.query})
    with pytest.raises(ValueError, match="task and an example dimension"):
        TaskBatch.from_torchmeta({"train": (batch.support_x[0, 0, 0, 0], batch.support_y), "test": batch.query})
    with pytest.raises(ValueError, match="task dimension"):
        TaskBatch.from_torchmeta({"train": batch.support, "test": (batch.query_x[:2], batch.query_y[:2])})


def test_adapted_regression_batch_steps_like_the_hand_built_one():
    model = smooth_mlp()
    batch = TaskBatch(*(torch.randn(3, n, 1, dtype=torch.float64) for n in (5, 5, 6, 6)))
    outs = [MetaOptimizer(copy.deepcopy(model), F.mse_loss, tableau="rk4", inner_lr=0.1).compute(b).direction.clone()
            for b in (batch, TaskBatch.from_tasks(per_task(batch)))]
    assert same_bits(outs[0], outs[1])
