"""``MetaOptimizer``: a ``torch.optim.Optimizer`` whose ``step(batch)`` is one Runge-Kutta meta-step."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn

from . import functional as RF
from . import kernels
from .batch import TaskBatch, check_task_batch
from .capture import CaptureMode, StepCapture, check_capture_mode, guarded_update, state_tensors
from .tableau import Tableau, get_tableau

__all__ = ["MetaOptimizer", "NonFiniteLossError", "resolve_vectorize"]

_OUTER: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


class NonFiniteLossError(FloatingPointError):
    """The meta-loss or the meta-direction of a step is NaN or infinite; nothing was updated."""


def _outer_class(outer: str | type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    if isinstance(outer, str):
        try:
            return _OUTER[outer.lower()]
        except KeyError:
            raise ValueError(
                f"unknown outer optimizer {outer!r}; use one of {', '.join(_OUTER)} "
                "or a torch.optim.Optimizer subclass"
            ) from None
    if isinstance(outer, type) and issubclass(outer, torch.optim.Optimizer):
        return outer
    raise TypeError(f"outer must be a name or a torch.optim.Optimizer subclass, got {outer!r}")


def _check_one_kind(params: Sequence[Tensor]) -> None:
    kinds = {(p.dtype, p.device) for p in params}
    if len(kinds) > 1:
        raise TypeError(f"meta-parameters must share one dtype and device, got {sorted(map(str, kinds))}")


def resolve_vectorize(choice: bool | Literal["auto"], model: nn.Module, device: torch.device) -> bool:
    """``vectorize="auto"``: ``vmap`` except for convolutional models on the CPU (see ``MetaOptimizer``)."""
    if choice != "auto":
        return bool(choice)
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return not (device.type == "cpu" and has_conv)


def _make_outer(cls: type[torch.optim.Optimizer], params: Any, lr: float, kwargs: dict[str, Any],
                capture: CaptureMode = False) -> torch.optim.Optimizer:
    """The outer optimizer; torch's fused implementation for SGD/Adam/AdamW unless the caller chose, and
    Adam/AdamW with ``capturable=True`` (its step counter on the device) when the step is captured."""
    if capture and cls in (torch.optim.Adam, torch.optim.AdamW):
        if kwargs.get("capturable") is False:
            raise ValueError(f"capture={capture!r} needs a capturable outer optimizer; drop capturable=False")
        kwargs = {**kwargs, "capturable": True}
    if cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW) and not {"fused", "foreach"} & set(kwargs):
        params = list(params)
        try:
            return cls(params, lr=lr, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):  # a device or dtype the fused kernel does not take
            pass
    return cls(params, lr=lr, **kwargs)


class MetaOptimizer(torch.optim.Optimizer):
    """Runge-Kutta meta-learning as a drop-in ``torch.optim`` optimizer.

    Each :meth:`step` takes a meta-batch of tasks, computes the RK meta-direction of the chosen tableau
    for all tasks at once (:func:`rkfast.functional.rk_meta_step`), writes it to the parameters'
    ``.grad`` and lets the outer optimizer update them::

        opt = rkfast.MetaOptimizer(model, F.mse_loss, tableau="rk4", inner_lr=0.01, outer="adam", lr=1e-3)
        for batch in task_loader:              # rkfast.TaskBatch(support_x, support_y, query_x, query_y)
            result = opt.step(batch)           # result.loss, result.stage_losses
        scores = opt.evaluate(test_batch, steps=(1, 5, 10))

    ``param_groups`` and ``state`` are the outer optimizer's own (shared, not copied), so learning-rate
    schedulers, ``zero_grad`` and ``state_dict``/``load_state_dict`` behave as on any torch optimizer;
    the state dict also carries the tableau, ``inner_lr`` and ``first_order``.

    Args:
        model: the model; its parameters (or ``params``) are the meta-parameters.
        loss_fn: ``loss_fn(output, target) -> scalar`` for one task (e.g. ``F.mse_loss``,
            ``F.cross_entropy``); integer targets also report accuracy.
        tableau: a :class:`~rkfast.tableau.Tableau` or a name: ``"maml"``, ``"heun"``, ``"rk4"``, ``"maml(3)"``...
        inner_lr: the RK step ``h`` of the stages (MAML's inner learning rate for ``"maml"``).
        outer: ``"sgd"`` (the plain step ``theta <- theta - lr * d``), ``"adam"``, ``"adamw"`` or any
            ``torch.optim.Optimizer`` subclass; ``outer_kwargs`` go to its constructor.
        lr: the outer learning rate.
        first_order: ignore second derivatives (first-order MAML and its RK analogues).
        params: parameters or param groups to meta-learn (default: every parameter of ``model`` that
            requires grad); the others stay fixed and are not adapted either.
        vectorize: ``True``: run the tasks together under ``vmap``; ``False``: one by one with plain
            autograd (same math); ``"auto"``: ``vmap``, except for models with convolutions on the CPU.
            Under ``vmap`` per-task convolution weights become grouped convolutions, which are slow on CPUs:
            a conv4 meta-step on 32 tasks (2 cores) ran 2.6-4.9x faster task by task, in every tableau and
            order, with less memory; MLPs on the CPU (sinusoid: ~7x) and every model on a GPU are faster
            under ``vmap``. The resolved choice is :attr:`vectorize`.
        check_finite: raise :class:`NonFiniteLossError` on a NaN/inf meta-loss or meta-direction before
            updating (costs one host synchronization per step).
        batch_statistics: switch the model's normalization layers to per-task batch statistics with no
            running statistics (MAML's convention, and required under ``vmap``); modifies ``model``.
        backend: kernels for the stage arithmetic and the plain outer step (:mod:`rkfast.kernels`):
            ``"auto"`` (C++ on CPU, Triton on CUDA, where available), ``"torch"``, ``"cpp"``, ``"triton"``.
        capture: CUDA only. ``True``: after two eager warm-up steps, capture one whole step (every stage,
            the outer update) in a CUDA graph and replay it for each later batch, whose shapes must then
            stay the same (:class:`~rkfast.capture.CaptureShapeError` otherwise); ``"auto"``: re-capture
            when the shapes change. A replayed step does not synchronize with the host: a non-finite step
            is skipped on the device (parameters and optimizer state kept, ``.grad`` zero) and counted in
            :attr:`skipped_steps` instead of raising. The learning rate is part of the captured step:
            after changing it (e.g. a scheduler), call :meth:`release_capture`. Adam/AdamW are created
            with ``capturable=True``.

    The meta-parameters are moved into one contiguous flat buffer, and each parameter becomes a view into
    it (the same ``Parameter`` objects: the model, its ``state_dict`` and user code keep working); their
    ``.grad`` are views into one flat gradient buffer. Every kernel then runs once over all parameters:
    ``outer="sgd"`` without momentum or weight decay is one fused ``axpy_``, and Adam/AdamW/SGD use
    torch's fused implementation unless ``foreach``/``fused`` is given in ``outer_kwargs``.

    Attributes:
        model, loss_fn: as given.
        tableau: the :class:`~rkfast.tableau.Tableau` in use; ``inner_lr``, ``first_order`` as given.
        layout: the :class:`~rkfast.functional.ParamLayout` of the meta-parameters inside a flat vector
            (what :meth:`meta_parameters` returns and ``MetaStepOutput.direction`` is laid out as).
        backend: the kernel backend in use (``"cpp"``, ``"triton"`` or ``"torch"``; ``"auto"`` resolved).
        vectorize: whether the tasks run together under ``vmap`` (``"auto"`` resolved).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        tableau: Tableau | str = "maml",
        inner_lr: float = 0.01,
        outer: str | type[torch.optim.Optimizer] = "adam",
        lr: float = 1e-3,
        *,
        first_order: bool = False,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        vectorize: bool | Literal["auto"] = "auto",
        check_finite: bool = True,
        batch_statistics: bool = True,
        backend: kernels.Backend = "auto",
        capture: CaptureMode = False,
        **outer_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.tableau = get_tableau(tableau)
        self.inner_lr = RF._check_step("inner_lr", inner_lr)
        self.first_order = bool(first_order)
        if vectorize not in (True, False, "auto"):
            raise ValueError(f"vectorize must be True, False or 'auto', got {vectorize!r}")
        self._vectorize_choice = vectorize
        self.check_finite = bool(check_finite)
        self.model = model
        self.loss_fn = loss_fn
        if batch_statistics:
            RF.use_batch_statistics(model)

        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self._outer = _make_outer(_outer_class(outer), params, lr, outer_kwargs, capture)
        # share the outer optimizer's groups and state: a scheduler or load_state_dict acting on this
        # object then acts on the optimizer that really updates the parameters
        super().__init__(self._outer.param_groups, self._outer.defaults)
        self.param_groups = self._outer.param_groups
        self.state = self._outer.state

        meta_params = [p for group in self.param_groups for p in group["params"]]
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [i for i, p in enumerate(meta_params) if id(p) not in names]
        if missing:
            raise ValueError(f"params {missing} are not parameters of the model")
        if not meta_params:
            raise ValueError("no parameters to meta-learn (none requires grad)")
        _check_one_kind(meta_params)
        self.backend = kernels.resolve_backend(backend, meta_params[0].device, meta_params[0].dtype)
        self._backend_choice = backend
        self.vectorize = resolve_vectorize(vectorize, model, meta_params[0].device)
        self._params = meta_params
        self.layout = RF.ParamLayout.from_named((names[id(p)], p) for p in meta_params)
        self.capture = check_capture_mode(capture, meta_params[0].device)
        self._bind_flat()
        self._task_loss = RF.module_task_loss(model, loss_fn, self.layout)  # built once, not per step
        self._workspace = RF.Workspace()
        self._capture = StepCapture(self.capture) if self.capture else None
        self._skipped = torch.zeros((), dtype=torch.int64, device=meta_params[0].device) if self.capture else None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only during construction: the flat layout of the meta-parameters is fixed afterwards."""
        if hasattr(self, "_params"):
            raise RuntimeError(
                "MetaOptimizer cannot take new parameter groups after construction; "
                "pass every group through `params` when creating it"
            )
        super().add_param_group(param_group)

    # -- the meta-step --------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self._params[0].dtype

    @property
    def device(self) -> torch.device:
        return self._params[0].device

    # -- the flat buffers -----------------------------------------------------------------------------

    def _bind_flat(self) -> None:
        """Copy the meta-parameters into one flat buffer and make each parameter a view into it.

        The parameters' ``.grad`` become views into one flat gradient buffer (current values kept).
        """
        params, numels = self._params, self.layout.numels
        first = params[0]
        flat = torch.empty(self.layout.numel, dtype=first.dtype, device=first.device)
        flat_grad = torch.zeros_like(flat)
        values, grad_views = [], []
        with torch.no_grad():
            for p, chunk, grad_chunk in zip(params, flat.split(numels), flat_grad.split(numels)):
                chunk.copy_(p.reshape(-1))
                values.append(chunk.view_as(p))
                grad_views.append(grad_chunk.view_as(p))
                if p.grad is not None:
                    grad_chunk.copy_(p.grad.reshape(-1))
            for p, value, grad_view in zip(params, values, grad_views):
                p.data = value  # same Parameter object, now backed by the flat buffer
                if p.grad is not None:
                    p.grad = grad_view
        self._flat, self._flat_grad, self._grad_views = flat, flat_grad, grad_views
        self._addresses = [p.data_ptr() for p in params]

    def _ensure_flat(self) -> None:
        """Re-bind if something replaced a parameter's storage (``model.to(...)``, ``p.data = ...``)."""
        if any(p.data_ptr() != a for p, a in zip(self._params, self._addresses)) or any(
            p.dtype != self._flat.dtype or p.device != self._flat.device for p in self._params
        ):
            _check_one_kind(self._params)
            self.backend = kernels.resolve_backend(self._backend_choice, self._params[0].device, self._params[0].dtype)
            self.vectorize = resolve_vectorize(self._vectorize_choice, self.model, self._params[0].device)
            self._bind_flat()

    @property
    def flat_parameters(self) -> Tensor:
        """The flat buffer ``[N]`` that holds the meta-parameters (each parameter is a view into it).

        Writing into it changes the model's parameters; :attr:`layout` says where each one lives.
        """
        self._ensure_flat()
        return self._flat

    def meta_parameters(self) -> Tensor:
        """The meta-parameters as a new flat vector ``[N]`` (a detached copy)."""
        return self.flat_parameters.detach().clone()

    def compute(self, batch: TaskBatch | Sequence[Tensor]) -> RF.MetaStepOutput:
        """The meta-direction and losses of ``batch`` at the current parameters, without updating."""
        return self._compute(check_task_batch(batch, dtype=self.dtype, device=self.device), RF.Workspace())

    def _compute(self, batch: TaskBatch, workspace: RF.Workspace) -> RF.MetaStepOutput:
        loss = self._task_loss
        return RF.rk_meta_step(
            self.flat_parameters.detach(), loss, loss, batch.support, batch.query, self.tableau, self.inner_lr,
            first_order=self.first_order, vectorize=self.vectorize, backend=self.backend, workspace=workspace,
        )

    def step(self, batch: TaskBatch | Sequence[Tensor]) -> RF.MetaStepOutput:  # type: ignore[override]
        """One meta-step on ``batch``: meta-direction into ``.grad``, then the outer update.

        ``.grad`` of the meta-parameters is overwritten with the meta-direction (not accumulated).
        Returns the :class:`~rkfast.functional.MetaStepOutput` (``loss``, ``stage_losses``, ...); its
        tensors may be buffers the next step reuses (clone what you keep).

        Raises:
            TypeError, ValueError, RuntimeError: a malformed batch (see :func:`~rkfast.batch.check_task_batch`).
            NonFiniteLossError: NaN/inf meta-loss or meta-direction (not raised by a replayed captured
                step; see ``capture``).
            CaptureShapeError: with ``capture=True``, a batch whose shapes differ from the captured ones.
            In every case before any parameter, gradient or optimizer state changes.
        """
        batch = check_task_batch(batch, dtype=self.dtype, device=self.device)
        if self._capture is None:
            return self._eager_step(batch)
        out = self._capture.run(batch, self._eager_step, self._captured_step)
        self._expose_grads()
        return out

    def _eager_step(self, batch: TaskBatch) -> RF.MetaStepOutput:
        out = self._compute(batch, self._workspace)
        if self.check_finite:
            self._check_finite(out)
        self._flat_grad.copy_(out.direction)
        self._expose_grads()
        self._outer_update()
        return out

    def _captured_step(self, batch: TaskBatch) -> RF.MetaStepOutput:
        """The step recorded into the CUDA graph: the finiteness check and the skip stay on the device."""
        out = self._compute(batch, self._workspace)
        self._expose_grads()
        if not self.check_finite:
            self._flat_grad.copy_(out.direction)
            self._outer_update()
            return out
        ok = torch.isfinite(out.direction).all() & torch.isfinite(out.loss)
        self._flat_grad.copy_(torch.where(ok, out.direction, 0.0))  # a skipped step updates with a zero gradient
        guarded_update(ok, [self._flat, *state_tensors(self._outer, self._params)], self._outer_update)
        self._skipped.add_((~ok).to(self._skipped.dtype))  # type: ignore[union-attr]
        return out

    def _expose_grads(self) -> None:
        for p, g in zip(self._params, self._grad_views):
            p.grad = g

    def _outer_update(self) -> None:
        if self._plain_sgd():
            kernels.axpy_(self._flat, self._flat_grad, -float(self.param_groups[0]["lr"]), backend=self.backend)
        else:
            self._outer.step()

    @property
    def skipped_steps(self) -> Tensor | None:
        """With ``capture``: the number of replayed steps skipped for a non-finite loss or direction (a
        device tensor: reading its value synchronizes). ``None`` without capture (such steps raise)."""
        return self._skipped

    def release_capture(self) -> None:
        """Drop the captured CUDA graph; the next steps warm up and capture again (e.g. after an lr change)."""
        if self._capture is not None:
            self._capture.release()

    def _plain_sgd(self) -> bool:
        """``theta <- theta - lr * d`` over the whole flat buffer: SGD with one group and no extras."""
        if type(self._outer) is not torch.optim.SGD or len(self.param_groups) != 1:
            return False
        group = self.param_groups[0]
        return (group["momentum"] == 0 and group["weight_decay"] == 0 and not group.get("maximize", False)
                and len(group["params"]) == len(self._params))

    def _check_finite(self, out: RF.MetaStepOutput) -> None:
        if bool(torch.isfinite(out.direction).all() & torch.isfinite(out.loss)):  # one host sync
            return
        stages = {j: float(v) for j, v in out.stage_losses.items()}
        raise NonFiniteLossError(
            f"non-finite meta-loss {float(out.loss)} (query loss per stage: {stages}) or meta-direction; "
            "parameters and optimizer state were left unchanged. Lower inner_lr or lr, or check the batch."
        )

    def evaluate(
        self,
        batch: TaskBatch | Sequence[Tensor],
        steps: Sequence[int] = (1, 5, 10),
        step_size: float | None = None,
        *,
        keep_params: bool = False,
    ) -> RF.AdaptationOutput:
        """Meta-test: adapt the current parameters to each task of ``batch`` with plain gradient steps.

        ``step_size`` defaults to ``tableau.test_step(inner_lr)`` = ``h * c_s`` (the step the tableau
        trains the model to adapt with). Parameters are not modified. Returns per-task query losses (and
        accuracies) before adaptation and after each count in ``steps``; ``.summary()`` gives means and
        95% confidence intervals. ``keep_params`` also returns the adapted flat parameters
        (``[len(steps), T, N]``; :attr:`layout` unflattens them).
        """
        batch = check_task_batch(batch, dtype=self.dtype, device=self.device)
        alpha = self.tableau.test_step(self.inner_lr) if step_size is None else step_size
        return RF.evaluate(
            self.model, self.loss_fn, self.flat_parameters.detach(), batch, alpha, steps,
            vectorize=self.vectorize, layout=self.layout, keep_params=keep_params,
        )

    # -- state ----------------------------------------------------------------------------------------

    def _meta_state(self) -> dict[str, Any]:
        return {
            "tableau": self.tableau.to_dict(),
            "inner_lr": self.inner_lr,
            "first_order": self.first_order,
            "outer": type(self._outer).__name__,
        }

    def state_dict(self) -> dict[str, Any]:
        """The outer optimizer's state dict plus ``"rkfast"``: tableau, ``inner_lr``, ``first_order``."""
        sd = self._outer.state_dict()
        sd["rkfast"] = self._meta_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: outer optimizer state, param groups, tableau and inner step."""
        meta = state_dict.get("rkfast")
        if not isinstance(meta, dict):
            raise ValueError("not a MetaOptimizer state dict: the 'rkfast' entry is missing")
        if meta.get("outer") != type(self._outer).__name__:
            raise ValueError(
                f"state dict is for outer optimizer {meta.get('outer')!r}, this one uses {type(self._outer).__name__!r}"
            )
        tableau = Tableau.from_dict(meta["tableau"])
        inner_lr = RF._check_step("inner_lr", meta["inner_lr"])
        self._outer.load_state_dict({k: v for k, v in state_dict.items() if k != "rkfast"})
        self.param_groups = self._outer.param_groups
        self.state = self._outer.state
        self.tableau, self.inner_lr, self.first_order = tableau, inner_lr, bool(meta["first_order"])

    def __repr__(self) -> str:
        return (
            f"MetaOptimizer(tableau={self.tableau.name}, inner_lr={self.inner_lr:g}, "
            f"first_order={self.first_order}, outer={self._outer!r})"
        )
