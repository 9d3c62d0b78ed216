"""The result of one probe and its JSON record (sections and names as in the seed formats).

Every reported scalar is declared once, in ``QUANTITIES``: its name, where it lives in the record
(a ``ProbeResult`` field, or an entry of ``ground_truth.diagnostics``),
whether it is a ``probes.jsonl`` field and whether it is a TensorBoard scalar. ``core()``,
``sanitize()`` and ``tensorboard.scalars`` derive from it. Adding a quantity is one line here
plus the estimator that returns it under that name (``ProbeResult.set``); a "field" quantity
also needs its typed attribute on ``ProbeResult``.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Quantity:
    """One reported scalar.

    ``section``: "field" (a ``ProbeResult`` attribute) or "diagnostics" (an entry of
    ``ProbeResult.diagnostics``, written under ``ground_truth.diagnostics``). ``core``: one of
    the numbers of ``core_results`` and of a ``probes.jsonl`` line. ``scalar``: written to
    TensorBoard as ``entropy_probe/<name>``. ``unit``: for the docs and the reader.
    """

    name: str
    section: str
    core: bool
    scalar: bool
    unit: str


_NATS = "nats per token (per_token) or per response (per_sequence)"
QUANTITIES: tuple[Quantity, ...] = (
    Quantity("deltaH1", "field", True, True, _NATS),
    Quantity("deltaH1_se", "field", True, True, _NATS),
    Quantity("deltaH_true", "field", True, True, _NATS + "; bias-corrected (jackknife)"),
    Quantity("deltaH_true_se", "field", True, True, _NATS),
    Quantity("bars_dot", "field", True, True, "entropy units per unit learning rate"),
    Quantity("learning_rate", "field", True, True, "the probed param group's lr"),
    Quantity("H_orig", "field", True, True, _NATS),
    Quantity("H_upd", "field", True, True, _NATS),
    Quantity("ess_fraction", "field", True, True, "ESS / B_E, in [0, 1]"),
    Quantity("update_cosine", "field", True, True, "cosine, predicted vs observed step"),
    Quantity("update_rel_error", "field", True, True, "‖predicted − observed‖/‖observed‖"),
    Quantity("ESS", "field", True, False, "effective sample size, sequences"),
    Quantity("update_norm", "field", False, False, "‖observed step‖ over the probed parameters"),
    Quantity("deltaH_true_raw", "diagnostics", False, False, _NATS + "; plain SNIS, O(1/B) bias"),
    Quantity("deltaH_true_bias", "diagnostics", False, False,
             _NATS + "; jackknife estimate of the raw value's bias (raw − corrected)"),
)
QUANTITY = {q.name: q for q in QUANTITIES}
CORE_FIELDS = tuple(q.name for q in QUANTITIES if q.core)
SCALAR_FIELDS = tuple(q.name for q in QUANTITIES if q.scalar)
NONFINITE_REASON = (
    "non-finite value (NaN/inf log-probs or entropies, or collapsed importance weights)"
)


def finite_float(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, not a number, or not finite (an
    integer beyond the float range, e.g. one of 4000 digits, counts as not finite)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class FrozenDict(dict):
    """A dict that refuses writes (a ``ProbeResult``'s sections); JSON sees a dict. For
    ``torch.load(weights_only=True)`` save plain copies (``thawed``, ``result.to_dict()``)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a ProbeResult is read-only; build a changed copy with "
                        "dataclasses.replace(result, ...)")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):
        return FrozenDict, (dict(self),)


class FrozenList(list):
    """A list that refuses writes (a ``ProbeResult``'s rows); JSON and pickle see a list."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a ProbeResult is read-only; build a changed copy with "
                        "dataclasses.replace(result, ...)")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = clear = extend = insert = pop = remove = reverse = sort = _refuse

    def __reduce__(self):
        return FrozenList, (list(self),)


def frozen(value: Any) -> Any:
    """``value`` with every dict and list inside it read-only (other objects as they are)."""
    if isinstance(value, dict):
        return FrozenDict({k: frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return FrozenList(frozen(v) for v in value)
    return value


def thawed(value: Any) -> Any:
    """A writable deep copy of ``value``'s dicts and lists (for a JSON record)."""
    if isinstance(value, dict):
        return {k: thawed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thawed(v) for v in value]
    return value


@dataclass(frozen=True)
class ProbeResult:
    """One probed optimizer step, read-only.

    Units: entropies in nats per token (``normalize="per_token"``) or nats per response
    (``"per_sequence"``); ``bars_dot`` in those units per unit learning rate.
    Any field may be None when the probe could not compute it; ``null_reasons`` says why, and
    ``error`` is set (phase, type, message) when a phase failed. ``batch_statistics["U_batch"]``
    holds the update batch's reward/advantage statistics when the adapter had them;
    ``attribution`` the split of delta H_1 (docs/attribution.md) when asked for.

    Built once (by the engine, or directly), cleaned once at construction: a declared quantity
    that is non-finite becomes None with its ``null_reasons`` entry (``NONFINITE_REASON``), one
    missing because a phase failed gets the failed phase as its reason. Nothing can write to it
    afterwards (``dataclasses.FrozenInstanceError``, ``TypeError`` for its dicts and lists);
    ``dataclasses.replace(result, ...)`` makes a changed, cleaned copy.
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
    derivative: str | None = None  # "forward" | "reverse": how delta H_1 was differentiated
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

    def get(self, name: str) -> Any:
        """A declared quantity's value (None when absent)."""
        if QUANTITY[name].section == "field":
            return getattr(self, name)
        return self.diagnostics.get(name)

    def __post_init__(self) -> None:
        """The one place where non-finite numbers become None (JSON has no NaN/inf), then every
        dict and list inside is made read-only."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["diagnostics"] = dict(values["diagnostics"])
        reasons = dict(values["null_reasons"])
        error = values["error"]
        for q in QUANTITIES:
            where = values if q.section == "field" else values["diagnostics"]
            value = where.get(q.name)
            if value is None:
                if error is not None and q.core:
                    reasons.setdefault(q.name, f"phase '{error['phase']}' failed: "
                                               f"{error['type']}")
            elif finite_or_none(value) is None:
                where[q.name] = None
                reasons.setdefault(q.name, NONFINITE_REASON)
        core_missing = None in (values["deltaH1"], values["deltaH_true"], values["ess_fraction"])
        if core_missing and values["reliable"] is not None:  # a null estimate is never reliable
            values["reliable"] = False
        values["null_reasons"] = reasons
        values["diagnostics"] = {k: finite_or_none(v) for k, v in values["diagnostics"].items()}
        values["eta_sweep"] = [{k: finite_or_none(v) for k, v in p.items()}
                               for p in values["eta_sweep"]]
        for name in ("sequences", "raw_tensors"):
            values[name] = {k: [finite_or_none(x) for x in col]
                            for k, col in values[name].items()}
        for name, value in values.items():
            object.__setattr__(self, name, frozen(value))

    def core(self) -> dict[str, Any]:
        """core_results: the numbers one line of probes.jsonl carries."""
        out: dict[str, Any] = {"step": self.step}
        for name in CORE_FIELDS:
            out[name] = self.get(name)
        out.update(
            B_E=self.B_E,
            T_E=self.T_E,
            normalize=self.normalize,
            reliable=self.reliable,
            update_source=self.update_source,
            derivative=self.derivative,
        )
        if self.error is not None:
            out["error"] = dict(self.error)
        if self.null_reasons:
            out["null_reasons"] = dict(self.null_reasons)
        return out

    def ground_truth(self) -> dict[str, Any]:
        diag = dict(self.diagnostics)
        diag.update(ESS=self.ESS, ess_fraction=self.ess_fraction)
        diag["reliable"] = self.reliable
        diag["is_mode"] = "snis_rb"
        return {
            "H_orig": self.H_orig,
            "H_upd": self.H_upd,
            "deltaH_true": self.deltaH_true,
            "deltaH_true_se": self.deltaH_true_se,
            "diagnostics": diag,
            "eta_sweep": [dict(point) for point in self.eta_sweep],
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
        vectors (each only when the probe collected it). A new, writable dict.
        """
        record: dict[str, Any] = {
            "core_results": self.core(),
            "timing": {k: float(v) for k, v in self.timing.items()},
            "update": {
                "source": self.update_source,
                "cosine": self.update_cosine,
                "rel_error": self.update_rel_error,
                "norm": self.update_norm,
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
        return thawed(record)


def _rows(columns: dict[str, list]) -> list[dict[str, Any]]:
    """Column lists -> one dict per sequence."""
    names = list(columns)
    n = len(columns[names[0]]) if names else 0
    return [{k: columns[k][i] for k in names} for i in range(n)]


_FIELDS = {f.name: f for f in fields(ProbeResult)}


class ResultDraft:
    """The engine's writable working copy of one probe's result, with ``ProbeResult``'s fields
    (and no others); ``freeze()`` hands out the one ``ProbeResult``."""

    def __init__(self, **values: Any) -> None:
        for name, f in _FIELDS.items():
            if name in values:
                value = values.pop(name)
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            else:
                value = f.default
            object.__setattr__(self, name, value)
        if values:
            raise TypeError(f"ProbeResult has no field(s) {sorted(values)}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _FIELDS:
            raise AttributeError(f"ProbeResult has no field {name!r}")
        object.__setattr__(self, name, value)

    def set(self, **values: Any) -> None:
        """Store declared quantities by name: a field, or an entry of ``diagnostics``."""
        for name, value in values.items():
            if QUANTITY[name].section == "field":
                setattr(self, name, value)
            else:
                self.diagnostics[name] = value

    def get(self, name: str) -> Any:
        """A declared quantity's value (None when absent)."""
        if QUANTITY[name].section == "field":
            return getattr(self, name)
        return self.diagnostics.get(name)

    def freeze(self, **values: Any) -> ProbeResult:
        """The ``ProbeResult`` of what the draft holds, with ``values`` on top (cleaned once)."""
        return ProbeResult(**{**{name: getattr(self, name) for name in _FIELDS}, **values})
