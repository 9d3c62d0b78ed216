"""What a probe is doing, while it does it: the package logger and a progress hook.

``logging.getLogger("entropy_callback")`` gets one INFO line per phase of a probe (rows, tokens,
seconds) and one per probe (the estimates and the total time). The package installs only a
``NullHandler``: nothing is printed unless the application configures logging, e.g.
``logging.basicConfig(level=logging.INFO)``.

A progress hook ``on_progress(phase, done, total)`` is called on rank 0 only, after each
microbatch of a long phase (``done`` of ``total`` rows); ``lightning_postfix`` makes one that
shows it in Lightning's TQDM bar, as the bar's postfix (other bars show nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger("entropy_callback")
logger.addHandler(logging.NullHandler())

ProgressHook = Callable[[str, int, int], None]


def log_phase(step: int, phase: str, rows: int, tokens: int, seconds: float) -> None:
    """One INFO line for a finished phase of the probe at ``step``."""
    logger.info("probe step %d: %s, %d sequences, %d tokens, %.2f s",
                step, phase, rows, tokens, seconds)


def log_probe(result) -> None:
    """One INFO line per probe: the estimates (nats) and the time per phase (seconds)."""
    if result.error is not None:
        logger.info("probe step %d failed in %s: %s", result.step,
                    result.error.get("phase"), result.error.get("type"))
        return
    timing = ", ".join(f"{k} {v:.2f}" for k, v in result.timing.items() if k != "total")
    logger.info(
        "probe step %d: deltaH1 %.4g +- %.2g, deltaH_true %.4g +- %.2g, ESS %.3g; "
        "%.2f s (%s)", result.step, _num(result.deltaH1), _num(result.deltaH1_se),
        _num(result.deltaH_true), _num(result.deltaH_true_se), _num(result.ess_fraction),
        result.timing.get("total", float("nan")), timing,
    )


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def lightning_postfix(trainer) -> ProgressHook | None:
    """A hook writing "probe <phase> <done>/<total>" into the postfix of the trainer's TQDM bar,
    or None where the trainer shows no TQDM bar (another progress bar, or none)."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    callback = getattr(trainer, "progress_bar_callback", None)
    if not isinstance(callback, TQDMProgressBar):
        return None

    def show(phase: str, done: int, total: int) -> None:
        bar = callback._train_progress_bar  # None outside an epoch
        if bar is not None:
            bar.set_postfix_str(f"probe {phase} {done}/{total}", refresh=True)

    return show
