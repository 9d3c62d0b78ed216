"""The result of one probe and its JSON record (sections and names as in the seed formats)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

CORE_FIELDS = (
    "deltaH1",
    "deltaH1_se",
    "deltaH_true",
    "deltaH_true_se",
    "bars_dot",
    "learning_rate",
    "H_orig",
    "H_upd",
    "ess_fraction",
    "update_cosine",
    "update_rel_error",
)


def finite_float(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, not a number, or not finite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class ProbeResult:
    """One probed optimizer step.

    Units: entropies in nats per token (``normalize="per_token"``) or nats per response
    (``"per_sequence"``); ``bars_dot`` in those units per unit learning rate.
    Any field may be None when the probe could not compute it; ``null_reasons`` says why, and
    ``error`` is set (phase, type, message) when a phase failed.
    """

    step: int
    normalize: str = "per_token"
    B_E: int = 0
    T_E: int = 0
    learning_rate: float | None = None
    deltaH1: float | None = None
    deltaH1_se: float | None = None
    bars_dot: float | None = None
    deltaH_true: float | None = None
    deltaH_true_se: float | None = None
    H_orig: float | None = None
    H_upd: float | None = None
    ESS: float | None = None
    ess_fraction: float | None = None
    reliable: bool | None = None
    update_cosine: float | None = None
    update_rel_error: float | None = None
    update_source: str | None = None
    update_norm: float | None = None
    num_params: int = 0
    diagnostics: dict[str, Any] = field(default_factory=dict)
    eta_sweep: list[dict[str, Any]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    batch_statistics: dict[str, Any] = field(default_factory=dict)
    sequences: dict[str, list] = field(default_factory=dict)
    token_data: list[dict[str, Any]] = field(default_factory=list)
    raw_tensors: dict[str, list] = field(default_factory=dict)
    error: dict[str, str] | None = None
    null_reasons: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    attribution: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def core(self) -> dict[str, Any]:
        """core_results: the numbers one line of probes.jsonl carries."""
        out: dict[str, Any] = {"step": self.step}
        for name in CORE_FIELDS:
            out[name] = finite_or_none(getattr(self, name))
        out.update(
            B_E=self.B_E,
            T_E=self.T_E,
            normalize=self.normalize,
            ESS=finite_or_none(self.ESS),
            reliable=self.reliable,
            update_source=self.update_source,
        )
        if self.error is not None:
            out["error"] = self.error
        if self.null_reasons:
            out["null_reasons"] = dict(self.null_reasons)
        return out

    def ground_truth(self) -> dict[str, Any]:
        diag = {k: finite_or_none(v) for k, v in self.diagnostics.items()}
        diag.update(ESS=finite_or_none(self.ESS), ess_fraction=finite_or_none(self.ess_fraction))
        diag["reliable"] = self.reliable
        diag["is_mode"] = "snis_rb"
        return {
            "H_orig": finite_or_none(self.H_orig),
            "H_upd": finite_or_none(self.H_upd),
            "deltaH_true": finite_or_none(self.deltaH_true),
            "deltaH_true_se": finite_or_none(self.deltaH_true_se),
            "diagnostics": diag,
            "eta_sweep": [
                {k: finite_or_none(v) for k, v in point.items()} for point in self.eta_sweep
            ],
        }

    def to_dict(
        self,
        *,
        sequences: bool = True,
        token_data: bool = True,
        raw_tensors: bool = True,
        standard: bool = True,
    ) -> dict[str, Any]:
        """The JSON record (without run_metadata, which the writer adds).

        ``standard`` adds ground_truth and batch_statistics; ``sequences`` the per-sequence
        records; ``token_data`` the token-level data; ``raw_tensors`` the per-sequence raw
        vectors (each only when the probe collected it).
        """
        record: dict[str, Any] = {
            "core_results": self.core(),
            "timing": {k: float(v) for k, v in self.timing.items()},
            "update": {
                "source": self.update_source,
                "cosine": finite_or_none(self.update_cosine),
                "rel_error": finite_or_none(self.update_rel_error),
                "norm": finite_or_none(self.update_norm),
                "num_params": self.num_params,
            },
        }
        if self.warnings:
            record["warnings"] = list(self.warnings)
        if standard:
            record["ground_truth"] = self.ground_truth()
            record["batch_statistics"] = self.batch_statistics
        if sequences and self.sequences:
            record["sequences"] = {"E_batch": _rows(self.sequences)}
        if token_data and self.token_data:
            record["token_data"] = {"E_batch": self.token_data}
        if raw_tensors and self.raw_tensors:
            record["raw_tensors"] = self.raw_tensors
        if self.attribution is not None:
            record["attribution"] = self.attribution
        return record


def _rows(columns: dict[str, list]) -> list[dict[str, Any]]:
    """Column lists -> one dict per sequence."""
    names = list(columns)
    n = len(columns[names[0]]) if names else 0
    return [{k: finite_or_none(columns[k][i]) for k in names} for i in range(n)]
