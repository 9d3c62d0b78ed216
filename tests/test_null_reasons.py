"""A null number says why, truthfully, and a record with a null core estimate is never
``reliable``. Real probes of the tiny float64 LoRA policy with a real AdamW step."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from entropy_callback import EntropyProbe, ProbeConfig
from entropy_callback.demos import build_policy
from entropy_callback.testing import randomize_lora_b

pytestmark = pytest.mark.usefixtures("single_thread")


def probe_step(lr: float):
    """One probed AdamW step at learning rate ``lr`` (0: the first step of a linear warmup)."""
    model, tok = build_policy(seed=0, dtype=torch.float64, attn_implementation="sdpa")
    randomize_lora_b(model, std=0.05, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    enc = tok(["3+4=7", "1+1=2"], return_tensors="pt", padding=True)
    model(**enc, labels=enc["input_ids"]).loss.backward()
    probe = EntropyProbe(model, tok, ["1+2=", "33+4=", "5="],
                         ProbeConfig(batch_size=16, max_new_tokens=4))
    probe.before_step(opt, step=0)
    opt.step()
    result = probe.after_step()
    assert result.error is None, result.error
    return result


def test_a_zero_learning_rate_is_named_as_the_cause():
    result = probe_step(lr=0.0)
    assert result.learning_rate == 0 and result.update_norm == 0
    for name in ("update_cosine", "update_rel_error"):
        assert result.update_cosine is None
        reason = result.null_reasons[name]
        assert "learning rate is 0" in reason and "advantages" not in reason, reason
    assert result.bars_dot is None
    assert "learning rate is 0" in result.null_reasons["bars_dot"]
    assert result.core()["null_reasons"]["bars_dot"] == result.null_reasons["bars_dot"]


def test_a_zero_step_at_a_positive_learning_rate_keeps_the_gradient_reason():
    result = probe_step(lr=1e-3)
    assert "bars_dot" not in result.null_reasons and result.bars_dot is not None
    assert "update_cosine" not in result.null_reasons


@pytest.mark.parametrize("field", ["deltaH1", "deltaH_true"])
def test_a_null_core_estimate_is_never_reliable(field):
    # estimate() sets reliable from ESS alone; a non-finite deltaH1 (a NaN Adam rebuild) or
    # deltaH_true becomes null in sanitize(), which must then say unreliable
    healthy = probe_step(lr=1e-3)
    assert healthy.reliable is True
    broken = dataclasses.replace(healthy, **{field: math.nan}, null_reasons={})
    core = broken.to_dict()["core_results"]
    assert core[field] is None and core["null_reasons"][field]
    assert core["reliable"] is False and broken.ground_truth()["diagnostics"]["reliable"] is False
