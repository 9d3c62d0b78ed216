"""The observer contract: the probe leaves modes, RNG streams and precision as it found them,
and a failure inside it becomes a warning and an error record (unless strict)."""

from __future__ import annotations

import random
import time
import traceback
import warnings
from contextlib import contextmanager

import numpy as np
import torch


class EntropyProbeWarning(UserWarning):
    """Something about the probe the user should know; training goes on."""


class ProbeFailure(RuntimeError):
    """Raised with ``strict=True`` when a phase of the probe fails."""


@contextmanager
def preserved_state(model: torch.nn.Module):
    """Eval mode, no grad, float32 matmuls at "highest" precision (no TF32) inside; on exit the
    train/eval mode of every module, every RNG stream (torch CPU and CUDA, numpy, python) and the
    matmul settings are restored exactly."""
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    precision = torch.get_float32_matmul_precision()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


class PhaseRunner:
    """Times named phases and contains their failures.

    ``with runner.phase("sampling"):`` records the phase's wall time in ``timing``; an exception
    inside it is recorded in ``error`` (phase, type, message), warned about, and swallowed, unless
    ``strict``. Once a phase has failed, ``failed`` is True and later phases are skipped by the
    caller.
    """

    def __init__(self, step: int, strict: bool, timing: dict[str, float]):
        self.step = step
        self.strict = strict
        self.timing = timing
        self.error: dict[str, str] | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:  # the observer contract: never crash the run
            self.error = {
                "phase": name,
                "type": type(exc).__name__,
                "message": str(exc)[:2000],
                "traceback": traceback.format_exc(limit=8)[-4000:],
            }
            if self.strict:
                raise ProbeFailure(
                    f"entropy probe failed in phase '{name}' at step {self.step}: {exc}"
                ) from exc
            warnings.warn(
                f"entropy probe failed in phase '{name}' at step {self.step} "
                f"({type(exc).__name__}: {exc}); training continues and the JSON log holds an "
                "error record. Pass strict=True to raise instead.",
                EntropyProbeWarning,
                stacklevel=2,
            )
        finally:
            self.timing[name] = self.timing.get(name, 0.0) + time.perf_counter() - start
