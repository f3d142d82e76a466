"""Small models and random task batches shared by the tests (fresh randomness: conftest seeds each test)."""

from __future__ import annotations

import io

import torch
from torch import nn

from rkfast import TaskBatch
from rkfast.functional import ParamLayout


def smooth_mlp(hidden: int = 8, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A small tanh MLP: smooth, so finite differences of second-order quantities are accurate."""
    return nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(dtype)


def regression_batch(tasks: int = 3, shots: int = 5, query: int = 6, dtype: torch.dtype = torch.float64) -> TaskBatch:
    return TaskBatch(
        torch.randn(tasks, shots, 1, dtype=dtype),
        torch.randn(tasks, shots, 1, dtype=dtype),
        torch.randn(tasks, query, 1, dtype=dtype),
        torch.randn(tasks, query, 1, dtype=dtype),
    )


def classification_batch(tasks: int = 3, ways: int = 3, shots: int = 2, query: int = 4, size: int = 16,
                         dtype: torch.dtype = torch.float64) -> TaskBatch:
    return TaskBatch(
        torch.randn(tasks, ways * shots, 1, size, size, dtype=dtype),
        torch.randint(0, ways, (tasks, ways * shots)),
        torch.randn(tasks, ways * query, 1, size, size, dtype=dtype),
        torch.randint(0, ways, (tasks, ways * query)),
    )


def flat_theta(model: nn.Module) -> tuple[ParamLayout, torch.Tensor]:
    layout = ParamLayout.from_module(model)
    return layout, layout.flatten(list(model.parameters())).detach()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    """Everything a failed call must leave as it was: parameter values, each ``.grad`` (or ``None``), and
    the serialized optimizer state dict (outer state, param groups, tableau)."""
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return params, grads, buf.getvalue()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (NaN payloads and signed zeros included)."""
    as_bytes = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def assert_unchanged(model: nn.Module, opt: torch.optim.Optimizer, snap) -> None:
    """Parameters, ``.grad`` (``None`` kept as ``None``) and the optimizer state equal ``snap`` bit for bit."""
    params, grads, state = snap
    for p, q in zip(model.parameters(), params, strict=True):
        assert same_bits(p, q), "a parameter changed"
    for p, g in zip(model.parameters(), grads, strict=True):
        assert (p.grad is None) == (g is None), ".grad None-ness changed"
        assert p.grad is None or same_bits(p.grad, g), ".grad changed"
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    assert buf.getvalue() == state, "the optimizer state changed"


# -- kernel tests: poisoned outputs and a cancellation-aware tolerance ------------------------------------

KERNEL_RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def nan_filled(shape, dtype, device) -> torch.Tensor:
    """An output buffer poisoned with NaN: an element a kernel forgets to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_kernel_close(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype) -> None:
    """``|out - ref| <= rtol |ref| + 8 eps * bound`` elementwise, where ``bound`` is the same sum taken over
    absolute values (so cancellation does not make a correct float32 result look wrong)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any(), "an element was not written (NaN poison left)"
    err = (out.double() - ref.double()).abs()
    tol = KERNEL_RTOL[dtype] * ref.double().abs() + 8 * torch.finfo(dtype).eps * bound.double()
    worst = (err - tol).argmax()
    assert bool((err <= tol).all()), f"max excess at {int(worst)}: |{out.flatten()[worst]} - {ref.flatten()[worst]}|"


def refused_in_one_line(argv: list[str], capsys, *needles: str) -> str:
    """The command line (``rkfast.cli.main``) must exit 2 with a one-line error naming ``needles``; returns
    its stderr."""
    from rkfast.cli import main

    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err
