"""Fashion-MNIST for all three backends: files, download, loading, batch order, preprocessing.

Everything that must be identical across PyTorch, TensorFlow/Keras and MXNet lives
here, in numpy, once: the bytes that are read (verified by SHA-256), the order in
which examples are visited (a seeded permutation per epoch), and the input pipeline
(scale to [0, 1], bilinear resize as two matrix products, normalise).  A backend only
moves a uint8 batch to its device and multiplies by the same matrices, so the three
implementations see the same numbers and can be compared with each other.

The module depends on numpy and the standard library only (tqdm is imported lazily
for the download progress bar).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import math
import os
import secrets
import time
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "DEBIAN_DIR",
    "ENV_VAR",
    "FILES",
    "IMAGE_SHAPE",
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
    "num_batches",
    "preprocess",
    "read_idx",
    "resize_matrix",
    "write_idx",
]


class DataError(ValueError):
    """Any problem with the data files; the message names the file and the problem.

    One exception type lets callers (training scripts, the CLI) catch every data
    problem in one place and show the message, which is written to be actionable.
    """


@dataclass(frozen=True)
class DataFile:
    """One of the four official Fashion-MNIST files.

    ``sha256`` is of the *decompressed* IDX content, because re-packaged copies
    (Debian's, for instance) carry different gzip headers for identical data;
    ``gz_md5`` is the digest Zalando publishes for their .gz, kept for reference.
    """

    name: str
    sha256: str
    gz_md5: str
    count: int

    @property
    def raw_name(self) -> str:
        """The decompressed file's name, accepted wherever the .gz is."""
        return self.name.removesuffix(".gz")


FILES: Mapping[str, DataFile] = MappingProxyType(
    {
        "train_images": DataFile(
            "train-images-idx3-ubyte.gz",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            60000,
        ),
        "train_labels": DataFile(
            "train-labels-idx1-ubyte.gz",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "25c81989df183df01b3e8a0aad5dffbe",
            60000,
        ),
        "test_images": DataFile(
            "t10k-images-idx3-ubyte.gz",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "bef4ecab320f06d8554ea6380940ec79",
            10000,
        ),
        "test_labels": DataFile(
            "t10k-labels-idx1-ubyte.gz",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            "bb300cfdad3c16e7a12a480ee83cd310",
            10000,
        ),
    }
)

MIRROR_URL = "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
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

# Pixel mean and standard deviation of the 60,000 training images on the [0, 1]
# scale (0.28604 and 0.35302 to five digits), computed from the official files;
# tests/test_data.py recomputes them from the real data.
NORMALIZE_MEAN = 0.2860
NORMALIZE_STD = 0.3530

_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 16  # download read size: small enough for a smooth progress bar


# --------------------------------------------------------------------------- IDX


def _read_content(path: Path) -> bytes:
    """Return the file's IDX bytes, decompressing when it starts with the gzip magic.

    Detection is by content, not by name, so a decompressed file that kept its
    ``.gz`` name (or the reverse) still reads correctly.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip data ({e})") from e


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    """Parse IDX bytes into a uint8 array, refusing anything that is not exactly well-formed."""
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes is too short for an IDX header")
    zero, dtype, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype != _IDX_UBYTE or ndim == 0:
        raise DataError(
            f"{path}: bad IDX magic 0x{data[:4].hex()}, expected 0x000008NN "
            "(unsigned bytes, NN = number of dimensions >= 1)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path}: truncated IDX header: {len(data)} bytes, a {ndim}-D header needs {header}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if 0 in dims:
        raise DataError(f"{path}: IDX dimension of size 0 in {dims}")
    expected = header + math.prod(dims)
    if len(data) < expected:
        raise DataError(
            f"{path}: truncated: {len(data)} bytes, dims {dims} need {expected} "
            f"({expected - len(data)} missing)"
        )
    if len(data) > expected:
        raise DataError(
            f"{path}: {len(data) - expected} trailing bytes: {len(data)} bytes, "
            f"dims {dims} need exactly {expected}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed or raw) into a writable uint8 array.

    The file length must equal header + prod(dims) exactly: a truncated download
    and a file with trailing garbage are both refused rather than silently
    reshaped, and every error is a DataError naming the file.
    """
    path = Path(path)
    return _parse_idx(_read_content(path), path)


@contextlib.contextmanager
def _atomic_write(path: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """Yield ``(file, temp_path)``; the temp file replaces ``path`` only if the block succeeds.

    Readers (another process, or a later run after a crash or kill) never see a
    partial file under the final name.  The temp file is in the same directory so
    that os.replace is atomic, and is named ``.<name>.<random>.part`` so that it is
    never mistaken for a data file.  It is created with mode 0o666 minus the umask,
    like an ordinary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_idx(
    path: str | os.PathLike[str], array: np.ndarray, compress: bool | None = None
) -> None:
    """Write a uint8 array as an IDX file, atomically; gzip if ``compress`` (None: if name is *.gz).

    Used by tests and tools to produce files in exactly the format read_idx reads.
    The gzip header has mtime 0 and no file name so the output is reproducible.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise DataError(f"{path}: IDX writer takes uint8 arrays, got {array.dtype}")
    if not 1 <= array.ndim <= 255 or 0 in array.shape:
        raise DataError(f"{path}: cannot write an array of shape {array.shape} as IDX")
    if compress is None:
        compress = path.name.endswith(".gz")
    header = bytes([0, 0, _IDX_UBYTE, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + np.ascontiguousarray(array).tobytes()
    with _atomic_write(path) as (f, _):
        if compress:
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
                gz.write(payload)
        else:
            f.write(payload)


# ---------------------------------------------------------------------- location


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/alexnet/fashion-mnist``, or ``~/.cache/alexnet/fashion-mnist``.

    Follows the XDG base-directory convention so downloads land where users expect
    caches and can be deleted safely.
    """
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "alexnet" / "fashion-mnist"


def _find(directory: Path, spec: DataFile) -> Path | None:
    """The file for ``spec`` in ``directory``: the .gz if present, else the decompressed one."""
    for name in (spec.name, spec.raw_name):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _missing(directory: Path) -> list[str]:
    return [spec.name for spec in FILES.values() if _find(directory, spec) is None]


def locate(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download_missing: bool = True,
    progress: bool = True,
) -> Path:
    """Return a directory holding all four files (each either .gz or decompressed).

    Search order: ``data_dir`` (when given it is the only candidate: a typo must not
    silently train on other data), ``$ALEXNET_DATA_DIR``, default_cache_dir(), the
    Debian package's DEBIAN_DIR; otherwise download into default_cache_dir(), or
    raise DataError listing where it looked when ``download_missing`` is False.
    """
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        missing = _missing(directory)
        if missing:
            raise DataError(f"data directory {directory} lacks {', '.join(missing)}")
        return directory

    searched: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        directory = Path(env).expanduser()
        missing = _missing(directory)
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
        if not _missing(directory):
            return directory
        searched.append(directory)

    cache = default_cache_dir()
    if not download_missing:
        raise DataError(
            "Fashion-MNIST not found; looked in "
            + ", ".join(str(d) for d in searched)
            + f". Set {ENV_VAR} or pass data_dir, or allow the download into {cache}"
        )
    return download(cache, progress=progress)


# ---------------------------------------------------------------------- download


class _TransientError(Exception):
    """A network failure worth retrying (connection reset, timeout, short body, HTTP 5xx/429)."""


def _sha256_ok(path: Path, spec: DataFile) -> bool:
    try:
        return hashlib.sha256(_read_content(path)).hexdigest() == spec.sha256
    except DataError:
        return False


def _stream(url: str, out: BinaryIO, *, timeout: float, progress: bool, desc: str) -> None:
    """Copy the body at ``url`` into ``out``, insisting on the full Content-Length.

    http.client returns a short body without error when the server closes early,
    so the byte count is checked here; that is what makes a cut connection a retry
    instead of a truncated file.
    """
    from tqdm import tqdm

    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise _TransientError(f"HTTP {e.code} {e.reason}") from e
        raise DataError(f"{desc}: {url} answered HTTP {e.code} {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:
        raise _TransientError(str(e) or type(e).__name__) from e
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=not progress,
        ) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise _TransientError(str(e) or type(e).__name__) from e
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise _TransientError(f"connection closed after {received} of {total} bytes")


def _fetch(
    spec: DataFile,
    url: str,
    dest: Path,
    *,
    retries: int,
    backoff: float,
    timeout: float,
    progress: bool,
) -> None:
    """Download one file to ``dest``, verified before it gets the final name."""
    last: _TransientError | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with _atomic_write(dest) as (f, tmp):
                _stream(url, f, timeout=timeout, progress=progress, desc=spec.name)
                f.flush()
                try:
                    got = hashlib.sha256(_read_content(tmp)).hexdigest()
                except DataError as e:
                    raise DataError(f"{spec.name} downloaded from {url} is unreadable: {e}") from e
                if got != spec.sha256:
                    raise DataError(
                        f"{spec.name} downloaded from {url} has decompressed SHA-256 {got}, "
                        f"expected {spec.sha256}; refused, nothing was saved"
                    )
            return
        except _TransientError as e:
            last = e
    raise DataError(
        f"could not download {spec.name} from {url}: {retries + 1} attempt(s) failed, "
        f"last error: {last}"
    )


def download(
    dest_dir: str | os.PathLike[str],
    base_url: str = MIRROR_URL,
    *,
    retries: int = 3,
    timeout: float = 60,
    progress: bool = True,
    backoff: float = 1.0,
) -> Path:
    """Fetch the four files into ``dest_dir`` and return it.

    Files already there and valid are kept.  Each download goes to a temp file
    in ``dest_dir``, is verified (decompressed SHA-256), and only then renamed to
    its final name, so an interrupted or bad download never leaves anything that
    passes for data.  Network errors are retried ``retries`` times, sleeping
    ``backoff * 2**k`` seconds (tests pass 0); a checksum mismatch is not retried.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    dest = Path(dest_dir).expanduser()
    base = base_url if base_url.endswith("/") else base_url + "/"
    for spec in FILES.values():
        present = _find(dest, spec)
        if present is not None and _sha256_ok(present, spec):
            continue
        _fetch(
            spec,
            base + spec.name,
            dest / spec.name,
            retries=retries,
            backoff=backoff,
            timeout=timeout,
            progress=progress,
        )
    return dest


# ------------------------------------------------------------------------- load


def _read_checked(path: Path, spec: DataFile, ndim: int, verify: bool) -> np.ndarray:
    data = _read_content(path)
    array = _parse_idx(data, path)
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
        for role, spec in FILES.items():
            path = _find(directory, spec)
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


# ------------------------------------------------------------------- batch order


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch: floor when the last partial batch is dropped, else ceil."""
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``range(n)`` visited in ``epoch``: the one shuffle all backends share.

    Seeding with ``[seed, epoch]`` makes each epoch's order a pure function of the
    run seed and the epoch number, so it needs no RNG state to be saved or restored
    when a run resumes, and no backend's own shuffler is involved.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def batch_indices(
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    shuffle: bool = True,
    drop_last: bool = False,
    start_batch: int = 0,
) -> Iterator[np.ndarray]:
    """Yield the int64 index array of each batch of ``epoch``, from batch ``start_batch`` on.

    A run resumed after k batches passes ``start_batch=k`` and gets exactly the
    batches it would have seen had it not stopped.  Arguments are checked here,
    eagerly, not at the first ``next()``.
    """
    total = num_batches(n, batch_size, drop_last)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch must be in 0..{total}, got {start_batch}")
    order = epoch_order(n, seed, epoch) if shuffle else np.arange(n, dtype=np.int64)
    return (order[b * batch_size : (b + 1) * batch_size] for b in range(start_batch, total))


# ----------------------------------------------------------------- preprocessing


def resize_matrix(src: int, dst: int) -> np.ndarray:
    """The (dst, src) float32 matrix of 1-D bilinear resampling, half-pixel centres.

    Same sampling as ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`` without antialiasing: output pixel i samples source
    coordinate (i + 0.5) * src / dst - 0.5, clamped at 0, between its two
    neighbours (the last one repeated at the edge).  ``R_h @ image @ R_w.T`` is the
    2-D resize; every backend applies these same matrices, so resizing is identical
    everywhere instead of depending on each library's resize kernel.
    """
    if src < 1 or dst < 1:
        raise ValueError(f"sizes must be >= 1, got src={src}, dst={dst}")
    x = np.maximum((np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5, 0.0)
    lo = np.floor(x).astype(np.int64)  # <= src - 1, since x < src - 0.5
    hi = np.minimum(lo + 1, src - 1)
    frac = x - lo
    matrix = np.zeros((dst, src), dtype=np.float64)
    rows = np.arange(dst)
    np.add.at(matrix, (rows, lo), 1.0 - frac)
    np.add.at(matrix, (rows, hi), frac)
    return matrix.astype(np.float32)


def preprocess(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Reference input pipeline: uint8 (N, h, w) -> normalised float32 (N, 1, H, W).

    Scale to [0, 1], resize with resize_matrix (``R_h @ x @ R_w.T``), then
    ``(x - NORMALIZE_MEAN) / NORMALIZE_STD``.  Backends reproduce this on their
    device, per batch; this numpy version is what their tests compare against.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"expected uint8 images of shape (N, h, w), got {images.dtype} {images.shape}"
        )
    height, width = size
    r_h = resize_matrix(images.shape[1], height)
    r_w = resize_matrix(images.shape[2], width)
    x = images.astype(np.float32) / np.float32(255.0)
    x = r_h @ x @ r_w.T
    x = (x - np.float32(NORMALIZE_MEAN)) / np.float32(NORMALIZE_STD)
    return np.ascontiguousarray(x[:, None], dtype=np.float32)
