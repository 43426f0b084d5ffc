"""Fashion-MNIST as a data set: where its files are found, loading and validating them.

``locate`` looks in the usual places and downloads (``mirrors.download``) as a last
resort; ``FashionMNIST.load`` reads the four IDX files, checks them against each other
and, by default, against the official checksums.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import mirrors, official
from .idx import DataError, parse_idx, read_content

__all__ = [
    "CLASS_NAMES",
    "DEBIAN_DIR",
    "ENV_VAR",
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "FashionMNIST",
    "default_cache_dir",
    "load",
    "locate",
]

ENV_VAR = "ALEXNET_DATA_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (28, 28)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/alexnet/fashion-mnist``, or ``~/.cache/alexnet/fashion-mnist``.

    Follows the XDG base-directory convention so downloads land where users expect
    caches and can be deleted safely.
    """
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "alexnet" / "fashion-mnist"


def locate(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download_missing: bool = True,
    progress: bool = True,
) -> Path:
    """Return a directory holding all four files (each either .gz or decompressed).

    Search order: ``data_dir`` (when given it is the only candidate: a typo must not
    silently train on other data), ``$ALEXNET_DATA_DIR``, default_cache_dir(), the
    Debian package's DEBIAN_DIR; otherwise download into default_cache_dir() from the
    mirrors (see mirrors.download), or raise DataError listing where it looked when
    ``download_missing`` is False.
    """
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        missing = official.missing(directory)
        if missing:
            raise DataError(f"data directory {directory} lacks {', '.join(missing)}")
        return directory

    searched: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        directory = Path(env).expanduser()
        missing = official.missing(directory)
        if not missing:
            return directory
        # Not an error (the search order says to go on), but a set variable that
        # points nowhere useful is almost always a mistake worth seeing.
        warnings.warn(
            f"{ENV_VAR}={env} lacks {', '.join(missing)}; looking elsewhere",
            stacklevel=2,
        )
        searched.append(directory)
    for directory in (default_cache_dir(), DEBIAN_DIR):
        if not official.missing(directory):
            return directory
        searched.append(directory)

    cache = default_cache_dir()
    if not download_missing:
        raise DataError(
            "Fashion-MNIST not found; looked in "
            + ", ".join(str(d) for d in searched)
            + f". Set {ENV_VAR} or pass data_dir, or allow the download into {cache}"
        )
    return mirrors.download(cache, progress=progress)


def _read_checked(path: Path, spec: official.DataFile, ndim: int, verify: bool) -> np.ndarray:
    data = read_content(path)
    array = parse_idx(data, path)
    if array.ndim != ndim:
        raise DataError(
            f"{path}: expected a {ndim}-D IDX file (magic 0x0000080{ndim}), got {array.ndim}-D"
        )
    if verify:
        got = hashlib.sha256(data).hexdigest()
        if got != spec.sha256:
            raise DataError(
                f"{path}: decompressed SHA-256 is {got}, but the official {spec.raw_name} has "
                f"{spec.sha256}. The file is corrupt or not the official Fashion-MNIST: delete it "
                f"to have it downloaded again, or point data_dir / {ENV_VAR} at the official "
                "files (verify=False is only for deliberately different data)"
            )
    return array


@dataclass(frozen=True, eq=False)
class FashionMNIST:
    """The whole data set in memory, as uint8 images and int64 labels.

    Images stay uint8 (about 55 MB in all); preprocessing happens per batch on
    each backend's device, so the resized float data set is never materialised.
    """

    train_images: np.ndarray  # (60000, 28, 28) uint8
    train_labels: np.ndarray  # (60000,) int64
    test_images: np.ndarray  # (10000, 28, 28) uint8
    test_labels: np.ndarray  # (10000,) int64

    @classmethod
    def load(
        cls,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        verify: bool = True,
        download_missing: bool = True,
        progress: bool = True,
    ) -> FashionMNIST:
        """Locate (see locate()), read and validate the four files.

        Checks image/label counts agree, labels are in 0..9 and images are 28x28;
        with ``verify`` each file's decompressed SHA-256 must be the official one,
        which is what makes results comparable across backends and machines.
        """
        directory = locate(data_dir, download_missing=download_missing, progress=progress)
        paths: dict[str, Path] = {}
        arrays: dict[str, np.ndarray] = {}
        for role, spec in official.FILES.items():
            path = official.find(directory, spec)
            if path is None:  # removed between locate() and here
                raise DataError(f"data directory {directory} lacks {spec.name}")
            paths[role] = path
            arrays[role] = _read_checked(path, spec, 3 if role.endswith("images") else 1, verify)

        for split in ("train", "test"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            image_path, label_path = paths[f"{split}_images"], paths[f"{split}_labels"]
            if images.shape[1:] != IMAGE_SHAPE:
                raise DataError(
                    f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, "
                    f"expected {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}"
                )
            if len(images) != len(labels):
                raise DataError(
                    f"count mismatch: {image_path} has {len(images)} images but "
                    f"{label_path} has {len(labels)} labels"
                )
            bad = np.flatnonzero(labels >= NUM_CLASSES)
            if bad.size:
                raise DataError(
                    f"{label_path}: label {labels[bad[0]]} at index {bad[0]} is outside "
                    f"0..{NUM_CLASSES - 1}"
                )
            arrays[f"{split}_labels"] = labels.astype(np.int64)
        return cls(**arrays)


load = FashionMNIST.load
