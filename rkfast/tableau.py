"""Butcher tableaus for Runge-Kutta meta-updates.

A tableau ``(A, b)`` is data: the generic RK meta-step in :mod:`rkfast.functional` reads it and
nothing else, so MAML, Heun, RK4 and any user-defined explicit scheme run through the same code.

Stage ``j`` of a task evaluates the support gradient at ``theta - h * sum_{i<j} A[j][i] * k_i`` and the
meta-loss weighs the query loss at stage ``j`` by ``b[j]`` (see ``docs/method.md``). A tableau has at most
:data:`MAX_STAGES` stages.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from types import FrameType
from typing import Any

__all__ = [
    "Tableau",
    "InconsistentTableauWarning",
    "TableauTypeError",
    "MAX_STAGES",
    "get_tableau",
    "named_tableaus",
    "rk2",
    "maml",
    "maml_msl",
]

# Tolerance of the order conditions: named tableaus are exact rationals, so anything looser than
# float rounding would only admit user tableaus that are "almost" of an order.
_ORDER_TOL = 1e-10


MAX_STAGES = 1001
"""The most stages a tableau may have (``maml(1000)``: 1000 inner steps). ``A`` is stored dense (``s^2``
entries, validated and checked against the order conditions in Python), the meta-step keeps each stage's
slope ``[T, N]`` until its last reader (for ``maml(k)`` until the end) and a second-order backward holds
every stage's graph: a scheme of thousands of stages would exhaust memory, so it is refused up front,
before anything of its size is allocated."""


class InconsistentTableauWarning(UserWarning):
    """The weights ``b`` do not sum to 1: the scheme does not integrate the gradient flow."""


class TableauTypeError(TypeError, ValueError):
    """A tableau argument of the wrong type: a string, ``bool`` or other non-number where numbers are
    expected (``maml_msl("55")`` would otherwise read the digits as weights). Also a ``ValueError``, the
    type the tableau's other validation errors have."""


def _is_text(x: Any) -> bool:
    return isinstance(x, (str, bytes))


def _number(x: Any, what: str) -> float:
    """A real number as a float; strings (``"0.5"``), ``bool`` and non-numbers are refused."""
    if _is_text(x) or isinstance(x, bool):
        raise TableauTypeError(f"{what} must be a number, got {x!r}")
    try:
        return float(x)
    except (TypeError, ValueError) as err:
        raise TableauTypeError(f"{what} must be a number, got {x!r}") from err


def _check_stages(s: int, what: str) -> None:
    if s > MAX_STAGES:
        raise ValueError(
            f"{what} has {s} stages; a tableau may have at most MAX_STAGES = {MAX_STAGES} "
            "(A is dense and the meta-step keeps a [tasks, parameters] slope per stage: more would exhaust memory)"
        )


def _sequence(x: Any, what: str) -> list[Any]:
    """``x`` as a list (tensors and arrays through ``tolist``); a string is not a sequence of numbers."""
    if hasattr(x, "tolist"):  # torch tensors and numpy arrays
        x = x.tolist()
    if _is_text(x):
        raise TableauTypeError(f"{what} must be a sequence of numbers, not a string: got {x!r}")
    try:
        return list(x)
    except TypeError as err:
        raise ValueError(f"{what} must be a sequence, got {x!r}") from err


def _as_float_matrix(A: Any) -> tuple[tuple[float, ...], ...]:
    rows = _sequence(A, "tableau A (a square matrix, a sequence of rows)")
    _check_stages(len(rows), "tableau A")
    return tuple(_as_float_vector(row, f"tableau A[{j}]") for j, row in enumerate(rows))


def _as_float_vector(b: Any, what: str = "tableau b") -> tuple[float, ...]:
    return tuple(_number(x, f"{what}[{j}]") for j, x in enumerate(_sequence(b, what)))


def _caller_stacklevel() -> int:
    """``warnings.warn`` stacklevel of the first frame outside this module (the user's call)."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    return level


def _close(x: float, target: float) -> bool:
    return abs(x - target) <= _ORDER_TOL * max(1.0, abs(target))


@dataclass(frozen=True)
class StageStep:
    """One stage a meta-step computes (:attr:`Tableau.schedule`).

    Attributes:
        index: the stage ``j`` (0-based).
        coefficients: the non-zero ``(m, A[j][m])``: the earlier slopes its point reads (none: theta itself).
        support_grad: its slope ``k_j`` is read by a later stage, so it is computed.
        query_loss: the meta-loss weighs its query loss (``b[j] != 0``).
        frees: the slopes no stage after this one reads.
    """

    index: int
    coefficients: tuple[tuple[int, float], ...]
    support_grad: bool
    query_loss: bool
    frees: tuple[int, ...]


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta tableau, validated on construction.

    Attributes:
        A: the ``s x s`` strictly lower triangular stage matrix, as a tuple of rows.
        b: the ``s`` stage weights of the meta-loss.
        name: a label used in logs, results and ``state_dict``.

    Derived (not stored by hand): ``c`` (row sums of ``A``, the stage nodes), ``order`` (1 to 4 from the
    order conditions, 0 for an inconsistent scheme whose weights do not sum to 1), ``stages``, and for
    meta-test :attr:`adaptation_steps` and :meth:`test_step` (the default step, ``h c_s / m``).

    Raises:
        ValueError: empty tableau, more than :data:`MAX_STAGES` stages, non-square ``A``, ``A`` not
            strictly lower triangular (implicit methods are not supported), ``len(b) != s`` or
            non-finite entries.
        TableauTypeError: (a ``ValueError`` too) an entry that is not a number (a string, ``bool``...).

    Warns:
        InconsistentTableauWarning: when ``sum(b) != 1``.
    """

    A: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    name: str = "custom"
    c: tuple[float, ...] = field(init=False, repr=False, compare=False)
    order: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        A = _as_float_matrix(self.A)
        b = _as_float_vector(self.b)
        s = len(A)
        if s == 0:
            raise ValueError("tableau is empty: A must have at least one row (one stage)")
        for j, row in enumerate(A):
            if len(row) != s:
                raise ValueError(f"tableau A must be square: it has {s} rows but row {j} has {len(row)} entries")
        if len(b) != s:
            raise ValueError(f"tableau b has {len(b)} entries but A has {s} stages: len(b) must equal s")
        bad = [f"A[{j}][{i}]" for j in range(s) for i in range(s) if not math.isfinite(A[j][i])]
        bad += [f"b[{j}]" for j in range(s) if not math.isfinite(b[j])]
        if bad:
            raise ValueError(f"tableau entries must be finite; non-finite: {', '.join(bad)}")
        upper = [f"A[{j}][{i}]={A[j][i]:g}" for j in range(s) for i in range(j, s) if A[j][i] != 0.0]
        if upper:
            raise ValueError(
                "tableau A must be strictly lower triangular (explicit RK); non-zero entries on or above "
                f"the diagonal: {', '.join(upper)}. Implicit methods are not supported."
            )
        if not _close(math.fsum(b), 1.0):
            warnings.warn(
                f"tableau {self.name!r}: sum(b) = {math.fsum(b):g} != 1, so the scheme is inconsistent "
                "(it does not follow the gradient flow); its order is reported as 0",
                InconsistentTableauWarning,
                stacklevel=_caller_stacklevel(),
            )
        object.__setattr__(self, "A", A)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "name", str(self.name))
        object.__setattr__(self, "c", tuple(math.fsum(row) for row in A))
        object.__setattr__(self, "order", _order(A, b))

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_arrays(cls, A: Any, b: Any, name: str = "custom") -> Tableau:
        """Build a tableau from any nested sequence, numpy array or tensor ``A`` and vector ``b``."""
        return cls(_as_float_matrix(A), _as_float_vector(b), name)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tableau:
        """Inverse of :meth:`to_dict` (used by ``MetaOptimizer.load_state_dict``)."""
        try:
            return cls.from_arrays(d["A"], d["b"], d.get("name", "custom"))
        except KeyError as err:
            raise ValueError(f"tableau dict needs keys 'A' and 'b', got {sorted(d)}") from err

    def to_dict(self) -> dict[str, Any]:
        """A plain-Python description (JSON- and ``torch.save``-friendly)."""
        return {"name": self.name, "A": [list(r) for r in self.A], "b": list(self.b)}

    # -- structure the meta-step reads ---------------------------------------------------------------

    @property
    def stages(self) -> int:
        """Number of stages ``s``."""
        return len(self.b)

    def coefficients(self, j: int) -> list[tuple[int, float]]:
        """The non-zero ``(i, A[j][i])`` of stage ``j`` (0-based): the earlier slopes its point uses."""
        return [(i, a) for i, a in enumerate(self.A[j][:j]) if a != 0.0]

    @property
    def last_reader(self) -> tuple[int, ...]:
        """Per stage ``j``: the last stage whose point uses the slope ``k_j`` (a non-zero ``A[i][j]``), or -1."""
        s = self.stages
        return tuple(max((i for i in range(j + 1, s) if self.A[i][j] != 0.0), default=-1) for j in range(s))

    @property
    def needs_support_grad(self) -> tuple[bool, ...]:
        """Per stage: is its support gradient ``k_j`` used by a later stage (a non-zero ``A[i][j]``)?"""
        return tuple(last >= 0 for last in self.last_reader)

    @property
    def needs_query_loss(self) -> tuple[bool, ...]:
        """Per stage: does the meta-loss weigh its query loss (``b[j] != 0``)?"""
        return tuple(w != 0.0 for w in self.b)

    @functools.cached_property
    def schedule(self) -> tuple[StageStep, ...]:
        """The stages a meta-step computes, in order: those whose slope a later stage reads or whose query
        loss the meta-loss weighs; every form of the step (:func:`rkfast.functional.stage_points`,
        :func:`rkfast.taskmap.stage_query_losses`) runs this one sequence."""
        last_reader, slope, query = self.last_reader, self.needs_support_grad, self.needs_query_loss
        return tuple(
            StageStep(j, tuple(coefs), slope[j], query[j], tuple(m for m, _ in coefs if last_reader[m] == j))
            for j, coefs in ((j, self.coefficients(j)) for j in range(self.stages))
            if slope[j] or query[j]
        )

    @property
    def last_node(self) -> float:
        """``c_s``, the node of the last stage: how far (in units of ``h``) the last stage has moved from
        theta, summed over all its steps (``k`` for ``maml(k)``)."""
        return self.c[-1]

    def _extends_previous(self, j: int) -> bool:
        """Stage ``j`` is a plain gradient step from stage ``j - 1``: ``theta^(j) = theta^(j-1) - h A[j][j-1]
        k^(j-1)``, i.e. row ``j`` of ``A`` repeats row ``j - 1`` and adds a non-zero ``A[j][j-1]``."""
        return self.A[j][j - 1] != 0.0 and self.A[j][: j - 1] == self.A[j - 1][: j - 1]

    @property
    def adaptation_steps(self) -> int:
        """``m``: the number of gradient steps by which the last stage adapts theta.

        The stages that end at the last one and each extend the one before by a plain gradient step
        (:meth:`_extends_previous`) form a chain; ``m`` counts its links, plus one if the chain starts at a
        stage that is itself away from theta (a non-zero row of ``A``). ``maml(k)`` and ``maml_msl`` with
        ``k + 1`` weights: ``k``; every other named tableau: 1 (``rk4``'s last stage is one combined step
        from theta); ``euler``: 0 (the last stage is theta).
        """
        j, links = self.stages - 1, 0
        while j >= 1 and self._extends_previous(j):
            j, links = j - 1, links + 1
        starts_away = any(a != 0.0 for a in self.A[j])
        return links + int(starts_away)

    def test_step(self, inner_lr: float) -> float:
        """Default meta-test adaptation step: the mean step of the tableau's own adaptation, ``h c_s / m``.

        The last stage moves ``h c_s`` from theta in :attr:`adaptation_steps` ``= m`` gradient steps, so a
        plain step of ``h c_s / m`` is the step size the meta-step trained the model to adapt with: ``h``
        for ``maml(k)``, ``maml_msl``, ``heun``, ``rk4``, ``rk38`` and ``kutta3``, ``h/2`` for
        ``midpoint``, ``2h/3`` for ``ralston``, ``h c`` for ``rk2(c)``. A tableau whose last node is not
        positive (``euler``: the last stage is theta, joint training with no adaptation inside the
        meta-step) falls back to ``h`` so that evaluation still fine-tunes.
        """
        if self.last_node <= 0.0:
            return float(inner_lr)
        return inner_lr * (self.last_node / self.adaptation_steps)  # c_s / m first: exactly h for maml(k)

    def describe(self) -> str:
        """One line: name, stages, order, non-zero ``A`` entries and ``b``."""
        entries = [f"A{j + 1}{i + 1}={_fmt(a)}" for j in range(self.stages) for i, a in self.coefficients(j)]
        return (
            f"{self.name}: s={self.stages}, order={self.order}, "
            f"A: {', '.join(entries) or '-'}; b=({', '.join(_fmt(x) for x in self.b)})"
        )

    def __str__(self) -> str:
        return self.describe()


def _fmt(x: float) -> str:
    frac = Fraction(x).limit_denominator(48)
    return str(frac) if abs(float(frac) - x) < 1e-12 else f"{x:.6g}"


def _order(A: tuple[tuple[float, ...], ...], b: tuple[float, ...]) -> int:
    """Classical order (0-4) of an explicit tableau from the order conditions up to order 4."""
    s = len(b)
    c = [math.fsum(row) for row in A]

    def dot(u: Sequence[float], v: Sequence[float]) -> float:
        return math.fsum(x * y for x, y in zip(u, v, strict=True))

    def matvec(v: Sequence[float]) -> list[float]:
        return [dot(A[j], v) for j in range(s)]

    c2 = [x * x for x in c]
    c3 = [x * x * x for x in c]
    Ac = matvec(c)
    conditions: list[list[tuple[float, float]]] = [
        [(math.fsum(b), 1.0)],
        [(dot(b, c), 1 / 2)],
        [(dot(b, c2), 1 / 3), (dot(b, Ac), 1 / 6)],
        [
            (dot(b, c3), 1 / 4),
            (dot(b, [ci * aci for ci, aci in zip(c, Ac, strict=True)]), 1 / 8),
            (dot(b, matvec(c2)), 1 / 12),
            (dot(b, matvec(Ac)), 1 / 24),
        ],
    ]
    order = 0
    for conds in conditions:
        if not all(_close(value, target) for value, target in conds):
            break
        order += 1
    return order


# -- factories ---------------------------------------------------------------------------------------


def rk2(c: float) -> Tableau:
    """The second-order two-stage family: ``A21 = c``, ``b = (1 - 1/(2c), 1/(2c))`` for ``c > 0``.

    ``rk2(1/2)`` is midpoint, ``rk2(1)`` is Heun, ``rk2(2/3)`` is Ralston.

    Raises:
        TableauTypeError: ``c`` is not a number (``"0.5"``, ``True``).
        ValueError: ``c`` is not finite or not ``> 0``.
    """
    c = _number(c, "rk2(c): c")
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"rk2(c) needs a finite c > 0, got {c}")
    return Tableau(((0.0, 0.0), (c, 0.0)), (1.0 - 1.0 / (2.0 * c), 1.0 / (2.0 * c)), f"rk2({_exact(c)})")


def _exact(x: float) -> str:
    """``x`` as short as ``:g`` writes it where that reads back exactly, else in full (names that
    :func:`get_tableau` parses back into the same tableau)."""
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


def _maml_matrix(steps: int, what: str) -> tuple[tuple[float, ...], ...]:
    s = steps + 1
    _check_stages(s, what)
    return tuple(tuple(1.0 if i < j else 0.0 for i in range(s)) for j in range(s))


def maml(steps: int = 1) -> Tableau:
    """MAML with ``steps`` inner gradient steps of size ``h``: ``A[j][i] = 1`` for ``i < j``, ``b = e_s``.

    Raises:
        TableauTypeError: ``steps`` is not an integer (``2.0``, ``"2"``, ``True``).
        ValueError: ``steps < 1`` or ``steps >= MAX_STAGES`` (at most ``MAX_STAGES - 1`` steps).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TableauTypeError(f"maml(steps) needs an integer number of steps >= 1, got {steps!r}")
    if steps < 1:
        raise ValueError(f"maml(steps) needs an integer number of steps >= 1, got {steps!r}")
    steps = int(steps)
    b = tuple(1.0 if j == steps else 0.0 for j in range(steps + 1))
    return Tableau(_maml_matrix(steps, f"maml({steps})"), b, "maml" if steps == 1 else f"maml({steps})")


def maml_msl(weights: Sequence[float]) -> Tableau:
    """MAML++ multi-step loss: ``len(weights) - 1`` inner steps, query loss after step ``j`` weighted by
    ``weights[j]`` (``weights[0]`` weighs the loss before adaptation).

    Raises:
        TableauTypeError: ``weights`` is a string or holds a non-number.
        ValueError: fewer than 2 weights, or more than :data:`MAX_STAGES`.
    """
    w = _as_float_vector(weights, "maml_msl(weights): weights")
    if len(w) < 2:
        raise ValueError(f"maml_msl(weights) needs at least 2 weights (one inner step), got {len(w)}")
    return Tableau(
        _maml_matrix(len(w) - 1, f"maml_msl with {len(w)} weights"), w, f"maml_msl({', '.join(_exact(x) for x in w)})"
    )


_NAMED: dict[str, Callable[[], Tableau]] = {
    "euler": lambda: Tableau(((0.0,),), (1.0,), "euler"),
    "maml": lambda: maml(1),
    "midpoint": lambda: Tableau(((0.0, 0.0), (0.5, 0.0)), (0.0, 1.0), "midpoint"),
    "heun": lambda: Tableau(((0.0, 0.0), (1.0, 0.0)), (0.5, 0.5), "heun"),
    "ralston": lambda: Tableau(((0.0, 0.0), (2 / 3, 0.0)), (0.25, 0.75), "ralston"),
    "kutta3": lambda: Tableau(((0.0, 0.0, 0.0), (0.5, 0.0, 0.0), (-1.0, 2.0, 0.0)), (1 / 6, 2 / 3, 1 / 6), "kutta3"),
    "rk4": lambda: Tableau(
        ((0.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, 0.0), (0.0, 0.5, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0)),
        (1 / 6, 1 / 3, 1 / 3, 1 / 6),
        "rk4",
    ),
    "rk38": lambda: Tableau(
        ((0.0, 0.0, 0.0, 0.0), (1 / 3, 0.0, 0.0, 0.0), (-1 / 3, 1.0, 0.0, 0.0), (1.0, -1.0, 1.0, 0.0)),
        (1 / 8, 3 / 8, 3 / 8, 1 / 8),
        "rk38",
    ),
}


def _whole(text: str) -> int:
    """A ``maml(...)`` argument: an integer as Python writes it (``"3"``; not ``"3.0"`` or ``"1e3"``, which
    the Python call ``maml(3.0)`` refuses too)."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"maml(steps) needs a whole number of steps written as an integer, e.g. 'maml(3)', got {text!r}"
        ) from None


def _real(text: str) -> float:
    """A ``rk2``/``maml_msl`` argument: a decimal (``"0.75"``, ``"1e-1"``), a fraction (``"2/3"``) or
    ``nan``/``inf`` (which the factories then refuse with their own messages)."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError, OverflowError):
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"could not read {text!r} as a number") from None


@dataclass(frozen=True)
class _Factory:
    """How :func:`get_tableau` calls a factory: its argument parser, whether it takes exactly one argument
    (else any number) and an example call."""

    make: Callable[..., Tableau]
    parse: Callable[[str], Any]
    single: bool
    example: str


_FACTORIES: dict[str, _Factory] = {
    "maml": _Factory(maml, _whole, True, "maml(3)"),
    "rk2": _Factory(rk2, _real, True, "rk2(0.75)"),
    "maml_msl": _Factory(lambda *w: maml_msl(w), _real, False, "maml_msl(0.2, 0.3, 0.5)"),
}


def _arguments(spec: str, text: str) -> list[str]:
    """The comma-separated arguments of a factory call; an empty one (``"maml_msl(0.5,,0.5)"``) is refused."""
    if not text.strip():
        return []
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise ValueError(f"tableau {spec!r} has an empty argument")
    return parts


def _call_factory(spec: str, name: str, text: str) -> Tableau:
    factory = _FACTORIES[name]
    args = _arguments(spec, text)
    if factory.single and len(args) != 1:
        raise ValueError(f"{name}(...) takes exactly one argument, e.g. {factory.example!r}; got {spec!r}")
    try:
        values = [factory.parse(a) for a in args]
    except ValueError as err:
        raise ValueError(f"could not parse the arguments of tableau {spec!r}: {err}") from err
    return factory.make(*values)


def named_tableaus() -> dict[str, Tableau]:
    """Every named tableau, in the order of the table in ``docs/method.md``."""
    return {name: make() for name, make in _NAMED.items()}


_CALL = re.compile(r"^\s*([a-z_0-9]+)\s*\((.*)\)\s*$")


def get_tableau(spec: str | Tableau) -> Tableau:
    """Look a tableau up by name.

    Accepts a :class:`Tableau` (returned as is), a name (``"rk4"``) or a factory call
    (``"maml(3)"``, ``"rk2(0.75)"``, ``"rk2(2/3)"``, ``"maml_msl(0.2, 0.3, 0.5)"``). Case and surrounding
    whitespace do not matter. ``maml``'s argument is an integer (``"maml(3.0)"`` is refused, as
    ``maml(3.0)`` is); ``rk2`` and ``maml_msl`` take decimals or fractions. A factory's ``name``
    (``maml(3).name``, ``rk2(c).name``, ``maml_msl(w).name``) reads back into the same tableau.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), arguments that do not parse,
            a named tableau given arguments, or the factory's own refusal (e.g. ``"maml(100000)"``: more
            than :data:`MAX_STAGES` stages).
        TypeError: ``spec`` is neither a string nor a :class:`Tableau`.
    """
    if isinstance(spec, Tableau):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"tableau must be a name or a Tableau, got {type(spec).__name__}")
    key = spec.strip().lower()
    if key in _NAMED:
        return _NAMED[key]()
    match = _CALL.match(key)
    if match and match.group(1) in _FACTORIES:
        return _call_factory(spec, match.group(1), match.group(2))
    if match and match.group(1) in _NAMED:
        raise ValueError(f"tableau {match.group(1)!r} takes no arguments; got {spec!r}")
    raise ValueError(
        f"unknown tableau {spec!r}; valid names: {', '.join(_NAMED)}; "
        "factories: maml(steps), rk2(c), maml_msl(w1, ..., ws)"
    )
