"""The three spec layers Keras has no exact built-in for: LRN, adaptive average pooling
and a dropout whose mask is a pure function of a step seed. All work on NHWC tensors."""
from __future__ import annotations

import functools

import numpy as np

from ._framework import keras, tf

_PACKAGE = "alexnet_tf"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LocalResponseNorm(keras.layers.Layer):
    """Across-channel LRN, b = a / (k + alpha/size * sum over the window of a^2)^beta.

    The spec stores alpha in PyTorch's convention (divided by ``size``); TensorFlow's op
    takes the already divided alpha and a radius instead of a window size.
    """

    def __init__(self, size: int, alpha: float, beta: float, k: float, **kwargs):
        super().__init__(**kwargs)
        self.size, self.alpha, self.beta, self.k = int(size), float(alpha), float(beta), float(k)

    def call(self, inputs):
        return tf.nn.local_response_normalization(
            inputs, depth_radius=(self.size - 1) // 2, bias=self.k, alpha=self.alpha / self.size, beta=self.beta
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k}


@functools.lru_cache(maxsize=None)
def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) float32 averaging matrix with PyTorch's adaptive windows:
    row i averages [floor(i*size/out), ceil((i+1)*size/out))."""
    matrix = np.zeros((out, size), np.float64)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        matrix[i, start:end] = 1.0 / (end - start)
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AdaptiveAvgPool2d(keras.layers.Layer):
    """PyTorch's AdaptiveAvgPool2d on NHWC: two small matrix products (rows, then columns),
    which is the windowed mean because each window is a rectangle."""

    def __init__(self, output_size, **kwargs):
        super().__init__(**kwargs)
        self.output_size = tuple(int(v) for v in output_size)

    def call(self, inputs):
        height, width = inputs.shape[1], inputs.shape[2]
        rows = tf.constant(adaptive_pool_matrix(height, self.output_size[0]), dtype=inputs.dtype)
        cols = tf.constant(adaptive_pool_matrix(width, self.output_size[1]), dtype=inputs.dtype)
        pooled = tf.einsum("ih,nhwc->niwc", rows, inputs)
        return tf.einsum("jw,niwc->nijc", cols, pooled)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.output_size, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "output_size": self.output_size}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SeededDropout(keras.layers.Layer):
    """Inverted dropout (PyTorch's: keep with probability 1-rate, scale kept values by 1/(1-rate)).

    Called with ``seed`` (an int64 scalar tensor), the mask is
    ``stateless_uniform(seed=(seed, stream)) >= rate``: a pure function of the step seed and
    of this layer's ``stream`` (its index in the spec), so a resumed run draws the same masks
    and a compiled step takes the seed as an input without retracing. Without a seed it
    draws from TensorFlow's global generator.
    """

    def __init__(self, rate: float, stream: int, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.stream = float(rate), int(stream)

    def call(self, inputs, training=False, seed=None):
        if not training or self.rate == 0.0:
            return inputs
        shape = tf.shape(inputs)
        if seed is None:
            uniform = tf.random.uniform(shape, dtype=inputs.dtype)
        else:
            pair = tf.stack([tf.cast(seed, tf.int64), tf.constant(self.stream, tf.int64)])
            uniform = tf.random.stateless_uniform(shape, seed=pair, dtype=inputs.dtype)
        scale = tf.constant(1.0 / (1.0 - self.rate), inputs.dtype)
        return tf.where(uniform >= self.rate, inputs * scale, tf.zeros_like(inputs))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "stream": self.stream}
