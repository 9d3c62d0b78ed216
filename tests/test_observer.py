"""The observer contract (design.md): a probed run is bitwise the run without the probe.

After training, the parameters, gradients, optimizer and scheduler state, every RNG stream
(torch CPU, numpy, python), the train/eval mode of every submodule, requires_grad flags and the
model config must be exactly what they are without the probe. LoRA dropout is active in
training, so a probe that left the model in eval mode, or drew from a global RNG, changes the
run. And the probe's own numbers are reproducible from its seed.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import lightning
import numpy as np
import pytest
import torch

from entropy_callback import EntropyProbe, ProbeConfig
from entropy_callback.demos.grpo import make_prompts, sample_responses, score_responses
from entropy_callback.demos.tiny import build_policy

pytestmark = pytest.mark.usefixtures("single_thread")

EVERY, MAX_STEPS = 10, 40
DUE = [0, 10, 20, 30]
CLIP = 0.02  # below every step's gradient norm: clipping acts on every step
DROPOUT = 0.1
RESULT_FIELDS = ("deltaH1", "deltaH1_se", "deltaH_true", "deltaH_true_se", "H_orig", "H_upd",
                 "ESS", "bars_dot", "learning_rate", "update_cosine", "update_rel_error")


def _lora_dropout_active(model: torch.nn.Module) -> bool:
    drops = [m for n, m in model.named_modules()
             if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    return bool(drops) and all(m.p == DROPOUT and m.training for m in drops)


# ------------------------------------------------------------------ Lightning
class ResultCollector(lightning.Callback):
    """Keeps every ProbeResult the probe callback (listed before it) emitted."""

    def __init__(self, probe) -> None:
        self.probe = probe
        self.results = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = self.probe.last_result
        if last is not None and (not self.results or self.results[-1] is not last):
            self.results.append(last)


@pytest.fixture(scope="module")
def lightning_runs(single_thread, make_grpo, make_probe, fit, observer, tmp_path_factory):
    """The same 40-step demo run without the probe, with it, and with it again."""
    runs = {}
    for name in ("without", "with", "with_again"):
        module = make_grpo(seed=0, lora_dropout=DROPOUT)
        assert _lora_dropout_active(module.model)
        initial = observer.capture(module.model, None)
        probe = None if name == "without" else make_probe(EVERY, strict=True)
        collector = None if probe is None else ResultCollector(probe)
        trainer = fit(module, tmp_path_factory.mktemp(name), max_steps=MAX_STEPS,
                      callbacks=() if probe is None else (probe, collector),
                      accumulate_grad_batches=2, gradient_clip_val=CLIP)
        results = [] if collector is None else collector.results
        # captured at once: nothing may draw from the global RNGs in between
        final = observer.capture(module.model, trainer.optimizers[0],
                                 trainer.lr_scheduler_configs[0].scheduler)
        runs[name] = SimpleNamespace(module=module, probe=probe, results=results,
                                     initial=initial, final=final,
                                     module_training=module.training)
    return runs


def test_lightning_run_with_the_probe_is_bitwise_the_run_without(lightning_runs, observer):
    without, probed = lightning_runs["without"], lightning_runs["with"]
    # The probe really measured every due step.
    assert probed.probe.probed_steps == DUE
    assert [r.step for r in probed.results] == DUE
    for r in probed.results:
        assert r.ok and math.isfinite(r.deltaH1) and math.isfinite(r.deltaH_true)
        # (a step whose groups all tie has no advantage, no gradient and no update: no cosine)
        assert r.update_norm == 0 or r.update_cosine >= 1 - 1e-6
    assert sum(r.update_norm > 0 for r in probed.results) >= 3
    # Not vacuous: training moved the LoRA weights, Adam took 40 steps, dropout stayed on.
    moved = [n for n, p in without.final["params"].items()
             if "lora_B" in n and not torch.equal(p, without.initial["params"][n])]
    assert moved
    assert all(float(s["step"]) == MAX_STEPS for s in without.final["optimizer"].values())
    assert _lora_dropout_active(without.module.model)
    # The contract: weights, grads, Adam and scheduler state, RNG streams, modes, flags, config.
    assert observer.differences(without.final, probed.final) == []
    assert probed.module_training == without.module_training
    assert _lora_dropout_active(probed.module.model)


def test_lightning_probe_results_are_reproducible(lightning_runs):
    first, second = lightning_runs["with"].results, lightning_runs["with_again"].results
    assert [r.step for r in first] == [r.step for r in second] == DUE
    for a, b in zip(first, second, strict=True):
        for name in RESULT_FIELDS:
            assert getattr(a, name) == getattr(b, name), (a.step, name)
        assert a.sequences == b.sequences


# ------------------------------------------------------------------ the engine, no framework
def plain_loop(observer, heldout_prompts, *, probed: bool, steps: int = 9, every: int = 4,
               derivative: str = "auto"):
    """A hand-written REINFORCE loop: AdamW with weight decay, norm clipping, LoRA dropout.

    It draws from all three global RNGs (python: prompts; torch: sampling and dropout; numpy:
    a baseline jitter), so a probe that consumed any of them would change the run. The last
    step (8) is probed and its gradients are left in place for the comparison.
    """
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model, tok = build_policy(seed=0, lora_dropout=DROPOUT, hidden_size=32, num_layers=1,
                              num_heads=2, intermediate_size=64, lora_r=4)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    probe = None
    if probed:
        config = ProbeConfig(batch_size=16, microbatch_size=8, max_new_tokens=4, seed=7,
                             log_level="detailed", derivative=derivative)
        probe = EntropyProbe(model, tok, heldout_prompts, config)
    pool = make_prompts(64, seed=0)
    results = []
    for step in range(steps):
        prompts = [p for p in random.sample(pool, 4) for _ in range(2)]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids, lengths = sample_responses(model, enc["input_ids"], enc["attention_mask"],
                                        max_new_tokens=4, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id)
        logp, _, _ = score_responses(model, enc["input_ids"], enc["attention_mask"], ids,
                                     lengths)
        rewards = -lengths.float()
        baseline = rewards.mean() + float(np.random.normal(scale=1e-3))
        loss = -((rewards - baseline) * logp.sum(-1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        due = probe is not None and step % every == 0
        if due:
            probe.before_step(optimizer, step=step)
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        if due:
            results.append(probe.after_step())
    return observer.capture(model, optimizer), results, model


@pytest.mark.parametrize("derivative", ["forward", "reverse"])
def test_plain_loop_with_the_engine_is_bitwise_the_loop_without(observer, heldout_prompts,
                                                                derivative):
    """Either derivative pass (the reverse one runs backward passes: never into .grad)."""
    without, _, _ = plain_loop(observer, heldout_prompts, probed=False)
    probed, results, model = plain_loop(observer, heldout_prompts, probed=True,
                                        derivative=derivative)
    assert [r.step for r in results] == [0, 4, 8]
    for r in results:
        assert r.derivative == derivative
        assert r.ok and math.isfinite(r.deltaH1) and math.isfinite(r.deltaH_true), r.error
        assert r.update_cosine >= 1 - 1e-6 and r.update_rel_error <= 1e-5
    assert _lora_dropout_active(model)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in probed["grads"].values())
    assert observer.differences(without, probed) == []


def test_plain_loop_probe_results_are_reproducible(observer, heldout_prompts):
    _, first, _ = plain_loop(observer, heldout_prompts, probed=True, steps=5)
    _, second, _ = plain_loop(observer, heldout_prompts, probed=True, steps=5)
    assert [r.step for r in first] == [r.step for r in second] == [0, 4]
    for a, b in zip(first, second, strict=True):
        for name in RESULT_FIELDS:
            assert getattr(a, name) == getattr(b, name), (a.step, name)
        assert a.sequences == b.sequences
