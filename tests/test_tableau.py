"""Tests for rkfast.tableau: named tableaus, factories, lookup, order conditions, validation.

The expected tableaus are written here independently, as fractions, from the table in docs/method.md; the order
check is an independent numpy implementation of the 8 order conditions up to order 4.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from fractions import Fraction as F

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rkfast.tableau import (
    MAX_STAGES,
    InconsistentTableauWarning,
    Tableau,
    get_tableau,
    maml,
    maml_msl,
    named_tableaus,
    rk2,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------------
# docs/method.md's tableau table, transcribed: name -> (s, non-zero A entries keyed 1-based (j, l), b, order)
# ---------------------------------------------------------------------------------------------------

EXPECTED = {
    "euler": (1, {}, [F(1)], 1),
    "maml": (2, {(2, 1): F(1)}, [F(0), F(1)], 1),
    "midpoint": (2, {(2, 1): F(1, 2)}, [F(0), F(1)], 2),
    "heun": (2, {(2, 1): F(1)}, [F(1, 2), F(1, 2)], 2),
    "ralston": (2, {(2, 1): F(2, 3)}, [F(1, 4), F(3, 4)], 2),
    "kutta3": (3, {(2, 1): F(1, 2), (3, 1): F(-1), (3, 2): F(2)}, [F(1, 6), F(2, 3), F(1, 6)], 3),
    "rk4": (
        4,
        {(2, 1): F(1, 2), (3, 2): F(1, 2), (4, 3): F(1)},
        [F(1, 6), F(1, 3), F(1, 3), F(1, 6)],
        4,
    ),
    "rk38": (
        4,
        {(2, 1): F(1, 3), (3, 1): F(-1, 3), (3, 2): F(1), (4, 1): F(1), (4, 2): F(-1), (4, 3): F(1)},
        [F(1, 8), F(3, 8), F(3, 8), F(1, 8)],
        4,
    ),
}


def expected_matrix(name: str) -> list[list[F]]:
    s, entries, _, _ = EXPECTED[name]
    return [[entries.get((j + 1, l + 1), F(0)) for l in range(s)] for j in range(s)]


# ---------------------------------------------------------------------------------------------------
# Independent order conditions (numpy; object dtype gives exact Fraction arithmetic)
# ---------------------------------------------------------------------------------------------------

TOL = 1e-10


def order_conditions(A, b):
    """The 8 order conditions up to order 4, grouped by order, as (value, target) pairs."""
    A = np.asarray(A)
    b = np.asarray(b)
    c = A.sum(axis=1)
    Ac = A @ c
    return [
        [(b.sum(), 1)],
        [(b @ c, F(1, 2))],
        [(b @ (c * c), F(1, 3)), (b @ Ac, F(1, 6))],
        [
            (b @ (c * c * c), F(1, 4)),
            (b @ (c * Ac), F(1, 8)),
            (b @ (A @ (c * c)), F(1, 12)),
            (b @ (A @ Ac), F(1, 24)),
        ],
    ]


def reference_order(A, b, exact: bool = False) -> int:
    dtype = object if exact else np.float64
    groups = order_conditions(np.array(A, dtype=dtype), np.array(b, dtype=dtype))
    order = 0
    for group in groups:
        if exact:
            ok = all(v == t for v, t in group)
        else:
            ok = all(abs(float(v) - float(t)) <= TOL for v, t in group)
        if not ok:
            break
        order += 1
    return order


def is_ambiguous(A, b) -> bool:
    """A float condition sits so close to the tolerance that the order is a matter of rounding."""
    groups = order_conditions(np.array(A, dtype=np.float64), np.array(b, dtype=np.float64))
    return any(1e-13 < abs(float(v) - float(t)) < 1e-7 for g in groups for v, t in g)


def quiet(make):
    """Construct without leaking InconsistentTableauWarning; return (tableau, warned)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = make()
    warned = any(issubclass(w.category, InconsistentTableauWarning) for w in record)
    return t, warned


# ---------------------------------------------------------------------------------------------------
# Hypothesis strategies
# ---------------------------------------------------------------------------------------------------

# Small-denominator rationals hit the order conditions exactly now and then; general floats do not.
grid = st.integers(-24, 24).map(lambda k: k / 12)
reals = st.floats(-3, 3, allow_nan=False, allow_infinity=False, allow_subnormal=False)
entries = st.one_of(grid, reals)


@st.composite
def tableau_arrays(draw, consistent: bool | None = None):
    """(A, b) of a valid explicit tableau: s in 1..5, strictly lower triangular A, any finite b."""
    s = draw(st.integers(1, 5))
    A = [[draw(entries) if l < j else 0.0 for l in range(s)] for j in range(s)]
    b = [draw(entries) for _ in range(s)]
    normalize = draw(st.booleans()) if consistent is None else consistent
    if normalize:
        b[-1] = 1.0 - math.fsum(b[:-1])
    return A, b


# ---------------------------------------------------------------------------------------------------
# Named tableaus
# ---------------------------------------------------------------------------------------------------


def test_named_tableaus_are_exactly_the_design_table():
    named = named_tableaus()
    assert list(named) == list(EXPECTED)  # the order of docs/method.md's table
    for name, t in named.items():
        assert isinstance(t, Tableau)
        assert t.name == name


def test_expected_table_is_self_consistent():
    # Sanity of the transcription itself: exact rational order conditions give docs/method.md's orders.
    for name, (_, _, b, order) in EXPECTED.items():
        assert reference_order(expected_matrix(name), b, exact=True) == order, name


@pytest.mark.parametrize("name", list(EXPECTED))
def test_named_tableau_entries_order_and_nodes(name):
    s, _, b, order = EXPECTED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", InconsistentTableauWarning)
        t = named_tableaus()[name]
    A = expected_matrix(name)
    assert t.stages == s
    assert len(t.A) == s and all(len(row) == s for row in t.A)
    assert len(t.b) == s and len(t.c) == s
    # entries match the table exactly (each is the correctly rounded float of the fraction)
    assert [list(row) for row in t.A] == [[float(x) for x in row] for row in A]
    assert list(t.b) == [float(x) for x in b]
    assert t.order == order
    # c is the row sums of A
    for j in range(s):
        assert t.c[j] == pytest.approx(math.fsum(t.A[j]), abs=1e-15)
        assert t.c[j] == pytest.approx(float(sum(A[j])), abs=1e-15)
    # and looked up by name it is the same tableau
    assert get_tableau(name) == t


# ---------------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [0.01, 0.1, 0.25, 0.5, 2 / 3, 0.75, 1.0, 1.5, 2.0, 10.0])
def test_rk2_family_is_order_two(c):
    t = rk2(c)
    assert t.stages == 2
    assert t.A == ((0.0, 0.0), (c, 0.0))
    assert t.b[0] == pytest.approx(1 - 1 / (2 * c))
    assert t.b[1] == pytest.approx(1 / (2 * c))
    assert t.order == 2
    assert t.c == pytest.approx((0.0, c))


@SETTINGS
@given(st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False))
def test_rk2_random_members_order_two_never_three(c):
    t, warned = quiet(lambda: rk2(c))
    assert not warned
    assert t.order == 2
    assert reference_order(t.A, t.b) == 2


@pytest.mark.parametrize(("c", "name"), [(0.5, "midpoint"), (1, "heun"), (2 / 3, "ralston")])
def test_rk2_special_members(c, name):
    t, ref = rk2(c), named_tableaus()[name]
    assert t.A == ref.A
    assert t.b == pytest.approx(ref.b, abs=1e-15)
    assert t.order == ref.order == 2


@pytest.mark.parametrize("c", [0, 0.0, -0.0, -1, -0.5, -1e-9, float("nan"), float("-inf"), float("inf")])
def test_rk2_rejects_nonpositive_or_nonfinite(c):
    with pytest.raises(ValueError):
        rk2(c)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_maml_k(k):
    t = maml(k)
    s = k + 1
    assert t.stages == s
    for j in range(s):
        for l in range(s):
            assert t.A[j][l] == (1.0 if l < j else 0.0)
    assert t.b == tuple(1.0 if j == k else 0.0 for j in range(s))
    assert t.order == 1
    assert t.c == tuple(float(j) for j in range(s))


def test_maml_default_is_named_maml():
    assert maml(1) == maml() == named_tableaus()["maml"] == get_tableau("maml")


@pytest.mark.parametrize("k", [0, -1, 1.5, 2.0, "2", None])
def test_maml_rejects_non_positive_integer(k):
    with pytest.raises(ValueError):
        maml(k)


@pytest.mark.parametrize("w", [(0, 1), (0.2, 0.3, 0.5), (0.1, 0.1, 0.1, 0.7), (0.25,) * 4])
def test_maml_msl_structure_and_order_one(w):
    t = maml_msl(w)
    k = len(w) - 1
    assert t.A == maml(k).A
    assert t.b == tuple(float(x) for x in w)
    assert t.stages == k + 1
    assert t.order == 1


def test_maml_msl_last_step_only_is_maml():
    t = maml_msl((0, 0, 1))
    assert t.A == maml(2).A and t.b == maml(2).b


def test_maml_msl_order_comes_from_weights():
    # (1/2, 1/2) on one inner step is Heun: order 2
    assert maml_msl((0.5, 0.5)).order == 2
    assert maml_msl((0.5, 0.5)).A == named_tableaus()["heun"].A
    # weights not summing to 1: inconsistent, order 0, warned
    with pytest.warns(InconsistentTableauWarning):
        t = maml_msl((0.5, 1.0))
    assert t.order == 0


@SETTINGS
@given(st.lists(entries, min_size=2, max_size=5))
def test_maml_msl_random_weights(w):
    t, warned = quiet(lambda: maml_msl(w))
    assert t.A == maml(len(w) - 1).A
    assert t.b == tuple(w)
    assume(not is_ambiguous(t.A, t.b))
    assert t.order == reference_order(t.A, t.b)
    assert warned == (reference_order(t.A, t.b) == 0)


def test_maml_msl_rejects_too_few_weights():
    with pytest.raises(ValueError):
        maml_msl((1.0,))
    with pytest.raises(ValueError):
        maml_msl(())


# ---------------------------------------------------------------------------------------------------
# get_tableau
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXPECTED))
def test_get_tableau_names_case_insensitive(name):
    ref = named_tableaus()[name]
    for spelling in (name, name.upper(), name.capitalize(), f"  {name} "):
        assert get_tableau(spelling) == ref


def test_get_tableau_passes_tableau_through():
    t = Tableau(((0.0, 0.0), (0.3, 0.0)), (0.2, 0.8), "mine")
    assert get_tableau(t) is t
    rk4 = named_tableaus()["rk4"]
    assert get_tableau(rk4) is rk4


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("maml(3)", lambda: maml(3)),
        ("MAML(3)", lambda: maml(3)),
        ("maml( 2 )", lambda: maml(2)),
        ("maml(1)", lambda: maml(1)),
        ("rk2(0.75)", lambda: rk2(0.75)),
        ("rk2(0.5)", lambda: rk2(0.5)),
        ("RK2(2)", lambda: rk2(2)),
        ("maml_msl(0.2, 0.3, 0.5)", lambda: maml_msl((0.2, 0.3, 0.5))),
        ("maml_msl(0.2,0.3,0.5)", lambda: maml_msl([0.2, 0.3, 0.5])),
        ("maml_msl(0, 1)", lambda: maml_msl((0, 1))),
    ],
)
def test_get_tableau_factory_strings(spec, expected):
    t, ref = get_tableau(spec), expected()
    assert t == ref
    assert t.A == ref.A and t.b == ref.b and t.order == ref.order


@pytest.mark.parametrize("spec", ["maml(0)", "maml(1.5)", "rk2(0)", "rk2(-1)", "rk2(nan)", "maml_msl(1)", "rk2(x)"])
def test_get_tableau_bad_factory_arguments(spec):
    with pytest.raises(ValueError):
        get_tableau(spec)


@pytest.mark.parametrize("spec", ["rk5", "nope", "", "rk 4", "dopri5(1)"])
def test_get_tableau_unknown_name_lists_valid_names(spec):
    with pytest.raises(ValueError) as info:
        get_tableau(spec)
    message = str(info.value)
    for name in EXPECTED:
        assert name in message
    for factory in ("maml(", "rk2(", "maml_msl("):
        assert factory in message


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("maml(3.0)", "integer"),  # as the Python call maml(3.0) is refused
        ("maml(1e3)", "integer"),
        ("maml(3.5)", "integer"),
        ("maml()", "one argument"),
        ("maml(2, 3)", "one argument"),
        ("rk2()", "one argument"),
        ("rk2(nan)", "finite"),
        ("rk2(inf)", "finite"),
        ("rk2(1/0)", "number"),
        ("maml_msl()", "at least 2 weights"),
        ("maml_msl(0.5,,0.5)", "empty argument"),
        ("maml_msl(0.5, 0.5,)", "empty argument"),
        ("euler(1)", "no arguments"),
        ("rk4()", "no arguments"),
    ],
)
def test_get_tableau_parse_errors_say_what_is_wrong(spec, match):
    with pytest.raises(ValueError, match=match):
        get_tableau(spec)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("rk2(2/3)", lambda: rk2(2 / 3)),
        ("rk2(1/2)", lambda: rk2(0.5)),
        ("  Maml_Msl( 1/4 , 3/4 ) ", lambda: maml_msl((0.25, 0.75))),
        ("\tMAML\n", lambda: maml(1)),
    ],
)
def test_get_tableau_fractions_case_and_whitespace(spec, expected):
    assert get_tableau(spec).A == expected().A and get_tableau(spec).b == expected().b


@pytest.mark.parametrize(
    "make",
    [lambda: maml(7), lambda: rk2(2 / 3), lambda: rk2(0.75), lambda: rk2(2),
     lambda: maml_msl((1 / 3, 1 / 3, 1 / 3)), lambda: maml_msl((0.2, 0.3, 0.5))],
)
def test_factory_names_read_back_into_the_same_tableau(make):
    t = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InconsistentTableauWarning)  # 1/3 written as 0.333333 would sum to != 1
        assert get_tableau(t.name) == t


# ---------------------------------------------------------------------------------------------------
# Arguments of the wrong type, and the stage limit
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["55", "0.5, 0.5", b"11"])
def test_maml_msl_refuses_a_string(weights):
    with pytest.raises(TypeError, match="string"):
        maml_msl(weights)


@pytest.mark.parametrize("c", ["0.5", True, None])
def test_rk2_refuses_non_numbers(c):
    with pytest.raises(TypeError, match="number"):
        rk2(c)


@pytest.mark.parametrize("k", [2.0, "2", True])
def test_maml_refuses_non_integers_with_type_error(k):
    with pytest.raises(TypeError, match="integer"):
        maml(k)


@pytest.mark.parametrize(
    ("A", "b"),
    [("11", (0.5, 0.5)), (((0, 0), (1, 0)), "11"), (((0, 0), ("1", 0)), (0.5, 0.5)), (((0,),), (True,))],
)
def test_tableau_refuses_strings_and_bools(A, b):
    with pytest.raises(TypeError):
        Tableau(A, b)


def test_tableau_type_error_is_also_a_value_error():
    with pytest.raises(ValueError):
        maml_msl("55")


@pytest.mark.parametrize(
    "make",
    [
        lambda: maml(100000),
        lambda: maml(MAX_STAGES),
        lambda: get_tableau("maml(100000)"),
        lambda: get_tableau("maml_msl(" + "0, " * MAX_STAGES + "1)"),
        lambda: maml_msl([0.0] * MAX_STAGES + [1.0]),
        lambda: Tableau.from_arrays(np.zeros((MAX_STAGES + 1, MAX_STAGES + 1)), np.ones(MAX_STAGES + 1)),
        lambda: Tableau.from_dict({"A": [[0.0]] * (MAX_STAGES + 1), "b": [1.0]}),
    ],
)
def test_more_than_max_stages_is_refused_with_the_limit(make):
    with pytest.raises(ValueError, match=f"at most MAX_STAGES = {MAX_STAGES}"):
        make()


def test_maml_up_to_the_limit_builds():
    t = maml(MAX_STAGES - 1)
    assert t.stages == MAX_STAGES and t.test_step(0.1) == 0.1


# ---------------------------------------------------------------------------------------------------
# Order computation against the independent reference
# ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(tableau_arrays())
def test_order_matches_reference(arrays):
    A, b = arrays
    assume(not is_ambiguous(A, b))
    t, warned = quiet(lambda: Tableau(A, b))
    ref = reference_order(A, b)
    assert t.order == ref
    assert 0 <= t.order <= 4
    assert warned == (ref == 0)


@SETTINGS
@given(
    st.sampled_from([("A", 1, 0), ("A", 2, 0), ("A", 2, 1), ("A", 3, 0), ("A", 3, 1), ("A", 3, 2)]
                    + [("b", j, None) for j in range(4)]),
    st.floats(1e-6, 1.0).flatmap(lambda x: st.sampled_from([x, -x])),
)
def test_perturbed_rk4_drops_order(where, eps):
    rk4 = named_tableaus()["rk4"]
    A = [list(row) for row in rk4.A]
    b = list(rk4.b)
    kind, j, l = where
    if kind == "A":
        A[j][l] += eps
    else:
        b[j] += eps
    t, warned = quiet(lambda: Tableau(A, b))
    assert t.order < 4
    assert t.order == reference_order(A, b)
    if kind == "b":
        assert warned and t.order == 0
    else:
        assert not warned and t.order == 1  # every stage node change breaks b.c = 1/2


@SETTINGS
@given(st.floats(1e-6, 1.0))
def test_rk4_node_preserving_perturbation_is_order_two(eps):
    A = [list(row) for row in named_tableaus()["rk4"].A]
    A[2][0] += eps
    A[2][1] -= eps  # c unchanged, so b.c, b.c^2 hold but b.Ac = 1/6 does not
    t = Tableau(A, named_tableaus()["rk4"].b)
    assert t.order == reference_order(A, t.b) == 2


def test_inconsistent_tableau_is_order_zero_and_warns():
    with pytest.warns(InconsistentTableauWarning):
        t = Tableau(((0.0,),), (0.5,))
    assert t.order == 0
    with pytest.warns(InconsistentTableauWarning, match="sum"):
        t = Tableau(((0.0, 0.0), (1.0, 0.0)), (0.5, 0.6))
    assert t.order == 0
    with pytest.warns(InconsistentTableauWarning):
        t = Tableau.from_arrays(np.zeros((3, 3)), np.zeros(3))
    assert t.order == 0


def test_consistent_tableau_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", InconsistentTableauWarning)
        Tableau(((0.0, 0.0), (0.3, 0.0)), (0.1, 0.9))
        Tableau(((0.0, 0.0, 0.0), (0.1, 0.0, 0.0), (0.2, 0.3, 0.0)), (0.1, 0.2, 0.7))  # sum rounds
        rk2(0.3), maml(4), maml_msl((0.2, 0.3, 0.5))


# ---------------------------------------------------------------------------------------------------
# Round trips, equality, immutability
# ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(tableau_arrays(consistent=True), st.sampled_from(["custom", "mine", "rk-x"]))
def test_round_trips(arrays, name):
    A, b = arrays
    t, _ = quiet(lambda: Tableau(A, b, name))
    # to_dict / from_dict, also through JSON
    d = t.to_dict()
    for back in (Tableau.from_dict(d), Tableau.from_dict(json.loads(json.dumps(d)))):
        assert back == t and hash(back) == hash(t)
        assert back.order == t.order and back.c == t.c and back.name == name
    # numpy and torch inputs
    for make_A, make_b in (
        (lambda: np.array(A, dtype=np.float64), lambda: np.array(b, dtype=np.float64)),
        (lambda: torch.tensor(A, dtype=torch.float64), lambda: torch.tensor(b, dtype=torch.float64)),
        (lambda: A, lambda: b),
        (lambda: tuple(map(tuple, A)), lambda: tuple(b)),
    ):
        u, _ = quiet(lambda: Tableau.from_arrays(make_A(), make_b(), name))
        assert u == t and hash(u) == hash(t)
        assert u.order == t.order
        assert all(type(x) is float for row in u.A for x in row)
        assert all(type(x) is float for x in u.b)


def test_from_arrays_named_tableaus_from_tensors_and_float32():
    for name, t in named_tableaus().items():
        A = torch.tensor(t.A, dtype=torch.float64)
        b = torch.tensor(t.b, dtype=torch.float64)
        assert Tableau.from_arrays(A, b, name) == t
        assert Tableau.from_arrays(A.numpy(), b.numpy(), name) == t
    # integer arrays are fine too
    assert Tableau.from_arrays(np.array([[0, 0], [1, 0]]), np.array([0, 1]), "maml") == maml()
    # float32 input is converted to Python floats (exactly, for representable entries)
    u = Tableau.from_arrays(torch.tensor([[0.0, 0.0], [0.5, 0.0]]), torch.tensor([0.0, 1.0]), "midpoint")
    assert u == named_tableaus()["midpoint"] and u.order == 2
    v = Tableau.from_arrays(torch.tensor([[0.0, 0.0], [2 / 3, 0.0]]), torch.tensor([0.25, 0.75]))
    assert v.A[1][0] == pytest.approx(2 / 3, rel=1e-6) and type(v.A[1][0]) is float


def test_equal_tableaus_hash_equal():
    a = Tableau([[0, 0], [0.5, 0]], [0, 1], "midpoint")
    b = Tableau(((0.0, 0.0), (0.5, 0.0)), (0.0, 1.0), "midpoint")
    assert a == b and hash(a) == hash(b)
    assert a == named_tableaus()["midpoint"] and hash(a) == hash(named_tableaus()["midpoint"])
    assert len({a, b, get_tableau("midpoint"), get_tableau("MIDPOINT")}) == 1
    assert get_tableau("rk4") == get_tableau("rk4") and hash(get_tableau("rk4")) == hash(named_tableaus()["rk4"])
    assert a != named_tableaus()["heun"]


def test_tableau_is_immutable():
    t = named_tableaus()["rk4"]
    for attr, value in (("A", ((0.0,),)), ("b", (1.0,)), ("name", "x"), ("c", (0.0,)), ("order", 1)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(t, attr, value)
    with pytest.raises(TypeError):
        t.A[1] = (0.0, 0.0, 0.0, 0.0)  # type: ignore[index]
    with pytest.raises(TypeError):
        t.b[0] = 1.0  # type: ignore[index]
    assert t == get_tableau("rk4")


def test_tableau_copies_its_input():
    A = [[0.0, 0.0], [1.0, 0.0]]
    b = [0.5, 0.5]
    t = Tableau(A, b, "heun")
    A[1][0] = 7.0
    b[0] = 3.0
    assert t == named_tableaus()["heun"]
    arr = np.array([[0.0, 0.0], [1.0, 0.0]])
    u = Tableau.from_arrays(arr, [0.5, 0.5], "heun")
    arr[1, 0] = 7.0
    assert u == named_tableaus()["heun"]


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def raises_with(match: str, A, b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InconsistentTableauWarning)
        with pytest.raises(ValueError) as info:
            Tableau(A, b)
    assert match.lower() in str(info.value).lower(), str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    ("A", "b"),
    [
        ([[0.0, 0.0], [1.0]], [0.5, 0.5]),  # ragged
        ([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], [0.5, 0.5]),  # 2 x 3
        ([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], [0.2, 0.3, 0.5]),  # 3 x 2
        ([[]], [1.0]),  # 1 x 0
    ],
)
def test_non_square_A(A, b):
    raises_with("square", A, b)


@pytest.mark.parametrize(
    ("A", "b"),
    [
        ([[1.0]], [1.0]),  # implicit Euler's diagonal
        ([[0.0, 0.0], [0.5, 0.5]], [0.0, 1.0]),  # diagonal
        ([[0.0, 0.5], [0.5, 0.0]], [0.0, 1.0]),  # upper
        ([[0.0, 0.0, 1e-300], [0.5, 0.0, 0.0], [0.0, 1.0, 0.0]], [0.2, 0.3, 0.5]),  # tiny upper
    ],
)
def test_not_strictly_lower_triangular(A, b):
    message = raises_with("implicit", A, b)
    assert "not supported" in message.lower()


@pytest.mark.parametrize(
    ("A", "b"),
    [
        ([[0.0, 0.0], [1.0, 0.0]], [1.0]),
        ([[0.0, 0.0], [1.0, 0.0]], [0.2, 0.3, 0.5]),
        ([[0.0]], []),
    ],
)
def test_wrong_length_b(A, b):
    raises_with("len(b)", A, b)


@pytest.mark.parametrize(
    ("A", "b", "entry"),
    [
        ([[0.0, 0.0], [float("nan"), 0.0]], [0.5, 0.5], "A[1][0]"),
        ([[0.0, 0.0], [float("inf"), 0.0]], [0.5, 0.5], "A[1][0]"),
        ([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.5, -math.inf, 0.0]], [0.2, 0.3, 0.5], "A[2][1]"),
        ([[0.0, 0.0], [1.0, 0.0]], [float("nan"), 0.5], "b[0]"),
        ([[0.0, 0.0], [1.0, 0.0]], [0.5, float("inf")], "b[1]"),
    ],
)
def test_non_finite_entries_are_named(A, b, entry):
    message = raises_with("finite", A, b)
    assert entry in message


def test_non_finite_from_tensor():
    A = torch.tensor([[0.0, 0.0], [float("nan"), 0.0]])
    with pytest.raises(ValueError, match=re.escape("A[1][0]")):
        Tableau.from_arrays(A, torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize(("A", "b"), [((), ()), ([], []), (np.zeros((0, 0)), np.zeros(0))])
def test_empty_tableau(A, b):
    with pytest.raises(ValueError, match="empty"):
        Tableau.from_arrays(A, b)
    if not isinstance(A, np.ndarray):
        raises_with("empty", A, b)


def test_non_numeric_input():
    with pytest.raises(ValueError):
        Tableau([["a", 0.0], [1.0, 0.0]], [0.5, 0.5])
    with pytest.raises(ValueError):
        Tableau([[0.0]], 1.0)
    with pytest.raises(ValueError):
        Tableau.from_arrays(np.array([0.0]), [1.0])


def test_from_dict_missing_keys():
    with pytest.raises(ValueError, match="'A'"):
        Tableau.from_dict({"b": [1.0]})


# ---------------------------------------------------------------------------------------------------
# What the meta-step and meta-test read
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "support", "query"),
    [
        ("maml", (True, False), (False, True)),
        ("rk4", (True, True, True, False), (True, True, True, True)),
        ("euler", (False,), (True,)),
        ("midpoint", (True, False), (False, True)),
        ("heun", (True, False), (True, True)),
        ("rk38", (True, True, True, False), (True, True, True, True)),
    ],
)
def test_needs_support_grad_and_query_loss(name, support, query):
    t = get_tableau(name)
    assert t.needs_support_grad == support
    assert t.needs_query_loss == query


def test_needs_for_maml_k_and_msl():
    assert maml(3).needs_support_grad == (True, True, True, False)
    assert maml(3).needs_query_loss == (False, False, False, True)
    assert maml_msl((0.0, 0.5, 0.5)).needs_query_loss == (False, True, True)


# The default meta-test step is the mean step of the tableau's own adaptation, h c_s / m (docs/method.md,
# "Meta-test"): (m, c_s / m) of every named tableau, written out by hand.
TEST_STEP = {
    "euler": (0, None),  # c_s = 0: falls back to h
    "maml": (1, F(1)),
    "midpoint": (1, F(1, 2)),
    "heun": (1, F(1)),
    "ralston": (1, F(2, 3)),
    "kutta3": (1, F(1)),
    "rk4": (1, F(1)),
    "rk38": (1, F(1)),
}


def test_test_step_table_covers_every_named_tableau():
    assert set(TEST_STEP) == set(named_tableaus())


@pytest.mark.parametrize("h", [0.01, 0.1, 0.4, 1.0])
@pytest.mark.parametrize("name", list(TEST_STEP))
def test_test_step_named(name, h):
    steps, factor = TEST_STEP[name]
    t = get_tableau(name)
    assert t.adaptation_steps == steps
    expected = h if factor is None else h * float(factor)
    assert t.test_step(h) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 10, 100])
@pytest.mark.parametrize("h", [0.01, 0.1, 0.3])
def test_test_step_maml_k_is_the_inner_step(k, h):
    # training takes k steps of h: the meta-test step is h, not the whole inner loop's k h
    assert maml(k).adaptation_steps == k
    assert maml(k).test_step(h) == h
    assert get_tableau(f"maml({k})").test_step(h) == h


@pytest.mark.parametrize("w", [(0, 1), (0.2, 0.3, 0.5), (0.1, 0.1, 0.1, 0.7), (1, 0, 0, 0, 0)])
def test_test_step_maml_msl_is_the_inner_step(w):
    t, _ = quiet(lambda: maml_msl(w))
    assert t.adaptation_steps == len(w) - 1
    assert t.test_step(0.1) == 0.1


@pytest.mark.parametrize("c", [0.1, 0.5, 0.75, 1.0, 2.0, 3.5])
def test_test_step_rk2_is_h_c(c):
    assert rk2(c).adaptation_steps == 1
    assert rk2(c).test_step(0.2) == pytest.approx(0.2 * c, rel=1e-15)


def test_test_step_chain_that_starts_away_from_theta():
    # theta_2 = theta - h/2 k_1, theta_3 = theta_2 - h/2 k_2: two steps of h/2 (c_3 = 1)
    t = Tableau(((0, 0, 0), (0.5, 0, 0), (0.5, 0.5, 0)), (0, 0, 1))
    assert t.adaptation_steps == 2
    assert t.test_step(0.4) == pytest.approx(0.2)


def test_test_step_non_positive_last_node_falls_back_to_h():
    zero = Tableau(((0, 0, 0), (1, 0, 0), (1, -1, 0)), (0.5, 0, 0.5))  # c_3 = 0
    uphill = Tableau(((0, 0), (-1, 0)), (0, 1))  # c_2 = -1
    for t in (zero, uphill):
        assert t.test_step(0.3) == 0.3


@pytest.mark.parametrize("name", list(EXPECTED))
def test_describe_mentions_name_and_order(name):
    t = get_tableau(name)
    text = t.describe()
    assert isinstance(text, str) and "\n" not in text
    assert name in text
    assert re.search(rf"order\W*{t.order}\b", text), text


@pytest.mark.parametrize(
    ("name", "last"),
    [("maml", (1, -1)), ("rk4", (1, 2, 3, -1)), ("euler", (-1,)), ("rk38", (3, 3, 3, -1)), ("heun", (1, -1))],
)
def test_last_reader_of_each_slope(name, last):
    # rk38's A = [[], [1/3], [-1/3, 1], [1, -1, 1]]: every slope is read again by the last stage
    assert get_tableau(name).last_reader == last
    assert maml(3).last_reader == (3, 3, 3, -1)  # theta_j = theta - h (k_0 + ... + k_{j-1}): all read by the last


def test_schedule_lists_the_stages_a_step_computes():
    from rkfast.tableau import StageStep

    rk4 = get_tableau("rk4")
    assert rk4.schedule == (
        StageStep(0, (), True, True, ()),
        StageStep(1, ((0, 0.5),), True, True, (0,)),
        StageStep(2, ((1, 0.5),), True, True, (1,)),
        StageStep(3, ((2, 1.0),), False, True, (2,)),
    )
    # maml(2): stage 0's query loss has weight 0 but its slope is read; the last stage's slope is not
    assert [(s.index, s.support_grad, s.query_loss) for s in get_tableau("maml(2)").schedule] == [
        (0, True, False), (1, True, False), (2, False, True)]
    # a stage nobody reads and nobody weighs is not computed at all
    skipped = Tableau(A=((0, 0, 0), (1, 0, 0), (1, 0, 0)), b=(0, 1, 0), name="skip")
    assert [s.index for s in skipped.schedule] == [0, 1]
    assert skipped.schedule is skipped.schedule  # computed once per tableau
