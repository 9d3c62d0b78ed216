"""The probe in the training setups practitioners use (docs/usage.md, "Supported setups").

The prediction is built from what the optimizer consumes: before the step the probe snapshots θ
and the Adam state, after it the step is rebuilt from that snapshot and the gradients Adam read
(``p.grad`` in its step post-hook). So anything between the probe's hook and the Adam math (a
module's own clipping, gradient repair, GradScaler's unscale, parameters left without gradients)
is in the prediction. Each setup runs a real Trainer on the tiny LoRA policy, in float64 where
the test judges numbers: there the rebuilt step equals torch's to round-off, hence the bar
cosine ≥ 1 − 1e-9 (measured: 1 − cosine ≤ 7.8e-16, relative error 0). Steps the optimizer does
not take are recorded as skipped and the probe re-arms. And in each setup the probed run is
bitwise the run without the probe (the observer contract, checked as in test_observer.py).
"""

from __future__ import annotations

import json
import math
import warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning
import pytest
import torch
from jsonschema import Draft202012Validator
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from probe_harness import Collect
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from entropy_callback import EntropyProbe, ProbeConfig
from entropy_callback.demos.grpo import (
    GRPOModule,
    make_prompts,
    sample_responses,
    score_responses,
    warmup_cosine,
)
from entropy_callback.demos.tiny import build_policy
from entropy_callback.observer import EntropyProbeWarning
from entropy_callback.runlog import load_run, load_step

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, lora_r=4)
PROBE = dict(batch_size=8, microbatch_size=8, max_new_tokens=4, strict=True)
EXACT = 1 - 1e-9  # float64: the rebuilt step is torch's own arithmetic, equal to round-off
SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "log-schema.json").read_text())


def length_reward(prompt: str, response: str) -> float:
    """A dense reward (the response text's length): every step has a gradient."""
    return float(len(response))


GRPO = dict(group_size=4, prompts_per_step=2, max_new_tokens=4, lr=3e-3, warmup_steps=4,
            total_steps=20, reward_fn=length_reward)


def run(module_cls, root: Path, prompts, *, every: int | None, max_steps: int = 4,
        dtype: torch.dtype = torch.float64, observer=None, prepare=None, callbacks=(),
        **trainer_options):
    """Fit ``module_cls`` (a GRPOModule subclass) on the tiny policy; ``every=None``: no probe.
    ``prepare(model)`` runs before the module is built (what it returns is kept as
    ``prepared``); ``callbacks`` come after the probe.

    Returns the probe's results, the records, the warnings and, with ``observer``, the state
    the observer contract protects, captured at once after fit.
    """
    lightning.seed_everything(0, verbose=False)
    model, tokenizer = build_policy(seed=0, dtype=dtype, attn_implementation="sdpa", **TINY)
    prepared = None if prepare is None else prepare(model)
    module = module_cls(model, tokenizer, make_prompts(32, seed=0), seed=0, **GRPO)
    probe = None if every is None else Collect(prompts, every=every, **PROBE)
    trainer = lightning.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps,
        logger=TensorBoardLogger(save_dir=str(root), name="run", version=0),
        callbacks=([] if probe is None else [probe]) + list(callbacks), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        **trainer_options,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    final = None if observer is None else observer.capture(model, trainer.optimizers[0])
    log_dir = Path(trainer.logger.log_dir)
    records = {} if probe is None else {r["step"]: r for r in load_run(log_dir)}
    return SimpleNamespace(module=module, model=model, trainer=trainer, final=final,
                           prepared=prepared,
                           results=[] if probe is None else probe.results, records=records,
                           log_dir=log_dir, probe=probe,
                           warnings=[str(w.message) for w in caught
                                     if issubclass(w.category, EntropyProbeWarning)])


def assert_observer(module_cls, tmp_path, prompts, observer, probed, **options) -> None:
    """The same run without the probe ends in bitwise the same state."""
    without = run(module_cls, tmp_path / "without", prompts, every=None, observer=observer,
                  **options)
    assert observer.differences(without.final, probed.final) == []


def assert_exact(results, steps) -> None:
    """Every listed step has a finite prediction whose rebuilt step is the observed one."""
    by_step = {r.step: r for r in results}
    for t in steps:
        r = by_step[t]
        assert r.error is None, r.error
        assert r.update_source == "adam_reconstruction"
        assert r.update_norm > 0
        assert r.update_cosine >= EXACT, (t, r.update_cosine)
        assert math.isfinite(r.deltaH1) and math.isfinite(r.deltaH_true)


# ------------------------------------------------------------------ the engine
def _reinforce_step(model, tokenizer, generator_seed: int) -> None:
    """One REINFORCE backward on the tiny task (length reward), real gradients on LoRA."""
    torch.manual_seed(generator_seed)
    prompts = [p for p in make_prompts(4, seed=generator_seed) for _ in range(2)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, lengths = sample_responses(model, enc["input_ids"], enc["attention_mask"],
                                    max_new_tokens=4, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id)
    logp, _, _ = score_responses(model, enc["input_ids"], enc["attention_mask"], ids, lengths)
    rewards = lengths.to(logp.dtype)
    (-((rewards - rewards.mean()) * logp.sum(-1)).mean()).backward()


def test_prediction_never_reads_the_updated_parameters(heldout_prompts):
    """δH₁ is a function of θ, the Adam state and the consumed gradients only: moving θ' after
    the optimizer step changes what is measured at θ' and the update check, never δH₁."""

    def probed_step(perturb: bool):
        model, tokenizer = build_policy(seed=0, dtype=torch.float64, **TINY)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=3e-3, weight_decay=0.01)
        probe = EntropyProbe(model, tokenizer, heldout_prompts,
                             ProbeConfig(batch_size=8, microbatch_size=8, max_new_tokens=4))
        _reinforce_step(model, tokenizer, 0)
        optimizer.step()  # an unprobed step first: Adam has momentum at the probed one
        optimizer.zero_grad(set_to_none=True)
        _reinforce_step(model, tokenizer, 1)
        probe.before_step(optimizer, step=1)
        optimizer.step()
        if perturb:
            noise = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for p in probe.params.values():
                    p.add_(0.05 * torch.randn(p.shape, generator=noise, dtype=p.dtype))
        return probe.after_step()

    plain, moved = probed_step(False), probed_step(True)
    assert plain.ok and moved.ok
    assert plain.update_cosine >= EXACT
    # the perturbation reached everything read at theta' ...
    assert moved.update_cosine < 0.9
    assert moved.deltaH_true != plain.deltaH_true and moved.H_upd != plain.H_upd
    # ... and nothing of the prediction
    assert moved.deltaH1 == plain.deltaH1 and moved.deltaH1_se == plain.deltaH1_se
    assert moved.H_orig == plain.H_orig


# ------------------------------------------------------------------ what the module does
OWN_CLIP = 0.05  # below the lora_B gradient norms of this task: the module's clipping acts


class CustomClipping(GRPOModule):
    """Clips only the lora_B gradients, by norm, in its own ``configure_gradient_clipping``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norms: list[float] = []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        params = [p for n, p in self.model.named_parameters() if "lora_B" in n]
        self.norms.append(float(torch.nn.utils.clip_grad_norm_(params, OWN_CLIP)))


class GradientRepair(GRPOModule):
    """NaN in some gradient entries after backward, replaced by 0 in the module's own
    ``on_before_optimizer_step`` (which Lightning runs after the callbacks')."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.repaired = 0

    def on_after_backward(self):
        for n, p in self.model.named_parameters():
            if "lora_A" in n and p.grad is not None:
                p.grad[0, :3] = float("nan")

    def on_before_optimizer_step(self, optimizer):
        for p in self.model.parameters():
            if p.grad is not None:
                self.repaired += int(p.grad.isnan().sum())
                torch.nan_to_num_(p.grad, nan=0.0)


class HalfWithoutGradients(GRPOModule):
    """From step 1 on, the lora_B tensors (half the LoRA tensors) are left with ``grad = None``:
    AdamW skips them, though they have momentum from step 0 (lora_A has none yet: with B = 0
    its gradient is zero at step 0)."""

    def on_after_backward(self):
        if self.trainer.global_step >= 1:
            for n, p in self.model.named_parameters():
                if "lora_B" in n:
                    p.grad = None


@pytest.mark.parametrize("module_cls", [CustomClipping, GradientRepair, HalfWithoutGradients])
def test_step_is_rebuilt_from_what_the_optimizer_consumed(module_cls, tmp_path, heldout_prompts,
                                                          observer):
    probed = run(module_cls, tmp_path / "with", heldout_prompts, every=1, observer=observer)
    assert [r.step for r in probed.results] == [0, 1, 2, 3]
    assert_exact(probed.results, [0, 1, 2, 3])
    # the setup does what it names
    if module_cls is CustomClipping:
        assert min(probed.module.norms) > OWN_CLIP
    if module_cls is GradientRepair:
        assert probed.module.repaired > 0
    if module_cls is HalfWithoutGradients:
        state = probed.final["optimizer"]
        lora_b = [n for n in state if "lora_B" in n]
        assert lora_b and all(float(state[n]["step"]) == 1 for n in lora_b)
        assert all(float(state[n]["step"]) == 4 for n in state if "lora_A" in n)
        assert all(bool(state[n]["exp_avg"].ne(0).any()) for n in lora_b)
    assert_observer(module_cls, tmp_path, heldout_prompts, observer, probed)


# ------------------------------------------------------------------ steps not taken
INF_STEP = 2


class InfiniteLossAt(GRPOModule):
    """At global step INF_STEP the loss is infinite: every gradient is inf/NaN."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.trainer.global_step == INF_STEP:
            out["loss"] = out["loss"] * float("inf")
        return out


class NoLossAt(GRPOModule):
    """At global step INF_STEP training_step returns None: no backward, no gradient."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        return None if self.trainer.global_step == INF_STEP else out


def _grad_scaler() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def _fused(module_cls):
    """``module_cls`` with fused AdamW: under GradScaler the scaler does not unscale p.grad
    before the step; it hands the scale to the fused kernel (``optimizer.grad_scale``), which
    unscales inside, writes the unscaled gradients back, and skips the step on inf/NaN."""

    class Fused(module_cls):
        def configure_optimizers(self):
            params = [p for p in self.model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay,
                                          fused=True)
            schedule = partial(warmup_cosine, warmup_steps=self.warmup_steps,
                               total_steps=self.total_steps)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    Fused.__name__ = f"Fused{module_cls.__name__}"
    return Fused


SKIPS = {
    # name: (module, trainer options, reason in the record)
    "grad-scaler": (InfiniteLossAt, dict(plugins=[_grad_scaler()]), "step count did not advance"),
    "grad-scaler-fused-adamw": (_fused(InfiniteLossAt), dict(plugins=[_grad_scaler()]),
                                "step count did not advance"),
    "training-step-none": (NoLossAt, dict(), "no probed parameter had a gradient"),
}


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("case", list(SKIPS))
def test_step_not_taken_is_recorded_as_skipped_and_the_probe_rearms(case, every, tmp_path,
                                                                     heldout_prompts, observer):
    module_cls, options, reason = SKIPS[case]
    probed = run(module_cls, tmp_path / "with", heldout_prompts, every=every, max_steps=5,
                 observer=observer, **options)
    # Lightning's step index advances over the skipped step; the optimizer's does not.
    assert probed.trainer.global_step == 5
    assert {float(s["step"]) for s in probed.final["optimizer"].values()} == {4.0}
    due = [t for t in range(5) if t % every == 0]
    expected = sorted(set(due) | {INF_STEP, INF_STEP + 1})  # the skipped step, then re-armed
    assert [r.step for r in probed.results] == expected
    assert sorted(probed.records) == expected
    skipped = probed.records[INF_STEP]
    assert skipped["update_source"] == "skipped"
    for name in ("deltaH1", "deltaH_true", "H_orig", "H_upd", "update_cosine", "ess_fraction"):
        assert skipped[name] is None
        assert reason in skipped["null_reasons"][name]
    assert_exact(probed.results, [t for t in expected if t != INF_STEP])
    # its own numbers: the re-armed step is measured on its own E batch and its own step
    after = probed.records[INF_STEP + 1]
    assert after["update_source"] == "adam_reconstruction"
    assert len([m for m in probed.warnings if "did not take step" in m]) == 1
    full = load_step(probed.log_dir, INF_STEP)
    assert full["update"]["source"] == "skipped"
    assert not list(Draft202012Validator(SCHEMA).iter_errors(full))
    events = EventAccumulator(str(probed.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    logged = [e.step for e in events.Scalars("entropy_probe/deltaH1")]
    assert logged == [t for t in expected if t != INF_STEP]
    assert_observer(module_cls, tmp_path, heldout_prompts, observer, probed, max_steps=5,
                    **options)


# ------------------------------------------------------------------ several steps per batch
class InnerEpochs(GRPOModule):
    """Manual optimisation, PPO style: two optimizer steps on each rollout batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for _ in range(2):
            out = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(out["loss"])
            opt.step()
        return out


class TwoOptimizers(GRPOModule):
    """Manual optimisation with a value head on its own optimizer, stepped between two policy
    steps: policy, value, policy per batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.value_head = torch.nn.Linear(4, 1, dtype=torch.float64)

    def configure_optimizers(self):
        policy = [p for p in self.model.parameters() if p.requires_grad]
        return (torch.optim.AdamW(policy, lr=self.lr),
                torch.optim.AdamW(self.value_head.parameters(), lr=1e-2))

    def training_step(self, batch, batch_idx):
        policy_opt, value_opt = self.optimizers()
        for opt in (policy_opt, value_opt, policy_opt):
            out = super().training_step(batch, batch_idx)
            loss = out["loss"] if opt is policy_opt else (
                self.value_head(out["rewards"].to(torch.float64).reshape(-1, 4)) ** 2).mean()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return out


@pytest.mark.parametrize("module_cls, policy_steps", [
    (InnerEpochs, [0, 1, 2, 3, 4, 5]),
    (TwoOptimizers, [0, 2, 3, 5]),  # global steps 1 and 4 are the value head's
])
def test_every_optimizer_step_of_a_batch_gets_its_own_record(module_cls, policy_steps, tmp_path,
                                                             heldout_prompts, observer):
    probed = run(module_cls, tmp_path / "with", heldout_prompts, every=1, max_steps=6,
                 observer=observer)
    assert probed.trainer.global_step == 6
    assert [r.step for r in probed.results] == policy_steps
    assert sorted(probed.records) == policy_steps
    events = EventAccumulator(str(probed.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("entropy_probe/deltaH1")] == policy_steps
    assert_exact(probed.results, policy_steps)
    # each record is its own step: distinct E batches (seeded by the step) and distinct steps
    assert len({r.H_orig for r in probed.results}) == len(policy_steps)
    assert len({r.update_norm for r in probed.results}) == len(policy_steps)
    assert_observer(module_cls, tmp_path, heldout_prompts, observer, probed, max_steps=6)


# ------------------------------------------------------------------ what the trainer wraps around
def _input_require_grads_hooks(model) -> list:
    return [(name, key, hook) for name, m in model.named_modules()
            for key, hook in m._forward_hooks.items()
            if getattr(hook, "__name__", "").startswith("make_inputs_require_grad")]


def _enable_checkpointing(model) -> list:
    """Checkpointing on, as peft / TRL set it up for adapters; returns the hooks it added."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames the method
        model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    return _input_require_grads_hooks(model)


def test_gradient_checkpointing_is_off_in_the_probe_and_restored(tmp_path, heldout_prompts,
                                                                   observer):
    probed = run(GRPOModule, tmp_path / "with", heldout_prompts, every=1, observer=observer,
                 prepare=_enable_checkpointing)
    assert_exact(probed.results, [0, 1, 2, 3])
    # still on, with the same hooks in the same places, after four probes
    flags = [m.gradient_checkpointing for m in probed.model.modules()
             if hasattr(m, "gradient_checkpointing")]
    assert flags and all(flags)
    assert probed.prepared and _input_require_grads_hooks(probed.model) == probed.prepared
    assert_observer(GRPOModule, tmp_path, heldout_prompts, observer, probed,
                    prepare=_enable_checkpointing)


class ManualStep(GRPOModule):
    """Manual optimisation: the optimizer step (and so the probe) runs inside training_step,
    inside the trainer's autocast under precision="bf16-mixed"."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        out = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(out["loss"])
        opt.step()
        return out


def test_no_outer_autocast_reaches_the_probe(tmp_path, heldout_prompts, observer):
    """Step 0 is probed at the same θ in both runs: its E batch and H_orig equal float32's."""
    mixed = run(ManualStep, tmp_path / "mixed", heldout_prompts, every=2, dtype=torch.float32,
                observer=observer, precision="bf16-mixed")
    full = run(ManualStep, tmp_path / "full", heldout_prompts, every=2, dtype=torch.float32)
    assert [r.step for r in mixed.results] == [0, 2]
    first_mixed, first_full = mixed.results[0], full.results[0]
    assert first_mixed.H_orig == first_full.H_orig
    assert first_mixed.deltaH1 != first_full.deltaH1  # training itself ran under autocast
    for r in mixed.results:
        assert r.ok and r.update_cosine >= 1 - 1e-6  # float32 weights: float32 round-off
    assert_observer(ManualStep, tmp_path, heldout_prompts, observer, mixed, dtype=torch.float32,
                    precision="bf16-mixed")


def _bf16(model) -> None:
    model.to(torch.bfloat16)  # peft keeps adapters in float32 on a bf16 base: cast them too


@pytest.mark.parametrize("case", ["bf16-weights", "bf16-true"])
def test_bf16_step_is_rebuilt_as_torch_takes_it(case, tmp_path, heldout_prompts, observer):
    options = (dict(dtype=torch.float32, prepare=_bf16) if case == "bf16-weights"
               else dict(dtype=torch.float32, precision="bf16-true"))
    probed = run(GRPOModule, tmp_path / "with", heldout_prompts, every=1, observer=observer,
                 **options)
    assert {p.dtype for p in probed.probe.probe.params.values()} == {torch.bfloat16}
    assert [r.step for r in probed.results] == [0, 1, 2, 3]
    for r in probed.results:
        assert r.ok and r.update_norm > 0
        # torch's own bf16 arithmetic replayed: the acceptance bar is cos >= 0.99999 and
        # rel error <= 1e-3 (a float64 rebuild rounded once gives 5e-3 ... 2.7e-2)
        assert r.update_cosine >= 0.99999 and r.update_rel_error <= 1e-3, r.step
    assert [m for m in probed.warnings if "bf16" in m and "precision floor" in m]
    assert_observer(GRPOModule, tmp_path, heldout_prompts, observer, probed, **options)


# ------------------------------------------------------------------ precision settings
def _set_nothing() -> None:
    """torch's defaults ("none" under the new API)."""


def _set_new_api() -> None:
    torch.backends.fp32_precision = "tf32"


def _set_legacy_api() -> None:
    torch.set_float32_matmul_precision("high")


class PrecisionSpy(lightning.Callback):
    """Reads the fp32 precision of every matmul backend inside the probe's passes (eval-mode
    forwards; the training forwards run in train mode)."""

    def __init__(self) -> None:
        self.inside: set[tuple[str, str]] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.model.get_base_model().lm_head.register_forward_pre_hook(self._read)

    def _read(self, module, args) -> None:
        if not module.training:
            self.inside.add((torch.backends.cuda.matmul.fp32_precision,
                             torch.backends.mkldnn.matmul.fp32_precision))


@pytest.fixture
def restore_precision():
    """Puts torch's precision settings back after the test, whatever it set."""
    keys = [("generic", "all")] + [(b, op) for b in ("cuda", "mkldnn")
                                   for op in ("all", "matmul", "conv", "rnn")]
    saved = {k: torch._C._get_fp32_precision_getter(*k) for k in keys}
    yield
    for k in keys:
        torch._C._set_fp32_precision_setter(*k, saved[k])


@pytest.mark.parametrize("setter", [_set_nothing, _set_new_api, _set_legacy_api],
                         ids=["default", "new-api", "legacy"])
def test_user_precision_settings_are_left_as_set(setter, tmp_path, heldout_prompts, observer,
                                                 restore_precision):
    setter()
    before = observer.precision()
    spy = PrecisionSpy()
    probed = run(GRPOModule, tmp_path / "with", heldout_prompts, every=2, observer=observer,
                 callbacks=[spy])
    assert [r.step for r in probed.results] == [0, 2] and all(r.ok for r in probed.results)
    assert probed.final["matmul_precision"] == before  # every (backend, op) value as set
    if setter is _set_legacy_api:
        assert torch.get_float32_matmul_precision() == "high"
    elif setter is _set_new_api:
        assert torch.backends.fp32_precision == "tf32"
    assert spy.inside == {("ieee", "ieee")}  # the probe's own passes: full fp32
    assert_observer(GRPOModule, tmp_path, heldout_prompts, observer, probed)
