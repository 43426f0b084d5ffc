"""The IDX file format of (Fashion-)MNIST: read, write, validate; gzip detected by content.

An IDX file is a 4-byte magic ``00 00 08 NN`` (unsigned bytes, NN dimensions), NN
big-endian 32-bit sizes, then the bytes.  Everything here is strict: a file whose length
is not exactly header + prod(dims) is refused, so a truncated download or trailing garbage
can never be reshaped into plausible-looking data.  Every error is a DataError naming the
file.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ..io import atomic_file

__all__ = ["DataError", "decompress", "parse_idx", "read_content", "read_idx", "write_idx"]


class DataError(ValueError):
    """Any problem with the data files; the message names the file and the problem.

    One exception type lets callers (training scripts, the CLI) catch every data
    problem in one place and show the message, which is written to be actionable.
    It lives here, in the lowest layer of the package, so every module can raise it.
    """


IDX_UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"


def decompress(data: bytes, source: object) -> bytes:
    """``data`` itself, or its gunzipped content when it starts with the gzip magic.

    Detection is by content, not by name, so a decompressed file that kept its ``.gz``
    name (or the reverse) still reads correctly.  ``source`` names the data in errors.
    """
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{source}: corrupt gzip data ({e})") from e


def read_content(path: Path) -> bytes:
    """The file's IDX bytes, decompressed if it is gzip."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    return decompress(data, path)


def parse_idx(data: bytes, path: object) -> np.ndarray:
    """Parse IDX bytes into a uint8 array, refusing anything that is not exactly well-formed."""
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes is too short for an IDX header")
    zero, dtype, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype != IDX_UBYTE or ndim == 0:
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
    return parse_idx(read_content(path), path)


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
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + np.ascontiguousarray(array).tobytes()
    with atomic_file(path) as f:
        if compress:
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
                gz.write(payload)
        else:
            f.write(payload)
