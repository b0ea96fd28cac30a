"""Writing results: a folder or file appears whole or not at all, never through a link, one writer at a time.

Every command that writes a result (export's folder, predictions, manifests) goes through here, so a full
disk, a kill or a second process writing the same target never leaves something that looks complete.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


class OutputError(ValueError):
    """A target that cannot be written; the message says which and what to do."""


# What a person can do about the operating system's refusals (the rest keep the system's own words).
_ADVICE = {
    errno.ENOSPC: "no space left on that device; free some space and run the command again",
    errno.EDQUOT: "disk quota exceeded; free some space and run the command again",
    errno.EROFS: "the file system is read-only; write somewhere else",
    errno.EACCES: "permission denied; write somewhere you may write",
    errno.EPERM: "operation not permitted; write somewhere you may write",
    errno.ENAMETOOLONG: "a name in this path is longer than the file system allows; choose a shorter one",
    errno.ELOOP: "too many symbolic links in this path",
    errno.EISDIR: "is a folder where a file was expected",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
}


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error: the path (printable whatever its bytes) and what to do."""
    where = exc.filename if exc.filename is not None else ""
    where = printable(os.fsdecode(where) if isinstance(where, bytes | str) else str(where))
    reason = _ADVICE.get(exc.errno or 0, exc.strerror or str(exc))
    return f"{where}: {reason}" if where else reason


def printable(text: str | os.PathLike) -> str:
    """A path or name as text that any terminal and UTF-8 file can take: bytes that are not UTF-8 (a file
    name from another system) are shown as \\xNN escapes instead of breaking the output."""
    return os.fspath(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shortened(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters at a word boundary, with an ellipsis where it was cut."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" ,;:(") + "…"


def check_new_folder(path: Path | str, option: str = "-o") -> Path:
    """A folder to create: not a link, not `.`/`..`, and new or empty."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise OutputError(f"{option} {printable(path)}: names an existing folder itself; name a new folder, "
                          "e.g. results/best")
    if path.is_symlink():
        raise OutputError(f"{option} {printable(path)}: is a symbolic link; name a real, new folder (results are "
                          "never written through a link)")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OutputError(f"{option} {printable(path)}: already exists and is not an empty folder; choose another "
                          "or remove it")
    return path


@contextmanager
def folder_written_whole(path: Path | str, option: str = "-o") -> Iterator[Path]:
    """Yield a private hidden folder beside `path` to write into; it becomes `path` when the block ends
    without error, and is removed otherwise. A second writer of the same `path` is refused at once (a lock
    beside it) and, should it get past the lock, by the final rename, which never replaces a non-empty
    folder: one writer wins whole, the other says why."""
    import fcntl

    path = check_new_folder(path, option)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = path.parent / f".{path.name}.lock"
        lock = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise OutputError(f"{option} {printable(path)}: {describe_os_error(exc)}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise OutputError(f"{option} {printable(path)}: another process is writing this folder right now; "
                          "wait for it, or choose another") from None
    try:
        check_new_folder(path, option)  # as seen under the lock
        for stale in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):  # of a writer killed outright
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
        try:
            with sigterm_as_interrupt():
                yield work
            _umask_modes(work)
            if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()
            try:
                os.rename(work, path)  # fails if path is (again) a non-empty folder
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise OutputError(f"{option} {printable(path)}: was written by another process meanwhile; "
                                      "nothing of this run was kept, choose another folder") from None
                raise
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        lock_file.unlink(missing_ok=True)
        os.close(lock)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask_modes(folder: Path) -> None:
    """The modes a plain `mkdir` and `open` would have given (mkdtemp and mkstemp make 0700 and 0600): what is
    written whole is shared like anything else the user writes."""
    mask = current_umask()
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's or `kill`'s stop) unwinds like Ctrl-C while a folder is written, so its partial
    folder and lock are removed; outside the main thread, signals cannot be handled and nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def file_written_whole(path: Path | str) -> Iterator[Path]:
    """Yield a hidden temporary file beside `path`; it replaces `path` when the block ends without error and
    is removed otherwise (a full disk midway leaves the old file, or none, never half of a new one)."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{printable(path)}: is a symbolic link; name a real file (results are never written "
                          "through a link)")
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from colleagues and containers
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace `path` by `data` as JSON in one rename: readers see the old file or the new one, never half.
    The temporary name carries the process id: two extractions of one folder write settings.json at once."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class NonFiniteError(ValueError):
    """An array meant for a cache holds NaN or infinity: a search would read it as a number."""


def save_atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    """`np.savez` into `path` in one rename (one writer per name, whatever the race); refuses (NonFiniteError)
    a floating-point array with a NaN or an infinity, so no cache part ever holds one."""
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise NonFiniteError(f"{name}: {bad} of {array.size} values are NaN or infinite")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
