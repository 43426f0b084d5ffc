import pytest

from common import shapes
from common.spec import book_alexnet, paper_alexnet

SPATIAL_224 = [54, 54, 26, 26, 26, 12, 12, 12, 12, 12, 12, 12, 5]


def spatial(rows, layout="NCHW"):
    return [r.shape[2:] if layout == "NCHW" else r.shape[1:3] for r in rows if len(r.shape) == 4]


def test_book_224_table():
    rows = shapes.infer(book_alexnet(), (1, 224, 224))
    assert [h for h, w in spatial(rows)] == SPATIAL_224
    assert all(h == w for h, w in spatial(rows))
    assert shapes.flatten_features(book_alexnet()) == 6400
    assert shapes.totals(rows)["params"] == 46_764_746
    assert rows[-1].shape == (1, 10)
    hidden = sum(r.params for r in rows if r.name in ("fc6", "fc7"))
    assert hidden * 4 / 2**20 == pytest.approx(164.0, abs=0.5)  # "about 164 MiB of float32 weights"


def test_non_square_input_in_both_layouts():
    nchw = shapes.infer(book_alexnet(), (1, 224, 244), batch=3)
    nhwc = shapes.infer(book_alexnet(), (1, 224, 244), batch=3, layout="NHWC")
    assert spatial(nchw)[0] == (54, 59) and spatial(nchw)[2] == (26, 29)
    assert spatial(nchw)[5] == (12, 14) and spatial(nchw)[-1] == (5, 6)
    assert nchw[0].shape == (3, 96, 54, 59) and nhwc[0].shape == (3, 54, 59, 96)
    assert spatial(nhwc, "NHWC") == spatial(nchw)
    assert shapes.flatten_features(book_alexnet(), (1, 224, 244)) == 7680


def test_macs_and_memory_scale_with_batch():
    one, four = shapes.infer(book_alexnet(), batch=1), shapes.infer(book_alexnet(), batch=4)
    assert one[0].macs == 54 * 54 * 96 * 11 * 11  # out pixels x out channels x fan-in
    assert one[0].activation_bytes == 96 * 54 * 54 * 4
    assert [r.macs * 4 for r in one] == [r.macs for r in four]
    assert [r.activation_bytes * 4 for r in one] == [r.activation_bytes for r in four]
    assert shapes.training_flops_per_image(book_alexnet()) == 6 * shapes.totals(one)["macs"]


def test_smallest_input_is_exact():
    assert shapes.smallest_input(book_alexnet()) == (65, 65)
    shapes.infer(book_alexnet(), (1, 65, 65))
    with pytest.raises(shapes.InputTooSmallError):
        shapes.infer(book_alexnet(), (1, 64, 65))
    assert shapes.infer(book_alexnet(), (1, 65, 65))[12].shape == (1, 256, 1, 1)


def test_too_small_input_names_the_layer_and_the_minimum():
    with pytest.raises(shapes.InputTooSmallError) as error:
        shapes.infer(book_alexnet(), (1, 32, 32))
    message = str(error.value)
    assert "at layer 'pool2'" in message and "MaxPool2d 3x3" in message
    assert "smallest input this network accepts is 1x65x65" in message


def test_wrong_channels_and_bad_arguments():
    with pytest.raises(ValueError, match="takes 1 input channel"):
        shapes.infer(book_alexnet(), (3, 224, 224))
    with pytest.raises(ValueError, match="layout must be one of"):
        shapes.infer(book_alexnet(), layout="CHWN")
    with pytest.raises(ValueError, match="batch must be a positive int"):
        shapes.infer(book_alexnet(), batch=0)


def test_paper_variant_table():
    rows = shapes.infer(paper_alexnet())
    assert shapes.flatten_features(paper_alexnet()) == 256 * 6 * 6
    conv2 = next(r for r in rows if r.name == "conv2")
    assert conv2.params == 256 * 48 * 25 + 256  # groups=2 halves the fan-in
    assert shapes.smallest_input(paper_alexnet()) == (67, 67)
