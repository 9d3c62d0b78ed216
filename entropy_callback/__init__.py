"""entropy-callback: what each optimizer step does to a language model policy's entropy.

Predicted (first order, delta H_1 = g_hat . Delta theta from the live AdamW state) and true
(Delta H_true by self-normalised importance sampling) entropy change of probed steps.

``import entropy_callback`` loads the config, the result and the sink layer only (no torch): the
engine and the framework adapters are imported on first use (``entropy_callback.EntropyProbe``
imports torch then, ``EntropyProbeCallback`` Lightning, ``EntropyProbeTrainerCallback``
transformers), so the ``entropy-probe`` reader and a log-only user never load them.
"""

from __future__ import annotations

from typing import Any

from .config import ProbeConfig, ProbeConfigError
from .errors import EntropyProbeWarning, ProbeFailure
from .result import ProbeResult
from .runlog import load_run
from .sinks import RunLogger, Sink

__version__ = "0.1.0"

# name -> the module that defines it (the engine, the governor, the adapters), imported on
# first access
_LAZY = {"EntropyProbe": "probe", "EntropyGovernor": "governor", "GovernorPolicy": "governor",
         "EntropyProbeCallback": "lightning", "EntropyProbeTrainerCallback": "hf",
         "EntropyGovernorCallback": "governor_lightning",
         "EntropyGovernorTrainerCallback": "governor_hf", "ProbeSession": "session"}
# adapter module -> the extra that installs its framework
_EXTRA = {"lightning": "lightning", "hf": "hf", "governor_lightning": "lightning",
          "governor_hf": "hf"}

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
    "Sink",
    "__version__",
    "load_run",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    try:
        value = getattr(import_module(f".{module}", __name__), name)
    except ModuleNotFoundError as exc:
        extra = _EXTRA.get(module)
        if extra is None or exc.name is None or exc.name.startswith(__name__):
            raise
        raise ImportError(f"{name} needs {exc.name}, which is not installed: pip install "
                          f"'entropy-callback[{extra}]'") from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
