"""TensorBoard sink: one scalar per quantity per probed step, and a Custom Scalars layout.

Tags live under ``entropy_probe/`` and are written at ``step = result.step`` (the probed
optimizer step t, the same index every sink uses). Entropy quantities are in nats per token
(``normalize="per_token"``) or nats per response (``"per_sequence"``); timings in seconds.

Example::

    sink = TensorBoardSink(experiment=trainer.logger.experiment)
    sink.write_layout(trainer.logger.log_dir)
    sink.log(result)

Adapters do not use it directly: ``sinks.RunLogger`` opens it with the other sinks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .attribution_report import scalars as attribution_scalars
from .result import SCALAR_FIELDS, ProbeResult, finite_float

PREFIX = "entropy_probe"
MULTILINE_CHART = "predicted vs true ΔH"
MARGIN_CHART = "ΔH_true ± 2 SE"


def layout(prefix: str = PREFIX) -> dict[str, dict[str, list[Any]]]:
    """The Custom Scalars layout, in ``SummaryWriter.add_custom_scalars`` form.

    Multiline tags are regexes (anchored with ``$`` so that ``deltaH1`` does not also match
    ``deltaH1_se``); the margin chart takes exact tags (value, lower, upper).
    """
    true = f"{prefix}/deltaH_true"
    quoted = re.escape(prefix)
    return {
        prefix: {
            MULTILINE_CHART: ["Multiline", [rf"{quoted}/deltaH1$", rf"{quoted}/deltaH_true$"]],
            MARGIN_CHART: ["Margin", [true, f"{true}_lo2se", f"{true}_hi2se"]],
        }
    }


def layout_subdir(prefix: str = PREFIX) -> str:
    """The run subdirectory holding the layout of the probe named ``prefix``."""
    return f"{prefix}_layout"


LAYOUT_SUBDIR = layout_subdir()


def scalars(result: ProbeResult, prefix: str = PREFIX) -> dict[str, float]:
    """The tag -> value pairs one probe writes (missing and non-finite values left out).

    One ``<prefix>/<name>`` per quantity declared with ``scalar=True`` in ``result.QUANTITIES``
    (``prefix``: the probe's name, ``entropy_probe`` by default).

    ``deltaH_true_lo2se`` / ``deltaH_true_hi2se`` are ΔH_true ∓ 2 SE (nats per token), written
    only when both ΔH_true and its standard error are known; ``time/<phase>`` are seconds.
    """
    out: dict[str, float] = {}
    for name in SCALAR_FIELDS:
        value = finite_float(result.get(name))
        if value is not None:
            out[f"{prefix}/{name}"] = value
    true, se = finite_float(result.deltaH_true), finite_float(result.deltaH_true_se)
    if true is not None and se is not None:
        out[f"{prefix}/deltaH_true_lo2se"] = true - 2.0 * se
        out[f"{prefix}/deltaH_true_hi2se"] = true + 2.0 * se
    out.update(attribution_scalars(result.attribution, prefix))
    for phase, seconds in (result.timing or {}).items():
        value = finite_float(seconds)
        if value is not None:
            out[f"{prefix}/time/{phase}"] = value
    return out


class TensorBoardSink:
    """Writes each ``ProbeResult`` as TensorBoard scalars.

    Args:
        experiment: a ``torch.utils.tensorboard.SummaryWriter``-like object (anything with
            ``add_scalar(tag, value, global_step=...)``), e.g. Lightning's
            ``TensorBoardLogger.experiment``. The sink never closes a writer it was given.
        log_dir: where to create its own ``SummaryWriter`` when no ``experiment`` is given.
        prefix: the tags' prefix, the probe's name (``entropy_probe`` by default).

    Example::

        sink = TensorBoardSink(log_dir="runs/probe")
        sink.write_layout()
        sink.log(result)
        sink.close()
    """

    name = "tensorboard"  # the phase named in warnings and error records

    def __init__(self, experiment: Any | None = None, log_dir: str | Path | None = None,
                 prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self._owns_writer = experiment is None
        if experiment is None:
            from torch.utils.tensorboard import SummaryWriter

            experiment = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        self.writer = experiment
        self._layout_written = False

    @property
    def log_dir(self) -> Path | None:
        """The writer's run directory, when the writer exposes one."""
        for getter in ("log_dir", "logdir"):
            value = getattr(self.writer, getter, None)
            if isinstance(value, (str, Path)):
                return Path(value)
        get_logdir = getattr(self.writer, "get_logdir", None)
        return Path(get_logdir()) if callable(get_logdir) else None

    def log(self, result: ProbeResult) -> None:
        """Write the probe's scalars at ``step=result.step``; None / non-finite are skipped."""
        for tag, value in scalars(result, self.prefix).items():
            self.writer.add_scalar(tag, value, global_step=int(result.step))

    def write_layout(self, run_dir: str | Path | None = None) -> Path | None:
        """Write the Custom Scalars layout once, into ``<run_dir>/<prefix>_layout/``.

        The layout gets its own run subdirectory so that it never replaces a layout the user
        wrote in their own run (TensorBoard merges the layouts of all runs). ``run_dir``
        defaults to the writer's log_dir. Returns the layout directory, or None when there is
        nothing to write into or the layout is already there (a resumed run).
        """
        if self._layout_written:
            return None
        base = Path(run_dir) if run_dir is not None else self.log_dir
        if base is None:
            return None
        target = base / layout_subdir(self.prefix)
        self._layout_written = True
        if target.is_dir() and any(target.glob("events.out.tfevents.*")):
            return None
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(target))
        try:
            writer.add_custom_scalars(layout(self.prefix))
        finally:
            writer.close()
        return target

    def flush(self) -> None:
        """Flush pending events to disk."""
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()

    def close(self) -> None:
        """Flush, and close the writer if this sink created it."""
        self.flush()
        if self._owns_writer:
            self.writer.close()
