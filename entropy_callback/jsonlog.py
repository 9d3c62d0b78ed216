"""JSON sink: one record per probed step, a summary beside it, and ``probes.jsonl``.

Layout of one run's directory (``<log_dir>/entropy_probe/`` or ``entropy_probe-<run_id>/``,
see :mod:`entropy_callback.runs`)::

    config.yaml                   the probe config and run metadata (run id...), once per run
    step_<t:08d>.json[.gz]        the full record of probed step t (sections as in seed 001)
    step_<t:08d>_summary.json     run_metadata (lite) + core_results
    probes.jsonl                  one line of core results per probe (+ timing_total, seconds)

Entropies are in nats per token (``normalize="per_token"``) or nats per response
(``"per_sequence"``); timings in seconds. Every file is written atomically (temporary file in
the same directory, flush, fsync, ``os.replace``); ``probes.jsonl`` grows by one complete line
per ``os.write``. A step is all or nothing: its record, its summary and its line are written in
that order, the line last, and a failure removes what was written of the step. Which sections a
record holds depends on ``ProbeConfig.log_level``: minimal = core_results + timing + update;
standard adds ground_truth and batch_statistics; detailed adds sequences; debug adds
token_data and raw_tensors.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import re
from pathlib import Path
from typing import Any

import yaml

from .config import ProbeConfig
from .fileio import (
    append_line,
    atomic_write,
    fsync_dir,
    is_regular,
    list_names,
    open_regular,
    remove_stale_temps,
    unlink,
)
from .result import ProbeResult, finite_or_none
from .runs import CONFIG_NAME, JSONL_NAME, environment, git_commit, probe_version, utc_now

__all__ = ["CONFIG_NAME", "JSONL_NAME", "JsonLogWriter", "StepWriteError", "atomic_write",
           "jsonable", "step_filename", "summary_filename", "timing_total"]

STEP_FILE_RE = re.compile(r"^step_(\d+)\.json(\.gz)?$")
STEP_OR_SUMMARY_RE = re.compile(r"^step_(\d+)(_summary)?\.json(\.gz)?$")


class StepWriteError(OSError):
    """Writing one step's files failed; ``on_disk`` says exactly what of the step is on disk."""

    def __init__(self, step: int, cause: BaseException, on_disk: str) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.step = step
        self.cause = cause
        self.on_disk = on_disk


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
    return finite_or_none(sum(v for v in values if v is not None))  # float + never raises


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past float range
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


class JsonLogWriter:
    """Writes the probe records of one run into ``root`` (the run's directory).

    Args:
        root: the run's directory; created (again) when missing.
        config: decides the level (sections), gzip and pruning (``max_files``).
        run: the run's identity and metadata (``run_id``, ``start_time``, ``logger_version``,
            adapter facts...), written into ``config.yaml`` and every record's
            ``run_metadata``.

    Example::

        writer = JsonLogWriter("runs/exp1/entropy_probe", ProbeConfig())
        path = writer.write(result, {"epoch": 3})

    Writing a result whose ``error`` is set writes the error record. Failing to write raises
    ``OSError`` (:class:`StepWriteError` for a step, saying what is left on disk); the caller
    decides whether to warn and go on.
    """

    def __init__(self, root: str | Path, config: ProbeConfig,
                 run: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.config = config
        self.run = jsonable(dict(run or {}))
        self._static: dict[str, Any] | None = None

    @property
    def jsonl_path(self) -> Path:
        return self.root / JSONL_NAME

    def run_metadata(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """timestamp (ISO 8601, UTC), probe_version, git_commit, config_hash, log_level,
        environment, the run's identity (``run``), then ``extra``."""
        if self._static is None:
            self._static = {
                "probe_version": probe_version(),
                "git_commit": git_commit(),
                "config_hash": self.config.config_hash(),
                "log_level": self.config.log_level,
                "environment": environment(),
                **self.run,
            }
        out: dict[str, Any] = {"timestamp": utc_now(), **self._static}
        if extra:
            out.update(jsonable(extra))
        return out

    def write_config(self) -> Path:
        """Create the directory if needed and (re)write ``config.yaml``: the config and the run
        metadata. Removes temporary files a crashed writer left. Returns its path."""
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.root)
        path = self.root / CONFIG_NAME
        body = {"config": jsonable(self.config.to_dict()), "run_metadata": self.run_metadata()}
        atomic_write(path, yaml.safe_dump(body, sort_keys=False, allow_unicode=True).encode())
        return path

    def ensure_root(self) -> str | None:
        """Recreate the directory, or its ``config.yaml``, if it was removed; returns what was
        recreated (``"directory"`` or ``"config.yaml"``), or None.

        Raises:
            OSError: ``root`` is a symbolic link (e.g. planted in place of the run directory
                mid-run): it is never followed, nothing is written.
        """
        if self.root.is_symlink():
            raise OSError(errno.ELOOP, f"{self.root} is a symbolic link, not the run's "
                          "directory; a run directory is never followed through a link, so "
                          "nothing was written")
        if not self.root.is_dir():
            self.write_config()
            return "directory"
        if not (self.root / CONFIG_NAME).is_file():
            self.write_config()
            return CONFIG_NAME
        return None

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

        All or nothing: the line goes last, and if any of the three fails the step's files
        written so far are removed again. ``run_metadata`` (e.g. epoch, global_step) is merged
        into the record's ``run_metadata`` section.

        Raises:
            StepWriteError: the step could not be written completely (``on_disk`` says what
                of it remains: nothing, unless removing a written file failed too).
            OSError: pruning older records failed (the step itself is complete).
        """
        step = int(result.step)
        path = self.root / step_filename(step, self.config.compress)
        summary_path = self.root / summary_filename(step)
        written: list[Path] = []
        try:
            self.ensure_root()
            record = self.record(result, run_metadata)
            core = record["core_results"]
            total = timing_total(result.timing)
            data = json.dumps(record, allow_nan=False, ensure_ascii=False).encode()
            if self.config.compress:
                data = gzip.compress(data, compresslevel=6, mtime=0)
            meta = record["run_metadata"]
            lite = {k: meta.get(k) for k in ("timestamp", "probe_version", "git_commit",
                                             "config_hash")}
            summary = {"run_metadata": {**lite, "record": path.name}, "core_results": core,
                       "timing_total": total}
            summary_data = json.dumps(summary, allow_nan=False, ensure_ascii=False,
                                      indent=2).encode()
            line = json.dumps({**core, "timing_total": total}, allow_nan=False,
                              ensure_ascii=False)
            atomic_write(path, data)
            written.append(path)
            atomic_write(summary_path, summary_data)
            written.append(summary_path)
            append_line(self.jsonl_path, line)
        except Exception as exc:
            raise StepWriteError(step, exc, self._roll_back(step, written)) from exc
        self.prune(keep=step)
        return path

    def _roll_back(self, step: int, written: list[Path]) -> str:
        """Remove the files of a step whose write failed; say what of it is left on disk."""
        left = []
        for path in written:
            try:
                unlink(path)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(path.name)
        with contextlib.suppress(OSError):
            fsync_dir(self.root)
        if left:
            return (f"{' and '.join(left)} of step {step} could not be removed and "
                    f"stay on disk in {self.root} without a {JSONL_NAME} line")
        earlier = sorted(n for n in list_names(self.root) if n.startswith(f"step_{step:08d}"))
        if earlier:  # the step was written before (a repeated step): its old files stay
            return (f"this write of step {step} left nothing on disk; the files of an earlier "
                    f"write of step {step} stay: {', '.join(earlier)}")
        return (f"nothing of step {step} is on disk (no {step_filename(step)}, no summary, "
                f"no {JSONL_NAME} line)")

    def prune(self, keep: int | None = None) -> list[Path]:
        """Delete the oldest step records (and their summaries) beyond ``config.max_files``.

        "Oldest" is the lowest step index; step ``keep`` (the one just written) is never
        deleted. ``probes.jsonl`` keeps every line. Returns the deleted paths.
        """
        limit = self.config.max_files
        if limit is None or not self.root.is_dir():
            return []
        by_step: dict[int, list[Path]] = {}
        for name in list_names(self.root):
            match = STEP_FILE_RE.match(name)
            if match:
                by_step.setdefault(int(match.group(1)), []).append(self.root / name)
        excess = len(by_step) - limit
        if excess <= 0:
            return []
        doomed = [t for t in sorted(by_step) if t != keep][:excess]
        deleted: list[Path] = []
        for step in doomed:
            for path in [*by_step[step], self.root / summary_filename(step)]:
                with contextlib.suppress(FileNotFoundError):
                    unlink(path)
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
        if is_regular(path) and not path.parent.is_symlink():
            with open_regular(path) as handle:
                raw = handle.read()
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
        for name in list_names(self.root):
            match = STEP_OR_SUMMARY_RE.match(name)
            if match and int(match.group(1)) >= step:
                with contextlib.suppress(FileNotFoundError):
                    unlink(self.root / name)
                dropped.add(int(match.group(1)))
        return sorted(dropped)
