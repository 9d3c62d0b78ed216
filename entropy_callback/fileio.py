"""Crash-safe file primitives of the JSON sink (atomic replace, one-line appends), and the
readers' guard against files that are not regular files.

Every file is created with mode ``0o666`` and the process umask applied by the kernel (0644
under umask 022, 0600 under 077), like any file the user's own code creates. No symlink is
followed when writing: the writer opens the run directory itself with ``O_NOFOLLOW``
(:func:`open_dir`) and creates, replaces, appends and unlinks relative to that descriptor, so a
link planted at the run directory mid-run makes the write fail with ``ELOOP`` instead of
sending records elsewhere; ``os.replace`` replaces a link rather than its target, and appends
open ``probes.jsonl`` with ``O_NOFOLLOW``.

Readers open a file only if it is a regular file (:func:`open_regular`): a FIFO, a device
(``/dev/zero``) or a socket is refused without blocking and without reading from it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".tmp-"
FILE_MODE = 0o666  # before the umask
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class NotRegularFileError(OSError):
    """A reader was pointed at something that is not a regular file (FIFO, device, socket)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path) -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file (a link to one is fine).

    Checked before opening (``stat``) and again on the open descriptor (``fstat``), which is
    opened with ``O_NONBLOCK``: a FIFO with no writer or a device never blocks the reader.

    Raises:
        NotRegularFileError: ``path`` is a FIFO, a device, a socket or a directory.
        OSError: it cannot be opened (missing, no permission).
    """
    path = Path(path)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(errno.EINVAL, f"{path} is {_kind(mode)}, not a regular file; "
                                  "refused (only regular files are read)")
    fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped between the stat and the open
            raise NotRegularFileError(errno.EINVAL, f"{path} is {_kind(mode)}, not a regular "
                                      "file; refused (only regular files are read)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_regular(path: str | Path) -> bool:
    """Whether ``path`` is a regular file (links followed); never opens it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def open_dir(path: str | Path) -> Iterator[int]:
    """A descriptor of the directory ``path`` for writing relative to it (``dir_fd``).

    The last component is opened with ``O_NOFOLLOW``: a symlink there (e.g. one planted in
    place of a run directory) is refused with ``ELOOP``, never followed. Closed on exit.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise OSError(exc.errno, f"{path} is a symbolic link; a run directory is never "
                          "followed through a link, so nothing was written") from exc
        raise
    try:
        yield fd
    finally:
        os.close(fd)


def _create_exclusive(name: str | Path, dir_fd: int | None = None) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    return os.open(name, flags | getattr(os, "O_BINARY", 0), FILE_MODE, dir_fd=dir_fd)


def atomic_write(path: Path, data: bytes, dir_fd: int | None = None) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never part.

    Writes a temporary file ``.tmp-<name>.<random>`` in the same directory, flushes and fsyncs
    it, then ``os.replace``s it onto ``path`` and fsyncs the directory. On any failure the
    temporary file is removed and the error re-raised; ``path`` is then untouched. With
    ``dir_fd`` (from :func:`open_dir`), ``path``'s name is taken in that directory.
    """
    if dir_fd is None:
        with open_dir(Path(path).parent) as fd:
            atomic_write(Path(path), data, fd)
        return
    name = Path(path).name
    tmp = f"{TMP_PREFIX}{name}.{secrets.token_hex(6)}"
    fd = _create_exclusive(tmp, dir_fd)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def append_line(path: Path, line: str, dir_fd: int | None = None) -> None:
    """Append one complete line to ``path`` with a single ``os.write``, then fsync.

    A truncated last line left by an earlier crash is cut off first, so that it does not
    swallow the new line. If the write fails (e.g. ENOSPC) the file is cut back to its length
    before the call, so a failed append leaves no partial line. ``path`` must not be a symlink.
    With ``dir_fd``, ``path``'s name is taken in that directory.
    """
    if dir_fd is None:
        with open_dir(Path(path).parent) as fd:
            append_line(Path(path), line, fd)
        return
    data = (line.rstrip("\n") + "\n").encode()
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC
    fd = os.open(Path(path).name, flags, FILE_MODE, dir_fd=dir_fd)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, f"{path} is {_kind(mode)}, not a regular "
                                      "file; nothing appended")
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


def unlink(path: Path) -> None:
    """Remove the file ``path``; its directory is opened without following a link there
    (see :func:`open_dir`), so a link planted at the run directory deletes nothing beyond it.

    Raises:
        FileNotFoundError: no such file. OSError: the directory is a link, or unlink failed.
    """
    with open_dir(Path(path).parent) as fd:
        os.unlink(Path(path).name, dir_fd=fd)


def list_names(directory: Path) -> list[str]:
    """The names in ``directory``, listed without following a link there ([] if it is one)."""
    try:
        with open_dir(directory) as fd:
            return os.listdir(fd)
    except OSError:
        return []


def remove_stale_temps(directory: Path) -> None:
    """Delete the ``.tmp-*`` files a crashed writer left in ``directory`` (not through a link)."""
    with contextlib.suppress(OSError), open_dir(directory) as fd:
        for name in os.listdir(fd):
            if name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=fd)
