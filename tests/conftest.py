"""Test session setup: the Triton interpreter on machines without a GPU, a private image cache, and a fresh,
printed seed per run.

Shared models and batches live in ``helpers.py`` (a plain module: ``from helpers import ...``)."""

from __future__ import annotations

import os

import torch

# Without a GPU, the Triton kernels are tested in Triton's CPU interpreter, which must be chosen before
# Triton compiles anything (i.e. before rkfast.kernels.triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tempfile  # noqa: E402

import pytest  # noqa: E402

# Decoded few-shot images go to a cache of this test session's own, not the user's ~/.cache/rkfast.
os.environ.setdefault("RKFAST_CACHE", tempfile.mkdtemp(prefix="rkfast-test-cache-"))

# Tests draw fresh random inputs each run; a failing seed is printed so it can be replayed.
_SEED = int(os.environ.get("RKFAST_TEST_SEED", torch.seed() % 2**31))


def pytest_report_header(config):  # noqa: D103
    return f"rkfast test seed: {_SEED} (replay with RKFAST_TEST_SEED={_SEED})"


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(_SEED)
    yield
