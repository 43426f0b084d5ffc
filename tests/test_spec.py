import pytest

from common import shapes
from common.spec import (
    AdaptiveAvgPool2d, Conv2d, Dense, Dropout, Flatten, LocalResponseNorm, MaxPool2d, ModelSpec, ReLU, SpecError,
    VARIANTS, book_alexnet, get_spec, paper_alexnet,
)


def test_book_alexnet_is_the_d2l_network():
    spec = book_alexnet()
    assert spec.input_shape == (1, 224, 224) and spec.num_classes == 10
    convs = [l for l in spec.layers if isinstance(l, Conv2d)]
    assert [(c.name, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        ("conv1", 96, (11, 11), (4, 4), (1, 1)),
        ("conv2", 256, (5, 5), (1, 1), (2, 2)),
        ("conv3", 384, (3, 3), (1, 1), (1, 1)),
        ("conv4", 384, (3, 3), (1, 1), (1, 1)),
        ("conv5", 256, (3, 3), (1, 1), (1, 1)),
    ]
    assert [l.name for l in spec.layers if isinstance(l, Dense)] == ["fc6", "fc7", "fc8"]
    assert [l.rate for l in spec.layers if isinstance(l, Dropout)] == [0.5, 0.5]
    assert [l.name for l in spec.layers if isinstance(l, MaxPool2d)] == ["pool1", "pool2", "pool5"]


def test_paper_variant_has_lrn_and_groups():
    spec = paper_alexnet()
    assert spec.input_shape == (3, 227, 227) and spec.num_classes == 1000
    assert [l.name for l in spec.layers if isinstance(l, LocalResponseNorm)] == ["norm1", "norm2"]
    assert {l.name: l.groups for l in spec.layers if isinstance(l, Conv2d)} == {
        "conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2}


def test_torchvision_variant_is_torchvisions_alexnet_layer_for_layer():
    """torchvision.models.alexnet: features, avgpool, classifier in that order (dropout before fc6, fc7)."""
    spec = VARIANTS["torchvision"]()
    assert spec.name == "torchvision" and spec.input_shape == (3, 224, 224) and spec.num_classes == 1000
    described = []
    for layer in spec.layers:
        if isinstance(layer, Conv2d):
            described.append(("conv", layer.out_channels, layer.kernel_size[0], layer.stride[0], layer.padding[0],
                              layer.groups))
        elif isinstance(layer, MaxPool2d):
            described.append(("maxpool", layer.kernel_size[0], layer.stride[0]))
        elif isinstance(layer, AdaptiveAvgPool2d):
            described.append(("avgpool", layer.output_size))
        elif isinstance(layer, Dense):
            described.append(("linear", layer.out_features))
        elif isinstance(layer, Dropout):
            described.append(("dropout", layer.rate))
        else:
            described.append((type(layer).__name__.lower(),))
    assert described == [
        ("conv", 64, 11, 4, 2, 1), ("relu",), ("maxpool", 3, 2),
        ("conv", 192, 5, 1, 2, 1), ("relu",), ("maxpool", 3, 2),
        ("conv", 384, 3, 1, 1, 1), ("relu",),
        ("conv", 256, 3, 1, 1, 1), ("relu",),
        ("conv", 256, 3, 1, 1, 1), ("relu",), ("maxpool", 3, 2),
        ("avgpool", (6, 6)), ("flatten",),
        ("dropout", 0.5), ("linear", 4096), ("relu",),
        ("dropout", 0.5), ("linear", 4096), ("relu",),
        ("linear", 1000),
    ]
    assert shapes.totals(shapes.infer(spec))["params"] == 61_100_840
    # the adaptive pool makes fc6's fan-in independent of the input size
    assert shapes.dense_in_features(spec.with_input(3, 256, 300))["fc6"] == 9216
    assert shapes.smallest_input(spec) == (63, 63)


def test_variants_and_modifiers():
    assert get_spec("book", num_classes=3).num_classes == 3
    assert book_alexnet().with_num_classes(7).layers[-1].out_features == 7
    assert book_alexnet().with_input(3, 100, 120).input_shape == (3, 100, 120)
    assert all(l.rate == 0 for l in book_alexnet().with_dropout(0.0).layers if isinstance(l, Dropout))
    with pytest.raises(SpecError, match="unknown AlexNet variant 'vgg'"):
        get_spec("vgg")


@pytest.mark.parametrize("make, message", [
    (lambda: Conv2d("c", 0, 3), "layer 'c': out_channels must be a positive int"),
    (lambda: Conv2d("c", 8, -1), "layer 'c': kernel_size must be >= 1"),
    (lambda: Conv2d("c", 8, 3, padding=-1), "layer 'c': padding must be >= 0"),
    (lambda: Conv2d("c", 9, 3, groups=2), "out_channels 9 is not divisible by groups 2"),
    (lambda: Dense("d", 0), "layer 'd': out_features must be a positive int"),
    (lambda: Dropout("p", 1.0), r"dropout rate must be in \[0, 1\)"),
    (lambda: MaxPool2d("m", 3, 0), "layer 'm': stride must be >= 1"),
    (lambda: LocalResponseNorm("n", size=4), "LRN size must be odd"),
])
def test_invalid_layers_raise_at_construction(make, message):
    with pytest.raises(SpecError, match=message):
        make()


@pytest.mark.parametrize("layers, message", [
    ((Conv2d("c", 4, 3, groups=2), Flatten("f"), Dense("d", 2)), "in_channels 3 is not divisible by groups 2"),
    (("conv", Flatten("f"), Dense("d", 2)), "unknown layer kind str"),
    ((ReLU("a"), ReLU("a"), Flatten("f"), Dense("d", 2)), "'a' is used twice"),
    ((Dense("d", 2),), "Dense needs a Flatten before it"),
    ((Flatten("f"), Dense("d", 2), MaxPool2d("m", 2, 2), Dense("e", 2)), "MaxPool2d after Flatten"),
    ((Flatten("f"), Dense("d", 2), ReLU("r")), "last layer must be Dense"),
    ((), "has no layers"),
])
def test_invalid_specs_raise_at_construction(layers, message):
    with pytest.raises(SpecError, match=message):
        ModelSpec("bad", 3, 32, layers)


def test_invalid_input_size():
    with pytest.raises(SpecError, match="input_size must be >= 1"):
        book_alexnet(input_size=0)
