"""A COPY of the book's code, not part of the library: the untuned baseline of `alexnet bench --baseline`.

The network is D2L 1.0, section 8.1 ("Deep Convolutional Neural Networks (AlexNet)"), JAX tab:
a ``flax.linen`` Sequential in NHWC with Flax's default initialisers and padding ("SAME" but the
first convolution's 1), ``Dropout(deterministic=not self.training)``, the mean of optax's
``softmax_cross_entropy_with_integer_labels``, and ``optax.sgd(lr)`` in a Flax ``TrainState`` as
the book's ``d2l.Trainer`` keeps it. The layer sizes are restated here on purpose, exactly as the
book writes them: this file is the yardstick the library's spec-built implementation is measured
against, so it shares none of the library's code, and the library never imports it.

One change: the book jits the loss and its gradient and applies the update outside; here the
gradient and ``apply_gradients`` are one jitted step, as every JAX user writes a training loop,
so the baseline to beat is the fast one. Glue added for the harness (below the line): a synthetic
batch on the device, one training step and one inference step that return Python floats.
"""
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state


class AlexNet(nn.Module):  # the book's d2l.Classifier subclass, without the plotting machinery
    lr: float = 0.1
    num_classes: int = 10
    training: bool = True

    def setup(self):
        self.net = nn.Sequential([
            nn.Conv(features=96, kernel_size=(11, 11), strides=4, padding=1),
            nn.relu,
            lambda x: nn.max_pool(x, window_shape=(3, 3), strides=(2, 2)),
            nn.Conv(features=256, kernel_size=(5, 5)),
            nn.relu,
            lambda x: nn.max_pool(x, window_shape=(3, 3), strides=(2, 2)),
            nn.Conv(features=384, kernel_size=(3, 3)), nn.relu,
            nn.Conv(features=384, kernel_size=(3, 3)), nn.relu,
            nn.Conv(features=256, kernel_size=(3, 3)), nn.relu,
            lambda x: nn.max_pool(x, window_shape=(3, 3), strides=(2, 2)),
            lambda x: x.reshape((x.shape[0], -1)),  # flatten
            nn.Dense(features=4096),
            nn.relu,
            nn.Dropout(0.5, deterministic=not self.training),
            nn.Dense(features=4096),
            nn.relu,
            nn.Dropout(0.5, deterministic=not self.training),
            nn.Dense(features=self.num_classes)
        ])

    def __call__(self, X):
        return self.net(X)


def classifier_loss(Y_hat, Y):  # d2l.Classifier.loss, averaged
    Y_hat = Y_hat.reshape((-1, Y_hat.shape[-1]))
    return optax.softmax_cross_entropy_with_integer_labels(Y_hat, Y.reshape((-1,))).mean()


# ---------------------------------------------------------------- harness glue (not the book's)

def make(*, batch_size, input_size=(224, 224), device="cpu", lr=0.01, seed=0):
    """The book's model and optimizer on ``device`` ('cpu' or 'gpu'); returns (batch, train_step, eval_step)."""
    where = jax.devices("gpu" if device == "gpu" else "cpu")[0]
    key, dropout_key = jax.random.split(jax.random.key(seed))
    model, evaluator = AlexNet(lr=lr), AlexNet(lr=lr, training=False)
    with jax.default_device(where):
        params = model.init({"params": key, "dropout": dropout_key}, jnp.zeros((1, *input_size, 1)))["params"]
        state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(lr))
    state = jax.device_put(state, where)
    holder = {"state": state, "dropout": dropout_key}

    def batch():
        x_key, y_key = jax.random.split(jax.random.key(seed + 1))
        return (jax.device_put(jax.random.normal(x_key, (batch_size, *input_size, 1)), where),
                jax.device_put(jax.random.randint(y_key, (batch_size,), 0, 10), where))

    @jax.jit
    def compiled_train_step(state, X, y, dropout):  # d2l.Trainer.fit_epoch, one batch
        def loss(params):
            return classifier_loss(state.apply_fn({"params": params}, X, rngs={"dropout": dropout}), y)
        value, grads = jax.value_and_grad(loss)(state.params)
        return state.apply_gradients(grads=grads), value

    @jax.jit
    def compiled_eval_step(params, X, y):  # d2l.Trainer.fit_epoch, validation
        return classifier_loss(evaluator.apply({"params": params}, X), y)

    def train_step(X, y):
        holder["dropout"] = jax.random.split(holder["dropout"])[0]
        holder["state"], value = compiled_train_step(holder["state"], X, y, holder["dropout"])
        return float(value)

    def eval_step(X, y):
        return float(compiled_eval_step(holder["state"].params, X, y))

    return batch, train_step, eval_step
