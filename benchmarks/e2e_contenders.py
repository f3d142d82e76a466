"""The end-to-end benchmark's contenders: each builds a zero-argument meta-step from a :class:`Setup`.

``loop`` (the per-task autograd loop most repositories write), the peer libraries in their documented MAML
patterns (``higher``, ``torchopt``, ``learn2learn``), ``vmap`` (a hand-written ``torch.func`` step for any
tableau) and rkfast's ``MetaOptimizer`` in its configurations. :data:`CONTENDERS` lists them with where they
apply; ``benchmarks/e2e.py``'s docstring describes each.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.func import grad, vmap

import rkfast
from rkfast._norms import exact_norms
from rkfast.optim import resolve_vectorize

from e2e_peers import NotAvailable, load_peer
from e2e_workloads import OUTER_LR, Setup, has_norm_layers

Step = Callable[[], None]

CAPTURE_WARMUP = 4  # StepCapture's two eager warm-up steps, the capture step, one replay: before timing


class Unsupported(Exception):
    """This contender does not run this tableau/order (not an error)."""


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


# -- the per-task loop and the hand-written vmap ----------------------------------------------------------


def build_loop(s: Setup) -> Step:
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


def _vmap_builder(exact_norms: bool) -> Callable[[Setup], Step]:
    def build(s: Setup) -> Step:
        params = dict(s.model.named_parameters())
        opt = s.adam(params.values())
        h, first_order = s.workload.inner_lr, s.first_order

        # only a gradient that is itself differentiated (second-order support gradients) needs the exact
        # norms; first derivatives through the fused norms are exact under vmap, and faster
        norms = exact_norms if exact_norms and has_norm_layers(s.model) else contextlib.nullcontext

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


# -- the peer libraries, each in its documented MAML pattern -------------------------------------------------


def _peer_for_maml(s: Setup, peer: str, no_first_order: str | None = None) -> Any:
    """The peer library's module for a MAML step on ``s``; Unsupported where the peer cannot take that
    step (``no_first_order``: why it has no first-order mode, if it has none)."""
    if s.tableau.name != "maml":
        raise Unsupported("peers run maml only")
    if s.first_order and no_first_order:
        raise Unsupported(no_first_order)
    return load_peer(peer)


def build_higher(s: Setup) -> Step:
    higher = _peer_for_maml(s, "higher", "higher has no first-order mode (track_higher_grads=False cuts the "
                                         "meta-gradient)")
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


def build_torchopt(s: Setup) -> Step:
    torchopt = _peer_for_maml(s, "torchopt", "torchopt's MetaSGD always differentiates through the inner step")
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


def build_learn2learn(s: Setup) -> Step:
    l2l = _peer_for_maml(s, "learn2learn")
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


# -- rkfast ---------------------------------------------------------------------------------------------------


def _rkfast_builder(**kwargs: Any) -> Callable[[Setup], Step]:
    """``MetaOptimizer(..., outer="adam", **kwargs).step(batch)``; the step carries the optimizer as
    ``step.optimizer`` (the measurement checks that a captured step replays)."""

    def build(s: Setup) -> Step:
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


# -- the list ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    name: str
    build: Callable[[Setup], Step]
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
    # the pure-PyTorch kernels: on the CPU, second order under vmap then runs each task's stages in one vmap call
    # (docs/method.md, "Kernels"), bit for bit the staged step with these kernels
    Contender("rkfast-torch", _rkfast_builder(backend="torch"), default=False),
    Contender("rkfast-captured", _rkfast_builder(capture=True), cuda_only=True, captured=True),
]}
