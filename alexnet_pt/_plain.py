"""A COPY of the book's code, not part of the library: the untuned baseline of `alexnet bench --baseline`.

The network is D2L 1.0, section 8.1 ("Deep Convolutional Neural Networks (AlexNet)"),
PyTorch tab, and the step is what the book's ``d2l.Trainer.fit_epoch`` does with its
``d2l.Classifier`` (``F.cross_entropy``, ``torch.optim.SGD(lr)``). The layer sizes are
restated here on purpose, exactly as the book writes them: this file is the yardstick the
library's own, spec-built implementation is measured against, so it must not share any of
the library's code, and the library never imports it.

Kept as the book has it: lazy layers, Xavier-uniform init, NCHW (PyTorch's default memory
format), eager mode, float32. Glue added for the harness (below the line): a synthetic batch
on the device, one training step and one inference step that return Python floats.
"""
import torch
from torch import nn
from torch.nn import functional as F


def init_cnn(module):  # d2l.init_cnn
    """Initialize weights for CNNs."""
    if type(module) == nn.Linear or type(module) == nn.Conv2d:
        nn.init.xavier_uniform_(module.weight)


class AlexNet(nn.Module):  # the book's d2l.Classifier subclass, without the plotting machinery
    def __init__(self, lr=0.1, num_classes=10):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.LazyConv2d(96, kernel_size=11, stride=4, padding=1),
            nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2),
            nn.LazyConv2d(256, kernel_size=5, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.LazyConv2d(384, kernel_size=3, padding=1), nn.ReLU(),
            nn.LazyConv2d(384, kernel_size=3, padding=1), nn.ReLU(),
            nn.LazyConv2d(256, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2), nn.Flatten(),
            nn.LazyLinear(4096), nn.ReLU(), nn.Dropout(p=0.5),
            nn.LazyLinear(4096), nn.ReLU(), nn.Dropout(p=0.5),
            nn.LazyLinear(num_classes))

    def forward(self, X):
        return self.net(X)

    def loss(self, Y_hat, Y, averaged=True):  # d2l.Classifier.loss
        Y_hat = Y_hat.reshape((-1, Y_hat.shape[-1]))
        Y = Y.reshape((-1,))
        return F.cross_entropy(Y_hat, Y, reduction='mean' if averaged else 'none')

    def training_step(self, batch):  # d2l.Module.training_step
        return self.loss(self(*batch[:-1]), batch[-1])

    def configure_optimizers(self):  # d2l.Module.configure_optimizers
        return torch.optim.SGD(self.parameters(), self.lr)


# ---------------------------------------------------------------- harness glue (not the book's)

def make(*, batch_size, input_size=(224, 224), device="cpu", lr=0.01, seed=0):
    """The book's model and optimizer on ``device`` ('cpu' or 'gpu'); returns (batch, train_step, eval_step)."""
    torch.manual_seed(seed)
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    model = AlexNet(lr=lr).to(dev)
    model(torch.zeros((1, 1, *input_size), device=dev))  # d2l's apply_init: materialise the lazy layers ...
    model.net.apply(init_cnn)  # ... then initialise them
    optim = model.configure_optimizers()

    def batch():
        return (torch.randn((batch_size, 1, *input_size), device=dev),
                torch.randint(0, 10, (batch_size,), device=dev))

    def train_step(X, y):  # d2l.Trainer.fit_epoch, one batch
        model.train()
        loss = model.training_step((X, y))
        optim.zero_grad()
        with torch.no_grad():
            loss.backward()
            optim.step()
        return float(loss)

    def eval_step(X, y):  # d2l.Trainer.fit_epoch, validation
        model.eval()
        with torch.no_grad():
            return float(model.loss(model(X), y))

    return batch, train_step, eval_step
