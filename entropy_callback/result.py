"""The result of one probe and its JSON record (sections and names as in the seed formats).

Every reported scalar is declared once, in ``QUANTITIES``: its name, where it lives in the record
(a ``ProbeResult`` field, an entry of ``ground_truth.diagnostics``, or a part of the
``attribution`` section), whether it is a ``probes.jsonl`` field, whether it is a TensorBoard
scalar, its unit and description. ``core()``, the clean-up at construction, the tags
(``tags.scalars``), the attribution table of ``entropy-probe attribution`` and
``docs/log-schema.json`` (``python -m entropy_callback.schema``) derive from it. Adding a quantity
is one line here plus the estimator that returns it under that name (``ResultDraft.set``); a
"field" quantity also needs its typed attribute on ``ProbeResult``, an "attribution" part its
entry in ``attribution_report.parts``. This module imports no torch.

The engine fills a mutable ``ResultDraft`` and hands out one ``ProbeResult``: frozen (its
fields and every dict or list inside it refuse writes), non-finite numbers already cleaned.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Quantity:
    """One reported scalar.

    ``section``: "field" (a ``ProbeResult`` attribute), "diagnostics" (an entry of
    ``ProbeResult.diagnostics``, written under ``ground_truth.diagnostics``) or "attribution"
    (an entry of the record's ``attribution.parts``). ``core``: one of the numbers of
    ``core_results`` and of a ``probes.jsonl`` line. ``scalar``: written to TensorBoard as
    ``<probe name>/<name>`` (``<probe name>/attribution/<name>`` for an attribution part).
    ``unit``: for the docs and the reader. ``doc``: its description in the log schema.
    ``label``: its row in the attribution table (attribution parts; "" = not a row).
    ``integer``: a count (never null) rather than a number that may be null.
    """

    name: str
    section: str
    core: bool
    scalar: bool
    unit: str
    doc: str = ""
    label: str = ""
    integer: bool = False


SECTIONS = ("field", "diagnostics", "attribution")
_NATS = "nats per token (per_token) or per response (per_sequence)"
_PART = "the units of δH₁"
QUANTITIES: tuple[Quantity, ...] = (
    Quantity("deltaH1", "field", True, True, _NATS,
             "predicted entropy change δH₁ = ĝ·Δθ of step t, entropy units; positive = entropy "
             "rises"),
    Quantity("deltaH1_se", "field", True, True, _NATS,
             "standard error of deltaH1 (delta method), entropy units"),
    Quantity("deltaH_true", "field", True, True, _NATS + "; bias-corrected (jackknife)",
             "measured entropy change H(θ') − H(θ): the SNIS ratio H_upd − H_orig on the same E "
             "tokens with its O(1/B) bias removed by the jackknife (ground_truth.diagnostics "
             "holds the raw value and the bias), entropy units; positive = entropy rises"),
    Quantity("deltaH_true_se", "field", True, True, _NATS,
             "jackknife standard error of deltaH_true, entropy units"),
    Quantity("bars_dot", "field", True, True, "entropy units per unit learning rate",
             "deltaH1 / learning_rate: the predicted change per unit learning rate"),
    Quantity("learning_rate", "field", True, True, "the probed param group's lr",
             "η, the lr of the param group holding the probed parameters at step t"),
    Quantity("H_orig", "field", True, True, _NATS,
             "entropy of the policy before the step, on E, entropy units"),
    Quantity("H_upd", "field", True, True, _NATS,
             "entropy after the step (importance-weighted), entropy units"),
    Quantity("ess_fraction", "field", True, True, "ESS / B_E, in [0, 1]",
             "ESS / B_E of the importance weights, in (0, 1]"),
    Quantity("update_cosine", "field", True, True, "cosine, predicted vs observed step",
             "cosine between the reconstructed Adam step and the observed θ' − θ (≈ 1)"),
    Quantity("update_rel_error", "field", True, True, "‖predicted − observed‖/‖observed‖",
             "‖Δθ_pred − Δθ_obs‖ / ‖Δθ_obs‖"),
    Quantity("ESS", "field", True, False, "effective sample size, sequences",
             "effective sample size (Σw)² / Σw² of the importance weights"),
    Quantity("update_norm", "field", False, False, "‖observed step‖ over the probed parameters",
             "‖θ' − θ‖ over the probed parameters (update.norm)"),
    Quantity("deltaH_true_raw", "diagnostics", False, False, _NATS + "; plain SNIS, O(1/B) bias",
             "the plain SNIS ratio H_upd − H_orig (biased at O(1/B)), entropy units"),
    Quantity("deltaH_true_bias", "diagnostics", False, False,
             _NATS + "; jackknife estimate of the raw value's bias (raw − corrected)",
             "jackknife estimate of the raw value's O(1/B) bias, (B − 1)(mean_i raw₋ᵢ − raw); "
             "deltaH_true = deltaH_true_raw − deltaH_true_bias"),
    # attribution=True (docs/attribution.md): the parts of δH₁, in the table's order
    Quantity("momentum", "attribution", False, True, _PART,
             "ĝ_E · momentum: the earlier steps' gradients", "momentum (earlier steps' gradients)"),
    Quantity("weight_decay", "attribution", False, True, _PART, "ĝ_E · decay", "weight decay"),
    Quantity("rollouts", "attribution", False, True, _PART,
             "Σ_i δH_i over the step's update rollouts", "this step's rollouts"),
    Quantity("rollouts_pos_adv", "attribution", False, True, _PART,
             "Σ_i δH_i over the rollouts with advantage > 0", "  advantage > 0"),
    Quantity("rollouts_neg_adv", "attribution", False, True, _PART,
             "Σ_i δH_i over the rollouts with advantage < 0", "  advantage < 0"),
    Quantity("rollouts_zero_adv", "attribution", False, False, _PART,
             "Σ_i δH_i over the rollouts with advantage = 0", "  advantage = 0"),
    Quantity("tokens_pos_adv_high_p", "attribution", False, True, _PART,
             "Σ δH_it over tokens with A > 0 and log π above the step's mean",
             "  tokens A>0, high p"),
    Quantity("tokens_pos_adv_low_p", "attribution", False, True, _PART,
             "Σ δH_it over tokens with A > 0 and log π below the step's mean",
             "  tokens A>0, low p"),
    Quantity("tokens_neg_adv_high_p", "attribution", False, True, _PART,
             "Σ δH_it over tokens with A < 0 and log π above the step's mean",
             "  tokens A<0, high p"),
    Quantity("tokens_neg_adv_low_p", "attribution", False, True, _PART,
             "Σ δH_it over tokens with A < 0 and log π below the step's mean",
             "  tokens A<0, low p"),
    Quantity("residual", "attribution", False, True, _PART,
             "deltaH1 − (momentum + weight_decay + rollouts)", "residual (δH₁ − parts)"),
    Quantity("cui_proxy", "attribution", False, True, "nats × advantage units",
             "Cui et al.'s proxy −Cov_tokens(log π(y_t), A_t) over the update rollouts",
             "Cui proxy −Cov(log π, A)"),
    Quantity("cui_proxy_lr", "attribution", False, True, "nats × advantage units × lr",
             "learning_rate × cui_proxy", "  × learning rate"),
    Quantity("gradient_consumed", "attribution", False, False, _PART,
             "ĝ_E · κ g / D with the gradient the optimizer consumed"),
    Quantity("reverse_total", "attribution", False, False, _PART, "ĝ_E · Δθ (reverse mode)"),
    Quantity("clip_coefficient", "attribution", False, False, "dimensionless",
             "c: the clipping coefficient times the loss scale"),
    Quantity("clip_offset", "attribution", False, False, "relative norm",
             "‖consumed − c_clip raw‖ / ‖consumed‖ (0 for clipping by norm)"),
    Quantity("protocol_error", "attribution", False, False, "relative",
             "how far per_token_loss's gradient is from the one the step consumed"),
    Quantity("num_rollouts", "attribution", False, False, "rollouts",
             "update rollouts of the step", integer=True),
    Quantity("num_tokens", "attribution", False, False, "tokens",
             "response tokens of the update rollouts", integer=True),
)
QUANTITY = {q.name: q for q in QUANTITIES}
RECORD_QUANTITIES = tuple(q for q in QUANTITIES if q.section != "attribution")
ATTRIBUTION_PARTS = tuple(q for q in QUANTITIES if q.section == "attribution")
CORE_FIELDS = tuple(q.name for q in QUANTITIES if q.core)
SCALAR_FIELDS = tuple(q.name for q in RECORD_QUANTITIES if q.scalar)
ATTRIBUTION_SCALARS = tuple(q.name for q in ATTRIBUTION_PARTS if q.scalar)
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


def finite_tree(value: Any) -> Any:
    """``finite_or_none`` through dicts, lists and tuples (a new container; leaves as they are
    otherwise): the one non-finite clean-up of a record's sections."""
    if isinstance(value, dict):
        return {k: finite_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_tree(v) for v in value]
    return finite_or_none(value)




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
        for q in RECORD_QUANTITIES:
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
        for name in ("diagnostics", "eta_sweep", "sequences", "raw_tensors", "attribution"):
            values[name] = finite_tree(values[name])
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
