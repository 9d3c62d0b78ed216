"""TensorBoard sink: one scalar per quantity per probed step, and a Custom Scalars layout.

The tags and the layout are derived in :mod:`entropy_callback.tags` (torch-free, shared with the
metric-logger sink); this module only writes them. ``torch.utils.tensorboard`` is imported when
a writer is created, never at import.

Example::

    sink = TensorBoardSink(experiment=trainer.logger.experiment)
    sink.write_layout(trainer.logger.log_dir)
    sink.log(result)

Adapters do not use it directly: ``sinks.RunLogger`` opens it with the other sinks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .result import ProbeResult
from .tags import LAYOUT_SUBDIR, PREFIX, layout, layout_subdir, scalars

__all__ = ["LAYOUT_SUBDIR", "PREFIX", "TensorBoardSink", "layout", "layout_subdir", "scalars"]


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
