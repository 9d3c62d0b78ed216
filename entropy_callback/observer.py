"""The observer contract: the probe leaves modes, RNG streams, precision settings, autocast and
training hooks as it found them, and a failure inside it becomes a warning and an error record
(unless strict)."""

from __future__ import annotations

import random
import time
import traceback
import warnings
from contextlib import ExitStack, contextmanager

import numpy as np
import torch

from .checkpointing import suspended
from .errors import EntropyProbeWarning, ProbeFailure

__all__ = ["EntropyProbeWarning", "PhaseRunner", "ProbeFailure", "full_fp32_precision",
           "preserved_state", "without_autocast", "without_training_hooks"]


@contextmanager
def preserved_state(model: torch.nn.Module):
    """The probe's passes run inside: eval mode, no grad, no autocast, float32 matmuls and
    convolutions at full precision (no TF32/bf16), gradient checkpointing off and the
    input-require-grads hooks detached. On exit the train/eval mode of every module, every RNG
    stream (torch CPU and CUDA, numpy, python), the precision settings (torch's
    ``fp32_precision`` API and the legacy one alike), the checkpointing flags and the hooks are
    restored exactly."""
    modules = list(model.modules())
    modes = [(m, m.training) for m in modules]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    try:
        with full_fp32_precision(), without_autocast(model), without_training_hooks(modules):
            if any(training for _, training in modes):
                model.eval()
            with torch.no_grad():
                yield
    finally:
        for m, training in modes:
            if m.training != training:
                m.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


# torch's fp32_precision settings (torch >= 2.9), parents before children: setting a parent
# overwrites its children, so restoring in this order puts every value back as it was.
FP32_PRECISION_KEYS = (
    ("generic", "all"),
    ("cuda", "all"), ("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"),
    ("mkldnn", "all"), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"),
)


@contextmanager
def full_fp32_precision():
    """float32 matmuls and convolutions in full IEEE precision inside; the user's settings
    restored exactly on exit, whichever API set them.

    With torch's ``fp32_precision`` API every (backend, op) value is saved and set to "ieee"
    (the legacy getter ``torch.get_float32_matmul_precision`` raises once the new API has been
    used, and the legacy setter would turn "none" into "ieee"); the legacy matmul precision and
    allow_tf32 flags are views of the same values. Older torch: the legacy settings.
    """
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    setter = getattr(torch._C, "_set_fp32_precision_setter", None)
    if getter is None or setter is None:
        precision = torch.get_float32_matmul_precision()
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        try:
            torch.set_float32_matmul_precision("highest")
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            yield
        finally:
            torch.set_float32_matmul_precision(precision)
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        return
    saved = {key: getter(*key) for key in FP32_PRECISION_KEYS}
    try:
        for key in FP32_PRECISION_KEYS:
            setter(*key, "ieee")
        yield
    finally:
        for key in FP32_PRECISION_KEYS:
            setter(*key, saved[key])


@contextmanager
def without_autocast(model: torch.nn.Module):
    """No autocast inside (a manual-optimisation training_step runs the optimizer step, hence
    the probe, inside the trainer's autocast); the outer autocast state comes back on exit."""
    devices = {"cpu"}
    devices.update(p.device.type for p in model.parameters())
    if torch.cuda.is_available():
        devices.add("cuda")
    with ExitStack() as stack:
        for device in sorted(devices):
            stack.enter_context(torch.autocast(device_type=device, enabled=False))
        yield


@contextmanager
def without_training_hooks(modules: list[torch.nn.Module]):
    """Gradient checkpointing flags off and the input-require-grads forward hooks (transformers'
    ``enable_input_require_grads``, peft's ``make_inputs_require_grad``) detached inside: they
    exist for backward passes and call ``requires_grad_`` on activations, which forward-mode AD
    refuses. Each module's flag and hook dict (same dict, same order) restored on exit. The
    reverse derivative pass checkpoints the flagged decoder layers itself, in eval mode
    (``checkpointing.py``).
    ``modules``: the model's ``modules()``, listed once by the caller."""
    flags = [m for m in modules if getattr(m, "gradient_checkpointing", None) is True]
    hooked = [(m, dict(m._forward_hooks)) for m in modules
              if m._forward_hooks and any(_requires_grads_hook(h)
                                          for h in m._forward_hooks.values())]
    try:
        for m in flags:
            m.gradient_checkpointing = False
        for m, hooks in hooked:
            for key, hook in hooks.items():
                if _requires_grads_hook(hook):
                    del m._forward_hooks[key]
        with suspended(flags):  # the reverse pass checkpoints these layers (checkpointing.py)
            yield
    finally:
        for m in flags:
            m.gradient_checkpointing = True
        for m, hooks in hooked:
            m._forward_hooks.clear()
            m._forward_hooks.update(hooks)


def _requires_grads_hook(hook) -> bool:
    return getattr(hook, "__name__", "").startswith("make_inputs_require_grad")


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
            with contained(name, self.step, self.strict, self):
                yield
        finally:
            self.timing[name] = self.timing.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def contained(name: str, step: int | None, strict: bool, runner: PhaseRunner | None = None,
              allow: tuple[type[Exception], ...] = ()):
    """The barrier between the probe and training: an exception inside becomes an
    ``EntropyProbeWarning`` (and ``runner.error``, when a runner is given and holds none yet);
    with ``strict`` it is raised as ``ProbeFailure``. ``step`` None: not at a step (setup).
    ``allow``: exception types that pass through (bad input at setup: ``ProbeConfigError``)."""
    try:
        yield
    except allow:
        raise
    except Exception as exc:  # the observer contract: never crash the run
        where = f"phase '{name}'" + ("" if step is None else f" at step {step}")
        if runner is not None and runner.error is None:
            runner.error = {
                "phase": name,
                "type": type(exc).__name__,
                "message": str(exc)[:2000],
                "traceback": traceback.format_exc(limit=8)[-4000:],
            }
        if strict:
            if isinstance(exc, ProbeFailure):
                raise
            raise ProbeFailure(f"entropy probe failed in {where}: {exc}") from exc
        warnings.warn(
            f"entropy probe failed in {where} ({type(exc).__name__}: {exc}); training "
            "continues" + (" and the JSON log holds an error record" if runner else "")
            + ". Pass strict=True to raise instead.",
            EntropyProbeWarning,
            stacklevel=3,
        )
