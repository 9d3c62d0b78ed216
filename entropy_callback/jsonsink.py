"""The JSON records of one run as a sink: the run directory's claim, ``config.yaml``, one record
per probed step (``jsonlog.JsonLogWriter``), rewinding on resume.

The ``RunLogger`` puts it last among its sinks, so that a record holds the error of a scalar sink
that failed at the same step. Torch-free.

Example (what ``RunLogger.open`` does)::

    sink = JsonSink("runs/exp1", ProbeConfig())
    sink.open(run_id, start_time, {"framework": "plain"}, resume=False, start_step=0)
    sink.log(result, {"epoch": 3})      # runs/exp1/entropy_probe/step_<t>.json, summary, line
    sink.close()                         # releases the run directory's lock
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import ProbeConfig
from .errors import EntropyProbeWarning
from .jsonlog import JSONL_NAME, JsonLogWriter, StepWriteError, step_filename
from .result import ProbeResult
from .runs import RunBusyError, RunClaim, claim_run_dir, new_run_id, utc_now

__all__ = ["JsonSink", "SinkWriteError"]


class SinkWriteError(Exception):
    """A sink's write of one step failed; ``cause`` is the original exception, ``on_disk`` what
    of the step is on disk (a clause), ``context`` where it failed (may be empty)."""

    def __init__(self, cause: BaseException, on_disk: str, context: str = "") -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause
        self.on_disk = on_disk
        self.context = context


class JsonSink:
    """One run's JSON records under ``<log_dir>/entropy_probe/`` (or ``entropy_probe-<run_id>/``
    when another run holds that one; docs/logs.md).

    Args:
        log_dir: the run's log directory.
        config: the probe config (level, compression, pruning).

    After ``open``: ``run_id`` and ``start_time`` (a new id when the resumed run's directory
    is locked by a live process: the two are split), ``root`` (the run directory), ``writer``.
    """

    name = "json"  # the phase named in warnings and error records

    def __init__(self, log_dir: str | Path, config: ProbeConfig) -> None:
        self.log_dir = Path(log_dir)
        self.config = config
        self.run_id: str | None = None
        self.start_time: str | None = None
        self.writer: JsonLogWriter | None = None
        self._claim: RunClaim | None = None

    @property
    def root(self) -> Path:
        """The run directory."""
        if self.writer is None:
            raise RuntimeError("JsonSink.open() first.")
        return self.writer.root

    def open(self, run_id: str, start_time: str, metadata: Mapping[str, Any], *,
             resume: bool, start_step: int) -> None:
        """Claim the run directory, drop a resumed run's records of steps >= ``start_step``,
        write ``config.yaml``. Raises whatever fails (the caller decides); nothing stays
        claimed then."""
        self.run_id, self.start_time = run_id, start_time
        try:
            try:
                claim = claim_run_dir(self.log_dir, run_id, resume)
            except RunBusyError as exc:  # the same run resumed twice at once: split them
                self.run_id, self.start_time, resume = new_run_id(), utc_now(), False
                claim = claim_run_dir(self.log_dir, self.run_id, resume=False)
                _warn(f"{exc}: this process logs run {run_id} as a new run {self.run_id} in "
                      f"{claim.path}; the records in the locked directory stay as they are.")
            self._claim = claim
            facts = {**metadata, "run_id": self.run_id, "start_time": self.start_time}
            if resume:
                facts["resumed_at_step"] = start_step
            self.writer = JsonLogWriter(claim.path, self.config, facts)
            if not claim.created:
                self.rewind(start_step)
            self.writer.write_config()
        except BaseException:
            self.close()
            self.writer = None
            raise

    def log(self, result: ProbeResult, metadata: Mapping[str, Any] | None = None) -> None:
        """Write the step's record, summary and ``probes.jsonl`` line (``metadata`` merged into
        the record's ``run_metadata``); recreate the run directory first if it was removed.

        Raises:
            SinkWriteError: ``on_disk`` says what of the step is on disk.
        """
        step = int(result.step)
        root = self.root
        try:
            self._recreate_if_removed(step)
            self.writer.write(result, dict(metadata or {}))
        except StepWriteError as exc:
            raise SinkWriteError(exc.cause, exc.on_disk) from exc.cause
        except SinkWriteError:
            raise
        except Exception as exc:  # pruning: the step itself is complete
            raise SinkWriteError(
                exc, f"step {step} is complete on disk in {root}",
                f" while pruning old records (max_files={self.config.max_files})") from exc

    def outcome(self, result: ProbeResult) -> str:
        """What the last ``log`` of ``result`` left on disk, as a sentence (for warnings)."""
        step = int(result.step)
        name = step_filename(step, self.config.compress)
        what = "holds this error" if result.error is not None else "is complete"
        return (f"The JSON record of step {step} in {self.root} ({name}, its summary and its "
                f"{JSONL_NAME} line) {what}.")

    def _recreate_if_removed(self, step: int) -> None:
        """Recreate the run directory (or its config.yaml) if it was removed, and say so."""
        root = self.root
        try:
            recreated = self.writer.ensure_root()
        except OSError as exc:
            raise SinkWriteError(exc, f"nothing of step {step} is on disk ({root} was removed "
                                 "or replaced and cannot be recreated)") from exc
        if recreated == "directory":
            if self._claim is not None:
                try:
                    self._claim.lock()
                except RunBusyError as exc:
                    _warn(f"{exc}; run {self.run_id} keeps writing into it.")
            _warn(f"{root} was removed during run {self.run_id}: recreated it with its "
                  "config.yaml; the records written there before are gone.")
        elif recreated:
            _warn(f"{root / recreated} was removed during run {self.run_id}: rewrote it; the "
                  "records beside it are untouched.")

    def rewind(self, step: int) -> list[int]:
        """Drop this run's records of steps >= ``step`` (they are about to be probed again);
        returns the dropped steps. Never touches another run's directory."""
        if self.writer is None:
            return []
        dropped = self.writer.drop_from(int(step))
        if dropped:
            _warn(f"run {self.run_id} resumes at step {step}: dropped its own probe records of "
                  f"steps {dropped} from {self.root}, to log those steps again.")
        return dropped

    def flush(self) -> None:
        """Nothing buffered: every file is written and fsynced whole."""

    def close(self) -> None:
        """Release the run directory's lock. Safe to call twice."""
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.release()


def _warn(message: str) -> None:
    warnings.warn(message, EntropyProbeWarning, stacklevel=4)
