"""Downloading the official files: mirrors tried in order, retries, verification before the final name.

Each file is fetched from the first mirror that delivers it intact: a mirror that is down,
times out, cuts the connection, answers an HTTP error or sends bytes that are not the
official file is reported and the next one is tried.  Nothing gets a file's final name
before its decompressed SHA-256 equals the official one (``official.FILES``), so the
origin of the bytes does not matter: that check, not TLS, is what guarantees the data.
Writing goes through ``common.io`` (temporary file, fsync, rename), and temporaries left
by a download that was killed are removed when the next download starts.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ..io import atomic_path, remove_stale_temporaries
from . import official
from .idx import DataError, decompress

__all__ = ["MIRRORS", "MIRROR_ENV_VAR", "MIRROR_URL", "download", "mirror_list"]

# Tried in this order for every file.  Zalando's own mirror is an Amazon S3 *website*
# endpoint, which serves plain HTTP only (S3 website endpoints do not support HTTPS), so
# it is http:// on purpose: integrity comes from the official checksums checked before a
# file is kept, not from TLS.  The HTTPS fallbacks serve the same four .gz files: Keras'
# fashion_mnist.load_data downloads them from the first (keras/src/datasets/fashion_mnist.py),
# and the second is the data folder of Zalando's repository.
MIRRORS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
MIRROR_URL = MIRRORS[0]
# Mirrors of the user's own (a local proxy, an institute's copy), tried before MIRRORS;
# several may be given, separated by spaces or commas.
MIRROR_ENV_VAR = "ALEXNET_DATA_MIRROR"

_CHUNK = 1 << 16  # read size: small enough for a smooth progress bar


class DownloadFailed(Exception):
    """A body could not be fetched whole; the message says why in a few words."""


class _TransientError(DownloadFailed):
    """A network failure worth retrying on the same mirror (connection refused or reset,
    timeout, short body, HTTP 5xx/429)."""


class _MirrorFailed(DownloadFailed):
    """This mirror cannot deliver this file (HTTP 4xx, wrong bytes, retries used up): try the next."""


def _checked_url(url: str, source: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DataError(f"{source}: {url!r} is not an http:// or https:// URL")
    return url if url.endswith("/") else url + "/"


def mirror_list(mirrors: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """The base URLs to try, in order, each ending in ``/``.

    Given ``mirrors`` (one URL or several): exactly those.  Otherwise the mirrors in
    ``$ALEXNET_DATA_MIRROR`` first, then MIRRORS.  A URL that is not http(s) is a DataError.
    """
    if mirrors is not None:
        given = [mirrors] if isinstance(mirrors, str) else list(mirrors)
        if not given:
            raise DataError("no download mirror given")
        return tuple(_checked_url(url, "mirror") for url in given)
    own = os.environ.get(MIRROR_ENV_VAR, "").replace(",", " ").split()
    urls = [_checked_url(url, MIRROR_ENV_VAR) for url in own]
    urls += [url for url in MIRRORS if url not in urls]
    return tuple(urls)


def stream_url(url: str, out: BinaryIO, *, timeout: float, progress: bool, desc: str) -> None:
    """Copy the body at ``url`` (redirects followed) into ``out``, insisting on the full
    Content-Length; a failure is a DownloadFailed (``_TransientError`` where a retry may help).
    The one download loop of the project: the data's mirrors and the model zoo's weights.

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
        raise _MirrorFailed(f"HTTP {e.code} {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:
        raise _TransientError(_describe(e)) from e
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
                    raise _TransientError(_describe(e)) from e
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise _TransientError(f"connection closed after {received} of {total} bytes")


def _describe(error: BaseException) -> str:
    """A network error in a few words (urllib wraps the cause as ``<urlopen error ...>``)."""
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        if not isinstance(error.reason, BaseException):
            return str(error.reason)
        error = error.reason
    if isinstance(error, TimeoutError):
        return "timed out"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _fetch(
    spec: official.DataFile,
    url: str,
    dest: Path,
    *,
    retries: int,
    backoff: float,
    timeout: float,
    progress: bool,
) -> None:
    """Download one file from one mirror to ``dest``, verified before it gets the final name.

    Raises _MirrorFailed with the reason when this mirror cannot deliver it.
    """
    last: _TransientError | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with atomic_path(dest) as tmp:
                with open(tmp, "wb") as out:
                    stream_url(url, out, timeout=timeout, progress=progress, desc=spec.name)
                try:
                    content = decompress(tmp.read_bytes(), "the download")
                except DataError as e:
                    raise _MirrorFailed(f"sent unreadable data: {e}") from e
                got = hashlib.sha256(content).hexdigest()
                if got != spec.sha256:
                    raise _MirrorFailed(
                        f"sent the wrong bytes: decompressed SHA-256 {got}, "
                        f"expected {spec.sha256}; refused"
                    )
            return
        except _TransientError as e:
            last = e
    raise _MirrorFailed(f"{retries + 1} attempt(s) failed, last error: {last}")


def download(
    dest_dir: str | os.PathLike[str],
    mirrors: str | Sequence[str] | None = None,
    *,
    retries: int = 2,
    timeout: float = 30,
    progress: bool = True,
    backoff: float = 1.0,
) -> Path:
    """Fetch the four files into ``dest_dir`` and return it.

    Files already there and valid are kept.  For each missing file the mirrors
    (mirror_list(mirrors)) are tried in order; on each, network errors are retried
    ``retries`` times, sleeping ``backoff * 2**k`` seconds (tests pass 0), while an
    HTTP 4xx or a checksum mismatch moves on to the next mirror at once.  ``timeout``
    is in seconds per connection attempt or read.  Each download goes to a temporary
    file in ``dest_dir``, is verified (decompressed SHA-256), and only then renamed to
    its final name, so an interrupted or bad download never leaves anything that passes
    for data.  When every mirror fails, the DataError lists each one and why.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    urls = mirror_list(mirrors)
    dest = Path(dest_dir).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the download folder {dest}: {e.strerror or e}") from e
    remove_stale_temporaries(dest)  # what a killed download left behind
    for spec in official.FILES.values():
        present = official.find(dest, spec)
        if present is not None and official.is_official(present, spec):
            continue
        failures: list[str] = []
        for number, base in enumerate(urls):
            try:
                _fetch(
                    spec,
                    base + spec.name,
                    dest / spec.name,
                    retries=retries,
                    backoff=backoff,
                    timeout=timeout,
                    progress=progress,
                )
                break
            except _MirrorFailed as e:
                failures.append(f"  {spec.name}: {base} -> {e}")
                if progress and number + 1 < len(urls):
                    print(f"{spec.name}: {base} -> {e}; trying {urls[number + 1]}", file=sys.stderr)
            except OSError as e:  # local: the folder or the disk, not the network
                raise DataError(f"{dest / spec.name}: cannot write the download: {e}") from e
        else:
            raise DataError(
                f"{spec.name}: could not be downloaded from any of {len(urls)} mirror(s); "
                f"no partial file was kept in {dest}:\n" + "\n".join(failures) + "\n"
                f"Put a mirror first with {MIRROR_ENV_VAR}=<url>, or copy the four files "
                "into a folder and pass it as the data folder (--data-dir)."
            )
    return dest
