"""Shared fixtures: the same test runs for every backend.

A backend whose framework is not installed is skipped with the reason, except where
ALEXNET_REQUIRE_ALL_BACKENDS=1 (CI sets it): there a missing framework fails the run, so
"none skipped in CI" is enforced rather than hoped for.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from common.backend import BACKENDS, capabilities, load_backend, training_backends

REQUIRE_ALL = os.environ.get("ALEXNET_REQUIRE_ALL_BACKENDS") == "1"

# Frameworks that compile keep their compiled programs in one folder for the whole run (their records'
# compile_cache_variable), in this process and the commands the tests start: the same network compiles
# once, not once per test. Set before any framework is imported; a cache the user set is theirs.
_CACHE_VARIABLES = {capabilities(name).compile_cache_variable for name in BACKENDS} - {""}
if _CACHE_VARIABLES - set(os.environ):
    _COMPILED = tempfile.mkdtemp(prefix="alexnet-test-compiled-")
    atexit.register(shutil.rmtree, _COMPILED, ignore_errors=True)
    for _variable in _CACHE_VARIABLES - set(os.environ):
        os.environ[_variable] = str(Path(_COMPILED) / _variable.lower())
TRAINING_BACKENDS = training_backends()  # the cross-backend tests train or compare training
REAL_DATA = Path(os.environ.get("ALEXNET_DATA_DIR", Path(__file__).resolve().parents[2] / "shared/data/fashion-mnist"))


def get_backend(name: str):
    try:
        return load_backend(name)
    except ImportError as error:
        if REQUIRE_ALL:
            raise
        pytest.skip(f"backend {name} unavailable: {error}")


@pytest.fixture(params=TRAINING_BACKENDS)
def backend(request):
    return get_backend(request.param)


@pytest.fixture(params=list(BACKENDS))
def every_backend(request):
    """Every registered backend, inference-only ones (onnx) included: for the contract's rules."""
    return get_backend(request.param)


@pytest.fixture
def all_backends():
    return [get_backend(name) for name in TRAINING_BACKENDS]


@pytest.fixture
def seed(request):
    """A fresh seed per test, printed so a failure can be replayed with ALEXNET_TEST_SEED."""
    value = int(os.environ.get("ALEXNET_TEST_SEED", np.random.default_rng().integers(0, 2**31 - 1)))
    print(f"\n{request.node.name}: seed {value} (replay with ALEXNET_TEST_SEED={value})")
    return value


def has_gpu(backend) -> bool:
    return bool(backend.gpu_available())


# ------------------------------------------------------------------ checks the backends' own tests share
def relative_error(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def update_error(before: np.ndarray, after: np.ndarray, update: np.ndarray) -> float:
    """Relative error of the step ``before -> after`` against ``before - update`` (float64). The expected
    weights are rounded to float32 first, as any float32 framework stores them: with lr * grad about 1e-3
    of a weight, that rounding alone would be ~1e-4 of the step."""
    before = before.astype(np.float64)
    expected = (before - update).astype(np.float32).astype(np.float64)
    return relative_error(before - after, before - expected)


def assert_same_weights(got: dict, expected: dict) -> None:
    """The same canonical weights, bit for bit: names, float32, shapes and values."""
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == np.float32 and got[name].shape == expected[name].shape, name
        assert np.array_equal(got[name], expected[name]), name
