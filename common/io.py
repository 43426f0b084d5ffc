"""The one way this project writes a file: completely or not at all.

Every file the project writes (weights, checkpoints, run records, plots, downloads, bench
results, native checkpoints of each framework) goes through :func:`atomic_path`: the data is
written to a temporary file in the same folder, flushed and fsync'ed, renamed over the
final name, and the folder is fsync'ed so the rename itself survives a power cut. A reader,
or a later run after a crash, ``kill -9`` or a full disk, sees the old file or the new one,
never a half-written one.

Temporary files are named ``.tmp-<pid>-<token>-<final name>``: the final name comes last, so
writers that insist on a suffix (Keras wants ``.weights.h5``, matplotlib reads the format
from it) are satisfied, and :func:`remove_stale_temporaries` can recognise, on the next
start, what a killed writer left behind. They get the ordinary mode (0o666 less the umask),
not ``tempfile``'s 0o600, so the final file has the permissions any other file would.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO, Iterator

TEMP_PREFIX = ".tmp-"
_TEMP_NAME = re.compile(r"^\.tmp-(?P<pid>\d+)-[0-9a-f]{8}-(?P<final>.+)$")


def temporary_name(path: Path) -> Path:
    """Where the temporary file for ``path`` goes (same folder, so the rename is atomic)."""
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to, by any means (``np.savez``,
    ``torch.save``, ``model.save_weights``, ``fig.savefig`` ...). When the block ends normally
    the temporary file is fsync'ed and renamed over ``path`` and the folder fsync'ed; on any
    exception, KeyboardInterrupt included, it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise OSError(f"{path}: the writer produced no file")
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_folder(path.parent)


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (the folder included), deepest first."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_file(Path(root) / name)
        fsync_folder(Path(root))


def _remove(path: Path) -> None:
    """Delete a file or a whole folder; a missing one is no error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_path` for a writer that makes a whole folder (a TensorFlow SavedModel): yield
    a temporary path beside ``path`` (not yet created; the writer creates it). When the block
    ends normally every file in it is fsync'ed and the folder renamed to ``path``; on any
    exception it is removed and ``path`` is left as it was. A folder cannot be renamed over a
    non-empty one, so an existing ``path`` is first moved aside under a temporary name and
    deleted after: a reader sees the old folder, for an instant none, or the new one, never a
    partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if not tmp.is_dir():
            raise OSError(f"{path}: the writer produced no folder")
        _fsync_tree(tmp)
        old = None
        if path.exists() or path.is_symlink():
            old = temporary_name(path)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the previous version back
                os.replace(old, path)
            raise
    except BaseException:
        _remove(tmp)
        raise
    fsync_folder(path.parent)
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces ``path`` only if the block succeeds."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) into ``path``, which appears only complete."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders (:func:`atomic_folder`'s) that writers killed
    mid-write (SIGKILL, power cut) left in ``folder``; one whose writer process is still alive
    is left alone. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match and (entry.is_file() or entry.is_dir()) and not _alive(int(match["pid"])):
            _remove(entry)
            if not entry.exists():
                removed.append(entry)
    return removed


def check_writable(folder: str | os.PathLike, *, what: str = "output folder") -> Path:
    """Create ``folder`` and prove a file can be written there, before any expensive work:
    an OSError becomes a ValueError that names the folder and the reason."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(folder / f"{TEMP_PREFIX}probe", b"")
        (folder / f"{TEMP_PREFIX}probe").unlink()
    except OSError as error:
        raise ValueError(f"{what} {folder} is not writable ({error.strerror or error})") from None
    return folder


__all__ = [
    "TEMP_PREFIX", "atomic_file", "atomic_folder", "atomic_path", "check_writable", "fsync_folder", "remove_stale_temporaries",
    "temporary_name", "write_bytes_atomic", "write_text_atomic",
]
