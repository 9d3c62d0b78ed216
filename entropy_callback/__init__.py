"""entropy-callback: what each optimizer step does to a language model policy's entropy.

Predicted (first order, delta H_1 = g_hat . Delta theta from the live AdamW state) and true
(Delta H_true by self-normalised importance sampling) entropy change of probed steps.
"""

from .config import ProbeConfig, ProbeConfigError
from .lightning import EntropyProbeCallback
from .observer import EntropyProbeWarning, ProbeFailure
from .probe import EntropyProbe
from .result import ProbeResult
from .runlog import load_run

__version__ = "0.1.0"

__all__ = [
    "EntropyProbe",
    "EntropyProbeCallback",
    "EntropyProbeWarning",
    "ProbeConfig",
    "ProbeConfigError",
    "ProbeFailure",
    "ProbeResult",
    "__version__",
    "load_run",
]
