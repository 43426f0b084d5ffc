"""The four official Fashion-MNIST files: names, example counts, checksums, and finding them.

These digests are what makes a copy trustworthy whatever its origin (a mirror over plain
HTTP, Debian's package, a folder a user copied): the data is accepted only if it matches.
Other modules read ``official.FILES`` through this module (not a copy of the name), so
that tests which substitute small files patch one place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from .idx import DataError, read_content

__all__ = ["FILES", "DataFile", "find", "is_official", "missing"]


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


def find(directory: Path, spec: DataFile) -> Path | None:
    """The file for ``spec`` in ``directory``: the .gz if present, else the decompressed one."""
    for name in (spec.name, spec.raw_name):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def missing(directory: Path) -> list[str]:
    """Names of the official files that ``directory`` has in neither form."""
    return [spec.name for spec in FILES.values() if find(directory, spec) is None]


def is_official(path: Path, spec: DataFile) -> bool:
    """Whether ``path`` holds exactly the official content of ``spec`` (unreadable: no)."""
    try:
        return hashlib.sha256(read_content(path)).hexdigest() == spec.sha256
    except DataError:
        return False
