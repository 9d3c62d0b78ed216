"""The one sink layer every adapter uses: a ``RunLogger`` over pluggable sinks.

The result flows one way: engine -> ``ProbeResult`` -> ``RunLogger.emit`` -> each sink. A sink
is any object with the :class:`Sink` protocol (``name``, ``log(result)``, ``flush()``,
``close()``). The RunLogger's own sinks are TensorBoard (``tensorboard.TensorBoardSink``), the
metric loggers (``MetricLoggerSink``: a Lightning logger's ``log_metrics``, a wandb ``log``...)
and the JSON records (``jsonsink.JsonSink``); ``sinks=[...]`` adds the user's. Scalar sinks
derive their tags from ``tags.scalars`` (``<name>/deltaH1``... at step t). The JSON sink comes
last, so that the record of a step whose other sink failed holds that error.

Nothing a sink does reaches training: opening a sink, and every write, flush and close, catch
every exception; a sink that cannot be opened is disabled for the run with one warning, a write
that fails costs that sink's output of that step with a warning saying exactly what is on disk;
``strict=True`` raises ``ProbeFailure`` instead. Only rank 0 creates a RunLogger. Nothing here
imports torch or the engine.

Example (a plain PyTorch loop; the Lightning and HF adapters do the same)::

    run = RunLogger(config, "runs/exp1", sinks=[MySink()]).open()   # + entropy_probe/, TB
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
from typing import Any, Protocol, runtime_checkable

from .config import ProbeConfig, probe_name
from .errors import EntropyProbeWarning, ProbeFailure
from .jsonsink import JsonSink
from .result import ProbeResult
from .runs import new_run_id, utc_now
from .tags import PREFIX, scalars
from .tensorboard import TensorBoardSink

__all__ = ["MetricLogger", "MetricLoggerSink", "RunLogger", "Sink"]

MetricLogger = Callable[[dict[str, float], int], Any]
"""``(scalars, step) -> None``: e.g. a Lightning logger's ``log_metrics``, a wandb ``log``."""


@runtime_checkable
class Sink(Protocol):
    """What the RunLogger needs of a sink (in the spirit of torchtune's metric loggers).

    ``name`` is the phase named in warnings and error records (and the key of the sink's time
    in ``timing``); ``log`` writes one probe at ``step = result.step`` (``result`` is the
    RunLogger's copy: a sink must not change it). Exceptions are the RunLogger's to handle.
    The run's identity is the RunLogger's ``run_id`` / ``state_dict()``.
    """

    name: str

    def log(self, result: ProbeResult) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class MetricLoggerSink:
    """Hands each probe's ``<prefix>/*`` scalars (``tags.scalars``) to a ``(scalars, step)``
    callable."""

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
        sinks: the user's sinks (:class:`Sink`): each gets every probe, after TensorBoard and
            the metric loggers, before the JSON record; closed by ``close()``.
        metadata: facts about the run for ``config.yaml`` and every record's ``run_metadata``,
            e.g. ``{"framework": "lightning", "every": 20, "logger_version": 3}``.
        name: the probe's name, the prefix of its TensorBoard and metric-logger tags
            (``<name>/deltaH1``) and of its Custom Scalars layout directory; recorded in
            ``run_metadata`` as ``probe_name``. Two probes writing to one TensorBoard run need
            two names.

    After ``open()``: ``run_id``, ``run_dir`` (None without JSON), ``json`` (the
    ``JsonSink``, ``.root`` its directory), ``tensorboard``, ``sinks`` (all open sinks, in
    the order they get each probe).
    """

    def __init__(
        self,
        config: ProbeConfig,
        log_dir: str | Path | None = None,
        *,
        tensorboard: Any = None,
        metric_loggers: Iterable[MetricLogger] = (),
        sinks: Iterable[Sink] = (),
        metadata: Mapping[str, Any] | None = None,
        name: str = PREFIX,
    ) -> None:
        if not isinstance(config, ProbeConfig):
            raise TypeError(f"RunLogger needs a ProbeConfig, got {type(config).__name__}.")
        user = list(sinks)
        for i, sink in enumerate(user):
            if not isinstance(sink, Sink) or not isinstance(getattr(sink, "name", None), str):
                raise TypeError(f"sinks[{i}] ({type(sink).__name__}) is not a Sink: it needs a "
                                "str `name` and methods log(result), flush(), close().")
        chosen = log_dir if log_dir is not None else config.log_dir
        self.config = config
        self.log_dir: Path | None = None if chosen is None else Path(chosen)
        self.name = probe_name(name)
        self.metadata = {**(metadata or {}), "probe_name": self.name}
        self._tb_arg = tensorboard
        self._metric_loggers = list(metric_loggers)
        self._user_sinks = user
        self.run_id: str | None = None
        self.start_time: str | None = None
        self.tensorboard: TensorBoardSink | None = None
        self.json: JsonSink | None = None
        self.sinks: list[Sink] = []
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

        A sink that cannot be opened (whatever the exception) is left out with one warning
        unless ``strict``; the others still go on.
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
        self.sinks += self._user_sinks
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
            self._close_quietly(self.tensorboard)
            self.tensorboard = None
            self._failed_to_open("tensorboard", exc, "no TensorBoard scalars for this run")
            return
        self.sinks.insert(0, self.tensorboard)

    def _open_json(self, resume: bool, start_step: int) -> None:
        assert self.log_dir is not None
        sink = JsonSink(self.log_dir, self.config)
        try:
            if self.tensorboard is not None and not isinstance(self._tb_arg, (str, Path)):
                self.tensorboard.write_layout(self.log_dir)
            sink.open(self.run_id, self.start_time, self.metadata, resume=resume,
                      start_step=start_step)
        except Exception as exc:
            still = ("TensorBoard scalars are still logged" if self.tensorboard is not None
                     else "nothing of the probe is logged")
            self._failed_to_open("json", exc, f"cannot write under log_dir={str(self.log_dir)!r}: "
                                 f"no JSON records and no Custom Scalars layout; {still}. Pass "
                                 "log_dir= a writable directory")
            return
        self.run_id, self.start_time = sink.run_id, sink.start_time
        self.json = sink
        self.sinks.append(sink)

    # ------------------------------------------------------------------ emit
    def emit(self, result: ProbeResult, extra: Mapping[str, Any] | None = None) -> None:
        """Write one probe to every sink: scalars first, the JSON record last.

        ``extra`` (e.g. ``{"epoch": 3}``) is merged into the record's ``run_metadata``. A sink
        failure is a warning saying what is on disk, and the first one is the record's
        ``error`` (if it had none); with ``strict`` it raises ``ProbeFailure``. The record
        also holds each sink's time (``timing.<sink>``, seconds). ``result`` itself is not
        changed: the sinks get a copy.
        """
        if not self._opened or self._closed:
            raise RuntimeError("RunLogger.emit() needs an open RunLogger (open() first, and "
                               "not after close()).")
        try:
            self._emit(result, extra)
        except ProbeFailure:
            raise
        except Exception as exc:  # nothing of the sink layer reaches training
            self._raise_if_strict("emit", int(result.step), exc)
            self._warn(f"{_failed('emit', result.step, exc)}; training continues.")

    def _emit(self, result: ProbeResult, extra: Mapping[str, Any] | None) -> None:
        result = _private_copy(result)
        step = int(result.step)
        failures: list[tuple[Sink, Exception]] = []
        for sink in self.sinks:
            if sink is self.json and failures and result.error is None:
                error = _error_record(failures[0][0].name, _cause(failures[0][1]))
                result = dataclasses.replace(result, error=error)
            start = time.perf_counter()
            try:
                if sink is self.json:  # the record: the step's extras into its run_metadata
                    sink.log(result, extra)
                else:
                    sink.log(result)
            except Exception as exc:
                self._raise_if_strict(sink.name, step, _cause(exc))
                failures.append((sink, exc))
            finally:
                seconds = result.timing.get(sink.name, 0.0) + time.perf_counter() - start
                result = dataclasses.replace(result, timing={**result.timing,
                                                              sink.name: seconds})
        for sink, exc in failures:
            self._warn(self._failure_message(sink, step, exc, failures, result))

    def _failure_message(self, sink: Sink, step: int, exc: Exception,
                         failures: list[tuple[Sink, Exception]], result: ProbeResult) -> str:
        """What failed and what of step ``step`` is on disk, as a warning."""
        failed = _failed(sink.name, step, _cause(exc))
        on_disk, context = getattr(exc, "on_disk", None), getattr(exc, "context", "")
        if sink is self.json and context:  # the step is written; something after it failed
            return f"{failed}{context}; training continues. {on_disk[0].upper()}{on_disk[1:]}."
        if sink is self.json:
            return f"{failed}; training continues, and {on_disk or 'nothing of it is on disk'}."
        if self.json is None:
            return f"{failed}; training continues. No JSON record is written in this run."
        json_exc = next((e for s, e in failures if s is self.json), None)
        if json_exc is not None and not getattr(json_exc, "context", ""):
            return f"{failed}; training continues. No JSON record of step {step} was written."
        return f"{failed}; training continues. {self.json.outcome(result)}"

    # ------------------------------------------------------------------ resume, state, close
    def rewind(self, step: int) -> list[int]:
        """Drop this run's records of steps >= ``step`` (they are about to be probed again);
        returns the dropped steps. Never touches another run's directory."""
        if self.json is None:
            return []
        try:
            return self.json.rewind(int(step))
        except Exception as exc:
            self._raise_if_strict("json", int(step), exc)
            self._warn(f"entropy probe could not drop run {self.run_id}'s records of steps >= "
                       f"{step} ({type(exc).__name__}: {exc}); the records logged again are "
                       "appended beside them (load_run keeps the last of each step).")
            return []

    def state_dict(self) -> dict[str, Any]:
        """The run's identity, for the adapter's checkpoint: pass it back to ``open`` to resume
        this run (``run_id``, ``start_time``, ``run_dir``)."""
        return {"run_id": self.run_id, "start_time": self.start_time,
                "run_dir": None if self.run_dir is None else str(self.run_dir)}

    def flush(self) -> None:
        """Flush the sinks (TensorBoard events to disk)."""
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

    # ------------------------------------------------------------------ failures
    def _raise_if_strict(self, phase: str, step: int, exc: BaseException) -> None:
        if self.config.strict:
            raise ProbeFailure(_failed(phase, step, exc)) from exc

    def _failed_to_open(self, phase: str, exc: Exception, consequence: str) -> None:
        if self.config.strict:
            raise ProbeFailure(f"entropy probe sink '{phase}' could not be opened: {exc}") from exc
        self._warn(f"entropy probe {consequence} ({type(exc).__name__}: {exc}).")

    def _close_quietly(self, sink: Any) -> None:
        try:
            if sink is not None:
                sink.close()
        except Exception as exc:
            self._warn(f"entropy probe sink '{sink.name}' failed to close ({exc}).")

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(message, EntropyProbeWarning, stacklevel=4)


def _private_copy(result: ProbeResult) -> ProbeResult:
    """A copy whose containers that writing a record may fill (``sanitize`` sets null reasons
    and cleans diagnostics) are its own: nothing reaches the caller's result."""
    return dataclasses.replace(result, timing=dict(result.timing),
                               null_reasons=dict(result.null_reasons),
                               diagnostics=dict(result.diagnostics))


def _cause(exc: Exception) -> BaseException:
    """The original exception of a sink's failure (``SinkWriteError.cause``), else itself."""
    return getattr(exc, "cause", None) or exc


def _failed(phase: str, step: int, exc: BaseException) -> str:
    return f"entropy probe failed in phase '{phase}' at step {step} ({type(exc).__name__}: {exc})"


def _error_record(phase: str, exc: BaseException) -> dict[str, str]:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8))
    return {"phase": phase, "type": type(exc).__name__, "message": str(exc)[:2000],
            "traceback": text[-4000:]}
