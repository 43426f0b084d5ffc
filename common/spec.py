"""AlexNet written once, as data.

Every backend builds its native model from a :class:`ModelSpec`; none of them restates a
layer size, padding or channel count. Layers are frozen dataclasses with stable names
(``conv1`` ... ``fc8``) that the shape tables, canonical weights and parity reports share.

Sizes are ``(height, width)`` pairs; a plain int in a constructor means a square.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Union


class SpecError(ValueError):
    """A model spec that cannot describe a network (raised at construction)."""


def _pair(value, what: str, layer: str, *, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise SpecError(f"layer {layer!r}: {what} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise SpecError(f"layer {layer!r}: {what} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


def _positive(value, what: str, layer: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"layer {layer!r}: {what} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class Conv2d:
    """2-D convolution with explicit zero padding (never 'same': docs/design.md says why)."""

    name: str
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1

    def __post_init__(self):
        _positive(self.out_channels, "out_channels", self.name)
        _positive(self.groups, "groups", self.name)
        object.__setattr__(self, "kernel_size", _pair(self.kernel_size, "kernel_size", self.name, minimum=1))
        object.__setattr__(self, "stride", _pair(self.stride, "stride", self.name, minimum=1))
        object.__setattr__(self, "padding", _pair(self.padding, "padding", self.name, minimum=0))
        if self.out_channels % self.groups:
            raise SpecError(
                f"layer {self.name!r}: out_channels {self.out_channels} is not divisible by groups {self.groups}"
            )


@dataclass(frozen=True)
class MaxPool2d:
    name: str
    kernel_size: tuple[int, int]
    stride: tuple[int, int]

    def __post_init__(self):
        object.__setattr__(self, "kernel_size", _pair(self.kernel_size, "kernel_size", self.name, minimum=1))
        object.__setattr__(self, "stride", _pair(self.stride, "stride", self.name, minimum=1))


@dataclass(frozen=True)
class ReLU:
    name: str


@dataclass(frozen=True)
class LocalResponseNorm:
    """Across-channel LRN as in the 2012 paper: b = a / (k + alpha/size * sum a^2)^beta.

    alpha is stored as PyTorch's convention (divided by ``size`` inside the sum); backends
    whose framework uses the undivided alpha convert it.
    """

    name: str
    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0

    def __post_init__(self):
        _positive(self.size, "size", self.name)
        if self.size % 2 == 0:
            raise SpecError(f"layer {self.name!r}: LRN size must be odd, got {self.size}")


@dataclass(frozen=True)
class AdaptiveAvgPool2d:
    """Average pooling to a fixed output size (torchvision's AlexNet uses 6x6)."""

    name: str
    output_size: tuple[int, int]

    def __post_init__(self):
        object.__setattr__(self, "output_size", _pair(self.output_size, "output_size", self.name, minimum=1))


@dataclass(frozen=True)
class Flatten:
    """Flattens (C, H, W) in NCHW order; NHWC backends permute fc weights instead."""

    name: str


@dataclass(frozen=True)
class Dense:
    name: str
    out_features: int

    def __post_init__(self):
        _positive(self.out_features, "out_features", self.name)


@dataclass(frozen=True)
class Dropout:
    name: str
    rate: float

    def __post_init__(self):
        if not (isinstance(self.rate, (int, float)) and 0.0 <= self.rate < 1.0):
            raise SpecError(f"layer {self.name!r}: dropout rate must be in [0, 1), got {self.rate!r}")


Layer = Union[Conv2d, MaxPool2d, ReLU, LocalResponseNorm, AdaptiveAvgPool2d, Flatten, Dense, Dropout]
LAYER_TYPES = (Conv2d, MaxPool2d, ReLU, LocalResponseNorm, AdaptiveAvgPool2d, Flatten, Dense, Dropout)
SPATIAL_TYPES = (Conv2d, MaxPool2d, LocalResponseNorm, AdaptiveAvgPool2d)  # need an image input
WEIGHTED_TYPES = (Conv2d, Dense)


@dataclass(frozen=True)
class ModelSpec:
    """A whole network: input (channels, height, width), then layers in order.

    The last layer is the classifier; ``num_classes`` is its width.
    """

    name: str
    in_channels: int
    input_size: tuple[int, int]
    layers: tuple[Layer, ...] = field(repr=False)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        _positive(self.in_channels, "in_channels", "<input>")
        object.__setattr__(self, "input_size", _pair(self.input_size, "input_size", "<input>", minimum=1))
        if not self.layers:
            raise SpecError(f"spec {self.name!r} has no layers")
        seen: set[str] = set()
        channels, flat = self.in_channels, False
        for layer in self.layers:
            if not isinstance(layer, LAYER_TYPES):
                raise SpecError(
                    f"spec {self.name!r}: unknown layer kind {type(layer).__name__} ({layer!r}); "
                    f"known kinds: {', '.join(t.__name__ for t in LAYER_TYPES)}"
                )
            if not layer.name or not layer.name.isidentifier():
                raise SpecError(f"spec {self.name!r}: layer name {layer.name!r} is not an identifier")
            if layer.name in seen:
                raise SpecError(f"spec {self.name!r}: layer name {layer.name!r} is used twice")
            seen.add(layer.name)
            if isinstance(layer, SPATIAL_TYPES) and flat:
                raise SpecError(f"layer {layer.name!r}: {type(layer).__name__} after Flatten needs an image input")
            if isinstance(layer, Conv2d):
                if channels % layer.groups:
                    raise SpecError(
                        f"layer {layer.name!r}: in_channels {channels} is not divisible by groups {layer.groups}"
                    )
                channels = layer.out_channels
            elif isinstance(layer, Flatten):
                flat = True
            elif isinstance(layer, Dense) and not flat:
                raise SpecError(f"layer {layer.name!r}: Dense needs a Flatten before it")
        if not isinstance(self.layers[-1], Dense):
            raise SpecError(f"spec {self.name!r}: the last layer must be Dense (the classifier)")

    @property
    def num_classes(self) -> int:
        return self.layers[-1].out_features

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one example."""
        return (self.in_channels, *self.input_size)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"spec {self.name!r} has no layer {name!r}; it has {[l.name for l in self.layers]}")

    def with_num_classes(self, num_classes: int) -> "ModelSpec":
        return replace(self, layers=self.layers[:-1] + (replace(self.layers[-1], out_features=num_classes),))

    def with_input(self, in_channels: int, height: int, width: int | None = None) -> "ModelSpec":
        return replace(self, in_channels=in_channels, input_size=(height, height if width is None else width))

    def with_dropout(self, rate: float) -> "ModelSpec":
        """The same network with every dropout rate set to ``rate`` (0 switches dropout off)."""
        return replace(self, layers=tuple(replace(l, rate=rate) if isinstance(l, Dropout) else l for l in self.layers))

    def weighted_layers(self) -> tuple[Conv2d | Dense, ...]:
        return tuple(l for l in self.layers if isinstance(l, WEIGHTED_TYPES))


def _features(*, lrn: bool, groups: tuple[int, int, int], conv1, pad_first: int) -> list[Layer]:
    """The five convolutions shared by the paper's and the book's AlexNet."""
    g2, g4, g5 = groups
    layers: list[Layer] = [Conv2d("conv1", conv1[0], 11, stride=4, padding=pad_first), ReLU("relu1")]
    if lrn:
        layers.append(LocalResponseNorm("norm1"))
    layers += [MaxPool2d("pool1", 3, 2), Conv2d("conv2", 256, 5, padding=2, groups=g2), ReLU("relu2")]
    if lrn:
        layers.append(LocalResponseNorm("norm2"))
    layers += [
        MaxPool2d("pool2", 3, 2),
        Conv2d("conv3", 384, 3, padding=1),
        ReLU("relu3"),
        Conv2d("conv4", 384, 3, padding=1, groups=g4),
        ReLU("relu4"),
        Conv2d("conv5", 256, 3, padding=1, groups=g5),
        ReLU("relu5"),
        MaxPool2d("pool5", 3, 2),
    ]
    return layers


def _classifier(num_classes: int, dropout: float, *, hidden: int = 4096) -> list[Layer]:
    return [
        Flatten("flatten"),
        Dense("fc6", hidden),
        ReLU("relu6"),
        Dropout("drop6", dropout),
        Dense("fc7", hidden),
        ReLU("relu7"),
        Dropout("drop7", dropout),
        Dense("fc8", num_classes),
    ]


def book_alexnet(num_classes: int = 10, in_channels: int = 1, input_size=224, dropout: float = 0.5) -> ModelSpec:
    """The AlexNet of "Dive into Deep Learning" 8.1 (PyTorch version), for Fashion-MNIST."""
    layers = _features(lrn=False, groups=(1, 1, 1), conv1=(96,), pad_first=1) + _classifier(num_classes, dropout)
    return ModelSpec("book", in_channels, input_size, tuple(layers))


def paper_alexnet(num_classes: int = 1000, dropout: float = 0.5) -> ModelSpec:
    """Krizhevsky et al. 2012: 3x227x227, LRN after conv1/conv2, two-GPU groups in conv2/4/5."""
    layers = _features(lrn=True, groups=(2, 2, 2), conv1=(96,), pad_first=0) + _classifier(num_classes, dropout)
    return ModelSpec("paper", 3, 227, tuple(layers))


def torchvision_alexnet(num_classes: int = 1000, dropout: float = 0.5) -> ModelSpec:
    """``torchvision.models.alexnet``, the model-zoo AlexNet (Krizhevsky's "one weird trick", 2014).

    64-192-384-256-256 channels, no LRN or groups, an adaptive average pool to 6x6 (so any
    input from 63x63 up gives fc6 9,216 inputs), and dropout *before* fc6 and fc7. Layer for
    layer torchvision's ``features``/``avgpool``/``classifier``; 61,100,840 parameters.
    """
    layers: list[Layer] = [
        Conv2d("conv1", 64, 11, stride=4, padding=2),
        ReLU("relu1"),
        MaxPool2d("pool1", 3, 2),
        Conv2d("conv2", 192, 5, padding=2),
        ReLU("relu2"),
        MaxPool2d("pool2", 3, 2),
        Conv2d("conv3", 384, 3, padding=1),
        ReLU("relu3"),
        Conv2d("conv4", 256, 3, padding=1),
        ReLU("relu4"),
        Conv2d("conv5", 256, 3, padding=1),
        ReLU("relu5"),
        MaxPool2d("pool5", 3, 2),
        AdaptiveAvgPool2d("avgpool", 6),
        Flatten("flatten"),
        Dropout("drop6", dropout),
        Dense("fc6", 4096),
        ReLU("relu6"),
        Dropout("drop7", dropout),
        Dense("fc7", 4096),
        ReLU("relu7"),
        Dense("fc8", num_classes),
    ]
    return ModelSpec("torchvision", 3, 224, tuple(layers))


VARIANTS = {"book": book_alexnet, "paper": paper_alexnet, "torchvision": torchvision_alexnet}


def get_spec(name: str = "book", **kwargs) -> ModelSpec:
    try:
        factory = VARIANTS[name]
    except KeyError:
        raise SpecError(f"unknown AlexNet variant {name!r}; choose from {', '.join(VARIANTS)}") from None
    return factory(**kwargs)
