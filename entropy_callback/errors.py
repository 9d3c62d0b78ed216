"""The probe's warning and failure types (torch-free, so that sinks and readers can use them
without loading the engine)."""

from __future__ import annotations

__all__ = ["EntropyProbeWarning", "ProbeFailure"]


class EntropyProbeWarning(UserWarning):
    """Something about the probe the user should know; training goes on."""


class ProbeFailure(RuntimeError):
    """Raised with ``strict=True`` when a phase of the probe fails."""
