"""Every backend module offers the same public names, so switching framework is one import."""
from common.backend import BACKENDS, CONTRACT


def test_backend_exports_exactly_the_contract(backend):
    assert [name for name in backend.__all__ if name in CONTRACT] == list(CONTRACT)
    missing = [name for name in CONTRACT if not hasattr(backend, name)]
    assert not missing, f"{backend.__name__} lacks {missing}"
    assert BACKENDS[backend.NAME] == backend.__name__
    assert backend.LAYOUT in ("NCHW", "NHWC") and backend.FRAMEWORK in ("PyTorch", "TensorFlow", "MXNet")
    assert all(callable(getattr(backend, name)) for name in CONTRACT if name not in ("NAME", "FRAMEWORK", "LAYOUT"))
