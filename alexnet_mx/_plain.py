"""A COPY of the book's code, not part of the library: the untuned baseline of `alexnet bench --baseline`.

The network is D2L 1.0, section 8.1 ("Deep Convolutional Neural Networks (AlexNet)"),
MXNet tab, and the step is what the book's ``d2l.Trainer.fit_epoch`` does for MXNet:
``autograd.record``, ``SoftmaxCrossEntropyLoss`` averaged, ``loss.backward()``,
``gluon.Trainer(..., 'sgd', {'learning_rate': lr}).step(1)``, with ``npx.set_np()`` as the
book's MXNet code runs. The layer sizes are restated here on purpose, exactly as the book
writes them: this file is the yardstick the library's own, spec-built implementation is
measured against, so it must not share any of the library's code, and the library never
imports it.

Kept as the book has it: ``nn.Sequential`` (not hybridized), Xavier init, NCHW, float32.
Glue added for the harness (below the line): the ``numpy.bool`` alias MXNet 1.9.1 needs on
numpy >= 1.24, a synthetic batch on the device, one training step and one inference step
that return Python floats. Reading the loss waits for the forward pass only (MXNet's engine
is asynchronous); the harness waits for the rest (``mx.nd.waitall()``) before it stops the
clock.
"""
import numpy

if "bool" not in numpy.__dict__:  # harness glue: MXNet 1.9.1 reads numpy.bool, gone in numpy 1.24
    numpy.bool = bool

from mxnet import autograd, gluon, init, np, npx  # noqa: E402
from mxnet.gluon import nn  # noqa: E402
import mxnet as mx  # noqa: E402

npx.set_np()


class AlexNet(nn.Block):  # the book's d2l.Classifier subclass, without the plotting machinery
    def __init__(self, lr=0.1, num_classes=10):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential()
        self.net.add(
            nn.Conv2D(96, kernel_size=11, strides=4, activation='relu'),
            nn.MaxPool2D(pool_size=3, strides=2),
            nn.Conv2D(256, kernel_size=5, padding=2, activation='relu'),
            nn.MaxPool2D(pool_size=3, strides=2),
            nn.Conv2D(384, kernel_size=3, padding=1, activation='relu'),
            nn.Conv2D(384, kernel_size=3, padding=1, activation='relu'),
            nn.Conv2D(256, kernel_size=3, padding=1, activation='relu'),
            nn.MaxPool2D(pool_size=3, strides=2),
            nn.Dense(4096, activation='relu'), nn.Dropout(0.5),
            nn.Dense(4096, activation='relu'), nn.Dropout(0.5),
            nn.Dense(num_classes))

    def forward(self, X):
        return self.net(X)

    def loss(self, Y_hat, Y, averaged=True):  # d2l.Classifier.loss
        Y_hat = Y_hat.reshape((-1, Y_hat.shape[-1]))
        Y = Y.reshape((-1,))
        fn = gluon.loss.SoftmaxCrossEntropyLoss()
        l = fn(Y_hat, Y)
        return l.mean() if averaged else l

    def training_step(self, batch):  # d2l.Module.training_step
        return self.loss(self(*batch[:-1]), batch[-1])

    def configure_optimizers(self):  # d2l.Module.configure_optimizers
        return gluon.Trainer(self.collect_params(), 'sgd', {'learning_rate': self.lr})


# ---------------------------------------------------------------- harness glue (not the book's)

def make(*, batch_size, input_size=(224, 224), device="cpu", lr=0.01, seed=0):
    """The book's model and optimizer on ``device`` ('cpu' or 'gpu'); returns (batch, train_step, eval_step)."""
    mx.random.seed(seed)
    ctx = mx.gpu(0) if device == "gpu" else mx.cpu()
    model = AlexNet(lr=lr)
    model.initialize(init.Xavier(), ctx=ctx)
    model(np.zeros((1, 1, *input_size), ctx=ctx))  # finishes the deferred initialisation
    optim = model.configure_optimizers()

    def batch():
        return (np.random.normal(size=(batch_size, 1, *input_size), ctx=ctx),
                np.random.randint(0, 10, size=(batch_size,), ctx=ctx))

    def train_step(X, y):  # d2l.Trainer.fit_epoch, one batch
        with autograd.record():
            loss = model.training_step((X, y))
        loss.backward()
        optim.step(1)
        return float(loss)

    def eval_step(X, y):  # d2l.Trainer.fit_epoch, validation
        return float(model.loss(model(X), y))

    return batch, train_step, eval_step
