"""``MetaOptimizer``: a ``torch.optim.Optimizer`` whose ``step(tasks)`` is one Runge-Kutta meta-step.

The class validates and delegates: the method lives in :mod:`rkfast.functional`, the flat parameter
buffer in :mod:`rkfast.flat`, the outer update and its undo in :mod:`rkfast.outer`, learned coefficients in
:mod:`rkfast.learned`, task parallelism in :mod:`rkfast.distributed`, whole-step CUDA graphs in
:mod:`rkfast.capture`. Each optional capability is one object, bound to the parameters here and consulted
through one interface (``docs/api.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.func import vmap

from . import functional as RF
from . import kernels
from .batch import TaskBatch, TaskSet, check_task_batch, check_task_set
from .capture import CaptureMode, StepCapture, make_step_capture
from .chunks import split_tasks
from .distributed import LocalTasks, Parallel, TaskParallel, is_ddp_wrapped, resolve_process_group
from .flat import FlatParameters
from .layout import ParamLayout
from .learned import Coefficients, LearnedRates, LearnedTableau, Rates, TableauCoefficients, describe_state_key
from .memory import Memory
from .outer import (
    NON_FINITE_GRAD,
    OuterUpdate,
    all_finite,
    cast_state_to_params,
    check_lr,
    make_outer_optimizer,
    non_finite_direction_error,
    outer_class,
)
from .results import AdaptationOutput, MetaStepOutput, NonFiniteLossError
from .tableau import Tableau, get_tableau

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["MetaOptimizer", "NonFiniteLossError", "resolve_vectorize"]

Tasks = TaskBatch | TaskSet | Sequence[Tensor]
"""What a step learns from: a :class:`~rkfast.batch.TaskBatch` (or its 4-tuple) or a :class:`~rkfast.batch.TaskSet`."""

_META_KEYS = ("tableau", "inner_lr", "first_order", "outer")  # the state dict's entries besides coefficients'


def resolve_vectorize(choice: bool | Literal["auto"], model: nn.Module, device: torch.device) -> bool:
    """``vectorize="auto"``: ``vmap`` except for convolutional models on the CPU (see ``MetaOptimizer``)."""
    if choice != "auto":
        return bool(choice)
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return not (device.type == "cpu" and has_conv)


class MetaOptimizer(torch.optim.Optimizer):
    """Runge-Kutta meta-learning as a drop-in ``torch.optim`` optimizer (``docs/api.md`` describes every
    argument and capability; ``docs/method.md`` the math).

    Each :meth:`step` takes a meta-batch of tasks, computes the RK meta-direction of the tableau for all
    tasks at once (:func:`rkfast.functional.rk_meta_step`), writes it to the parameters' ``.grad`` and lets
    the outer optimizer update them; :meth:`compute` and :meth:`apply` are its two halves::

        opt = rkfast.MetaOptimizer(model, F.mse_loss, tableau="rk4", inner_lr=0.01, outer="adam", lr=1e-3)
        for batch in task_loader:  # rkfast.TaskBatch(support_x, support_y, query_x, query_y)
            result = opt.step(batch)  # result.loss, result.stage_losses
        scores = opt.evaluate(test_batch, steps=(1, 5, 10))

    ``tableau`` is a name (``"maml"``, ``"rk4"``, ``"maml(3)"``...), a :class:`~rkfast.tableau.Tableau` or a
    :class:`~rkfast.learned.LearnedTableau`; ``inner_lr`` the RK step ``h``; ``outer``, ``lr`` and
    ``outer_kwargs`` the outer optimizer. Each optional capability is one object: ``rates`` a
    :class:`~rkfast.learned.Rates`, ``parallel`` a :class:`~rkfast.distributed.TaskParallel`, ``capture`` a
    :class:`~rkfast.capture.StepCapture`. ``param_groups`` and ``state`` are the outer optimizer's own.

    Attributes:
        tableau: the base :class:`~rkfast.tableau.Tableau`; rates, learned_tableau: the bound
            :class:`~rkfast.learned.LearnedRates` and :class:`~rkfast.learned.TableauCoefficients` or ``None``;
            coefficients: those present (:class:`~rkfast.learned.Coefficients`, updated beside the parameters);
            distributed: the :class:`~rkfast.distributed.TaskParallel` or ``None``; capture: ``False``, ``True``
            or ``"auto"``; layout: the flat meta-parameters' :class:`~rkfast.layout.ParamLayout`; backend,
            vectorize: resolved choices.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
        tableau: Tableau | str | LearnedTableau = "maml",
        inner_lr: float = 0.01,
        outer: str | type[torch.optim.Optimizer] = "adam",
        lr: float = 1e-3,
        *,
        first_order: bool = False,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        rates: Rates | None = None,
        parallel: TaskParallel | ProcessGroup | Literal["auto"] | None = "auto",
        capture: CaptureMode | StepCapture = False,
        memory: Memory | None = None,
        vectorize: bool | Literal["auto"] = "auto",
        check_finite: bool = True,
        batch_statistics: bool = True,
        backend: kernels.Backend = "auto",
        **outer_kwargs: Any,
    ) -> None:
        _check_arguments(model, loss_fn, vectorize, rates, tableau)
        self.memory = _checked_memory(memory, first_order, capture)
        learned = tableau if isinstance(tableau, LearnedTableau) else None
        self.tableau = get_tableau(tableau.tableau if isinstance(tableau, LearnedTableau) else tableau)
        self.rates: LearnedRates | None = None
        self.inner_lr = RF.check_step("inner_lr", inner_lr)
        self.first_order, self.check_finite = bool(first_order), bool(check_finite)
        self.model, self.loss_fn, self.batch_statistics = model, loss_fn, bool(batch_statistics)
        self._capture = make_step_capture(capture)
        self.capture: CaptureMode = self._capture.mode
        self.distributed = _task_parallel(parallel, self.capture)
        self._parallel: Parallel = self.distributed or LocalTasks()
        params = [p for p in model.parameters() if p.requires_grad] if params is None else params
        optimizer = make_outer_optimizer(
            outer_class(outer), params, lr, outer_kwargs, capturable=self._capture.requires_cuda
        )
        # share the outer optimizer's groups and state: a scheduler or load_state_dict acting on this
        # object then acts on the optimizer that really updates the parameters
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups, self.state = optimizer.param_groups, optimizer.state
        self.layout, self._flat = _flat_meta_parameters(model, self.param_groups)
        self._placement = _Placement(model, self._flat, self._capture, self.memory, backend, vectorize)
        self._bind_coefficients(rates, learned, optimizer, lr)
        self._placement.coefficients = self.coefficients
        self._capture.place(self.device)
        self._outer = OuterUpdate(
            optimizer, self._flat, self._coefficient_tensors(), [c.check_update for c in self.coefficients]
        )
        self._functions = _ModelFunctions(model, loss_fn, self.layout, self.batch_statistics)
        self._workspace = RF.Workspace()
        self._parallel.broadcast_(self._flat.data)  # every rank starts from rank 0's meta-parameters

    def _bind_coefficients(
        self, rates: Rates | None, learned: LearnedTableau | None, optimizer: torch.optim.Optimizer, lr: float
    ) -> None:
        """The learned coefficients bound to the meta-parameters' layout, dtype and device, each checked
        against the step's settings and given its param group."""
        if rates is not None:
            self.rates = rates.bind(self.layout, self.inner_lr, self.tableau.stages, self.dtype, self.device)
        self.learned_tableau: TableauCoefficients | None = learned.bind(self.dtype, self.device) if learned else None
        self.coefficients: tuple[Coefficients, ...] = tuple(
            c for c in (self.rates, self.learned_tableau) if c is not None
        )
        for c in self.coefficients:
            c.check_compatible(first_order=self.first_order, captured=self.capture is not False)
            _add_coefficient_group(optimizer, c.tensors, lr if c.lr is None else c.lr)

    @property
    def inner_lr(self) -> float:
        """The RK step ``h`` (learned rates start at it; unlearned rates follow it)."""
        return self._inner_lr

    @inner_lr.setter
    def inner_lr(self, value: float) -> None:
        self._inner_lr = value
        if self.rates is not None:
            self.rates.inner_lr = value  # the rate of tensors neither learned nor frozen

    def current_tableau(self) -> Tableau:
        """The tableau the next step uses: :attr:`tableau`, or the learned tableau at its current values."""
        return self.learned_tableau.current() if self.learned_tableau is not None else self.tableau

    def coefficient_summaries(self) -> dict[str, dict[str, Any]]:
        """``{key: summary}`` of each learned coefficient kind (``"rates"``, ``"learned_tableau"``): its
        :meth:`~rkfast.learned.Coefficients.summary` and its param group's learning rate (``"rate_lr"``,
        ``"tableau_lr"``; ``None`` without learned tensors), as ``results.json`` reports them."""
        return {
            c.key: {**c.summary(self.inner_lr), c.lr_name: _group_lr(self.param_groups, c.tensors)}
            for c in self.coefficients
        }

    def _coefficient_tensors(self) -> list[Tensor]:
        """The learned coefficients' leaf tensors, in :attr:`coefficients` order."""
        return [t for c in self.coefficients for t in c.tensors]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only during construction: the flat layout of the meta-parameters is fixed afterwards."""
        if hasattr(self, "_flat"):
            raise RuntimeError(
                "MetaOptimizer cannot take new parameter groups after construction; "
                "pass every group through `params` when creating it"
            )
        super().add_param_group(param_group)

    # -- the meta-step (docs/api.md, "Steps and failures") ---------------------------------------------

    # takes the tasks where torch's Optimizer.step takes an optional closure: not a drop-in override there
    def step(self, tasks: Tasks) -> MetaStepOutput:  # type: ignore[override]
        """One meta-step on ``tasks``: the meta-direction into ``.grad`` (overwritten), then the outer update.

        Returns the :class:`~rkfast.results.MetaStepOutput` (its tensors may be buffers the next step
        reuses). When it raises (``docs/api.md``, "Steps and failures": malformed tasks, a non-finite step...),
        the parameters, every ``.grad`` and the optimizer state are as they were before the call."""
        out = self._capture.run(
            tasks, self._eager_step, self._captured_step, lambda t: self._check_tasks(t, "step", captured=True)
        )
        self._flat.expose_grads()  # a replayed step sets no .grad itself
        return out

    def _eager_step(self, tasks: Tasks) -> MetaStepOutput:
        out, ranks = self._reduced_direction(tasks, "step")  # raises before anything changes
        # the reduced direction and loss are identical on every rank: so is every decision below
        self._outer.checked_update(
            lambda: self._outer.write_grads(out.direction, out.coefficient_directions),
            [out.direction, out.loss, *out.coefficient_directions],
            lambda: non_finite_direction_error(out, self._parallel.reduction_note(ranks)),
            check_finite=self.check_finite,
            backend=self.backend,
        )
        self._parallel.after_update(self._flat.data)
        return out

    def compute(self, tasks: Tasks) -> MetaStepOutput:
        """The first half of :meth:`step`: the meta-direction of ``tasks`` into every ``.grad``, no update.

        Edit ``.grad`` as after any ``backward()`` (clip, log), then call :meth:`apply`. Raises as
        :meth:`step` does, before ``.grad`` changes. With task parallelism it is the collective half: ``.grad``
        receives the reduced meta-direction, and edits must be identical on every rank."""
        out, ranks = self._reduced_direction(tasks, "compute")
        if self.check_finite and not bool(all_finite(out.direction, out.loss, *out.coefficient_directions)):  # one sync
            raise non_finite_direction_error(out, self._parallel.reduction_note(ranks))
        self._outer.write_grads(out.direction, out.coefficient_directions)
        return out

    def apply(self) -> None:
        """The second half of :meth:`step`: the outer update from the current ``.grad`` (edited or replaced
        tensors are used as they are; a ``.grad`` set to ``None`` is skipped). Does not communicate, except
        for ``check_consistency``. Raises ``ValueError`` for a ``.grad`` of the wrong shape and, with
        ``check_finite``, :class:`NonFiniteLossError`; nothing changes then."""
        _refuse_inference_mode("apply")
        self._rebind_if_replaced()
        grads = [self._flat.grad, *(t.grad for t in self._coefficient_tensors())]  # as the update reads them
        self._outer.checked_update(
            self._flat.adopt_grads,
            grads,
            lambda: NonFiniteLossError(NON_FINITE_GRAD),
            check_finite=self.check_finite,
            backend=self.backend,
        )
        self._parallel.after_update(self._flat.data)

    def _reduced_direction(self, tasks: Tasks, call: str) -> tuple[MetaStepOutput, tuple[int, ...]]:
        """This process's tasks checked and their meta-direction computed, then reduced over the ranks (one
        all-reduce, with task parallelism): a rank whose check or computation raises still joins it, then
        re-raises; the others raise RankFailedError. Also the ranks whose own direction was non-finite."""

        def local() -> tuple[MetaStepOutput, int]:
            checked = self._check_tasks(tasks, call)
            return self._meta_direction(checked), _task_count(checked)

        # the parameters' dtype and device as they are now (a re-bind inside local() may change them)
        return self._parallel.reduce_step(
            local, self._flat.params[0], self.layout.numel, self.tableau.stages, self._coefficient_tensors()
        )

    def _captured_step(self, batch: TaskBatch) -> MetaStepOutput:
        """The step recorded into the CUDA graph: the finiteness check and the skip stay on the device; the
        learned coefficients are part of it (a skipped step keeps them too)."""
        out = self._meta_direction(batch)
        if not self.check_finite:
            self._outer.write_grads(out.direction, out.coefficient_directions)
            self._outer.update(self.backend)
            return out
        ok = all_finite(out.direction, out.loss, *out.coefficient_directions)
        self._outer.guarded_step(out.direction, out.coefficient_directions, ok, self.backend)
        self._capture.count_skipped(ok)
        return out

    def _meta_direction(self, tasks: TaskBatch | TaskSet) -> MetaStepOutput:
        """The RK meta-direction of checked ``tasks`` at the current parameters (finiteness: the caller's)."""
        tableau = self.learned_tableau if self.learned_tableau is not None else self.tableau
        options = dict(first_order=self.first_order, vectorize=self.vectorize, backend=self.backend, rates=self.rates)
        options.update(workspace=self._workspace, memory=self.memory)
        theta = self._flat.data.detach()
        return self._functions.run(RF.rk_meta_step, theta, tasks, tableau, self.inner_lr, **options)

    def _check_tasks(self, tasks: Tasks, call: str, captured: bool = False) -> TaskBatch | TaskSet:
        """``tasks`` checked against the parameters as they are now (raises before anything changes), then
        the flat buffer re-bound if something replaced a parameter's storage since the last call."""
        _refuse_inference_mode(call)
        rebind = self._placement.replaced()
        checked = _checked_tasks(tasks, self.loss_fn is not None, self.dtype, self.device, captured)
        if rebind:
            self._rebind()
        return checked

    # -- the flat buffer and what depends on its device (_Placement) -------------------------------------

    dtype = property(lambda self: self._placement.dtype, doc="The meta-parameters' dtype.")
    device = property(lambda self: self._placement.device, doc="The meta-parameters' device.")
    backend = property(lambda self: self._placement.backend, doc="The kernel backend in use (``auto`` resolved).")
    vectorize = property(lambda self: self._placement.vectorize, doc="Whether the tasks run together under vmap.")

    def _rebind_if_replaced(self) -> None:
        """Re-bind if something replaced a parameter's storage (``model.to(...)``, ``p.data = ...``)."""
        if self._placement.replaced():
            self._rebind()

    def _rebind(self) -> None:
        self._placement.rebind(self.outer_optimizer)
        self.param_groups, self.state = self.outer_optimizer.param_groups, self.outer_optimizer.state

    @property
    def flat_parameters(self) -> Tensor:
        """The flat buffer ``[N]`` that holds the meta-parameters (each parameter is a view into it; writing
        into it changes the model's parameters; :attr:`layout` says where each one lives)."""
        self._rebind_if_replaced()
        return self._flat.data

    def meta_parameters(self) -> Tensor:
        """The meta-parameters as a new flat vector ``[N]`` (a detached copy)."""
        return self.flat_parameters.detach().clone()

    @property
    def outer_optimizer(self) -> torch.optim.Optimizer:
        """The ``torch.optim`` optimizer that performs the outer update (its param groups are this object's)."""
        return self._outer.optimizer

    def task_models(self, params: Tensor) -> Callable[..., Any]:
        """The model of every task at once: ``f(*inputs)`` with inputs ``[T, ...]`` runs task ``t``'s
        parameters ``params[t]`` (flat rows ``[T, N]``, e.g. a stage point given to a TaskSet data
        callable) on ``inputs[t]`` under ``vmap``. For rollouts of each task's policy. Norm layers use batch
        statistics as in a step (``batch_statistics``), and per-step layers (:mod:`rkfast.norms`) the row
        of the stage being computed."""
        return self._functions.task_models(params)

    @property
    def skipped_steps(self) -> Tensor | None:
        """With ``capture``: the number of replayed steps skipped for a non-finite loss or direction (a
        device tensor: reading its value synchronizes). ``None`` without capture (such steps raise)."""
        return self._capture.skipped

    def release_capture(self) -> None:
        """Drop the captured CUDA graph; the next steps warm up and capture again (e.g. after an lr change)."""
        self._capture.release()

    # -- meta-test --------------------------------------------------------------------------------------

    def evaluate(
        self,
        tasks: Tasks,
        steps: Sequence[int] = (1, 5, 10),
        step_size: float | None = None,
        *,
        keep_params: bool = False,
        adaptation: Literal["gradient", "stages"] = "gradient",
    ) -> AdaptationOutput:
        """Meta-test: adapt the current parameters to each task (they are not modified) and return per-task
        query losses (and accuracies) before adaptation and after each count in ``steps`` (``docs/api.md``,
        "Meta-test"). ``adaptation="gradient"``: gradient steps of ``step_size`` (default: the tableau's
        test step, or the learned rates); ``"stages"``: each step is one RK meta-step's stage points.
        ``keep_params`` also returns the adapted flat parameters ``[len(steps), T, N]``. Does not communicate.
        With ``memory.task_chunk``, ``task_chunk`` tasks adapt at a time."""
        if adaptation not in ("gradient", "stages"):
            raise ValueError(f"adaptation must be 'gradient' or 'stages', got {adaptation!r}")
        tasks = self._check_tasks(tasks, "evaluate")
        tableau = self.current_tableau()
        by_stages = adaptation == "stages"
        own_step = self.inner_lr if by_stages else tableau.test_step(self.inner_lr)
        alpha, rates = (own_step if step_size is None else step_size), None
        if self.rates is not None:
            alpha, rates = self.rates.adaptation_rates(own_step, step_size)
        stages = RF.StageMap(tableau, rates) if by_stages else None
        options: dict[str, Any] = dict(keep_params=keep_params, rates=None if by_stages else rates, stages=stages)
        theta, pieces = self.flat_parameters.detach(), split_tasks(tasks, _task_count(tasks), self.memory.task_chunk)
        run = self._functions.run
        parts = [run(RF.adapt, theta, piece, alpha, steps, vectorize=self.vectorize, **options) for piece in pieces]
        return AdaptationOutput.cat(parts)

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The outer optimizer's state dict plus ``"rkfast"``: tableau, ``inner_lr``, ``first_order``, the
        outer optimizer's name and each learned coefficient kind's state under its key (``"rates"``,
        ``"learned_tableau"``; their outer-optimizer state is in the outer state dict, as their param groups)."""
        sd = self.outer_optimizer.state_dict()
        sd["rkfast"] = _meta_state(
            self.tableau, self.inner_lr, self.first_order, self.outer_optimizer, self.coefficients
        )
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: outer optimizer state, param groups, tableau, inner step, learned
        coefficients. Raises ``ValueError`` (before anything changes) for another optimizer's state dict,
        learned coefficients configured otherwise, an invalid ``inner_lr`` or a param group's invalid ``lr``."""
        meta = _checked_meta(state_dict, type(self.outer_optimizer).__name__, self.coefficients)
        tableau, inner_lr = Tableau.from_dict(meta["tableau"]), RF.check_step("inner_lr", meta["inner_lr"])
        values = [c.check_state(meta.get(c.key)) for c in self.coefficients]
        self.outer_optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "rkfast"})
        self.param_groups, self.state = self.outer_optimizer.param_groups, self.outer_optimizer.state
        self.tableau, self.inner_lr, self.first_order = tableau, inner_lr, bool(meta["first_order"])
        for c, v in zip(self.coefficients, values, strict=True):
            c.load(v)

    def __repr__(self) -> str:
        return (
            f"MetaOptimizer(tableau={self.tableau.name}, inner_lr={self.inner_lr:g}, "
            f"first_order={self.first_order}, outer={self.outer_optimizer!r})"
        )


def _refuse_inference_mode(call: str) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"MetaOptimizer.{call}() cannot run under torch.inference_mode(): the meta-step and meta-test "
            "adaptation differentiate through the model, which inference mode forbids, and optimizer state "
            f"created there could not be updated by later steps. Call {call}() outside inference_mode "
            "(under torch.no_grad() it works as usual)."
        )


def _checked_tasks(
    tasks: Tasks, has_loss_fn: bool, dtype: torch.dtype, device: torch.device, captured: bool
) -> TaskBatch | TaskSet:
    """``tasks`` checked for a step over parameters of ``dtype`` on ``device`` (``TypeError``/``ValueError``)."""
    if isinstance(tasks, TaskSet):
        if captured:
            raise TypeError(
                "a captured step (capture=True/'auto') takes TaskBatch batches, whose tensors the "
                "graph copies in; run TaskSet steps with capture=False"
            )
        return check_task_set(tasks, device=device)
    if not has_loss_fn:
        raise TypeError(
            "this MetaOptimizer was built with loss_fn=None: give each step a TaskSet with its "
            "losses, or build it with a loss_fn for TaskBatch batches"
        )
    return check_task_batch(tasks, dtype=dtype, device=device)


def _meta_state(
    tableau: Tableau,
    inner_lr: float,
    first_order: bool,
    outer: torch.optim.Optimizer,
    coefficients: Sequence[Coefficients],
) -> dict[str, Any]:
    """The ``"rkfast"`` entry of a state dict (:data:`_META_KEYS`, and each coefficient kind's state)."""
    return {
        "tableau": tableau.to_dict(),
        "inner_lr": inner_lr,
        "first_order": first_order,
        "outer": type(outer).__name__,
        **{c.key: c.state() for c in coefficients},
    }


def _checked_meta(state_dict: dict[str, Any], outer: str, coefficients: Sequence[Coefficients]) -> dict[str, Any]:
    """The ``"rkfast"`` entry of a state dict, checked against an optimizer whose outer optimizer class is
    named ``outer`` and which has ``coefficients`` (``ValueError``; their own checks are theirs)."""
    meta = state_dict.get("rkfast")
    if not isinstance(meta, dict):
        raise ValueError("not a MetaOptimizer state dict: the 'rkfast' entry is missing")
    if meta.get("outer") != outer:
        raise ValueError(f"state dict is for outer optimizer {meta.get('outer')!r}, this one uses {outer!r}")
    for key in meta.keys() - set(_META_KEYS) - {c.key for c in coefficients}:
        if meta[key] is not None:
            raise ValueError(f"the state dict has {describe_state_key(key)}, this MetaOptimizer has none")
    for i, group in enumerate(state_dict.get("param_groups", ())):
        if "lr" in group:
            check_lr(group["lr"], f"lr of param group {i}")
    return meta


def _group_lr(groups: list[dict[str, Any]], tensors: Sequence[Tensor]) -> float | None:
    """The learning rate of the param group that holds ``tensors`` (``None``: none does)."""
    ids = {id(t) for t in tensors}
    return next((group["lr"] for group in groups if any(id(p) in ids for p in group["params"])), None)


def _check_arguments(model: Any, loss_fn: Any, vectorize: Any, rates: Any, tableau: Any) -> None:
    """The arguments MetaOptimizer checks before building anything (``TypeError``/``ValueError``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_ddp_wrapped(model):
        raise ValueError(
            "the model is wrapped in torch.nn.parallel.DistributedDataParallel: pass the unwrapped model "
            "(model.module) to MetaOptimizer. MetaOptimizer all-reduces the meta-direction over the process "
            "group itself (parallel='auto' uses the default group); DDP's gradient hooks never see "
            "the meta-direction, so a DDP-wrapped model would silently drift apart across ranks."
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (or None for TaskSet steps), got {type(loss_fn).__name__}")
    if vectorize not in (True, False, "auto"):
        raise ValueError(f"vectorize must be True, False or 'auto', got {vectorize!r}")
    if rates is not None and not isinstance(rates, Rates):
        raise TypeError(f"rates must be a rkfast.Rates or None, got {type(rates).__name__}")
    if not isinstance(tableau, (str, Tableau, LearnedTableau)):
        raise TypeError(f"tableau must be a name, a Tableau or a LearnedTableau, got {type(tableau).__name__}")


def _checked_memory(memory: Any, first_order: bool, capture: Any) -> Memory:
    """The step's :class:`~rkfast.memory.Memory` (``None``: the defaults), checked against its settings."""
    if memory is None:
        return Memory()
    if not isinstance(memory, Memory):
        raise TypeError(f"memory must be a rkfast.Memory or None, got {type(memory).__name__}")
    memory.check_compatible(first_order=first_order, captured=make_step_capture(capture).mode is not False)
    return memory


class _Placement:
    """The flat buffer and what depends on the meta-parameters' dtype and device: the kernel backend, the
    ``vmap`` choice, the learned coefficients' and the outer state's placement, a captured graph. When
    something replaces a parameter's storage (``model.to(...)``, ``p.data = ...``), the next call re-binds,
    checked first (:meth:`replaced`), so that nothing changes when it cannot."""

    def __init__(
        self,
        model: nn.Module,
        flat: FlatParameters,
        capture: Any,
        memory: Memory,
        backend: kernels.Backend,
        vectorize: Any,
    ) -> None:
        self.model, self.flat, self.capture, self.memory = model, flat, capture, memory
        self._backend_choice, self._vectorize_choice = backend, vectorize
        self.coefficients: tuple[Coefficients, ...] = ()
        self._resolve()
        memory.check_device(self.device)

    # the parameters' own (after model.to(...) that is their new kind, before the flat buffer is re-bound)
    dtype = property(lambda self: self.flat.params[0].dtype)
    device = property(lambda self: self.flat.params[0].device)

    def _resolve(self) -> None:
        self.backend = kernels.resolve_backend(self._backend_choice, self.device, self.dtype)
        self.vectorize = resolve_vectorize(self._vectorize_choice, self.model, self.device)

    def replaced(self) -> bool:
        """Whether a parameter's storage was replaced; raises (before anything changes) if the parameters
        cannot be re-bound as they are now."""
        if not self.flat.replaced():
            return False
        self.flat.check_rebind()
        kernels.resolve_backend(self._backend_choice, self.device, self.dtype)
        self.capture.check_device(self.device)
        self.memory.check_device(self.device)
        return True

    def rebind(self, optimizer: torch.optim.Optimizer) -> None:
        """The parameters into new flat buffers, with everything that depends on their dtype and device: the
        learned coefficients (the same tensors: their param groups hold them), the outer state (cast first:
        that can fail, the rest cannot), the kernel choices, a captured graph (it reads the old buffers)."""
        with torch.inference_mode(False):  # the new buffers and state must stay trainable
            if (self.dtype, self.device) != (self.flat.dtype, self.flat.device):
                for c in self.coefficients:
                    c.to_(self.dtype, self.device)
                cast_state_to_params(optimizer)
            self.flat.rebind()
        self._resolve()
        self.capture.place(self.device)


class _ModelFunctions:
    """The model in the functional core's terms (:mod:`rkfast.functional`): the per-task losses of a step's
    tasks and the model of every task at once, its norm layers as ``batch_statistics`` says."""

    def __init__(self, model: nn.Module, loss_fn: Any, layout: ParamLayout, batch_statistics: bool) -> None:
        self.model, self.layout, self.batch_statistics = model, layout, batch_statistics
        self.norm_layers = RF.has_norm_layers(model)
        self.call = RF.model_call(model, batch_statistics=batch_statistics)
        self.batch_loss = (
            None if loss_fn is None else RF.module_task_loss(model, loss_fn, layout, batch_statistics=batch_statistics)
        )

    def stage_losses(self, tasks: TaskBatch | TaskSet) -> tuple[RF.TaskLoss, RF.TaskLoss, Any, Any, int | None]:
        """The support and query losses and data of checked ``tasks``, and the task count a TaskSet gives."""
        if isinstance(tasks, TaskBatch):
            assert self.batch_loss is not None  # without a loss_fn a TaskBatch is refused (_checked_tasks)
            return self.batch_loss, self.batch_loss, tasks.support, tasks.query, None
        support, query = (
            RF.model_task_loss(
                self.model, loss, self.layout, norm_layers=self.norm_layers, batch_statistics=self.batch_statistics
            )
            for loss in (tasks.support_loss, tasks.query_loss)
        )
        return support, query, tasks.support_data, tasks.query_data, tasks.num_tasks

    def run(
        self, core: Callable[..., Any], theta: Tensor, tasks: TaskBatch | TaskSet, *args: Any, **options: Any
    ) -> Any:
        """``core(theta, support_loss, query_loss, support_data, query_data, *args, num_tasks=..., **options)``:
        a functional-core call (:func:`~rkfast.functional.rk_meta_step`, :func:`~rkfast.functional.adapt`) on
        checked ``tasks``."""
        support, query, support_data, query_data, num_tasks = self.stage_losses(tasks)
        return core(theta, support, query, support_data, query_data, *args, num_tasks=num_tasks, **options)

    def task_models(self, params: Tensor) -> Callable[..., Any]:
        """``f(*inputs)``: task ``t``'s parameters ``params[t]`` (flat rows ``[T, N]``) on ``inputs[t]``, under
        ``vmap`` (:meth:`MetaOptimizer.task_models`)."""
        layout, call = self.layout, self.call

        def run(*inputs: Any) -> Any:
            return vmap(lambda row, *xs: call(layout.unflatten(row), *xs))(params, *inputs)

        return run


def _task_parallel(parallel: Any, capture: CaptureMode) -> TaskParallel | None:
    """The :class:`TaskParallel` of ``parallel`` (``None``: none), refused together with ``capture``."""
    resolved = resolve_process_group(parallel)
    if resolved is not None and capture is not False:
        raise ValueError(
            f"capture={capture!r} with a process group is not supported: the all-reduce of the "
            "meta-direction would have to be recorded in the CUDA graph (NCCL collectives can be captured, "
            "but that path is not tested here; gloo's cannot). Use capture=False, or parallel=None "
            "for a rank-local optimizer (docs/distributed.md)."
        )
    return resolved


def _flat_meta_parameters(model: nn.Module, groups: list[dict[str, Any]]) -> tuple[ParamLayout, FlatParameters]:
    """The layout of the groups' parameters (all of ``model``, named as there) and their flat buffer."""
    meta_params = [p for group in groups for p in group["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [i for i, p in enumerate(meta_params) if id(p) not in names]
    if missing:
        raise ValueError(f"params {missing} are not parameters of the model")
    if not meta_params:
        raise ValueError("no parameters to meta-learn (none requires grad)")
    layout = ParamLayout.from_named((names[id(p)], p) for p in meta_params)
    return layout, FlatParameters(meta_params, layout)


def _add_coefficient_group(optimizer: torch.optim.Optimizer, tensors: Sequence[Tensor], lr: Any) -> None:
    """The learned coefficients' own param group (none without tensors): their learning rate, and no weight
    decay where the optimizer has one (it would pull the rates and entries to zero)."""
    if not tensors:
        return
    group: dict[str, Any] = {"params": list(tensors), "lr": lr}
    if "weight_decay" in optimizer.defaults:
        group["weight_decay"] = 0.0
    optimizer.add_param_group(group)


def _task_count(tasks: TaskBatch | TaskSet) -> int:
    """The number of tasks of checked ``tasks`` (a rank's weight in the reduced meta-direction)."""
    if isinstance(tasks, TaskBatch):
        return tasks.num_tasks
    return RF.resolve_num_tasks(tasks.num_tasks, tasks.support_data, tasks.query_data)
