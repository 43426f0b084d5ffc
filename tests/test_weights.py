import pickle
import zipfile

import numpy as np
import pytest

from common.spec import book_alexnet, paper_alexnet
from common.weights import (
    GOOD_STEPS_KEY, LOSS_SCALE_GROWTH_INTERVAL, LOSS_SCALE_INITIAL, LOSS_SCALE_KEY, MOMENTUM_PREFIX, WeightsError,
    check_weights, expected_shapes, init_weights, load_weights_file, loss_scale_entries, momentum_buffers,
    nhwc_flatten_permutation, read_npz, save_weights, split_loss_scale,
)


def test_names_and_canonical_layouts():
    shapes = expected_shapes(book_alexnet())
    assert list(shapes) == [f"{layer}.{kind}" for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
                            for kind in ("weight", "bias")]
    assert shapes["conv1.weight"] == (96, 1, 11, 11)
    assert shapes["fc6.weight"] == (4096, 6400)
    assert expected_shapes(paper_alexnet())["conv2.weight"] == (256, 48, 5, 5)  # in/groups


def test_init_is_seeded_xavier_uniform_with_zero_bias():
    a, b, c = init_weights(book_alexnet(), 1), init_weights(book_alexnet(), 1), init_weights(book_alexnet(), 2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])
    conv2 = a["conv2.weight"]
    limit = np.sqrt(6 / (96 * 25 + 256 * 25))
    assert conv2.dtype == np.float32 and np.abs(conv2).max() <= limit
    assert np.abs(conv2).max() > 0.99 * limit  # fills its range: uniform, not normal
    assert conv2.std() == pytest.approx(limit / np.sqrt(3), rel=0.01)
    assert all(not a[k].any() for k in a if k.endswith(".bias"))


def test_save_load_round_trip(tmp_path):
    weights = init_weights(book_alexnet().with_input(1, 65, 65), 0)
    path = save_weights(tmp_path / "w.npz", weights)
    loaded = load_weights_file(path, book_alexnet().with_input(1, 65, 65))
    assert list(loaded) == list(weights) and all(np.array_equal(loaded[k], weights[k]) for k in weights)
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]  # no temporary file left behind


def test_all_problems_reported_at_once(tmp_path):
    spec = book_alexnet().with_input(1, 65, 65)
    weights = init_weights(spec, 0)
    del weights["fc8.bias"]
    weights["conv1.weight"] = weights["conv1.weight"][:, :, :5]
    weights["fc7.weight"] = weights["fc7.weight"].astype(np.float64)
    weights["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError) as error:
        check_weights(spec, weights)
    message = str(error.value)
    assert "4 problem(s)" in message
    assert "missing fc8.bias" in message and "unexpected extra.weight" in message
    assert "conv1.weight: shape (96, 1, 5, 11), expected (96, 1, 11, 11)" in message
    assert "fc7.weight: dtype float64, expected float32" in message


def test_wrong_input_size_names_the_file(tmp_path):
    path = save_weights(tmp_path / "w65.npz", init_weights(book_alexnet().with_input(1, 65, 65), 0))
    with pytest.raises(WeightsError, match=r"(?s)w65.npz do not fit spec .book. with input 1x224x224.*fc6.weight: shape \(4096, 256\)"):
        load_weights_file(path, book_alexnet())


def test_pickle_inside_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"conv1.weight": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(WeightsError, match="refused, the file holds a pickled object"):
        read_npz(path)
    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps({"conv1.weight": 1}))
    with pytest.raises(WeightsError, match="raw.npz: refused, the file holds a pickled object"):
        read_npz(raw)


def test_truncated_file_and_missing_file(tmp_path):
    path = save_weights(tmp_path / "w.npz", {"a": np.zeros(1000, np.float32)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(WeightsError, match="w.npz: not a readable .npz"):
        read_npz(path)
    with pytest.raises(WeightsError, match="no such weights file"):
        read_npz(tmp_path / "absent.npz")


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_weights(tmp_path / "w.npz", {"a": np.ones(3, np.float32)})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", broken)
    with pytest.raises(OSError, match="disk full"):
        save_weights(path, {"a": np.zeros(3, np.float32)})
    assert np.array_equal(read_npz(path)["a"], np.ones(3)) and len(list(tmp_path.iterdir())) == 1


def test_nhwc_flatten_permutation():
    spec = book_alexnet()
    c, h, w = 256, 5, 5
    x = np.random.default_rng(0).standard_normal((2, c, h, w))
    perm = nhwc_flatten_permutation(spec)
    assert np.array_equal(x.transpose(0, 2, 3, 1).reshape(2, -1), x.reshape(2, -1)[:, perm])
    assert sorted(perm) == list(range(c * h * w))


def test_momentum_buffers_checked_in_full_and_zeros_when_absent():
    spec = book_alexnet()
    shapes = expected_shapes(spec)
    zeros = momentum_buffers(spec, 0.9, {})  # a fresh start: PyTorch's buf = g equals 0.9 * 0 + g
    assert {k: v.shape for k, v in zeros.items()} == shapes and not any(v.any() for v in zeros.values())
    state = {MOMENTUM_PREFIX + name: np.full(shape, 0.5, np.float32) for name, shape in shapes.items()}
    assert all((momentum_buffers(spec, 0.9, state)[name] == 0.5).all() for name in shapes)
    assert momentum_buffers(spec, 0.0, {}) == {}

    broken = dict(state)
    del broken["momentum/fc8.bias"]
    broken["momentum/conv1.weight"] = state["momentum/conv1.weight"].astype(np.float64)
    broken["momentum/fc6.weight"] = np.zeros((4096, 9216), np.float32)
    broken["momentum/fc9.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError) as caught:
        momentum_buffers(spec, 0.9, broken)
    message = str(caught.value)
    assert "momentum buffers do not fit spec 'book'" in message and "(4 problem(s))" in message
    for problem in ("missing momentum/fc8.bias (10,)", "unexpected momentum/fc9.weight",
                    "momentum/conv1.weight: dtype float64, expected float32",
                    "momentum/fc6.weight: shape (4096, 9216), expected (4096, 6400)"):
        assert problem in message
    with pytest.raises(WeightsError, match="no momentum, so it keeps no optimizer state: unexpected momentum/conv1.bias"):
        momentum_buffers(spec, 0.0, state)


def test_the_loss_scale_state_is_split_off_and_checked_before_use():
    momentum = {"momentum/fc8.bias": np.zeros(10, np.float32)}
    entries = loss_scale_entries(2.0 ** 14, 5)
    assert {k: (v.dtype, v.shape) for k, v in entries.items()} == {LOSS_SCALE_KEY: (np.float32, ()),
                                                                   GOOD_STEPS_KEY: (np.int64, ())}
    rest, scale = split_loss_scale({**momentum, **entries}, scaled=True)
    assert rest == momentum and scale == (2.0 ** 14, 5)
    assert split_loss_scale(momentum, scaled=True) == (momentum, (LOSS_SCALE_INITIAL, 0))  # a fresh start
    assert split_loss_scale(momentum, scaled=False) == (momentum, None)
    with pytest.raises(WeightsError, match="does not scale its loss .*: unexpected loss_scale/good_steps, loss_scale/scale"):
        split_loss_scale({**momentum, **entries}, scaled=False)
    with pytest.raises(WeightsError, match="loss_scale/scale without loss_scale/good_steps"):
        split_loss_scale({LOSS_SCALE_KEY: entries[LOSS_SCALE_KEY]}, scaled=True)
    for scale, good, problem in ((np.float32(0), 0, "must be finite and > 0"), (np.float32(np.inf), 0, "finite"),
                                 (np.float32(1), LOSS_SCALE_GROWTH_INTERVAL, "in \\[0, 2000\\)"),
                                 (np.float32(1), -1, "in \\[0, 2000\\)"),
                                 (np.ones(2, np.float32), 0, "a float scalar and an integer scalar")):
        with pytest.raises(WeightsError, match=problem):
            split_loss_scale({LOSS_SCALE_KEY: scale, GOOD_STEPS_KEY: np.int64(good)}, scaled=True)
