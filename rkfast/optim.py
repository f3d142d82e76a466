"""``MetaOptimizer``: a ``torch.optim.Optimizer`` whose ``step(tasks)`` is one Runge-Kutta meta-step.

The class validates and delegates: the method lives in :mod:`rkfast.functional`, the flat parameter
buffer in :mod:`rkfast.flat`, the outer update in :mod:`rkfast.outer`, whole-step CUDA graphs in
:mod:`rkfast.capture`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import vmap

from . import functional as RF
from . import kernels
from .batch import TaskBatch, TaskSet, check_task_batch, check_task_set
from .capture import CaptureMode, StepCapture, make_step_capture
from .distributed import TaskParallel, is_ddp_wrapped, resolve_process_group
from .flat import FlatParameters
from .layout import ParamLayout
from .learned import GRANULARITIES, TABLEAU_PATTERNS, TABLEAU_WEIGHTS, LearnedRates, LearnedTableau, RatesStepOutput
from .outer import OuterUpdate, cast_state_to_params, check_lr, make_outer_optimizer, outer_class
from .results import AdaptationOutput, MetaStepOutput, NonFiniteLossError
from .tableau import Tableau, get_tableau

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["MetaOptimizer", "NonFiniteLossError", "resolve_vectorize"]

Tasks = Union[TaskBatch, TaskSet, Sequence[Tensor]]
"""What a step learns from: a :class:`~rkfast.batch.TaskBatch` (or its 4-tuple) or a :class:`~rkfast.batch.TaskSet`."""


def resolve_vectorize(choice: bool | Literal["auto"], model: nn.Module, device: torch.device) -> bool:
    """``vectorize="auto"``: ``vmap`` except for convolutional models on the CPU (see ``MetaOptimizer``)."""
    if choice != "auto":
        return bool(choice)
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return not (device.type == "cpu" and has_conv)


class MetaOptimizer(torch.optim.Optimizer):
    """Runge-Kutta meta-learning as a drop-in ``torch.optim`` optimizer.

    Each :meth:`step` takes a meta-batch of tasks, computes the RK meta-direction of the chosen tableau
    for all tasks at once (:func:`rkfast.functional.rk_meta_step`), writes it to the parameters'
    ``.grad`` and lets the outer optimizer update them::

        opt = rkfast.MetaOptimizer(model, F.mse_loss, tableau="rk4", inner_lr=0.01, outer="adam", lr=1e-3)
        for batch in task_loader:              # rkfast.TaskBatch(support_x, support_y, query_x, query_y)
            result = opt.step(batch)           # result.loss, result.stage_losses
        scores = opt.evaluate(test_batch, steps=(1, 5, 10))

    For a hook between computing and applying the meta-gradient (clipping, logging, a custom all-reduce),
    split the step in two, as ``loss.backward(); clip_grad_norm_(...); opt.step()`` does::

        opt.compute(batch)                                       # the meta-direction into every .grad
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # edit .grad as usual
        opt.apply()                                              # the outer update from .grad

    Tasks that are not ``(x, y)`` pairs (reinforcement learning, custom losses) come as a
    :class:`~rkfast.batch.TaskSet`: per-task support and query losses over the model, and data that may be
    produced per stage from that stage's parameters.

    ``param_groups`` and ``state`` are the outer optimizer's own (shared, not copied), so learning-rate
    schedulers, ``zero_grad`` and ``state_dict``/``load_state_dict`` behave as on any torch optimizer;
    the state dict also carries the tableau, ``inner_lr`` and ``first_order``.

    Args:
        model: the model; its parameters (or ``params``) are the meta-parameters.
        loss_fn: ``loss_fn(output, target) -> scalar`` for one task of a :class:`~rkfast.batch.TaskBatch`
            (e.g. ``F.mse_loss``, ``F.cross_entropy``); integer targets also report accuracy. ``None`` when
            every step gets a :class:`~rkfast.batch.TaskSet`, which carries its own losses.
        tableau: a :class:`~rkfast.tableau.Tableau` or a name: ``"maml"``, ``"heun"``, ``"rk4"``, ``"maml(3)"``...
        inner_lr: the RK step ``h`` of the stages (MAML's inner learning rate for ``"maml"``): finite, ``> 0``.
        outer: ``"sgd"`` (the plain step ``theta <- theta - lr * d``), ``"adam"``, ``"adamw"`` or any
            ``torch.optim.Optimizer`` subclass; ``outer_kwargs`` go to its constructor.
        lr: the outer learning rate: finite and ``>= 0`` (as every param group's; ``0``, which torch
            accepts, leaves the parameters where they are). ``TrainConfig`` and ``rkfast train --lr``
            apply the same rule.
        first_order: ignore second derivatives (first-order MAML and its RK analogues).
        params: parameters or param groups to meta-learn (default: every parameter of ``model`` that
            requires grad); the others stay fixed and are not adapted either.
        vectorize: ``True``: run the tasks together under ``vmap``; ``False``: one by one with plain
            autograd (same math); ``"auto"``: ``vmap``, except for models with convolutions on the CPU,
            where ``vmap`` turns per-task convolution weights into grouped convolutions, which CPUs run
            slowly (see the README's benchmarks). The resolved choice is :attr:`vectorize`.
        check_finite: raise :class:`NonFiniteLossError` on a NaN/inf meta-loss or meta-direction, or on
            NaN/inf parameters after the outer update (e.g. from a NaN learning rate), and restore the
            parameters, ``.grad`` and optimizer state as they were before the step (one host
            synchronization per step: the check runs once, after the update).
        batch_statistics: every model call of a step, of :meth:`evaluate` and of :meth:`task_models`
            normalizes with each task's own batch statistics and neither reads nor updates the running
            statistics of BatchNorm/InstanceNorm layers (MAML's convention, and what ``vmap`` needs). The
            model is not modified: its ``track_running_stats``, running buffers and ``state_dict`` stay as
            they are, and outside rkfast's calls it behaves as configured (``model.eval()`` uses its running
            statistics). ``False``: the layers run as configured inside rkfast's calls too (running
            statistics read in ``eval()``, updated in ``train()`` mode, which needs ``vectorize=False``).
        backend: kernels for the stage arithmetic and the plain outer step (:mod:`rkfast.kernels`):
            ``"auto"`` (C++ on CPU, Triton on CUDA, where available) or a backend name.
        capture: CUDA only. ``True``: after two eager warm-up steps, capture one whole step (every stage,
            the outer update) in a CUDA graph and replay it for each later batch, whose shapes must then
            stay the same (:class:`~rkfast.capture.CaptureShapeError` otherwise); ``"auto"``: re-capture
            when the shapes change. A replayed step does not synchronize with the host: a non-finite step
            is skipped on the device (parameters and optimizer state kept, ``.grad`` zero) and counted in
            :attr:`skipped_steps` instead of raising. The learning rate is part of the captured step:
            after changing it (e.g. a scheduler), call :meth:`release_capture`. Adam/AdamW are created
            with ``capturable=True``. Captured steps take :class:`~rkfast.batch.TaskBatch` es;
            :meth:`compute`/:meth:`apply` run eagerly. A :class:`~rkfast.capture.StepCapture` instance
            is used as the capture engine as given. Not with a process group (``ValueError``).
        process_group: task parallelism over ``torch.distributed`` (:mod:`rkfast.distributed`,
            ``docs/distributed.md``). ``"auto"``: the default process group when torch.distributed is
            initialized with more than one rank (as under ``torchrun``), else none; ``None``: never (a
            rank-local optimizer, e.g. one built on rank 0 alone); or a ``torch.distributed.ProcessGroup``.
            With a group, construction broadcasts the meta-parameters from the group's rank 0 (a collective:
            every rank must build its optimizer), and each :meth:`step`/:meth:`compute` is a collective too:
            every rank passes its own tasks (:meth:`TaskParallel.split <rkfast.distributed.TaskParallel.split>`
            gives its share), computes their meta-direction, and one all-reduce makes it the task-weighted
            mean over all ranks' tasks, identical on every rank, which every rank applies with the same outer
            update. A failure on one rank makes the others raise :class:`~rkfast.distributed.RankFailedError`;
            a non-finite meta-loss on one rank makes all raise :class:`NonFiniteLossError`. :meth:`apply` and
            :meth:`evaluate` do not communicate. :attr:`distributed` is the group's
            :class:`~rkfast.distributed.TaskParallel`.
        check_consistency: with a process group, a debug check after every outer update (:meth:`step`,
            :meth:`apply`): all ranks compare a checksum of the meta-parameters' bits (one small
            ``all_gather``) and raise :class:`~rkfast.distributed.InconsistentParametersError`, naming the
            ranks that differ from rank 0, if they are not identical (the update itself is kept).
        learn_rates: learn the inner rates by the same meta-gradient (``docs/method.md``, "Learned inner
            rates"): ``"scalar"`` (one rate), ``"tensor"`` (one per parameter tensor: MAML++'s per-layer
            rates) or ``"element"`` (one per element: Meta-SGD); ``None`` (default): the fixed step
            ``inner_lr``. Stage ``j``'s point becomes ``theta - sum_l A[j][l] (r_l ⊙ k_l)``. The rates start
            at ``inner_lr`` (the first step equals the fixed-step one exactly) and are unconstrained (a rate
            may become zero or negative). They are leaf tensors in their own, last, param group of the outer
            optimizer (``lr=rate_lr``, ``weight_decay=0`` where the optimizer has one), so schedulers, the
            outer update and its state dict cover them; :attr:`rates` reads them. Meta-test
            (:meth:`evaluate`) adapts with them. With a process group their direction is reduced with the
            parameters'; with ``capture`` they are part of the CUDA graph.
        per_stage_rates: one set of rates per slope of the tableau (for ``maml(k)``: one per inner step,
            MAML++'s per-step rates); needs ``learn_rates``.
        rate_lr: the outer learning rate of the rates (default: ``lr``): finite, ``>= 0``; needs ``learn_rates``.
        frozen_rates: ``{parameter name or glob: rate}``: fixed, not learned, rates for the matching
            parameter tensors (``{"features.*": 0.0}``: ANIL, those tensors are meta-learned by the outer
            update but not adapted in the inner loop or at meta-test). Works with ``learn_rates=None`` too
            (fixed per-tensor rates, ``inner_lr`` elsewhere). A pattern that matches nothing is a ``ValueError``.
        learn_tableau: learn the tableau's coefficients by the same meta-gradient (``docs/method.md``,
            "Learned tableaus"): ``"pattern"`` (the non-zero entries of ``tableau.A``, starting at their
            values; the zeros stay zero, so the step costs what the named tableau costs) or ``"full"`` (every
            entry below the diagonal); ``None`` (default): the tableau is fixed. The entries are one tensor
            in their own param group (``lr=tableau_lr``, ``weight_decay=0``); :attr:`learned_tableau` and
            :meth:`current_tableau` read them, and meta-test adaptation uses the current tableau's step.
        tableau_weights: ``"fixed"`` (default): ``b`` stays the tableau's; ``"order"``: ``b`` follows ``A``
            as the solution of the order conditions linear in ``b`` (``rkfast.learned.order_weights``: for
            2 stages the second-order family, for 4 stages order 3), so the scheme stays consistent. A free
            ``b`` trained on the same meta-loss is not offered: the meta-loss is linear in ``b``, and its
            minimum puts all weight on one stage. Needs ``learn_tableau``.
        tableau_lr: the outer learning rate of the learned tableau (default: ``lr``): finite, ``>= 0``.

    The meta-parameters are moved into one contiguous flat buffer (:class:`~rkfast.flat.FlatParameters`),
    and each parameter becomes a view into it (the same ``Parameter`` objects: the model, its
    ``state_dict`` and user code keep working); their ``.grad`` are views into one flat gradient buffer.

    Attributes:
        model, loss_fn: as given.
        tableau: the :class:`~rkfast.tableau.Tableau` in use; ``inner_lr``, ``first_order`` as given.
        layout: the :class:`~rkfast.layout.ParamLayout` of the meta-parameters inside a flat vector
            (what :meth:`meta_parameters` returns and ``MetaStepOutput.direction`` is laid out as).
        backend: the kernel backend in use (``"auto"`` resolved).
        vectorize: whether the tasks run together under ``vmap`` (``"auto"`` resolved).
        batch_statistics: as given.
        capture: ``False``, ``True`` or ``"auto"``.
        distributed: the :class:`~rkfast.distributed.TaskParallel` of ``process_group``, or ``None``.
        check_consistency: as given.
        outer_optimizer: the ``torch.optim`` optimizer of the outer update.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
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
        capture: CaptureMode | StepCapture = False,
        process_group: ProcessGroup | Literal["auto"] | None = "auto",
        check_consistency: bool = False,
        learn_rates: Literal["scalar", "tensor", "element"] | None = None,
        per_stage_rates: bool = False,
        rate_lr: float | None = None,
        frozen_rates: Mapping[str, float] | None = None,
        learn_tableau: Literal["pattern", "full"] | None = None,
        tableau_weights: Literal["fixed", "order"] = "fixed",
        tableau_lr: float | None = None,
        **outer_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if is_ddp_wrapped(model):
            raise ValueError(
                "the model is wrapped in torch.nn.parallel.DistributedDataParallel: pass the unwrapped model "
                "(model.module) to MetaOptimizer. MetaOptimizer all-reduces the meta-direction over the process "
                "group itself (process_group='auto' uses the default group); DDP's gradient hooks never see "
                "the meta-direction, so a DDP-wrapped model would silently drift apart across ranks."
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (or None for TaskSet steps), got {type(loss_fn).__name__}")
        if vectorize not in (True, False, "auto"):
            raise ValueError(f"vectorize must be True, False or 'auto', got {vectorize!r}")
        self.tableau = get_tableau(tableau)
        self.inner_lr = RF.check_step("inner_lr", inner_lr)
        self.first_order = bool(first_order)
        self.check_finite = bool(check_finite)
        self.model, self.loss_fn = model, loss_fn
        self._vectorize_choice, self._backend_choice = vectorize, backend
        self.batch_statistics = bool(batch_statistics)

        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self._capture = make_step_capture(capture)
        self._dist = resolve_process_group(process_group)
        if self._dist is not None and self._capture is not None:
            raise ValueError(
                f"capture={self._capture.mode!r} with a process group is not supported: the all-reduce of the "
                "meta-direction would have to be recorded in the CUDA graph (NCCL collectives can be captured, "
                "but that path is not tested here; gloo's cannot). Use capture=False, or process_group=None "
                "for a rank-local optimizer (docs/distributed.md)."
            )
        self.check_consistency = bool(check_consistency)
        self._check_rate_options(learn_rates, per_stage_rates, rate_lr, frozen_rates)
        self._check_tableau_options(learn_tableau, tableau_weights, tableau_lr)
        graphed = self._capture is not None and self._capture.requires_cuda
        optimizer = make_outer_optimizer(outer_class(outer), params, lr, outer_kwargs, capturable=graphed)
        # share the outer optimizer's groups and state: a scheduler or load_state_dict acting on this
        # object then acts on the optimizer that really updates the parameters
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups, self.state = optimizer.param_groups, optimizer.state

        meta_params = [p for group in self.param_groups for p in group["params"]]
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [i for i, p in enumerate(meta_params) if id(p) not in names]
        if missing:
            raise ValueError(f"params {missing} are not parameters of the model")
        if not meta_params:
            raise ValueError("no parameters to meta-learn (none requires grad)")
        self.layout = ParamLayout.from_named((names[id(p)], p) for p in meta_params)
        self._flat = FlatParameters(meta_params, self.layout)
        self._resolve_device_choices()
        if self._capture is not None:
            self._capture.check_device(self.device)
        self.capture = self._capture.mode if self._capture is not None else False
        self._rates: LearnedRates | None = None
        if learn_rates is not None or frozen_rates is not None:
            self._rates = LearnedRates(self.layout, self.inner_lr, learn_rates, per_stage=per_stage_rates,
                                       stages=self.tableau.stages, frozen=frozen_rates, dtype=self.dtype,
                                       device=self.device)
            if self._rates.learned:
                _add_coefficient_group(optimizer, self._rates.tensors, lr if rate_lr is None else float(rate_lr))
        self._learned_tableau: LearnedTableau | None = None
        if learn_tableau is not None:
            self._learned_tableau = LearnedTableau(self.tableau, learn_tableau, tableau_weights, dtype=self.dtype,
                                                   device=self.device)
            _add_coefficient_group(optimizer, self._learned_tableau.tensors,
                                   lr if tableau_lr is None else float(tableau_lr))
        self._outer = OuterUpdate(optimizer, self._flat, self._coefficient_tensors())
        self._norm_layers = RF.has_norm_layers(model)
        self._model_call = RF.model_call(model, batch_statistics=self.batch_statistics)
        self._batch_loss = (RF.module_task_loss(model, loss_fn, self.layout, batch_statistics=self.batch_statistics)
                            if loss_fn is not None else None)
        self._workspace = RF.Workspace()
        self._skipped = torch.zeros((), dtype=torch.int64, device=self.device) if self._capture else None
        if self._dist is not None:  # every rank starts from rank 0's meta-parameters
            self._dist.broadcast_(self._flat.data)

    def _check_rate_options(self, learn_rates: Any, per_stage_rates: Any, rate_lr: Any, frozen_rates: Any) -> None:
        """The learned-rate arguments, refused with a ``ValueError`` that names the argument."""
        if learn_rates is not None and learn_rates not in GRANULARITIES:
            raise ValueError(f"learn_rates must be one of {', '.join(map(repr, GRANULARITIES))} or None, "
                             f"got {learn_rates!r}")
        if learn_rates is None and per_stage_rates:
            raise ValueError("per_stage_rates=True needs learn_rates ('scalar', 'tensor' or 'element')")
        _check_coefficient_lr("rate_lr", rate_lr, learn_rates is not None, "learned rates: it needs learn_rates")
        if frozen_rates is not None and not isinstance(frozen_rates, Mapping):
            raise ValueError(f"frozen_rates must be a mapping {{name or glob: rate}}, got {frozen_rates!r}")

    def _check_tableau_options(self, learn_tableau: Any, tableau_weights: Any, tableau_lr: Any) -> None:
        """The learned-tableau arguments, refused with a ``ValueError`` that names the argument."""
        if learn_tableau is not None and learn_tableau not in TABLEAU_PATTERNS:
            raise ValueError(f"learn_tableau must be one of {', '.join(map(repr, TABLEAU_PATTERNS))} or None, "
                             f"got {learn_tableau!r}")
        if tableau_weights not in TABLEAU_WEIGHTS:
            raise ValueError(f"tableau_weights must be one of {', '.join(map(repr, TABLEAU_WEIGHTS))}, "
                             f"got {tableau_weights!r}")
        if learn_tableau is None and tableau_weights != "fixed":
            raise ValueError(f"tableau_weights={tableau_weights!r} needs learn_tableau ('pattern' or 'full')")
        _check_coefficient_lr("tableau_lr", tableau_lr, learn_tableau is not None,
                              "a learned tableau: it needs learn_tableau")
        if learn_tableau is not None and self._capture is not None and self.first_order:
            raise ValueError(f"learn_tableau={learn_tableau!r} with capture={self._capture.mode!r} needs second order: "
                             "the first-order step reads the tableau's weights b on the host, which a CUDA graph "
                             "cannot replay. Use first_order=False or capture=False.")

    def _coefficient_tensors(self) -> list[Tensor]:
        """The learned coefficients' leaf tensors, updated beside the meta-parameters: the learned rates',
        then the learned tableau's."""
        rates = self._rates.tensors if self._rates is not None else []
        return [*rates, *(self._learned_tableau.tensors if self._learned_tableau is not None else [])]

    @property
    def learned_tableau(self) -> LearnedTableau | None:
        """The learned tableau (:class:`~rkfast.learned.LearnedTableau`: ``.current()`` is the tableau at its
        current values, ``.tensors`` its learned entries), or ``None`` without ``learn_tableau``."""
        return self._learned_tableau

    def current_tableau(self) -> Tableau:
        """The tableau the next step uses: :attr:`tableau`, or the learned tableau at its current values."""
        return self._learned_tableau.current() if self._learned_tableau is not None else self.tableau

    @property
    def rates(self) -> LearnedRates | None:
        """The inner rates (:class:`~rkfast.learned.LearnedRates`: ``.values()``, ``.vector(stage)``,
        ``.tensors``), or ``None`` without ``learn_rates``/``frozen_rates``."""
        return self._rates

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only during construction: the flat layout of the meta-parameters is fixed afterwards."""
        if hasattr(self, "_flat"):
            raise RuntimeError(
                "MetaOptimizer cannot take new parameter groups after construction; "
                "pass every group through `params` when creating it"
            )
        super().add_param_group(param_group)

    # -- the meta-step --------------------------------------------------------------------------------

    def step(self, tasks: Tasks) -> MetaStepOutput:  # type: ignore[override]
        """One meta-step on ``tasks``: meta-direction into ``.grad``, then the outer update.

        ``.grad`` of the meta-parameters is overwritten with the meta-direction (not accumulated).
        Returns the :class:`~rkfast.results.MetaStepOutput` (``loss``, ``stage_losses``, ...); its
        tensors may be buffers the next step reuses (clone what you keep).

        Works under ``torch.no_grad()`` (the step enables autograd where it differentiates).

        Raises:
            RuntimeError: called under ``torch.inference_mode()`` (call it outside).
            TypeError, ValueError, RuntimeError: malformed tasks (see :func:`~rkfast.batch.check_task_batch`
                and :func:`~rkfast.batch.check_task_set`; inference tensors among them too), or parameters
                replaced (``model.to(...)``, ``p.data = ...``) by ones that cannot be re-bound: mixed dtypes
                or devices, a changed shape, a dtype the kernel backend does not take.
            NonFiniteLossError: with ``check_finite``, a NaN/inf meta-loss or meta-direction, or NaN/inf
                parameters after the outer update (e.g. a NaN learning rate); not raised by a replayed
                captured step, which skips the update on the device instead (see ``capture``).
            CaptureShapeError: with ``capture=True``, a batch whose shapes differ from the captured ones.
            RankFailedError: with a process group, the step failed on another rank (which raises its own
                exception), or the all-reduce failed (a rank died or stopped stepping: bounded by the
                process group's timeout); see :mod:`rkfast.distributed`.
            InconsistentParametersError: with ``check_consistency``, ranks whose parameters differ after
                the update (raised after it).
            Any exception of the outer optimizer's own ``step``.

            In every case the parameters, every ``.grad`` (``None`` included) and the optimizer state are
            as they were before the call: malformed input is refused before any work, and a failure in
            or after the outer update restores what the update had changed. (Parameters whose storage was
            replaced since the last call, e.g. by ``model.to(torch.float64)``, are re-bound and the
            optimizer state cast to their new dtype and device once the tasks are checked; a later
            failure keeps that re-binding, which changes no value.)
        """
        if self._dist is not None:
            return self._distributed_step(tasks)
        tasks = self._check_tasks(tasks, "step", captured=self._capture is not None)
        if self._capture is not None:
            out = self._capture.run(tasks, self._eager_step, self._captured_step)
            self._flat.expose_grads()
            return out
        return self._eager_step(tasks)

    def _eager_step(self, tasks: TaskBatch | TaskSet) -> MetaStepOutput:
        out = self._meta_direction(tasks)  # stage losses -> rk_meta_step (raises before anything changes)
        self._transactional_update(lambda: self._write_grads(out), out.direction, out.loss,
                                   lambda: self._non_finite_direction_error(out), _coefficient_directions(out))
        return out

    def _write_grads(self, out: MetaStepOutput) -> None:
        """The meta-direction into every ``.grad``: the parameters' flat buffer and the learned coefficients'."""
        self._flat.write_grad(out.direction)
        for t, d in zip(self._coefficient_tensors(), _coefficient_directions(out)):
            t.grad = d

    # -- task-parallel steps (rkfast.distributed) ------------------------------------------------------

    @property
    def distributed(self) -> TaskParallel | None:
        """The :class:`~rkfast.distributed.TaskParallel` this optimizer reduces its meta-direction over
        (``process_group``), or ``None`` when it runs alone."""
        return self._dist

    def _reduced_direction(self, tasks: Tasks, call: str) -> tuple[MetaStepOutput, tuple[int, ...]]:
        """This rank's tasks checked and their meta-direction computed, then reduced over the group (one
        all-reduce): the meta-step of every rank's tasks, identical on every rank. A rank whose check or
        computation raises still joins the all-reduce, then re-raises; the others raise RankFailedError."""
        dist = self._dist
        assert dist is not None

        def local() -> tuple[MetaStepOutput, int]:
            checked = self._check_tasks(tasks, call)
            return self._meta_direction(checked), _task_count(checked)

        def local_joined() -> tuple[MetaStepOutput, int]:
            out, count = local()
            return _joined(out), count

        # the reduced buffer's size is fixed (a re-bind keeps the layout); its dtype and device are the
        # parameters' as they are now (a re-bind inside local() may change them). The learned coefficients'
        # directions ride in the same buffer, after the parameters' (still one all-reduce).
        sizes = [t.numel() for t in self._coefficient_tensors()]
        like = self._flat.params[0].new_empty(self.layout.numel + sum(sizes))
        out, nonfinite = dist.reduce_meta_step(local_joined if sizes else local, like, self.tableau.stages)
        rates = len(self._rates.tensors) if self._rates is not None else 0
        return (_split(out, self.layout.numel, self._coefficient_tensors(), rates) if sizes else out), nonfinite

    def _distributed_step(self, tasks: Tasks) -> MetaStepOutput:
        out, nonfinite = self._reduced_direction(tasks, "step")
        # the reduced direction and loss are identical on every rank: so is every decision below
        self._transactional_update(lambda: self._write_grads(out), out.direction, out.loss,
                                   lambda: self._non_finite_direction_error(out, nonfinite),
                                   _coefficient_directions(out))
        if self.check_consistency:
            self._dist.check_identical(self._flat.data)  # type: ignore[union-attr]
        return out

    def compute(self, tasks: Tasks) -> MetaStepOutput:
        """The first half of :meth:`step`: the meta-direction of ``tasks`` into every ``.grad``, no update.

        Edit ``.grad`` as after any ``backward()`` (clip, log, all-reduce), then call :meth:`apply`.
        Raises as :meth:`step` does, before ``.grad`` changes (with ``check_finite``, a non-finite
        meta-loss or meta-direction is checked here, with one host synchronization).

        With a process group (``process_group``) this is the collective half: ``.grad`` receives the
        meta-direction already reduced over every rank's tasks (identical on every rank). Edits of
        ``.grad`` before :meth:`apply` must then be identical on every rank (a deterministic function of
        ``.grad``, such as ``clip_grad_norm_``, is); otherwise the ranks' parameters drift apart, which
        ``check_consistency`` reports.
        """
        if self._dist is not None:
            out, nonfinite = self._reduced_direction(tasks, "compute")
        else:
            out, nonfinite = self._meta_direction(self._check_tasks(tasks, "compute")), ()
        if self.check_finite and not bool(_all_finite(out.direction, out.loss, *_coefficient_directions(out))):  # one sync
            raise self._non_finite_direction_error(out, nonfinite)
        self._write_grads(out)
        return out

    def apply(self) -> None:
        """The second half of :meth:`step`: the outer update from the current ``.grad``.

        ``.grad`` edited in place or replaced by new tensors is used as it is; a ``.grad`` set to ``None``
        is skipped as torch optimizers do (plain SGD: no change to that parameter). With a process group it
        does not communicate (:meth:`compute` already reduced ``.grad``), except for the
        ``check_consistency`` check after the update.

        Raises:
            RuntimeError: called under ``torch.inference_mode()`` (call it outside).
            ValueError: a ``.grad`` whose shape is not its parameter's.
            NonFiniteLossError: with ``check_finite``, a NaN/inf ``.grad``, or NaN/inf parameters after
                the outer update (e.g. a NaN learning rate).
            Any exception of the outer optimizer's own ``step``.

            In every case the parameters, every ``.grad`` and the optimizer state are as they were before
            the call (one host synchronization with ``check_finite``, after the update).
        """
        self._refuse_inference_mode("apply")
        self._rebind_if_replaced()
        grad = self._flat.grad  # .grad as the update reads it, once adopted
        coefficient_grads = [t.grad for t in self._coefficient_tensors()]
        self._transactional_update(self._flat.adopt_grads, grad, None, lambda: NonFiniteLossError(
            "non-finite .grad; parameters, .grad and optimizer state were left unchanged"), coefficient_grads)
        if self._dist is not None and self.check_consistency:
            self._dist.check_identical(self._flat.data)

    def _transactional_update(self, set_grad: Callable[[], None], direction: Tensor, loss: Tensor | None,
                              direction_error: Callable[[], NonFiniteLossError],
                              coefficient_directions: Sequence[Tensor | None] = ()) -> None:
        """``set_grad()`` (the new ``.grad``) and the outer update as one transaction: any exception, and with
        ``check_finite`` a non-finite ``direction``/``loss`` or non-finite updated parameters, restores the
        parameters, ``.grad`` and optimizer state and raises.

        The finiteness of the inputs and of the result is read once, after the update (the step's one host
        synchronization): a non-finite direction makes the update produce garbage, which is then undone."""
        inputs_ok: Tensor | None = None
        coefficients = self._coefficient_tensors()
        try:
            with self._outer.transaction():
                set_grad()
                if self.check_finite:
                    inputs_ok = _all_finite(direction, loss, *coefficient_directions)  # on the device: no sync yet
                self._outer.update(self.backend)
                if inputs_ok is not None and not bool(inputs_ok & _all_finite(self._flat.data, *coefficients)):  # one sync
                    raise direction_error() if not bool(inputs_ok) else self._non_finite_update_error()
                if self._learned_tableau is not None:
                    # updated entries must still give usable weights (solvable, none negative): checked here, so
                    # that the state a step leaves behind (and a checkpoint saves) always has them
                    self._learned_tableau.weights()
        except Exception as err:
            # an optimizer that refuses a non-finite gradient itself: report what was non-finite
            if isinstance(err, NonFiniteLossError) or inputs_ok is None or bool(inputs_ok):
                raise
            raise direction_error() from err

    def _captured_step(self, batch: TaskBatch) -> MetaStepOutput:
        """The step recorded into the CUDA graph: the finiteness check and the skip stay on the device. Learned
        rates are part of it: their ``.grad`` are the graph's tensors, and a skipped step keeps them too."""
        out = self._meta_direction(batch)
        if not self.check_finite:
            self._write_grads(out)
            self._outer.update(self.backend)
            return out
        extra = _coefficient_directions(out)
        ok = _all_finite(out.direction, out.loss, *extra)
        self._flat.write_grad(torch.where(ok, out.direction, 0.0))  # a skipped step updates with a zero gradient
        for t, d in zip(self._coefficient_tensors(), extra):
            t.grad = torch.where(ok, d, 0.0)
        self._outer.update_if(ok, self.backend)
        self._skipped.add_((~ok).to(self._skipped.dtype))  # type: ignore[union-attr]
        return out

    def _meta_direction(self, tasks: TaskBatch | TaskSet) -> MetaStepOutput:
        """The RK meta-direction of ``tasks`` (checked, so the flat buffer is bound) at the current parameters;
        its finiteness is the caller's to check (after the update, before ``.grad``, or on the device)."""
        support_loss, query_loss, support_data, query_data, num_tasks = self._stage_losses(tasks)
        if self._rates is not None:
            self._rates.inner_lr = self.inner_lr  # the rate of tensors neither learned nor frozen
        tableau = self._learned_tableau if self._learned_tableau is not None else self.tableau
        return RF.rk_meta_step(
            self._flat.data.detach(), support_loss, query_loss, support_data, query_data, tableau,
            self.inner_lr, first_order=self.first_order, vectorize=self.vectorize, num_tasks=num_tasks,
            backend=self.backend, workspace=self._workspace, rates=self._rates,
        )

    def _stage_losses(self, tasks: TaskBatch | TaskSet) -> tuple[RF.TaskLoss, RF.TaskLoss, Any, Any, int | None]:
        """The per-task losses and data of ``tasks`` in the functional core's terms."""
        if isinstance(tasks, TaskBatch):
            return self._batch_loss, self._batch_loss, tasks.support, tasks.query, None  # type: ignore[return-value]
        support, query = (RF.model_task_loss(self.model, loss, self.layout, norm_layers=self._norm_layers,
                                             batch_statistics=self.batch_statistics)
                          for loss in (tasks.support_loss, tasks.query_loss))
        return support, query, tasks.support_data, tasks.query_data, tasks.num_tasks

    def _check_tasks(self, tasks: Tasks, call: str, captured: bool = False) -> TaskBatch | TaskSet:
        """``tasks`` checked against the parameters as they are now (raises before anything changes), then
        the flat buffer re-bound if something replaced a parameter's storage since the last call."""
        self._refuse_inference_mode(call)
        rebind = self._check_rebind()
        checked = self._checked_tasks(tasks, captured)
        if rebind:
            self._rebind()
        return checked

    def _checked_tasks(self, tasks: Tasks, captured: bool) -> TaskBatch | TaskSet:
        if isinstance(tasks, TaskSet):
            if captured:
                raise TypeError("a captured step (capture=True/'auto') takes TaskBatch batches, whose tensors the "
                                "graph copies in; run TaskSet steps with capture=False")
            return check_task_set(tasks, device=self.device)
        if self.loss_fn is None:
            raise TypeError("this MetaOptimizer was built with loss_fn=None: give each step a TaskSet with its "
                            "losses, or build it with a loss_fn for TaskBatch batches")
        return check_task_batch(tasks, dtype=self.dtype, device=self.device)

    @staticmethod
    def _refuse_inference_mode(call: str) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"MetaOptimizer.{call}() cannot run under torch.inference_mode(): the meta-step and meta-test "
                "adaptation differentiate through the model, which inference mode forbids, and optimizer state "
                f"created there could not be updated by later steps. Call {call}() outside inference_mode "
                "(under torch.no_grad() it works as usual)."
            )

    def _non_finite_direction_error(self, out: MetaStepOutput, ranks: Sequence[int] = ()) -> NonFiniteLossError:
        stages = {j: float(v) for j, v in out.stage_losses.items()}
        where = ""
        if self._dist is not None:
            where = (f" (reduced over {self._dist.world_size} ranks; non-finite on rank(s) {list(ranks)}: every "
                     "rank raises this error)" if ranks else f" (reduced over {self._dist.world_size} ranks)")
        return NonFiniteLossError(
            f"non-finite meta-loss {float(out.loss)} (query loss per stage: {stages}) or meta-direction{where}; "
            "parameters and optimizer state were left unchanged. Lower inner_lr or lr, or check the batch."
        )

    def _non_finite_update_error(self) -> NonFiniteLossError:
        optimizer = self.outer_optimizer
        lrs = [group.get("lr") for group in optimizer.param_groups]
        lr = f"lr={lrs[0]}" if len(lrs) == 1 else f"lr per param group={lrs}"
        return NonFiniteLossError(
            f"the outer update ({type(optimizer).__name__}, {lr}) produced non-finite parameters although the "
            "meta-direction (.grad) was finite; parameters, .grad and optimizer state were restored. Check the "
            "outer optimizer's learning rate and settings (a scheduler or an edit of param_groups may have set them)."
        )

    # -- the flat buffer and what depends on its device -------------------------------------------------

    # the parameters' own (after model.to(...) that is their new kind, before the flat buffer is re-bound)
    dtype = property(lambda self: self._flat.params[0].dtype, doc="The meta-parameters' dtype.")
    device = property(lambda self: self._flat.params[0].device, doc="The meta-parameters' device.")

    def _resolve_device_choices(self) -> None:
        self.backend = kernels.resolve_backend(self._backend_choice, self.device, self.dtype)
        self.vectorize = resolve_vectorize(self._vectorize_choice, self.model, self.device)

    def _rebind_if_replaced(self) -> None:
        """Re-bind if something replaced a parameter's storage (``model.to(...)``, ``p.data = ...``)."""
        if self._check_rebind():
            self._rebind()

    def _check_rebind(self) -> bool:
        """Whether a parameter's storage was replaced; raises (before anything changes) if the parameters
        cannot be re-bound as they are now."""
        if not self._flat.replaced():
            return False
        self._flat.check_rebind()
        kernels.resolve_backend(self._backend_choice, self.device, self.dtype)
        if self._capture is not None:
            self._capture.check_device(self.device)
        return True

    def _rebind(self) -> None:
        """The parameters into new flat buffers, with everything that depends on their dtype and device: the
        outer state (cast first: that can fail, the rest cannot), the kernel choices, a captured graph (it
        reads and writes the old buffers)."""
        with torch.inference_mode(False):  # the new buffers and state must stay trainable
            if (self.dtype, self.device) != (self._flat.dtype, self._flat.device):
                if self._rates is not None:
                    self._rates.to_(self.dtype, self.device)  # the same tensors: their param group holds them
                if self._learned_tableau is not None:
                    self._learned_tableau.to_(self.dtype, self.device)
                cast_state_to_params(self.outer_optimizer)
                self.param_groups, self.state = self.outer_optimizer.param_groups, self.outer_optimizer.state
            self._flat.rebind()
        self._resolve_device_choices()
        if self._capture is not None:
            self._capture.release()
            self._skipped = self._skipped.to(self.device)  # type: ignore[union-attr]

    @property
    def flat_parameters(self) -> Tensor:
        """The flat buffer ``[N]`` that holds the meta-parameters (each parameter is a view into it).

        Writing into it changes the model's parameters; :attr:`layout` says where each one lives.
        """
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
        layout, call = self.layout, self._model_call

        def run(*inputs: Any) -> Any:
            return vmap(lambda row, *xs: call(layout.unflatten(row), *xs))(params, *inputs)

        return run

    @property
    def skipped_steps(self) -> Tensor | None:
        """With ``capture``: the number of replayed steps skipped for a non-finite loss or direction (a
        device tensor: reading its value synchronizes). ``None`` without capture (such steps raise)."""
        return self._skipped

    def release_capture(self) -> None:
        """Drop the captured CUDA graph; the next steps warm up and capture again (e.g. after an lr change)."""
        if self._capture is not None:
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
        """Meta-test: adapt the current parameters to each task with plain gradient steps.

        ``step_size`` defaults to ``tableau.test_step(inner_lr)``, the step the tableau's own stages take
        (``h`` for ``maml(k)``, ``h/2`` for midpoint; ``docs/method.md``). Parameters are not modified.
        Returns per-task query losses (and accuracies) before adaptation and after each count in ``steps``;
        ``.summary()`` gives means and 95% confidence intervals. ``keep_params`` also returns the adapted
        flat parameters (``[len(steps), T, N]``; :attr:`layout` unflattens them). Works under
        ``torch.no_grad()``; raises ``RuntimeError`` under ``torch.inference_mode()``, and as :meth:`step`
        does for malformed tasks.

        With learned (or frozen) rates (:attr:`rates`) and no ``step_size``, step ``n`` (0-based) adapts with
        the rate vector of set ``min(n, sets - 1)`` times the tableau's test-step factor
        ``tableau.test_step(h) / h`` (1 for ``maml(k)``, 1/2 for midpoint), and the output's ``step_size``
        is that factor. An explicit ``step_size`` replaces the learned rates by that scalar, as without
        them; tensors with ``frozen_rates`` keep their fixed rate scaled by ``step_size / inner_lr`` (a
        rate frozen at 0 stays 0: ANIL's body is not adapted at meta-test either).

        ``adaptation="stages"`` adapts with the tableau's own stages instead (``docs/method.md``, "Meta-test"):
        each of the ``steps`` is one RK meta-step's stage points from the current parameters, from support
        gradients only, ending at the last stage's point (:class:`~rkfast.functional.StageMap`), with the
        step ``h`` (``step_size``, default ``inner_lr``) or the learned rates. For ``maml(k)`` one such step is
        ``k`` gradient steps of ``h``; for ``rk4`` (and any learned tableau) it is the point the last stage
        was trained at, which a plain gradient step of ``h c_s`` is not.

        With a process group it does not communicate: each rank evaluates the tasks it is given. Gathering
        is the caller's: ``AdaptationOutput.cat(opt.distributed.all_gather_object(result))``.
        """
        if adaptation not in ("gradient", "stages"):
            raise ValueError(f"adaptation must be 'gradient' or 'stages', got {adaptation!r}")
        tasks = self._check_tasks(tasks, "evaluate")
        tableau = self.current_tableau()
        by_stages = adaptation == "stages"
        own_step = self.inner_lr if by_stages else tableau.test_step(self.inner_lr)
        alpha = own_step if step_size is None else step_size
        rates = None
        if self._rates is not None:
            self._rates.inner_lr = self.inner_lr
            with torch.no_grad():
                if step_size is None:
                    alpha = own_step / self.inner_lr
                    vectors = [self._rates.vector(s).detach() for s in range(self._rates.sets)]
                    rates = lambda n: vectors[min(n, len(vectors) - 1)]  # noqa: E731
                elif self._rates.frozen:
                    scaled = self._rates.fixed_vector() / self.inner_lr  # 1 where not frozen: step_size exactly
                    rates = lambda n: scaled  # noqa: E731
        support_loss, query_loss, support_data, query_data, num_tasks = self._stage_losses(tasks)
        stages = RF.StageMap(tableau, rates) if by_stages else None
        return RF.adapt(
            self.flat_parameters.detach(), support_loss, query_loss, support_data, query_data, alpha, steps,
            vectorize=self.vectorize, num_tasks=num_tasks, keep_params=keep_params,
            rates=None if by_stages else rates, stages=stages,
        )

    # -- state ----------------------------------------------------------------------------------------

    def _meta_state(self) -> dict[str, Any]:
        meta = {
            "tableau": self.tableau.to_dict(),
            "inner_lr": self.inner_lr,
            "first_order": self.first_order,
            "outer": type(self.outer_optimizer).__name__,
        }
        if self._rates is not None:
            meta["rates"] = self._rates.state()
        if self._learned_tableau is not None:
            meta["learned_tableau"] = self._learned_tableau.state()
        return meta

    def state_dict(self) -> dict[str, Any]:
        """The outer optimizer's state dict plus ``"rkfast"``: tableau, ``inner_lr``, ``first_order`` and,
        with learned or frozen rates, ``"rates"``, and with a learned tableau, ``"learned_tableau"`` (their
        configuration and values; their outer-optimizer state is in the outer state dict, as their param
        groups)."""
        sd = self.outer_optimizer.state_dict()
        sd["rkfast"] = self._meta_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: outer optimizer state, param groups, tableau and inner step.

        Raises ``ValueError`` (before anything changes) for another optimizer's state dict, an invalid
        ``inner_lr``, or a param group whose ``lr`` is not a finite, non-negative number."""
        meta = state_dict.get("rkfast")
        if not isinstance(meta, dict):
            raise ValueError("not a MetaOptimizer state dict: the 'rkfast' entry is missing")
        outer = type(self.outer_optimizer).__name__
        if meta.get("outer") != outer:
            raise ValueError(f"state dict is for outer optimizer {meta.get('outer')!r}, this one uses {outer!r}")
        tableau = Tableau.from_dict(meta["tableau"])
        inner_lr = RF.check_step("inner_lr", meta["inner_lr"])
        if self._rates is None and meta.get("rates") is not None:
            raise ValueError("the state dict has learned/frozen rates (learn_rates or frozen_rates), this "
                             "MetaOptimizer has none")
        rate_values = self._rates.check_state(meta.get("rates")) if self._rates is not None else None
        if self._learned_tableau is None and meta.get("learned_tableau") is not None:
            raise ValueError("the state dict has a learned tableau (learn_tableau), this MetaOptimizer has none")
        tableau_values = (self._learned_tableau.check_state(meta.get("learned_tableau"))
                          if self._learned_tableau is not None else None)
        for i, group in enumerate(state_dict.get("param_groups", ())):
            if "lr" in group:
                check_lr(group["lr"], f"lr of param group {i}")
        self.outer_optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "rkfast"})
        self.param_groups, self.state = self.outer_optimizer.param_groups, self.outer_optimizer.state
        self.tableau, self.inner_lr, self.first_order = tableau, inner_lr, bool(meta["first_order"])
        if self._rates is not None:
            self._rates.inner_lr = inner_lr
            self._rates.load(rate_values)  # type: ignore[arg-type]
        if self._learned_tableau is not None:
            self._learned_tableau.load(tableau_values)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"MetaOptimizer(tableau={self.tableau.name}, inner_lr={self.inner_lr:g}, "
            f"first_order={self.first_order}, outer={self.outer_optimizer!r})"
        )


def _check_coefficient_lr(name: str, value: Any, learned: bool, what: str) -> None:
    """The learning rate ``name`` of learned coefficients: given only with them (``learned``; ``what`` says
    which), and a finite, non-negative number (``ValueError`` otherwise)."""
    if value is None:
        return
    if not learned:
        raise ValueError(f"{name} is the learning rate of {what}")
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a finite, non-negative number, got {value!r}")
    check_lr(value, name)


def _add_coefficient_group(optimizer: torch.optim.Optimizer, tensors: Sequence[Tensor], lr: Any) -> None:
    """The learned coefficients' own param group: their learning rate, and no weight decay where the
    optimizer has one (it would pull the rates and entries to zero)."""
    group: dict[str, Any] = {"params": list(tensors), "lr": lr}
    if "weight_decay" in optimizer.defaults:
        group["weight_decay"] = 0.0
    optimizer.add_param_group(group)


def _task_count(tasks: TaskBatch | TaskSet) -> int:
    """The number of tasks of checked ``tasks`` (a rank's weight in the reduced meta-direction)."""
    if isinstance(tasks, TaskBatch):
        return tasks.num_tasks
    return RF.resolve_num_tasks(tasks.num_tasks, tasks.support_data, tasks.query_data)


def _coefficient_directions(out: MetaStepOutput) -> list[Tensor]:
    """The learned coefficients' meta-directions of a step's output, in :meth:`MetaOptimizer._coefficient_tensors`
    order (none without learned rates or tableau)."""
    return list(getattr(out, "coefficient_directions", ()))


def _joined(out: MetaStepOutput) -> MetaStepOutput:
    """``out`` with the learned coefficients' directions appended to the flat direction (one buffer to reduce)."""
    extra = [d.reshape(-1).to(out.direction.dtype) for d in _coefficient_directions(out)]
    return MetaStepOutput(torch.cat([out.direction.reshape(-1), *extra]), out.loss, out.stage_losses,
                          out.stage_metrics)


def _split(out: MetaStepOutput, numel: int, coefficients: Sequence[Tensor], rates: int) -> RatesStepOutput:
    """Inverse of :func:`_joined` for the reduced output: the parameters' direction and each coefficient
    tensor's (in :meth:`MetaOptimizer._coefficient_tensors` order, the first ``rates`` the learned rates',
    shaped and typed like the tensor)."""
    pieces, offset = [], numel
    for t in coefficients:
        pieces.append(out.direction[offset : offset + t.numel()].view(t.shape).to(t.dtype))
        offset += t.numel()
    return RatesStepOutput(MetaStepOutput(out.direction[:numel], out.loss, out.stage_losses, out.stage_metrics),
                           pieces[:rates], pieces[rates:])


def _all_finite(*tensors: Tensor | None) -> Tensor:
    """A 0-d device boolean: every element of every given tensor is finite (reading it synchronizes)."""
    checks = [torch.isfinite(t).all() for t in tensors if t is not None]
    ok = checks[0]
    for check in checks[1:]:
        ok = ok & check
    return ok
