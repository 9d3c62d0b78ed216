"""JSON sink: one record per probed step, a summary beside it, and ``probes.jsonl``.

Layout of ``<log_dir>/entropy_probe/``::

    config.yaml                   the probe config and run metadata, once per run
    step_<t:08d>.json[.gz]        the full record of probed step t (sections as in seed 001)
    step_<t:08d>_summary.json     run_metadata (lite) + core_results
    probes.jsonl                  one line of core results per probe (+ timing_total, seconds)

Entropies are in nats per token (``normalize="per_token"``) or nats per response
(``"per_sequence"``); timings in seconds. Every file is written atomically (temporary file in
the same directory, flush, fsync, ``os.replace``); ``probes.jsonl`` grows by one complete line
per ``os.write``. Which sections a record holds depends on ``ProbeConfig.log_level``:
minimal = core_results + timing + update; standard adds ground_truth and batch_statistics;
detailed adds sequences; debug adds token_data and raw_tensors.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import platform
import re
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .config import ProbeConfig
from .result import ProbeResult, finite_or_none

JSONL_NAME = "probes.jsonl"
CONFIG_NAME = "config.yaml"
STEP_FILE_RE = re.compile(r"^step_(\d+)\.json(\.gz)?$")
STEP_OR_SUMMARY_RE = re.compile(r"^step_(\d+)(_summary)?\.json(\.gz)?$")
TMP_PREFIX = ".tmp-"


def step_filename(step: int, compress: bool = False) -> str:
    """``step_<t:08d>.json`` (``.json.gz`` when compressed)."""
    return f"step_{int(step):08d}.json" + (".gz" if compress else "")


def summary_filename(step: int) -> str:
    """``step_<t:08d>_summary.json``."""
    return f"step_{int(step):08d}_summary.json"


def timing_total(timing: dict[str, Any] | None) -> float | None:
    """Total probe time in seconds: the ``total`` / ``total_time`` entry, else the phase sum."""
    if not timing:
        return None
    for key in ("total", "total_time"):
        if key in timing:
            return finite_or_none(_number(timing[key]))
    values = [_number(v) for v in timing.values()]
    return finite_or_none(sum(v for v in values if v is not None))


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts.

    Non-finite floats become None; tensors and numpy values become lists / Python scalars
    (through ``tolist()``); paths and unknown objects become strings.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return finite_or_none(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        with contextlib.suppress(Exception):
            return jsonable(tolist())
    return str(obj)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never part.

    Writes a temporary file in the same directory, flushes and fsyncs it, then ``os.replace``s
    it onto ``path``. On any failure the temporary file is removed and the error re-raised.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
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
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def append_line(path: Path, line: str) -> None:
    """Append one complete line to ``path`` with a single ``os.write``, then fsync.

    A truncated last line left by an earlier crash is cut off first, so that it does not
    swallow the new line.
    """
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _drop_partial_line(fd)
        written = os.write(fd, data)
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
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
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
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


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class JsonLogWriter:
    """Writes probe records under ``root`` (= ``<log_dir>/entropy_probe/``).

    Args:
        root: the directory the records go into; created on the first write.
        config: decides the level (sections), gzip and pruning (``max_files``).

    Example::

        writer = JsonLogWriter("lightning_logs/version_0/entropy_probe", ProbeConfig())
        path = writer.write(result, {"epoch": 3})

    Writing a result whose ``error`` is set never raises: the error record is written.
    Failing to create or write the directory raises ``OSError``; the caller decides whether
    to warn and go on.
    """

    def __init__(self, root: str | Path, config: ProbeConfig) -> None:
        self.root = Path(root)
        self.config = config
        self._config_written = False
        self._prepared = False
        self._static: dict[str, Any] | None = None

    @property
    def jsonl_path(self) -> Path:
        return self.root / JSONL_NAME

    def run_metadata(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """timestamp (ISO 8601, UTC), probe_version, git_commit, config_hash, environment."""
        if self._static is None:
            self._static = {
                "probe_version": probe_version(),
                "git_commit": git_commit(),
                "config_hash": self.config.config_hash(),
                "log_level": self.config.log_level,
                "environment": environment(),
            }
        out: dict[str, Any] = {"timestamp": _utc_now(), **self._static}
        if extra:
            out.update(jsonable(extra))
        return out

    def write_config(self, run_metadata: dict[str, Any] | None = None) -> Path:
        """Write ``config.yaml`` (config + run metadata) once per writer; returns its path."""
        path = self.root / CONFIG_NAME
        if self._config_written:
            return path
        self._prepare()
        body = {
            "config": jsonable(self.config.to_dict()),
            "run_metadata": self.run_metadata(run_metadata),
        }
        atomic_write(path, yaml.safe_dump(body, sort_keys=False, allow_unicode=True).encode())
        self._config_written = True
        return path

    def record(
        self, result: ProbeResult, run_metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The full JSON record of one probe at the configured level (nothing written)."""
        cfg = self.config
        sections = result.to_dict(
            sequences=cfg.wants("sequences"),
            token_data=cfg.wants("token_data"),
            raw_tensors=cfg.wants("raw_tensors"),
            standard=cfg.log_level != "minimal",
        )
        return jsonable({"run_metadata": self.run_metadata(run_metadata), **sections})

    def write(self, result: ProbeResult, run_metadata: dict[str, Any] | None = None) -> Path:
        """Write the step record, its summary and one ``probes.jsonl`` line; prune; return path.

        ``run_metadata`` (e.g. epoch, global_step, checkpoint path) is merged into the
        record's ``run_metadata`` section.
        """
        self.write_config(run_metadata)
        record = self.record(result, run_metadata)
        core = record["core_results"]
        total = timing_total(result.timing)

        path = self.root / step_filename(result.step, self.config.compress)
        data = json.dumps(record, allow_nan=False, ensure_ascii=False).encode()
        if self.config.compress:
            data = gzip.compress(data, compresslevel=6, mtime=0)
        atomic_write(path, data)

        meta = record["run_metadata"]
        lite = {k: meta.get(k) for k in ("timestamp", "probe_version", "git_commit", "config_hash")}
        summary = {
            "run_metadata": {**lite, "record": path.name},
            "core_results": core,
            "timing_total": total,
        }
        atomic_write(
            self.root / summary_filename(result.step),
            json.dumps(summary, allow_nan=False, ensure_ascii=False, indent=2).encode(),
        )
        line = json.dumps({**core, "timing_total": total}, allow_nan=False, ensure_ascii=False)
        append_line(self.jsonl_path, line)
        self.prune(keep=int(result.step))
        return path

    def prune(self, keep: int | None = None) -> list[Path]:
        """Delete the oldest step records (and their summaries) beyond ``config.max_files``.

        "Oldest" is the lowest step index; step ``keep`` (the one just written) is never
        deleted. ``probes.jsonl`` keeps every line. Returns the deleted paths.
        """
        limit = self.config.max_files
        if limit is None or not self.root.is_dir():
            return []
        by_step: dict[int, list[Path]] = {}
        for path in self.root.iterdir():
            match = STEP_FILE_RE.match(path.name)
            if match:
                by_step.setdefault(int(match.group(1)), []).append(path)
        excess = len(by_step) - limit
        if excess <= 0:
            return []
        doomed = [t for t in sorted(by_step) if t != keep][:excess]
        deleted: list[Path] = []
        for step in doomed:
            for path in [*by_step[step], self.root / summary_filename(step)]:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    deleted.append(path)
        return deleted

    def drop_from(self, step: int) -> list[int]:
        """Forget the records of steps >= ``step``: a run resumed from a checkpoint older than
        its last probe re-runs those steps and probes them again.

        ``probes.jsonl`` is rewritten atomically without their lines (a truncated last line goes
        too; a line that is not JSON is kept), and their step records and summaries are deleted.
        Returns the dropped steps, sorted.
        """
        if not self.root.is_dir():
            return []
        dropped: set[int] = set()
        path = self.jsonl_path
        if path.is_file():
            raw = path.read_bytes()
            lines = raw.splitlines(keepends=True)
            kept = []
            for line in lines:
                if not line.endswith(b"\n"):
                    continue  # a crash mid-write; append_line would cut it anyway
                try:
                    line_step = json.loads(line)["step"]
                except (ValueError, TypeError, KeyError):
                    line_step = None
                if isinstance(line_step, int) and line_step >= step:
                    dropped.add(line_step)
                else:
                    kept.append(line)
            if len(kept) != len(lines):
                atomic_write(path, b"".join(kept))
        for file in self.root.iterdir():
            match = STEP_OR_SUMMARY_RE.match(file.name)
            if match and int(match.group(1)) >= step:
                with contextlib.suppress(FileNotFoundError):
                    file.unlink()
                dropped.add(int(match.group(1)))
        return sorted(dropped)

    def _prepare(self) -> None:
        """Create the directory and remove temporary files a crashed writer left behind."""
        if self._prepared:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                stale.unlink()
        self._prepared = True
