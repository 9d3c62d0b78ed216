"""Run identity: every run has an id, its own directory of records, and metadata.

Layout under a run's ``log_dir`` (see docs/logs.md)::

    entropy_probe/               the records of the first run that wrote here
    entropy_probe-<run_id>/      the records of each later run on the same log_dir
    entropy_probe_layout/        TensorBoard's Custom Scalars layout (shared, not a run)

A run directory is claimed with an atomic ``mkdir``: a run never writes into a directory it did
not create, except its own when it resumes (the run id travels in the adapter's checkpointed
state and is matched against ``config.yaml``). While a run writes, it holds an exclusive
``flock`` on ``<run dir>/.lock`` (released by the kernel when the process ends), so a second
live process resuming the same run id gets a new run instead of writing into the same files.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import secrets
import subprocess
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .fileio import FILE_MODE, open_regular
from .yamlsafe import read_yaml

RUN_DIR_NAME = "entropy_probe"
RUN_DIR_RE = re.compile(r"^entropy_probe(?:-([0-9A-Za-z][0-9A-Za-z._-]*))?$")
CONFIG_NAME = "config.yaml"
JSONL_NAME = "probes.jsonl"
LOCK_NAME = ".lock"


class RunBusyError(OSError):
    """Another live process holds the lock of a run directory."""


def utc_now() -> str:
    """The current time, ISO 8601 UTC to the second (``2026-01-15T10:30:00Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_run_id() -> str:
    """A new run id: UTC start time and 6 random hex digits, ``20260115T103000Z-3fa9c1``
    (sorts by start time; unique across processes)."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def run_dir_name(run_id: str) -> str:
    """``entropy_probe-<run_id>``: the directory of a run that finds ``entropy_probe/`` taken."""
    return f"{RUN_DIR_NAME}-{run_id}"


# ------------------------------------------------------------------ finding runs
def run_dirs(log_dir: Path) -> list[Path]:
    """The run directories directly under ``log_dir`` (``entropy_probe``, ``entropy_probe-*``),
    sorted by name; symlinks are not runs."""
    if not log_dir.is_dir():
        return []
    return sorted(p for p in log_dir.iterdir()
                  if RUN_DIR_RE.match(p.name) and p.is_dir() and not p.is_symlink())


@dataclass(frozen=True)
class RunInfo:
    """What ``config.yaml`` and ``probes.jsonl`` say about one run directory (a segment of a
    run: a run resumed into another directory, e.g. a new Lightning logger version, has one
    directory per segment, all with its run id)."""

    path: Path
    run_id: str | None
    start_time: str | None
    logger_version: Any
    probes: int  # complete lines in probes.jsonl
    name: str | None = None  # the probe's name (its TensorBoard prefix), when recorded
    opened: str | None = None  # run_metadata.timestamp: when this directory was (re)opened
    resumed_at_step: int | None = None  # the first step of a resumed segment
    problem: str | None = None  # why config.yaml was not read, when it was not

    def describe(self, segment: bool = False) -> str:
        """``<path> (run <id>[, probe '<name>'], started <time>, <n> probes)``; with
        ``segment``, only what differs between the segments of one run."""
        parts = [] if segment else [f"run {self.run_id or 'without id'}"]
        if self.name and self.name != RUN_DIR_NAME and not segment:
            parts.append(f"probe {self.name!r}")
        if self.start_time and not segment:
            parts.append(f"started {self.start_time}")
        if self.logger_version is not None:
            parts.append(f"logger version {self.logger_version}")
        if self.resumed_at_step is not None:
            parts.append(f"resumed at step {self.resumed_at_step}")
        parts.append(f"{self.probes} probe{'s' if self.probes != 1 else ''}")
        if self.problem:
            parts.append(self.problem)
        return f"{self.path} ({', '.join(parts)})"


def read_run_meta(directory: Path) -> dict[str, Any]:
    """``run_metadata`` of ``<directory>/config.yaml``; {} when it is missing or unreadable
    (see :func:`read_run_meta_checked`)."""
    return read_run_meta_checked(directory)[0]


def read_run_meta_checked(directory: Path) -> tuple[dict[str, Any], str | None]:
    """``run_metadata`` of ``<directory>/config.yaml`` and, when it could not be read, why.

    Never blocks or recurses without bound: only a regular file is read (a FIFO or a device is
    refused), at most 1 MiB, with YAML anchors/aliases and deep nesting refused (``yamlsafe``).
    """
    path = directory / CONFIG_NAME
    try:
        body = read_yaml(path)
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as exc:
        return {}, f"{CONFIG_NAME} not read: {' '.join(str(exc).split())[:200]}"
    meta = body.get("run_metadata") if isinstance(body, dict) else None
    if not isinstance(meta, dict):
        return {}, f"{CONFIG_NAME} holds no run_metadata mapping"
    return meta, None


def read_run_info(directory: Path) -> RunInfo:
    """The id, start time, logger version and number of probes of one run directory."""
    meta, problem = read_run_meta_checked(directory)
    run_id, resumed = meta.get("run_id"), meta.get("resumed_at_step")
    return RunInfo(
        path=directory,
        run_id=run_id if isinstance(run_id, str) else None,
        start_time=_text(meta.get("start_time")),
        logger_version=_plain(meta.get("logger_version")),
        probes=_count_lines(directory / JSONL_NAME),
        name=meta["probe_name"] if isinstance(meta.get("probe_name"), str) else None,
        opened=_text(meta.get("timestamp")),
        resumed_at_step=(resumed if isinstance(resumed, int) and not isinstance(resumed, bool)
                         and 0 <= resumed < 2**63 else None),
        problem=problem,
    )


def _text(value: Any) -> str | None:
    """A scalar metadata value as short text (YAML may give a datetime); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float, datetime)):
        return None
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return text[:64] or None


def _plain(value: Any) -> Any:
    """A logger version as recorded (an int or a short string), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63:
        return value
    return value[:64] if isinstance(value, str) else None


def _count_lines(path: Path) -> int:
    """Newlines in ``path`` (a regular file only; 0 when missing or not one)."""
    count = 0
    with contextlib.suppress(OSError), open_regular(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b""):
            count += chunk.count(b"\n")
    return count


@dataclass(frozen=True)
class Run:
    """One run id and its directories (segments), in order: a run resumed into another
    directory (a new Lightning logger version) continues there under the same id.

    "Later" is decided by what each segment's ``config.yaml`` records: the time it was opened
    (``run_metadata.timestamp``), then an original segment before a resumed one
    (``resumed_at_step``), then the logger version, then the path. A later segment resumed at
    step s supersedes every record of step >= s of the earlier ones (those steps were run
    again from the checkpoint), and any step it logs again.
    """

    run_id: str | None
    segments: tuple[RunInfo, ...]

    @property
    def path(self) -> Path:
        """The first segment's directory (a run without segments does not exist)."""
        return self.segments[0].path

    def describe(self) -> str:
        """One segment: as :meth:`RunInfo.describe`; several: the run and each segment."""
        if len(self.segments) == 1:
            return self.segments[0].describe()
        first = self.segments[0]
        head = [f"run {self.run_id}"]
        if first.name and first.name != RUN_DIR_NAME:
            head.append(f"probe {first.name!r}")
        if first.start_time:
            head.append(f"started {first.start_time}")
        head.append(f"{len(self.segments)} segments joined")
        return f"{', '.join(head)}: " + "; ".join(seg.describe(segment=True)
                                                  for seg in self.segments)


def _natural(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def segment_order(info: RunInfo) -> tuple:
    """The sort key that puts a run's segments in the order they were written (see Run)."""
    version = info.logger_version
    version_key = ((0, version, "") if isinstance(version, int)
                   else (1, 0, "" if version is None else str(version)))
    return (info.opened or "", info.resumed_at_step is not None, version_key,
            _natural(str(info.path)))


def group_runs(infos: list[RunInfo]) -> list[Run]:
    """Run directories grouped by run id (in the order each id is first met), each run's
    segments in :func:`segment_order`; a directory without a run id is a run of its own."""
    groups: dict[Any, list[RunInfo]] = {}
    for index, info in enumerate(infos):
        groups.setdefault(info.run_id if info.run_id is not None else ("no id", index),
                          []).append(info)
    return [Run(infos_[0].run_id, tuple(sorted(infos_, key=segment_order)))
            for infos_ in groups.values()]


# ------------------------------------------------------------------ claiming a run directory
class RunClaim:
    """A run's directory, and the lock that says a live process writes it.

    The lock is released by ``release()`` (``RunLogger.close``), or when the claim is collected
    (a finalizer: the last resort for a run whose training raised past its adapter)."""

    def __init__(self, path: Path, created: bool) -> None:
        self.path = path
        self.created = created  # False: an existing directory of this run (a resume)
        self._fd: int | None = None
        self._finalizer: weakref.finalize | None = None

    def lock(self) -> None:
        """Take ``<path>/.lock`` exclusively (again, after the directory was recreated).

        Raises:
            RunBusyError: another live process holds it.
        """
        self.release()
        try:
            import fcntl
        except ImportError:  # no flock on this platform: directories are still separate
            return
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path / LOCK_NAME, flags, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise RunBusyError(
                f"{self.path} is being written by another live process (its {LOCK_NAME} is "
                "locked)") from exc
        except OSError:  # a filesystem without flock: directories are still separate
            os.close(fd)
            return
        self._fd = fd
        self._finalizer = weakref.finalize(self, _close_quietly, fd)

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        if self._fd is not None:
            self._finalizer.detach()
            _close_quietly(self._fd)
            self._fd = None


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def claim_run_dir(log_dir: Path, run_id: str, resume: bool) -> RunClaim:
    """This run's directory under ``log_dir``, locked.

    A resumed run (``resume=True``) gets back the directory whose ``config.yaml`` holds its
    ``run_id``. Otherwise (or when that directory is gone) it creates ``entropy_probe/`` if no
    run has it, else ``entropy_probe-<run_id>/``; the atomic ``mkdir`` decides between two runs
    starting at once. An existing directory is never taken over by another run.

    Raises:
        RunBusyError: the run's directory is locked by another live process.
        OSError: ``log_dir`` cannot be created or written.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        for directory in run_dirs(log_dir):
            if read_run_meta(directory).get("run_id") == run_id:
                claim = RunClaim(directory, created=False)
                claim.lock()
                return claim
    for name in (RUN_DIR_NAME, run_dir_name(run_id)):
        directory = log_dir / name
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        claim = RunClaim(directory, created=True)
        claim.lock()
        return claim
    raise FileExistsError(f"{log_dir / run_dir_name(run_id)} exists already; run ids collide.")


# ------------------------------------------------------------------ run metadata
def _dist_version(*names: str) -> str | None:
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return None


def probe_version() -> str:
    """This package's version (installed metadata, else ``entropy_callback.__version__``)."""
    found = _dist_version("entropy-callback")
    if found:
        return found
    try:
        from . import __version__  # type: ignore[attr-defined]
    except ImportError:
        return "unknown"
    return str(__version__)


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the git repository holding ``cwd`` (default: the working directory), or None."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def environment() -> dict[str, Any]:
    """Versions and hardware of this process (never raises)."""
    env: dict[str, Any] = {
        "python_version": platform.python_version(),
        "torch_version": _dist_version("torch"),
        "transformers_version": _dist_version("transformers"),
        "peft_version": _dist_version("peft"),
        "lightning_version": _dist_version("lightning", "pytorch-lightning"),
        "cuda_version": None,
        "device_name": "cpu",
        "memory_gb": None,
        "platform": platform.platform(),
    }
    with contextlib.suppress(Exception):
        import torch

        env["cuda_version"] = torch.version.cuda
        if torch.cuda.is_available():
            index = torch.cuda.current_device()
            env["device_name"] = torch.cuda.get_device_name(index)
            total = torch.cuda.get_device_properties(index).total_memory
            env["memory_gb"] = round(total / 2**30, 1)
    return env
