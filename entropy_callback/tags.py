"""The tags every scalar sink writes (TensorBoard, metric loggers): names, values, the Custom
Scalars layout. Torch-free: a sink or a reader derives its tags here without loading the engine.

Tags live under ``<prefix>/`` (the probe's name, ``entropy_probe`` by default) and are written at
``step = result.step`` (the probed optimizer step t, the same index every sink uses):

- ``<prefix>/<name>``: each quantity declared with ``scalar=True`` in ``result.QUANTITIES``
  (entropy quantities in nats per token with ``normalize="per_token"``, per response with
  ``"per_sequence"``);
- ``<prefix>/deltaH_true_lo2se``, ``_hi2se``: ΔH_true ∓ 2 SE;
- ``<prefix>/attribution/<part>``: each declared attribution part with ``scalar=True``;
- ``<prefix>/time/<phase>``: seconds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .result import ATTRIBUTION_SCALARS, SCALAR_FIELDS, ProbeResult, finite_float

__all__ = ["LAYOUT_SUBDIR", "MARGIN_CHART", "MULTILINE_CHART", "PREFIX", "attribution_scalars",
           "layout", "layout_subdir", "scalars"]

PREFIX = "entropy_probe"
MULTILINE_CHART = "predicted vs true ΔH"
MARGIN_CHART = "ΔH_true ± 2 SE"


def layout(prefix: str = PREFIX) -> dict[str, dict[str, list[Any]]]:
    """The Custom Scalars layout, in ``SummaryWriter.add_custom_scalars`` form.

    Multiline tags are regexes (anchored with ``$`` so that ``deltaH1`` does not also match
    ``deltaH1_se``); the margin chart takes exact tags (value, lower, upper).
    """
    true = f"{prefix}/deltaH_true"
    quoted = re.escape(prefix)
    return {
        prefix: {
            MULTILINE_CHART: ["Multiline", [rf"{quoted}/deltaH1$", rf"{quoted}/deltaH_true$"]],
            MARGIN_CHART: ["Margin", [true, f"{true}_lo2se", f"{true}_hi2se"]],
        }
    }


def layout_subdir(prefix: str = PREFIX) -> str:
    """The run subdirectory holding the layout of the probe named ``prefix``."""
    return f"{prefix}_layout"


LAYOUT_SUBDIR = layout_subdir()


def scalars(result: ProbeResult, prefix: str = PREFIX) -> dict[str, float]:
    """The tag -> value pairs one probe writes (missing and non-finite values left out)."""
    out: dict[str, float] = {}
    for name in SCALAR_FIELDS:
        value = finite_float(result.get(name))
        if value is not None:
            out[f"{prefix}/{name}"] = value
    true, se = finite_float(result.deltaH_true), finite_float(result.deltaH_true_se)
    if true is not None and se is not None:
        out[f"{prefix}/deltaH_true_lo2se"] = true - 2.0 * se
        out[f"{prefix}/deltaH_true_hi2se"] = true + 2.0 * se
    out.update(attribution_scalars(result.attribution, prefix))
    for phase, seconds in (result.timing or {}).items():
        value = finite_float(seconds)
        if value is not None:
            out[f"{prefix}/time/{phase}"] = value
    return out


def attribution_scalars(section: Mapping[str, Any] | None,
                        prefix: str = PREFIX) -> dict[str, float]:
    """The tags ``<prefix>/attribution/<part>`` of a record's attribution section: each part
    declared with ``scalar=True`` (missing and non-finite values left out)."""
    parts = section.get("parts") if isinstance(section, Mapping) else None
    if not isinstance(parts, Mapping):
        return {}
    out = {}
    for name in ATTRIBUTION_SCALARS:
        value = finite_float(parts.get(name))
        if value is not None:
            out[f"{prefix}/attribution/{name}"] = value
    return out
