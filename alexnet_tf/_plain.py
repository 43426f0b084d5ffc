"""A COPY of the book's code, not part of the library: the untuned baseline of `alexnet bench --baseline`.

The network is D2L 1.0, section 8.1 ("Deep Convolutional Neural Networks (AlexNet)"),
TensorFlow tab, and the step is what the book's ``d2l.Trainer.fit_epoch`` does for
TensorFlow: an eager ``tf.GradientTape`` step with ``tf.keras.optimizers.SGD(lr)`` and
``SparseCategoricalCrossentropy(from_logits=True)``. The layer sizes are restated here on
purpose, exactly as the book writes them: this file is the yardstick the library's own,
spec-built implementation is measured against, so it must not share any of the library's
code, and the library never imports it.

Kept as the book has it: Keras ``Sequential``, default (Glorot) init, NHWC, no XLA, float32.
Three changes: the book's ``loss`` method is named ``classifier_loss`` here (a Keras 3 model
keeps a ``loss`` attribute of its own); the network is called with ``training=True`` while
training (the book calls it without, so Keras leaves its dropout off), so all three frameworks
do the same work; and the step runs as a ``tf.function`` (graph mode), as ``model.fit`` runs
it for every Keras user. The book's own loop steps eagerly, which is an easy target: on an
Intel Xeon with AVX-512 the eager copy trained 2.4x slower than this project's backend, the
graph-mode one 0.91x (issue 15's measurement); the baseline to beat is the graph-mode one.
Glue added for the harness (below the line): a synthetic batch on the device, one training
step and one inference step that return Python floats.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


class AlexNet(tf.keras.Model):  # the book's d2l.Classifier subclass, without the plotting machinery
    def __init__(self, lr=0.1, num_classes=10):
        super().__init__()
        self.lr = lr
        self.net = tf.keras.models.Sequential([
            tf.keras.layers.Conv2D(filters=96, kernel_size=11, strides=4,
                                   activation='relu'),
            tf.keras.layers.MaxPool2D(pool_size=3, strides=2),
            tf.keras.layers.Conv2D(filters=256, kernel_size=5, padding='same',
                                   activation='relu'),
            tf.keras.layers.MaxPool2D(pool_size=3, strides=2),
            tf.keras.layers.Conv2D(filters=384, kernel_size=3, padding='same',
                                   activation='relu'),
            tf.keras.layers.Conv2D(filters=384, kernel_size=3, padding='same',
                                   activation='relu'),
            tf.keras.layers.Conv2D(filters=256, kernel_size=3, padding='same',
                                   activation='relu'),
            tf.keras.layers.MaxPool2D(pool_size=3, strides=2),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(4096, activation='relu'),
            tf.keras.layers.Dropout(0.5),
            tf.keras.layers.Dense(4096, activation='relu'),
            tf.keras.layers.Dropout(0.5),
            tf.keras.layers.Dense(num_classes)])

    def call(self, X, training=None):
        return self.net(X, training=training)

    def classifier_loss(self, Y_hat, Y, averaged=True):  # d2l.Classifier.loss (Keras 3 models own a `loss` attribute)
        Y_hat = tf.reshape(Y_hat, (-1, Y_hat.shape[-1]))
        Y = tf.reshape(Y, (-1,))
        fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return fn(Y, Y_hat)

    def configure_optimizers(self):  # d2l.Module.configure_optimizers
        return tf.keras.optimizers.SGD(self.lr)


# ---------------------------------------------------------------- harness glue (not the book's)

def make(*, batch_size, input_size=(224, 224), device="cpu", lr=0.01, seed=0):
    """The book's model and optimizer on ``device`` ('cpu' or 'gpu'); returns (batch, train_step, eval_step)."""
    tf.random.set_seed(seed)
    device_name = "/GPU:0" if device == "gpu" else "/CPU:0"
    with tf.device(device_name):
        model = AlexNet(lr=lr)
        model(tf.zeros((1, *input_size, 1)))  # builds the layers
        optim = model.configure_optimizers()

    def batch():
        with tf.device(device_name):
            return (tf.random.normal((batch_size, *input_size, 1)),
                    tf.random.uniform((batch_size,), 0, 10, dtype=tf.int32))

    @tf.function  # graph mode, as model.fit compiles its train step (jit_compile off: no XLA)
    def compiled_train_step(X, y):  # d2l.Trainer.fit_epoch, one batch
        with tf.device(device_name):
            with tf.GradientTape() as tape:
                loss = model.classifier_loss(model(X, training=True), y)
            grads = tape.gradient(loss, model.trainable_variables)
            optim.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def compiled_eval_step(X, y):  # d2l.Trainer.fit_epoch, validation
        with tf.device(device_name):
            return model.classifier_loss(model(X, training=False), y)

    def train_step(X, y):
        return float(compiled_train_step(X, y))

    def eval_step(X, y):
        return float(compiled_eval_step(X, y))

    return batch, train_step, eval_step
