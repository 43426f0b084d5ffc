"""The one way this project writes a file: completely or not at all.

Every file the project writes (weights, checkpoints, run records, plots, downloads, bench
results, native checkpoints of each framework) goes through :func:`atomic_path`: the data is
written to a temporary file in the same folder, flushed and fsync'ed, renamed over the
final name, and the folder is fsync'ed so the rename itself survives a power cut. A reader,
or a later run after a crash, ``kill -9`` or a full disk, sees the old file or the new one,
never a half-written one. A writer of several files that belong together (an export's graph
and its weights) uses :func:`atomic_paths`: all are written under temporary names first and
renamed only when every one is complete, so the set appears whole or not at all; a single
file (:func:`atomic_path`) or folder (:func:`atomic_folder`) is the same mechanism with one.

Temporary files are named ``.tmp-<pid>-<token>-<final name>``: the final name comes last, so
writers that insist on a suffix (Keras wants ``.weights.h5``, matplotlib reads the format
from it) are satisfied, and :func:`remove_stale_temporaries` can recognise, on the next
start, what a killed writer left behind. They get the ordinary mode (0o666 less the umask),
not ``tempfile``'s 0o600, so the final file has the permissions any other file would.
"""
from __future__ import annotations

import contextlib
import errno
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


def atomic_path(path: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path to write ``path``'s content to, by any means (``np.savez``,
    ``torch.save``, ``model.save_weights``, ``fig.savefig`` ...). When the block ends normally
    the temporary file is fsync'ed and renamed over ``path`` and the folder fsync'ed; on any
    exception, KeyboardInterrupt included, it is removed and ``path`` is left as it was.
    :func:`atomic_paths` with one file."""
    return _single(_atomic([(Path(path), "file")]))


def atomic_folder(path: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """:func:`atomic_path` for a writer that makes a whole folder (a TensorFlow SavedModel): yield
    a temporary path beside ``path`` (not yet created; the writer creates it). When the block
    ends normally every file in it is fsync'ed and the folder renamed to ``path``; on any
    exception it is removed and ``path`` is left as it was. A folder cannot be renamed over a
    non-empty one, so an existing ``path`` is first moved aside under a temporary name and
    deleted after: a reader sees the old folder, for an instant none, or the new one, never a
    partial one. :func:`atomic_paths` with one folder."""
    return _single(_atomic([(Path(path), "folder")]))


def atomic_paths(*paths: str | os.PathLike) -> contextlib.AbstractContextManager[list[Path]]:
    """Several files or folders written as one set (an export's graph and its weights): yield one
    temporary path beside each target, for the writers to create (a file or a folder). Only when
    the block ends normally and every temporary exists are they fsync'ed and renamed to their
    targets; on any exception every temporary is removed and no target is touched. If a rename
    fails midway, the targets already renamed are put back as they were (an earlier version of
    a file is kept as a hard link until all are in), so the set appears together or not at all."""
    return _atomic([(Path(path), None) for path in paths])


@contextlib.contextmanager
def _single(manager) -> Iterator[Path]:
    with manager as (tmp,):
        yield tmp


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


_PRODUCED = {"file": (Path.is_file, "no file"), "folder": (Path.is_dir, "no folder"), None: (Path.exists, "nothing")}


@contextlib.contextmanager
def _atomic(targets: list[tuple[Path, str | None]]) -> Iterator[list[Path]]:
    """The one mechanism behind every writer here: ``targets`` are (path, "file" | "folder" | None:
    either); yields their temporaries, and renames them all, or none, when the block succeeds."""
    for path, _ in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporaries = [temporary_name(path) for path, _ in targets]
    try:
        yield temporaries
        for (path, kind), tmp in zip(targets, temporaries):
            produced, missing = _PRODUCED[kind]
            if not produced(tmp):
                raise OSError(f"{path}: the writer produced {missing}")
        for tmp in temporaries:
            _fsync_tree(tmp) if tmp.is_dir() else _fsync_file(tmp)
        _rename_all(list(zip(temporaries, (path for path, _ in targets))))
    except BaseException:
        for tmp in temporaries:
            _remove(tmp)
        raise
    for folder in dict.fromkeys(path.parent for path, _ in targets):
        fsync_folder(folder)


def _set_aside(target: Path, tmp: Path, rollback: bool) -> Path | None:
    """Keep ``target``'s current version under a temporary name while ``tmp`` takes its place, so it
    can be put back; None where there is none or nothing to put back. A file over a file is
    replaced in one rename (readers never miss it), its old version kept as a hard link (moved
    aside where the file system has none); a folder cannot be renamed over, so it is moved aside."""
    if not (target.exists() or target.is_symlink()):
        return None
    folders = (target.is_dir() and not target.is_symlink()) or tmp.is_dir()
    if not folders and not rollback:
        return None
    backup = temporary_name(target)
    if not folders:
        with contextlib.suppress(OSError):
            os.link(target, backup, follow_symlinks=False)
            return backup
    os.replace(target, backup)
    return backup


def _rename_all(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each (temporary, target); if one fails, every target is put back as it was."""
    done: list[tuple[Path, Path | None, bool]] = []  # (target, its old version, new one in place)
    try:
        for tmp, target in pairs:
            done.append((target, _set_aside(target, tmp, rollback=len(pairs) > 1), False))
            os.replace(tmp, target)
            done[-1] = (*done[-1][:2], True)
    except BaseException:
        for target, backup, placed in reversed(done):
            with contextlib.suppress(OSError):
                if placed:
                    _remove(target)
                if backup is not None:
                    os.replace(backup, target)
                    _remove(backup)  # a hard link renamed over its own file stays (POSIX rename)
        raise
    for _, backup, _ in done:
        if backup is not None:
            _remove(backup)


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


def check_creatable(folder: str | os.PathLike, *, what: str = "output folder") -> Path:
    """:func:`check_writable` for a folder made only once there is something to put in it (a command
    that may still fail leaves no empty folder): an existing folder is test-written; for a missing
    one, its nearest existing parent must be a folder this process may write in."""
    folder = Path(folder)
    if folder.exists():
        return check_writable(folder, what=what)
    parent = folder.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        reason = os.strerror(errno.ENOTDIR if not parent.is_dir() else errno.EACCES)
        raise ValueError(f"{what} {folder} is not writable ({reason})")
    return folder


# Room kept beyond a writer's estimate: file-format overhead (headers, a graph, an index) is small but not nil.
FREE_SPACE_MARGIN = 1.1
FREE_SPACE_SLACK = 4 << 20


def check_free_space(folder: str | os.PathLike, needed: int, *, what: str) -> None:
    """Raise OSError(ENOSPC) naming ``folder`` when it has less room than ``needed`` bytes (with a margin)
    for ``what``: some frameworks' writers abort or crash the whole process on a full disk, so a writer
    that hands a file to them checks first (where the folder does not exist yet, its nearest parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # no answer (an unusual file system): the writer's own error will say what went wrong
    want = int(needed * FREE_SPACE_MARGIN) + FREE_SPACE_SLACK
    if free < want:
        raise OSError(errno.ENOSPC, f"No space left on device: {what} needs about {want / 2**20:.0f} MiB, "
                                    f"{folder} has {free / 2**20:.0f} MiB free")


__all__ = [
    "TEMP_PREFIX", "atomic_file", "atomic_folder", "atomic_path", "atomic_paths", "check_creatable", "check_free_space", "check_writable",
    "fsync_folder", "remove_stale_temporaries",
    "temporary_name", "write_bytes_atomic", "write_text_atomic",
]
