"""entropy-callback: what each optimizer step does to a language model policy's entropy.

Predicted (first order, delta H_1 = g_hat . Delta theta from the live AdamW state) and true
(Delta H_true by self-normalised importance sampling) entropy change of probed steps.

``import entropy_callback`` loads the engine and the sinks only; the framework adapters are
imported on first use (``from entropy_callback import EntropyProbeCallback`` imports Lightning
then), so an engine or plain-loop user never imports Lightning or transformers' Trainer.
"""

from __future__ import annotations

from typing import Any

from .config import ProbeConfig, ProbeConfigError
from .governor import EntropyGovernor, GovernorPolicy
from .observer import EntropyProbeWarning, ProbeFailure
from .probe import EntropyProbe
from .result import ProbeResult
from .runlog import load_run
from .sinks import RunLogger

__version__ = "0.1.0"

# name -> the adapter module that defines it, imported on first access
_LAZY = {"EntropyProbeCallback": "lightning", "EntropyProbeTrainerCallback": "hf",
         "EntropyGovernorCallback": "governor_lightning",
         "EntropyGovernorTrainerCallback": "governor_hf", "ProbeSession": "session"}

__all__ = [
    "EntropyGovernor",
    "EntropyGovernorCallback",
    "EntropyGovernorTrainerCallback",
    "EntropyProbe",
    "EntropyProbeCallback",
    "EntropyProbeTrainerCallback",
    "EntropyProbeWarning",
    "ProbeConfig",
    "ProbeConfigError",
    "ProbeFailure",
    "GovernorPolicy",
    "ProbeResult",
    "ProbeSession",
    "RunLogger",
    "__version__",
    "load_run",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
