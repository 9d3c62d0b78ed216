"""The one sink layer every adapter uses: a ``RunLogger`` over TensorBoard, metric-logger and
JSON sinks.

The result flows one way: engine -> ``ProbeResult`` -> ``RunLogger.emit`` -> each sink. The
TensorBoard sink and any metric loggers get the same ``entropy_probe/*`` scalars at step t
(``tensorboard.scalars``); the JSON sink gets the full record, last, so that the record of a
step whose TensorBoard write failed holds that error. A sink that fails costs that sink's output
for that step, with a warning saying exactly what is on disk; ``strict=True`` raises
``ProbeFailure`` instead. Only rank 0 creates a RunLogger.

Example (a plain PyTorch loop; the Lightning and HF adapters do the same)::

    run = RunLogger(config, "runs/exp1").open()     # runs/exp1/entropy_probe/ + TensorBoard
    ...
    result = probe.after_step()
    if result is not None:
        run.emit(result)
    ...
    run.close()
"""

from __future__ import annotations

import dataclasses
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from .config import ProbeConfig, probe_name
from .jsonlog import JSONL_NAME, JsonLogWriter, StepWriteError, step_filename
from .observer import EntropyProbeWarning, ProbeFailure
from .result import ProbeResult
from .runs import RunBusyError, RunClaim, claim_run_dir, new_run_id, utc_now
from .tensorboard import PREFIX, TensorBoardSink, scalars

MetricLogger = Callable[[dict[str, float], int], Any]
"""``(scalars, step) -> None``: e.g. a Lightning logger's ``log_metrics``, a wandb ``log``."""


class Sink(Protocol):
    """What the RunLogger needs of a scalar sink (in the spirit of torchtune's metric loggers).

    ``name`` is the phase named in warnings and error records; ``log`` writes one probe's
    scalars at ``step = result.step``.
    """

    name: str

    def log(self, result: ProbeResult) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class MetricLoggerSink:
    """Hands each probe's ``<prefix>/*`` scalars to a ``(scalars, step)`` callable."""

    def __init__(self, log: MetricLogger, name: str = "logger", prefix: str = PREFIX) -> None:
        self._log = log
        self.name = name
        self.prefix = prefix

    def log(self, result: ProbeResult) -> None:
        self._log(scalars(result, self.prefix), int(result.step))

    def flush(self) -> None:
        """Nothing buffered here."""

    def close(self) -> None:
        """The callable's owner closes it."""


class RunLogger:
    """One run's sinks: open, emit each probe, rewind on resume, close.

    Args:
        config: the probe config (level, compression, pruning, ``strict``).
        log_dir: the run's log directory. JSON records go to ``<log_dir>/entropy_probe/`` (or
            ``entropy_probe-<run_id>/`` when another run has that one, see docs/logs.md), the
            Custom Scalars layout to ``<log_dir>/entropy_probe_layout/``. None:
            ``config.log_dir``; if that is None too, no JSON and no own TensorBoard writer.
        tensorboard: an existing ``SummaryWriter``-like object (``add_scalar``) to write the
            scalars into (never closed here); a directory: a ``SummaryWriter`` of its own there
            (the layout beside it; e.g. HF's ``args.logging_dir``); None: a ``SummaryWriter``
            of its own under ``log_dir``; False: no TensorBoard.
        metric_loggers: callables ``(scalars: dict[str, float], step: int)`` that get the same
            scalars as TensorBoard (e.g. a Lightning logger's ``log_metrics``).
        metadata: facts about the run for ``config.yaml`` and every record's ``run_metadata``,
            e.g. ``{"framework": "lightning", "every": 20, "logger_version": 3}``.
        name: the probe's name, the prefix of its TensorBoard and metric-logger tags
            (``<name>/deltaH1``) and of its Custom Scalars layout directory; recorded in
            ``run_metadata`` as ``probe_name``. Two probes writing to one TensorBoard run need
            two names.

    After ``open()``: ``run_id``, ``run_dir`` (None without JSON), ``json``, ``tensorboard``.
    """

    def __init__(
        self,
        config: ProbeConfig,
        log_dir: str | Path | None = None,
        *,
        tensorboard: Any = None,
        metric_loggers: Iterable[MetricLogger] = (),
        metadata: Mapping[str, Any] | None = None,
        name: str = PREFIX,
    ) -> None:
        if not isinstance(config, ProbeConfig):
            raise TypeError(f"RunLogger needs a ProbeConfig, got {type(config).__name__}.")
        chosen = log_dir if log_dir is not None else config.log_dir
        self.config = config
        self.log_dir: Path | None = None if chosen is None else Path(chosen)
        self.name = probe_name(name)
        self.metadata = {**(metadata or {}), "probe_name": self.name}
        self._tb_arg = tensorboard
        self._metric_loggers = list(metric_loggers)
        self.run_id: str | None = None
        self.start_time: str | None = None
        self.tensorboard: TensorBoardSink | None = None
        self.json: JsonLogWriter | None = None
        self.sinks: list[Sink] = []
        self._claim: RunClaim | None = None
        self._opened = self._closed = False

    @property
    def run_dir(self) -> Path | None:
        """The directory of this run's JSON records (None: no JSON for this run)."""
        return None if self.json is None else self.json.root

    # ------------------------------------------------------------------ open
    def open(self, resume_state: Mapping[str, Any] | None = None,
             start_step: int = 0) -> RunLogger:
        """Start the run: claim its directory, write ``config.yaml``, the layout; returns self.

        Args:
            resume_state: this run's ``state_dict()`` from a checkpoint. Given, the run keeps
                its id and directory, and its records of steps >= ``start_step`` (which the
                resumed run probes again) are dropped. None: a new run, with a new id and a
                directory of its own; no other run's records are touched.
            start_step: the first optimizer step this process runs.

        A directory that cannot be written costs the JSON records (one warning) unless
        ``strict``; the TensorBoard scalars still go on.
        """
        if self._opened:
            raise RuntimeError("RunLogger.open() was called twice; make a new RunLogger.")
        self._opened = True
        state = dict(resume_state) if isinstance(resume_state, Mapping) else {}
        resumed_id = state.get("run_id") if isinstance(state.get("run_id"), str) else None
        self.run_id = resumed_id or new_run_id()
        self.start_time = str(state.get("start_time") or utc_now())
        self._open_tensorboard()
        self.sinks += [MetricLoggerSink(log, prefix=self.name) for log in self._metric_loggers]
        if self.log_dir is not None:
            self._open_json(resumed_id is not None, int(start_step))
        return self

    def _open_tensorboard(self) -> None:
        arg = self._tb_arg
        if arg is False or (arg is None and self.log_dir is None):
            return
        try:
            if isinstance(arg, (str, Path)):  # an own writer there, with the layout beside it
                self.tensorboard = TensorBoardSink(log_dir=Path(arg), prefix=self.name)
                self.tensorboard.write_layout(Path(arg))
            else:
                self.tensorboard = TensorBoardSink(
                    experiment=arg, log_dir=self.log_dir if arg is None else None,
                    prefix=self.name)
        except Exception as exc:
            self._failed_to_open("tensorboard", exc, "no TensorBoard scalars for this run")
            return
        self.sinks.insert(0, self.tensorboard)

    def _open_json(self, resume: bool, start_step: int) -> None:
        assert self.log_dir is not None
        try:
            if self.tensorboard is not None and not isinstance(self._tb_arg, (str, Path)):
                self.tensorboard.write_layout(self.log_dir)
            try:
                claim = claim_run_dir(self.log_dir, self.run_id, resume)
            except RunBusyError as exc:  # the same run resumed twice at once: split them
                old, self.run_id, self.start_time = self.run_id, new_run_id(), utc_now()
                resume = False
                claim = claim_run_dir(self.log_dir, self.run_id, resume=False)
                self._warn(f"{exc}: this process logs run {old} as a new run {self.run_id} in "
                           f"{claim.path}; the records in the locked directory stay as they are.")
            self._claim = claim
            self.json = JsonLogWriter(claim.path, self.config, self._run_facts(resume,
                                                                                start_step))
            if not claim.created:
                self._rewind_json(start_step)
            self.json.write_config()
        except OSError as exc:
            self._release()
            self.json = None
            still = ("TensorBoard scalars are still logged" if self.tensorboard is not None
                     else "nothing of the probe is logged")
            self._failed_to_open("json", exc, f"cannot write under log_dir={str(self.log_dir)!r}: "
                                 f"no JSON records and no Custom Scalars layout; {still}. Pass "
                                 "log_dir= a writable directory")

    def _run_facts(self, resume: bool, start_step: int) -> dict[str, Any]:
        facts = {**self.metadata, "run_id": self.run_id, "start_time": self.start_time}
        if resume:
            facts["resumed_at_step"] = start_step
        return facts

    # ------------------------------------------------------------------ emit
    def emit(self, result: ProbeResult, extra: Mapping[str, Any] | None = None) -> None:
        """Write one probe to every sink: scalars first, then the JSON record.

        ``extra`` (e.g. ``{"epoch": 3}``) is merged into the record's ``run_metadata``. A sink
        failure is a warning saying what is on disk, and the first one is the record's
        ``error`` (if it had none); with ``strict`` it raises ``ProbeFailure``. The record
        also holds each sink's time (``timing.<sink>``, seconds). ``result`` itself is not
        changed: data flows from the engine to the sinks only.
        """
        if not self._opened or self._closed:
            raise RuntimeError("RunLogger.emit() needs an open RunLogger (open() first, and "
                               "not after close()).")
        step = int(result.step)
        timing = dict(result.timing)
        failures: list[tuple[str, Exception]] = []
        for sink in self.sinks:
            start = time.perf_counter()
            try:
                sink.log(result)
            except Exception as exc:
                self._raise_if_strict(sink.name, step, exc)
                failures.append((sink.name, exc))
            finally:
                timing[sink.name] = timing.get(sink.name, 0.0) + time.perf_counter() - start
        error = result.error
        if failures and error is None:
            error = _error_record(*failures[0])
        result = dataclasses.replace(result, timing=timing, error=error)  # the caller's stays
        written = self._write_json(result, extra)
        for name, exc in failures:
            self._warn(f"{_failed(name, step, exc)}; training continues. {written}")

    def _write_json(self, result: ProbeResult, extra: Mapping[str, Any] | None) -> str:
        """Write the record; return what of step t the JSON sink has on disk, as a sentence."""
        step = int(result.step)
        if self.json is None:
            return "No JSON record is written in this run."
        name = step_filename(step, self.config.compress)
        try:
            self._recreate_if_removed(step)
            self.json.write(result, dict(extra or {}))
        except StepWriteError as exc:
            self._raise_if_strict("json", step, exc.cause)
            self._warn(f"{_failed('json', step, exc.cause)}; training continues, and "
                       f"{exc.on_disk}.")
            return f"No JSON record of step {step} was written ({exc.on_disk})."
        except Exception as exc:  # pruning: the step itself is complete
            self._raise_if_strict("json", step, exc)
            self._warn(f"{_failed('json', step, exc)} while pruning old records "
                       f"(max_files={self.config.max_files}); training continues. Step {step} "
                       f"is complete on disk in {self.json.root}.")
        what = "holds this error" if result.error is not None else "is complete"
        return (f"The JSON record of step {step} in {self.json.root} ({name}, its summary and its "
                f"{JSONL_NAME} line) {what}.")

    def _recreate_if_removed(self, step: int) -> None:
        """Recreate the run directory (or its config.yaml) if it was removed, and say so."""
        assert self.json is not None
        root = self.json.root
        try:
            recreated = self.json.ensure_root()
        except OSError as exc:
            raise StepWriteError(step, exc, f"nothing of step {step} is on disk ({root} was "
                                 "removed or replaced and cannot be recreated)") from exc
        if recreated == "directory":
            if self._claim is not None:
                try:
                    self._claim.lock()
                except RunBusyError as exc:
                    self._warn(f"{exc}; run {self.run_id} keeps writing into it.")
            self._warn(f"{root} was removed during run {self.run_id}: recreated it with its "
                       "config.yaml; the records written there before are gone.")
        elif recreated:
            self._warn(f"{root / recreated} was removed during run {self.run_id}: rewrote it; "
                       "the records beside it are untouched.")

    # ------------------------------------------------------------------ resume, state, close
    def rewind(self, step: int) -> list[int]:
        """Drop this run's records of steps >= ``step`` (they are about to be probed again);
        returns the dropped steps. Never touches another run's directory."""
        if self.json is None:
            return []
        return self._rewind_json(int(step))

    def _rewind_json(self, step: int) -> list[int]:
        assert self.json is not None
        dropped = self.json.drop_from(step)
        if dropped:
            self._warn(f"run {self.run_id} resumes at step {step}: dropped its own probe records "
                       f"of steps {dropped} from {self.json.root}, to log those steps again.")
        return dropped

    def state_dict(self) -> dict[str, Any]:
        """The run's identity, for the adapter's checkpoint: pass it back to ``open`` to resume
        this run (``run_id``, ``start_time``, ``run_dir``)."""
        return {"run_id": self.run_id, "start_time": self.start_time,
                "run_dir": None if self.run_dir is None else str(self.run_dir)}

    def flush(self) -> None:
        """Flush the scalar sinks (TensorBoard events to disk)."""
        for sink in self.sinks:
            try:
                sink.flush()
            except Exception as exc:
                if self.config.strict:
                    raise ProbeFailure(f"entropy probe sink '{sink.name}' failed to flush: "
                                       f"{exc}") from exc
                self._warn(f"entropy probe sink '{sink.name}' failed to flush ({exc}).")

    def close(self) -> None:
        """Flush and close the sinks (a writer that was given is only flushed) and release the
        run directory's lock. Safe to call twice."""
        self._closed = True
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception as exc:
                self._warn(f"entropy probe sink '{sink.name}' failed to close ({exc}).")
        self._release()

    def _release(self) -> None:
        if self._claim is not None:
            self._claim.release()

    # ------------------------------------------------------------------ failures
    def _raise_if_strict(self, phase: str, step: int, exc: BaseException) -> None:
        if self.config.strict:
            raise ProbeFailure(_failed(phase, step, exc)) from exc

    def _failed_to_open(self, phase: str, exc: Exception, consequence: str) -> None:
        if self.config.strict:
            raise ProbeFailure(f"entropy probe sink '{phase}' could not be opened: {exc}") from exc
        self._warn(f"entropy probe {consequence} ({type(exc).__name__}: {exc}).")

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(message, EntropyProbeWarning, stacklevel=4)


def _failed(phase: str, step: int, exc: BaseException) -> str:
    return f"entropy probe failed in phase '{phase}' at step {step} ({type(exc).__name__}: {exc})"


def _error_record(phase: str, exc: Exception) -> dict[str, str]:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8))
    return {"phase": phase, "type": type(exc).__name__, "message": str(exc)[:2000],
            "traceback": text[-4000:]}
