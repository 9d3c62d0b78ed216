"""One declaration per reported quantity (``result.QUANTITIES``): a real probe's every declared
scalar reaches the record sections and TensorBoard tags the declaration names, and NaN clean-up
happens in one place (a ``ProbeResult``'s construction), after which it is read-only."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from entropy_callback import EntropyProbe, ProbeConfig
from entropy_callback.demos import build_policy
from entropy_callback.result import (
    ATTRIBUTION_PARTS,
    NONFINITE_REASON,
    QUANTITIES,
    RECORD_QUANTITIES,
    SECTIONS,
    ProbeResult,
    ResultDraft,
)
from entropy_callback.tags import PREFIX, attribution_scalars, scalars
from entropy_callback.testing import randomize_lora_b

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture()
def result() -> ProbeResult:
    """One probed AdamW step of the tiny float64 policy, with a two-point η sweep."""
    model, tok = build_policy(seed=0, dtype=torch.float64, attn_implementation="sdpa")
    randomize_lora_b(model, std=0.05, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    enc = tok(["3+4=7", "1+1=2"], return_tensors="pt", padding=True)
    model(**enc, labels=enc["input_ids"]).loss.backward()
    cfg = ProbeConfig(batch_size=16, max_new_tokens=4, eta_multipliers=(0.5, 1.0),
                      log_level="detailed")
    probe = EntropyProbe(model, tok, ["1+2=", "33+4=", "5="], cfg)
    probe.before_step(opt, step=0)
    opt.step()
    out = probe.after_step()
    assert out.error is None, out.error
    return out


def test_declared_field_quantities_are_result_fields():
    fields = {f.name for f in dataclasses.fields(ProbeResult)}
    for q in QUANTITIES:
        assert (q.name in fields) == (q.section == "field"), q.name
        assert q.section in SECTIONS, q.name
        assert not (q.core and q.section == "attribution"), q.name


def test_every_declared_quantity_reaches_the_sections_it_declares(result):
    record, core, tags = result.to_dict(), result.core(), scalars(result)
    for q in RECORD_QUANTITIES:
        value = result.get(q.name)
        assert isinstance(value, float) and math.isfinite(value), (q.name, value)
        assert (q.name in core) == q.core, q.name
        if q.core:
            assert core[q.name] == value
        assert (f"{PREFIX}/{q.name}" in tags) == q.scalar, q.name
        if q.scalar:
            assert tags[f"{PREFIX}/{q.name}"] == value
        if q.section == "diagnostics":
            assert record["ground_truth"]["diagnostics"][q.name] == value
    # nothing numeric reaches core_results or TensorBoard without a declaration
    declared = {q.name for q in RECORD_QUANTITIES}
    numbers = {k for k, v in core.items() if isinstance(v, float)}
    assert numbers <= declared, numbers - declared
    undeclared = {t for t in tags if "/time/" not in t and not t.endswith("2se")}
    assert undeclared <= {f"{PREFIX}/{n}" for n in declared}
    # the correction and its parts, here and at every sweep point
    assert result.deltaH_true == pytest.approx(
        result.get("deltaH_true_raw") - result.get("deltaH_true_bias"), rel=1e-12, abs=1e-15)
    for point in result.eta_sweep:
        assert point["deltaH_true"] == pytest.approx(
            point["deltaH_true_raw"] - point["deltaH_true_bias"], rel=1e-12, abs=1e-15)


def test_set_refuses_an_undeclared_quantity():
    with pytest.raises(KeyError):
        ResultDraft(step=0).set(deltaH_2=0.1)


def test_a_result_refuses_every_write(result):
    """Nothing changes a ProbeResult after the engine returned it: its fields, and every dict
    and list inside it, refuse writes; a changed copy comes from dataclasses.replace."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.deltaH1 = 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.error = {"phase": "x"}
    writes = [lambda: result.null_reasons.update(deltaH1="x"),
              lambda: result.timing.__setitem__("total", 0.0),
              lambda: result.diagnostics.pop("deltaH_true_raw"),
              lambda: result.eta_sweep[0].__setitem__("H_upd", 0.0),
              lambda: result.eta_sweep.append({}),
              lambda: result.sequences["rb_entropy"].__setitem__(0, 0.0),
              lambda: result.batch_statistics["E_batch"].clear(),
              lambda: result.warnings.append("x")]
    for write in writes:
        with pytest.raises(TypeError, match="read-only"):
            write()
    copy = dataclasses.replace(result, deltaH1=float("nan"))
    assert copy.deltaH1 is None and copy.null_reasons["deltaH1"] == NONFINITE_REASON
    assert result.deltaH1 is not None and "deltaH1" not in result.null_reasons
    record = result.to_dict()  # a plain, writable copy
    record["core_results"]["deltaH1"] = None
    assert result.deltaH1 is not None


def test_non_finite_values_are_cleaned_in_one_place(result):
    sweep = [dict(p) for p in result.eta_sweep]
    sweep[0]["H_upd"] = float("-inf")
    sequences = {k: list(v) for k, v in result.sequences.items()}
    sequences["rb_entropy"][0] = float("nan")
    result = dataclasses.replace(  # cleaned at construction
        result, deltaH1=float("nan"), eta_sweep=sweep, sequences=sequences,
        diagnostics={**result.diagnostics, "deltaH_true_bias": float("inf")},
        attribution={"parts": {"momentum": float("nan"), "residual": 0.5}})
    record = result.to_dict()
    assert record["core_results"]["deltaH1"] is None
    assert record["core_results"]["null_reasons"]["deltaH1"] == NONFINITE_REASON
    assert record["ground_truth"]["diagnostics"]["deltaH_true_bias"] is None
    assert record["ground_truth"]["eta_sweep"][0]["H_upd"] is None
    assert record["sequences"]["E_batch"][0]["rb_entropy"] is None
    assert record["attribution"]["parts"] == {"momentum": None, "residual": 0.5}
    assert f"{PREFIX}/deltaH1" not in scalars(result)
    assert result.to_dict() == record  # idempotent


def test_attribution_tags_are_the_declared_scalar_parts():
    """Each attribution part declared scalar is a tag ``<prefix>/attribution/<part>``, the
    others are not; non-finite and missing parts are left out."""
    section = {"parts": {q.name: 0.5 + i for i, q in enumerate(ATTRIBUTION_PARTS)}}
    tags = attribution_scalars(section, "p")
    assert set(tags) == {f"p/attribution/{q.name}" for q in ATTRIBUTION_PARTS if q.scalar}
    assert tags["p/attribution/momentum"] == 0.5
    section["parts"]["momentum"] = float("nan")
    del section["parts"]["residual"]
    assert {"p/attribution/momentum", "p/attribution/residual"}.isdisjoint(
        attribution_scalars(section, "p"))
    assert attribution_scalars({"error": {"phase": "attribution"}}) == {}
