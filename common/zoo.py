"""The model-zoo AlexNet's checkpoints in and out: torchvision's state_dict and Gluon's model zoo.

Both zoos ship the network of the ``torchvision`` variant (``common.spec.torchvision_alexnet``)
and both store PyTorch's layouts, which are the canonical ones: conv (out, in, kH, kW), dense
(out, in) with fc6's columns in NCHW flatten order (256 x 6 x 6). So a conversion renames
keys and copies arrays; no value changes, and round trips are exact.

* torchvision (``alexnet-owt-7be5be79.pth``): ``features.0.weight`` ... ``classifier.6.bias``,
  the indices of ``nn.Sequential`` children (ReLU, pooling and dropout take indices too).
* Gluon model zoo (``alexnet-44335d1f.params``): ``features.0.weight`` ... ``output.bias``;
  Gluon fuses each ReLU into its Conv2D/Dense and puts dropout *after* fc6 and fc7, so its
  indices differ from torchvision's for the same layers. Files written by Gluon before
  ``save_parameters`` existed name parameters ``conv0_weight`` ... ``dense2_bias``; those
  are read too. Gluon's network has no adaptive pool: at 224x224 pool5 is already 6x6, so
  both compute the same function there (only there).

A file's format is recognised by its keys (the container by its first bytes), not by its
name. A file of another architecture is refused with one line naming the first missing,
mis-shaped or extra key. PyTorch files are read with ``torch.load(weights_only=True)``
(no pickled code runs). Each container is read and written by the backend whose record lists it
(``Capabilities.containers``: ``read_container`` / ``write_container``), so one reader serves this
module and that backend's own checkpoints, and this module imports no framework.
"""
from __future__ import annotations

import hashlib
import os
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .backend import container_backend
from .io import atomic_path
from .spec import ModelSpec, torchvision_alexnet
from .weights import DTYPE, WeightsError, _dtype_name, check_weights, expected_shapes

TORCH, MXNET = "PyTorch", "MXNet"  # the two containers
_MXNET_MAGIC = (0x112).to_bytes(8, "little")  # mx.nd.save's file header (kMXAPINDArrayListMagic)
_PICKLE_MAGIC = b"\x80"  # torch.save's legacy (pre-1.6, not zipped) format starts with a pickle


@dataclass(frozen=True)
class ZooFormat:
    """One zoo's key names for the canonical layers (``conv1`` ... ``fc8``)."""

    name: str
    title: str
    container: str  # TORCH or MXNET
    layers: tuple[tuple[str, str], ...]  # (canonical layer, native prefix), in the file's order
    separator: str = "."  # between the prefix and "weight"/"bias"
    suffixes: tuple[str, ...] = ()  # endings a file written in this format should have

    def keys(self) -> dict[str, str]:
        """Canonical parameter name -> native key, in the file's order."""
        return {f"{layer}.{kind}": f"{prefix}{self.separator}{kind}"
                for layer, prefix in self.layers for kind in ("weight", "bias")}


TORCHVISION = ZooFormat(
    "torchvision", "torchvision's AlexNet state_dict", TORCH,
    (("conv1", "features.0"), ("conv2", "features.3"), ("conv3", "features.6"), ("conv4", "features.8"),
     ("conv5", "features.10"), ("fc6", "classifier.1"), ("fc7", "classifier.4"), ("fc8", "classifier.6")),
    suffixes=(".pth", ".pt"),
)
GLUON = ZooFormat(
    "gluon", "Gluon model zoo AlexNet parameters", MXNET,
    (("conv1", "features.0"), ("conv2", "features.2"), ("conv3", "features.4"), ("conv4", "features.5"),
     ("conv5", "features.6"), ("fc6", "features.9"), ("fc7", "features.11"), ("fc8", "output")),
    suffixes=(".params",),
)
GLUON_LEGACY = ZooFormat(  # Gluon's save_params (before 1.3): block names, prefix "alexnet0_" stripped
    "gluon-legacy", "Gluon model zoo AlexNet parameters (legacy names)", MXNET,
    (("conv1", "conv0"), ("conv2", "conv1"), ("conv3", "conv2"), ("conv4", "conv3"), ("conv5", "conv4"),
     ("fc6", "dense0"), ("fc7", "dense1"), ("fc8", "dense2")),
    separator="_", suffixes=(".params",),
)
READ_FORMATS = (TORCHVISION, GLUON, GLUON_LEGACY)
WRITE_FORMATS = {f.name: f for f in (TORCHVISION, GLUON)}


@dataclass(frozen=True)
class ZooFile:
    """A recognised zoo file: its format and its arrays as the framework loaded them."""

    path: Path
    format: ZooFormat
    arrays: Mapping[str, object]  # native key -> torch.Tensor / mx.nd.NDArray


# ---------------------------------------------------------------------- reading


def container_of(path: str | os.PathLike) -> str | None:
    """TORCH, MXNET, or None (not a file, or neither framework's format), from the first bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return None
    if head == _MXNET_MAGIC:
        return MXNET
    if head.startswith(_PICKLE_MAGIC):
        return TORCH
    if head.startswith(b"PK\x03\x04"):  # a zip: torch.save's, or an .npz; torch's holds <name>/data.pkl
        try:
            with zipfile.ZipFile(path) as archive:
                if any(name.endswith("data.pkl") for name in archive.namelist()):
                    return TORCH
        except (zipfile.BadZipFile, OSError):
            return None
    return None


def read_arrays(path: str | os.PathLike) -> tuple[str, dict[str, object]]:
    """(container, {key: tensor or NDArray}) of a PyTorch state_dict file or an MXNet .params file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    container = container_of(path)
    if container is None:
        raise WeightsError(f"{path}: neither a PyTorch state_dict nor an MXNet .params file")
    return container, dict(container_backend(container).read_container(path))


def recognise(keys, container: str | None = None) -> ZooFormat | None:
    """The zoo format whose key names ``keys`` share most (of the container's formats), or None."""
    keys = set(keys)
    scored = [(len(keys & set(f.keys().values())), f) for f in READ_FORMATS if container in (None, f.container)]
    best, fmt = max(scored, key=lambda pair: pair[0])
    return fmt if best else None


def open_zoo_file(path: str | os.PathLike) -> ZooFile | None:
    """The file as a ZooFile when its keys are a zoo's; None when it is no PyTorch/MXNet file
    or its keys match no zoo (a native checkpoint of this project, say)."""
    path = Path(path)
    if container_of(path) is None:
        return None
    container, arrays = read_arrays(path)
    fmt = recognise(arrays, container)
    return None if fmt is None else ZooFile(path, fmt, arrays)


def _layers_match(spec: ModelSpec, fmt: ZooFormat) -> None:
    """Both zoos hold the torchvision variant (any number of classes): refuse another spec up front,
    rather than report its first mis-shaped layer as if the file were wrong."""
    zoo_spec = torchvision_alexnet(num_classes=spec.num_classes)
    if expected_shapes(spec) != expected_shapes(zoo_spec) or [l for l, _ in fmt.layers] != [
            layer.name for layer in spec.weighted_layers()]:
        raise WeightsError(f"{fmt.title} holds the torchvision variant; spec {spec.name!r} is another network "
                           f"(use --variant torchvision)")


def first_problem(spec: ModelSpec, fmt: ZooFormat, arrays: Mapping[str, object]) -> str | None:
    """One line for the first missing or mis-shaped key (in the format's order), else the first
    extra key, else a float32 dtype mismatch; None when ``arrays`` fit ``spec`` exactly."""
    shapes = expected_shapes(spec)
    keys = fmt.keys()
    problems = []
    for name, key in keys.items():
        if key not in arrays:
            problems.append(f"missing {key} {shapes[name]}")
        elif tuple(arrays[key].shape) != shapes[name]:
            problems.append(f"{key} has shape {tuple(arrays[key].shape)}, expected {shapes[name]}")
    problems += [f"unexpected {key}" for key in arrays if key not in keys.values()]
    problems += [f"{key} is {_dtype_name(arrays[key].dtype)}, expected float32" for key in keys.values()
                 if key in arrays and _dtype_name(arrays[key].dtype) != "float32"]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return f"{problems[0]}{more}"


def _numpy(value) -> np.ndarray:
    if hasattr(value, "asnumpy"):  # MXNet NDArray
        return np.ascontiguousarray(value.asnumpy(), dtype=DTYPE)
    return np.ascontiguousarray(value.detach().cpu().contiguous().numpy(), dtype=DTYPE)  # torch.Tensor


def to_canonical(zoo_file: ZooFile, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Canonical weights for ``spec`` from a zoo file, checked (one line) before anything is copied."""
    fmt = zoo_file.format
    _layers_match(spec, fmt)
    problem = first_problem(spec, fmt, zoo_file.arrays)
    if problem:
        raise WeightsError(f"{zoo_file.path}: not {fmt.title} for spec {spec.name!r} "
                           f"({'x'.join(map(str, spec.input_shape))}, {spec.num_classes} classes): {problem}")
    return {name: _numpy(zoo_file.arrays[key]) for name, key in fmt.keys().items()}


def read_zoo(path: str | os.PathLike, spec: ModelSpec) -> tuple[ZooFormat, dict[str, np.ndarray]]:
    """(format, canonical weights) of a torchvision or Gluon model-zoo AlexNet file."""
    zoo_file = open_zoo_file(path)
    if zoo_file is None:
        if not Path(path).is_file():
            raise WeightsError(f"{path}: no such weights file")
        expected = ", ".join(f"{f.title} ({next(iter(f.keys().values()))} ...)" for f in READ_FORMATS)
        raise WeightsError(f"{path}: not a model-zoo AlexNet file; expected {expected}")
    return zoo_file.format, to_canonical(zoo_file, spec)


# ---------------------------------------------------------------------- writing


def from_canonical(weights: Mapping[str, np.ndarray], fmt: ZooFormat) -> "OrderedDict[str, np.ndarray]":
    """Native key -> float32 array, in the zoo's own order."""
    return OrderedDict((key, np.ascontiguousarray(weights[name], dtype=DTYPE)) for name, key in fmt.keys().items())


def write_zoo(path: str | os.PathLike, weights: Mapping[str, np.ndarray], fmt: ZooFormat | str,
              spec: ModelSpec) -> Path:
    """Write canonical ``weights`` (checked against ``spec``) as the zoo's own file, atomically:
    what ``torchvision.models.alexnet().load_state_dict(torch.load(path))`` or
    ``gluon.model_zoo.vision.alexnet().load_parameters(path)`` reads."""
    if isinstance(fmt, str):
        try:
            fmt = WRITE_FORMATS[fmt]
        except KeyError:
            raise WeightsError(f"unknown zoo format {fmt!r}; choose from {', '.join(WRITE_FORMATS)}") from None
    path = Path(path)
    if fmt.suffixes and not path.name.endswith(fmt.suffixes):
        raise WeightsError(f"{path}: {fmt.title} files end in {' or '.join(fmt.suffixes)}")
    _layers_match(spec, fmt)
    check_weights(spec, weights, source="weights")
    container_backend(fmt.container).write_container(path, from_canonical(weights, fmt))
    return path


# ---------------------------------------------------------------------- published weights
#
# A small fetch of its own (urllib + common.io) rather than common.data's: that one is tied to
# Fashion-MNIST's file records (gzip, SHA-256 of the decompressed content) and is being
# restructured into a package; this needs one file, a zip member for Gluon, and a hash prefix.

_DOWNLOAD_CHUNK = 1 << 20
_MAX_MEMBER_BYTES = 2 << 30  # a zip member beyond 2 GiB is no AlexNet (and may be a zip bomb)


@dataclass(frozen=True)
class Published:
    """A published AlexNet weights file: where it is, what it is called in the cache, and how
    its name vouches for its content (``-<hex>.``: the start of the file's digest)."""

    name: str
    format: ZooFormat
    url: str
    file_name: str
    algorithm: str  # a hashlib name
    member: str | None = None  # the file inside a zip download

    @property
    def hash_prefix(self) -> str:
        match = re.search(r"-([0-9a-f]{8,})\.", self.file_name)
        if match is None:
            raise ValueError(f"{self.file_name}: no '-<hex digest prefix>.' in the name")
        return match[1]


PUBLISHED = {
    # torchvision's AlexNet_Weights.IMAGENET1K_V1 (acc@1 56.5); torch.hub checks the SHA-256 prefix in the name
    "torchvision": Published("torchvision", TORCHVISION, "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
                             "alexnet-owt-7be5be79.pth", "sha256"),
    # mxnet/gluon/model_zoo/model_store.py: {repo}gluon/models/{name}-{short SHA-1}.zip holding the .params
    "gluon": Published("gluon", GLUON,
                       "https://apache-mxnet.s3-accelerate.dualstack.amazonaws.com/gluon/models/alexnet-44335d1f.zip",
                       "alexnet-44335d1f.params", "sha1", member="alexnet-44335d1f.params"),
}


def default_weights_dir() -> Path:
    """``$XDG_CACHE_HOME/alexnet/weights``, or ``~/.cache/alexnet/weights``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "alexnet" / "weights"


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_DOWNLOAD_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, out, *, timeout: float, progress: bool, desc: str) -> None:
    """The body at ``url`` into the binary file ``out``, all of it (a short body is an error), by the
    project's one download loop (``common.data.mirrors.stream_url``)."""
    from .data.mirrors import DownloadFailed, stream_url

    try:
        stream_url(url, out, timeout=timeout, progress=progress, desc=desc)
    except DownloadFailed as error:
        raise WeightsError(f"could not download {url}: {error}") from None


def _extract(archive, member: str, target: Path, url: str) -> None:
    """Copy ``member`` of the zip ``archive`` (an open file) to ``target``; nothing else is unpacked."""
    import shutil

    try:
        with zipfile.ZipFile(archive) as bundle:
            try:
                info = bundle.getinfo(member)
            except KeyError:
                raise WeightsError(f"{url}: the archive holds no {member} "
                                   f"(it holds {', '.join(bundle.namelist()[:5]) or 'nothing'})") from None
            if info.file_size > _MAX_MEMBER_BYTES:
                raise WeightsError(f"{url}: {member} would unpack to {info.file_size:,} bytes; refused")
            with bundle.open(info) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, _DOWNLOAD_CHUNK)
    except zipfile.BadZipFile as error:
        raise WeightsError(f"{url}: not a zip archive ({error})") from None


def fetch_weights(source: Published | str, cache_dir: str | os.PathLike | None = None, *, url: str | None = None,
                  timeout: float = 60, progress: bool = True) -> Path:
    """The published file for ``source`` ("torchvision" or "gluon") in ``cache_dir``, downloaded once.

    The file gets its final name only after its digest is checked against the prefix in that
    name (SHA-256 for torchvision's, SHA-1 for Gluon's); a cached file is checked the same way
    and fetched again if it fails. ``url`` replaces the published address (a mirror); the name
    and the hash stay the source's.
    """
    from .io import check_writable, remove_stale_temporaries

    if isinstance(source, str):
        try:
            source = PUBLISHED[source]
        except KeyError:
            raise WeightsError(f"no published weights called {source!r}; choose from {', '.join(PUBLISHED)}") from None
    folder = check_writable(Path(cache_dir) if cache_dir is not None else default_weights_dir(),
                            what="weights cache folder")
    remove_stale_temporaries(folder)
    target, prefix = folder / source.file_name, source.hash_prefix
    if target.is_file() and file_digest(target, source.algorithm).startswith(prefix):
        return target
    address = url or source.url
    with atomic_path(target) as tmp:
        if source.member is None:
            with open(tmp, "wb") as out:
                _download(address, out, timeout=timeout, progress=progress, desc=source.file_name)
        else:
            import tempfile

            with tempfile.TemporaryFile(dir=folder) as archive:  # unnamed: gone however this ends
                _download(address, archive, timeout=timeout, progress=progress, desc=source.file_name)
                archive.seek(0)
                _extract(archive, source.member, tmp, address)
        digest = file_digest(tmp, source.algorithm)
        if not digest.startswith(prefix):
            raise WeightsError(f"{address}: {source.algorithm.upper()} {digest} does not start with {prefix}, "
                               f"the hash in the name {source.file_name}; refused, nothing was saved")
    return target
