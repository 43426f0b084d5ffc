"""Fashion-MNIST for every backend: files, download, loading, batch order, preprocessing.

Everything that must be identical across the frameworks lives
here, in numpy, once: the bytes that are read (verified by SHA-256), the order in
which examples are visited (a seeded permutation per epoch), and the input pipeline
(scale to [0, 1], bilinear resize as two matrix products, normalise).  A backend only
moves a uint8 batch to its device and multiplies by the same matrices, so every
backend sees the same numbers and they can be compared with each other.

One module per concern; this file only gathers their public names:

  idx.py       the IDX format: read, write, validate (gzip detected by content); DataError
  official.py  the four official files: names, counts, checksums, finding them in a folder
  mirrors.py   downloading: mirrors tried in order, retries, verification, atomic writes
  dataset.py   where the files are looked for (locate) and loading them (FashionMNIST)
  batches.py   batch order, resize matrices, preprocessing, normalisation constants

Depends on numpy, the standard library and ``common.io`` (tqdm is imported lazily for the
download progress bar).  To replace a fact in a test (``FILES``, ``DEBIAN_DIR``,
``download``), patch it in the module that owns it (``common.data.official.FILES``,
``common.data.dataset.DEBIAN_DIR``, ``common.data.mirrors.download``): the names here are
copies for readers, and the modules look their facts up where they are defined.
"""

from __future__ import annotations

from .batches import (
    NORMALIZE_MEAN,
    NORMALIZE_STD,
    batch_indices,
    epoch_order,
    num_batches,
    preprocess,
    resize_matrix,
)
from .dataset import (
    CLASS_NAMES,
    DEBIAN_DIR,
    ENV_VAR,
    IMAGE_SHAPE,
    NUM_CLASSES,
    FashionMNIST,
    default_cache_dir,
    load,
    locate,
)
from .idx import DataError, read_idx, write_idx
from .mirrors import MIRROR_ENV_VAR, MIRROR_URL, MIRRORS, download, mirror_list
from .official import FILES, DataFile

__all__ = [
    "CLASS_NAMES",
    "DEBIAN_DIR",
    "ENV_VAR",
    "FILES",
    "IMAGE_SHAPE",
    "MIRRORS",
    "MIRROR_ENV_VAR",
    "MIRROR_URL",
    "NORMALIZE_MEAN",
    "NORMALIZE_STD",
    "NUM_CLASSES",
    "DataError",
    "DataFile",
    "FashionMNIST",
    "batch_indices",
    "default_cache_dir",
    "download",
    "epoch_order",
    "load",
    "locate",
    "mirror_list",
    "num_batches",
    "preprocess",
    "read_idx",
    "resize_matrix",
    "write_idx",
]
