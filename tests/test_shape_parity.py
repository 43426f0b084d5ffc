"""Each backend's native model has common.shapes' per-layer shapes (in its layout) and parameter counts."""
import pytest

from common import shapes
from common.spec import book_alexnet

CASES = {
    "224x224": ((1, 224, 224), 1),
    "224x244": ((1, 224, 244), 1),
    "batch3": ((1, 224, 224), 3),
    "smallest": ((1, 65, 65), 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_shapes_and_params_match_common(backend, case):
    chw, batch = CASES[case]
    spec = book_alexnet().with_input(*chw)
    model = backend.build(spec, device="cpu")
    input_shape = shapes.to_layout((batch, *chw), backend.LAYOUT)
    rows = backend.layer_summary(model, input_shape, print_table=False)
    expected = shapes.infer(spec, batch=batch, layout=backend.LAYOUT)
    assert [r.name for r in rows] == [e.name for e in expected]
    assert [(r.name, r.shape) for r in rows] == [(e.name, e.shape) for e in expected]
    assert [(r.name, r.params) for r in rows] == [(e.name, e.params) for e in expected]


def test_seed_tables(backend):
    """The issue's own numbers, measured on the native models."""
    square = backend.layer_summary(backend.build(device="cpu"), shapes.to_layout((1, 1, 224, 224), backend.LAYOUT),
                                   print_table=False)
    wide = backend.layer_summary(backend.build(book_alexnet().with_input(1, 224, 244), device="cpu"),
                                 shapes.to_layout((1, 1, 224, 244), backend.LAYOUT), print_table=False)
    hw = (lambda s: s[2:]) if backend.LAYOUT == "NCHW" else (lambda s: s[1:3])
    convs_and_pools = ["conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5"]
    by_name = {r.name: r for r in square}
    assert [hw(by_name[n].shape)[0] for n in convs_and_pools] == [54, 26, 26, 12, 12, 12, 12, 5]
    assert by_name["flatten"].shape == (1, 6400)
    assert sum(r.params for r in square) == 46_764_746
    wide_by_name = {r.name: r for r in wide}
    assert [hw(wide_by_name[n].shape) for n in ("conv1", "pool1", "pool2", "pool5")] == [(54, 59), (26, 29), (12, 14), (5, 6)]
    assert wide_by_name["flatten"].shape == (1, 7680)


def test_summary_prints_a_table(backend, capsys):
    model = backend.build(book_alexnet().with_input(1, 65, 65), device="cpu")
    backend.layer_summary(model, shapes.to_layout((1, 1, 65, 65), backend.LAYOUT))
    out = capsys.readouterr().out
    assert backend.LAYOUT in out and "conv1" in out and "fc8" in out
    assert f"{shapes.totals(shapes.infer(book_alexnet().with_input(1, 65, 65)))['params']:,}" in out


def test_summary_rejects_another_input_size(backend):
    model = backend.build(book_alexnet().with_input(1, 65, 65), device="cpu")
    with pytest.raises(ValueError, match="built for inputs 1x65x65"):
        backend.layer_summary(model, shapes.to_layout((1, 1, 96, 96), backend.LAYOUT), print_table=False)
    with pytest.raises(shapes.InputTooSmallError, match="at layer"):
        backend.layer_summary(model, shapes.to_layout((1, 1, 32, 32), backend.LAYOUT), print_table=False)
