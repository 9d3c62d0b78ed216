"""Crash-safe file primitives of the JSON sink: atomic replace, one-line appends.

Every file is created with mode ``0o666`` and the process umask applied by the kernel (0644
under umask 022, 0600 under 077), like any file the user's own code creates. No symlink is
followed when writing: ``os.replace`` replaces a link rather than its target, and appends open
``probes.jsonl`` with ``O_NOFOLLOW`` (a planted link makes the append fail with ``ELOOP``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

TMP_PREFIX = ".tmp-"
FILE_MODE = 0o666  # before the umask
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _create_exclusive(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    return os.open(path, flags | getattr(os, "O_BINARY", 0), FILE_MODE)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never part.

    Writes a temporary file ``.tmp-<name>.<random>`` in the same directory, flushes and fsyncs
    it, then ``os.replace``s it onto ``path`` and fsyncs the directory. On any failure the
    temporary file is removed and the error re-raised; ``path`` is then untouched.
    """
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{secrets.token_hex(6)}"
    fd = _create_exclusive(tmp)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def append_line(path: Path, line: str) -> None:
    """Append one complete line to ``path`` with a single ``os.write``, then fsync.

    A truncated last line left by an earlier crash is cut off first, so that it does not
    swallow the new line. If the write fails (e.g. ENOSPC) the file is cut back to its length
    before the call, so a failed append leaves no partial line. ``path`` must not be a symlink.
    """
    data = (line.rstrip("\n") + "\n").encode()
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC
    fd = os.open(path, flags, FILE_MODE)
    try:
        _drop_partial_line(fd)
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _drop_partial_line(fd: int) -> None:
    size = os.fstat(fd).st_size
    if size == 0 or _read_at(fd, size - 1, 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - (1 << 16))
        cut = _read_at(fd, start, end - start).rfind(b"\n")
        if cut >= 0:
            os.ftruncate(fd, start + cut + 1)
            return
        end = start
    os.ftruncate(fd, 0)


def _read_at(fd: int, offset: int, length: int) -> bytes:
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, length)


def remove_stale_temps(directory: Path) -> None:
    """Delete the ``.tmp-*`` files a crashed writer left in ``directory``."""
    for stale in directory.glob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            stale.unlink()
