"""One process of the two-replica proof (tests/test_replicas.py starts it; not a test itself).

It joins the replica group its environment describes (nothing: one process drives every
replica; torchrun's variables, TF_CONFIG or DMLC_* roles: one process per replica), trains the
65x65 AlexNet for a few SGD steps (momentum 0.9, weight decay 5e-4) on fixed global batches,
the last of which does not split evenly, and writes what it ended with to ``<out>-<rank>.npz``.
Rank 0 also trains the same steps with one replica on the whole batches (``ref/`` keys), so the
test compares the two from one file. Arrays only: the test reads it with allow_pickle=False.

    python tests/replica_worker.py BACKEND REPLICAS OUT [--dropout P] [--precision fp16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this file is in comes first

from common.backend import load_backend  # noqa: E402
from common.replicas import replica_seed, shard  # noqa: E402
from common.spec import book_alexnet  # noqa: E402
from common.train import step_seed  # noqa: E402

BATCHES = (8, 8, 8, 5)  # global batch sizes: the last gives the replicas 3 and 2 examples
LR, MOMENTUM, WEIGHT_DECAY, SEED = 0.01, 0.9, 5e-4, 7


def batches():
    rng = np.random.default_rng(20240613)
    return [(rng.integers(0, 256, (size, 28, 28), dtype=np.uint8), rng.integers(0, 10, size)) for size in BATCHES]


def train(backend, replicas: int, dropout: float, data, precision: str = "fp32"):
    group = backend.configure_replicas(replicas, "cpu")
    spec = book_alexnet().with_input(1, 65, 65).with_dropout(dropout)
    model = backend.build(spec, seed=SEED, device="cpu")
    trainer = backend.make_trainer(model, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, replicas=replicas,
                                   precision=precision)
    steps = [trainer.train_step(trainer.prepare(images), labels, seed=step_seed(SEED, 0, index))
             for index, (images, labels) in enumerate(data)]
    images, labels = data[0]
    evaluated = trainer.eval_step(trainer.prepare(images), labels)
    return group, model, trainer, steps, evaluated


def replica_copies_equal(backend, model) -> bool:
    """Every copy this process holds of every parameter is the same, bit for bit."""
    if backend.NAME == "tf":
        copies = [[c.numpy() for c in getattr(v.value, "values", (v.value,))] for v in model.weights]
    elif backend.NAME == "mx":
        copies = [[p.data(ctx).asnumpy() for ctx in p.list_ctx()] for p in model.collect_params().values()]
    else:
        return True  # one copy per process: the test compares the processes' files
    return all(np.array_equal(first, other) for first, *others in copies for other in others)


def emulated_dropout_reference(backend, replicas: int, dropout: float, data) -> dict:
    """PyTorch only: what N replicas with their own dropout seeds compute, done in one process with
    one model: each replica's slice under ``replica_seed(step seed, r)``, summed loss / global B,
    the gradients accumulated, then one SGD step."""
    import torch
    import torch.nn.functional as F

    spec = book_alexnet().with_input(1, 65, 65).with_dropout(dropout)
    model = backend.build(spec, seed=SEED, device="cpu")
    trainer = backend.make_trainer(model, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for index, (images, labels) in enumerate(data):
        trainer.optimizer.zero_grad(set_to_none=True)
        model.train(True)
        x, y = trainer.prepare(images), torch.as_tensor(labels)
        for replica in range(replicas):
            part = shard(len(labels), replicas, replica)
            with trainer._seeded(replica_seed(step_seed(SEED, 0, index), replica, replicas)):
                loss = F.cross_entropy(model(x[part]), y[part], reduction="sum") / len(labels)
            loss.backward()
        trainer.optimizer.step()
    return backend.export_weights(model)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend")
    parser.add_argument("replicas", type=int)
    parser.add_argument("out")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    backend = load_backend(args.backend)
    data = batches()
    group, model, trainer, steps, evaluated = train(backend, args.replicas, args.dropout, data, args.precision)
    arrays = dict(backend.export_weights(model))
    if not getattr(trainer, "_distributed", False):  # dist_sync keeps the momentum on its servers
        arrays.update(trainer.optimizer_state())
    arrays["losses"] = np.array([loss for loss, _ in steps], np.float64)
    arrays["corrects"] = np.array([correct for _, correct in steps], np.int64)
    arrays["eval"] = np.array(evaluated, np.float64)
    last = group.processes - 1
    arrays["agree"] = np.array([trainer.agree(group.rank == last), trainer.agree(False)])
    arrays["copies_equal"] = np.array(replica_copies_equal(backend, model))
    arrays["engine"] = np.array(group.engine)
    if group.rank == 0:
        if args.dropout:
            arrays.update({f"ref/{k}": v for k, v in emulated_dropout_reference(backend, args.replicas, args.dropout,
                                                                                data).items()})
        else:
            _, ref_model, ref_trainer, ref_steps, ref_eval = train(backend, 1, 0.0, data, args.precision)
            arrays.update({f"ref/{k}": v for k, v in backend.export_weights(ref_model).items()})
            arrays.update({f"ref/{k}": v for k, v in ref_trainer.optimizer_state().items()})
            arrays["ref/losses"] = np.array([loss for loss, _ in ref_steps], np.float64)
            arrays["ref/corrects"] = np.array([correct for _, correct in ref_steps], np.int64)
            arrays["ref/eval"] = np.array(ref_eval, np.float64)
    np.savez(f"{args.out}-{group.rank}.npz", **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
