"""The governor's sinks: TensorBoard scalars and one JSON line per record.

Tags ``entropy_governor/{alpha, predicted, realized, H, target}`` at ``step = record.step``
(entropies in nats/token; ``predicted`` = alpha * delta H_1, ``realized`` = Delta H_true, only on
governed steps). JSON: ``governor.jsonl``, one ``GovernorRecord.to_dict()`` per line with the
run's identity (``run_id``, the probe run's when the governor shares a run with a probe).

Example::

    log = GovernorLog("runs/exp1", tensorboard="runs/exp1")
    governor.attach(optimizer, on_record=log)
    ...
    log.close()
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EntropyProbeWarning
from .runs import new_run_id, utc_now

if TYPE_CHECKING:  # a sink imports no engine module (the record is only read here)
    from .governor import GovernorRecord

PREFIX = "entropy_governor"
JSONL_NAME = "governor.jsonl"
TAGS = ("alpha", "predicted", "realized", "H", "target")


class GovernorLog:
    """Writes each ``GovernorRecord`` (call it with the record).

    Args:
        json_dir: the directory of ``governor.jsonl`` (None: no JSON).
        tensorboard: a ``SummaryWriter``-like object (never closed here), a directory for a
            writer of its own, or None for no TensorBoard.
        run_id: the run's identity (default: a new one); metadata: merged into every line.
    A write that fails is a warning; training goes on.
    """

    def __init__(self, json_dir: str | Path | None = None, *, tensorboard: Any = None,
                 run_id: str | None = None, metadata: Mapping[str, Any] | None = None) -> None:
        self.run_id = run_id or new_run_id()
        self.metadata = {"run_id": self.run_id, "start_time": utc_now(), **(metadata or {})}
        self.path = None if json_dir is None else Path(json_dir) / JSONL_NAME
        self._owns = isinstance(tensorboard, (str, Path))
        if self._owns:
            from torch.utils.tensorboard import SummaryWriter

            tensorboard = SummaryWriter(log_dir=str(tensorboard))
        self.writer = tensorboard
        self._warned: set[str] = set()

    def __call__(self, record: GovernorRecord) -> None:
        if self.writer is not None:
            try:
                for tag, value in scalars(record).items():
                    self.writer.add_scalar(f"{PREFIX}/{tag}", value, global_step=record.step)
            except Exception as exc:  # a sink never stops training
                self._warn("tensorboard", exc)
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                line = json.dumps({**self.metadata, **record.to_dict()}, default=str)
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(line + "\n")
            except Exception as exc:
                self._warn("json", exc)

    def close(self) -> None:
        if self.writer is not None:
            flush = getattr(self.writer, "flush", None)
            if callable(flush):
                flush()
            if self._owns:
                self.writer.close()
        self.writer = None

    def _warn(self, sink: str, exc: Exception) -> None:
        if sink not in self._warned:
            self._warned.add(sink)
            warnings.warn(f"entropy governor sink '{sink}' failed ({type(exc).__name__}: {exc});"
                          " training continues without it. Said once per sink.",
                          EntropyProbeWarning, stacklevel=3)


def scalars(record: GovernorRecord) -> dict[str, float]:
    """The record's finite TensorBoard values, by tag suffix (``TAGS``)."""
    out = {}
    for tag in TAGS:
        value = getattr(record, tag)
        if value is not None and math.isfinite(float(value)):
            out[tag] = float(value)
    return out


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``governor.jsonl`` (a directory holding one, or the file)."""
    path = Path(path)
    if path.is_dir():
        path = path / JSONL_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
