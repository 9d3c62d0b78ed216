"""The probe never harms a run: failures inside it, and non-finite numbers, in real runs.

A fault is injected by making one internal function of the package raise at one chosen step;
everything else is real (Lightning Trainer, peft LoRA, AdamW, TensorBoardLogger, JSON files).
One run carries every fault, one per probed step, with clean probes before and after them.
"""

from __future__ import annotations

import errno
import gc
import math
from types import SimpleNamespace

import lightning
import pytest
import torch
from probe_harness import (
    SMALL_PROBE,
    StepClock,
    backward_on,
    fit,
    grpo_module,
    jsonl_records,
    lora_state,
    make_trainer,
    probe_callback,
    probe_dir,
    probe_prompts,
    step_record,
    tiny_policy,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from entropy_callback import (
    EntropyProbe,
    EntropyProbeCallback,
    ProbeFailure,
    ProbeResult,
    jsonlog,
)
from entropy_callback import probe as probe_module
from entropy_callback import records as records_module
from entropy_callback.scoring import Scorer
from entropy_callback.tensorboard import TensorBoardSink


class InjectedFault(RuntimeError):
    """The failure the tests inject."""


# phase -> (owner, name) of the internal function made to fail, and the step it fails at.
FAULTS = {
    "sampling": (probe_module, "sample_batch", 1),
    "derivative": (Scorer, "score_with_tangent", 2),
    "rescoring": (Scorer, "score", 3),
    "estimators": (records_module, "delta_h1", 4),
    "tensorboard": (TensorBoardSink, "log", 5),
    "json": (jsonlog, "atomic_write", 6),
}
ENGINE_PHASES = ("sampling", "derivative", "rescoring", "estimators")
MAX_STEPS = 8  # steps 0 and 7 probe cleanly, before and after every fault


def _fault(phase: str) -> Exception:
    if phase == "json":
        return OSError(errno.ENOSPC, "No space left on device (injected)")
    return InjectedFault(f"injected fault in {phase}")


def inject(monkeypatch: pytest.MonkeyPatch, phase: str, fails) -> None:
    """Make the function behind ``phase`` raise whenever ``fails()`` is true."""
    owner, name, _ = FAULTS[phase]
    original = getattr(owner, name)

    def failing(*args, **kwargs):
        if fails():
            raise _fault(phase)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    clock = StepClock()
    callback = probe_callback(every=1)
    module = grpo_module()
    trainer = make_trainer(root, [clock, callback], MAX_STEPS)
    with pytest.MonkeyPatch.context() as mp:
        for phase, (_, _, step) in FAULTS.items():
            inject(mp, phase, lambda step=step: clock.step == step)
        messages = fit(trainer, module)
    return SimpleNamespace(root=root, trainer=trainer, callback=callback, module=module,
                           warnings=messages)


@pytest.mark.parametrize("phase", list(FAULTS))
def test_failure_in_a_phase_is_warned_recorded_and_training_goes_on(faulty_run, phase):
    step = FAULTS[phase][2]
    assert faulty_run.trainer.global_step == MAX_STEPS
    named = [m for m in faulty_run.warnings if f"phase '{phase}' at step {step}" in m]
    assert len(named) == 1, faulty_run.warnings

    lines = {r["step"]: r for r in jsonl_records(faulty_run.root)}
    if phase == "json":  # nothing of that step reached the disk, not even part of it
        assert step not in lines
        assert not list(probe_dir(faulty_run.root).glob(f"step_{step:08d}*"))
    else:
        for core in (lines[step], step_record(faulty_run.root, step)["core_results"]):
            assert core["error"]["phase"] == phase
            assert core["error"]["type"] == "InjectedFault"
        if phase in ENGINE_PHASES:
            assert lines[step]["deltaH_true"] is None
            assert f"phase '{phase}' failed" in lines[step]["null_reasons"]["deltaH_true"]
    later = [r for s, r in lines.items() if s > step]
    assert later and all("error" not in r and r["deltaH_true"] is not None for r in later[-1:])


def test_every_step_is_probed_once_and_clean_probes_are_complete(faulty_run):
    assert faulty_run.callback.probed_steps == list(range(MAX_STEPS))
    steps = [r["step"] for r in jsonl_records(faulty_run.root)]
    assert steps == [s for s in range(MAX_STEPS) if s != FAULTS["json"][2]]
    for step in (0, MAX_STEPS - 1):
        core = step_record(faulty_run.root, step)["core_results"]
        assert "error" not in core and "null_reasons" not in core
        assert math.isfinite(core["deltaH1"]) and math.isfinite(core["deltaH_true"])
    # TensorBoard: the failed write lost one step; the writes after it went through.
    events = EventAccumulator(str(faulty_run.root / "run" / "version_0"))
    events.Reload()
    logged = [e.step for e in events.Scalars("entropy_probe/deltaH1")]
    assert logged == [0, FAULTS["json"][2], MAX_STEPS - 1]


def test_failing_probe_leaves_the_training_run_unchanged(faulty_run, tmp_path):
    """The observer contract holds while phases fail: same weights as a run without probe."""
    module = grpo_module()
    trainer = make_trainer(tmp_path, [], MAX_STEPS, logger=False)
    fit(trainer, module)
    reference, probed = lora_state(module), lora_state(faulty_run.module)
    assert reference.keys() == probed.keys()
    for name in reference:
        assert torch.equal(reference[name], probed[name]), name


@pytest.mark.parametrize("phase", ENGINE_PHASES)
def test_strict_engine_reraises_the_phase_failure(phase, monkeypatch):
    model, tokenizer = tiny_policy()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    probe = EntropyProbe(model, tokenizer, probe_prompts(), strict=True, **SMALL_PROBE)
    inject(monkeypatch, phase, lambda: True)
    backward_on(model, tokenizer)
    with pytest.raises(ProbeFailure, match=f"phase '{phase}' at step 0") as info:
        probe.before_step(optimizer, step=0)
        optimizer.step()
        probe.after_step()
    assert isinstance(info.value.__cause__, InjectedFault)


@pytest.mark.parametrize("phase", ["rescoring", "json"])
def test_strict_callback_stops_the_run(phase, monkeypatch, tmp_path):
    """Inside the optimizer's step hook (rescoring) and in a sink (json) alike."""
    clock = StepClock()
    inject(monkeypatch, phase, lambda: clock.step == 0)
    trainer = make_trainer(tmp_path, [clock, probe_callback(every=1, strict=True)], 2)
    with pytest.raises(ProbeFailure, match=f"phase '{phase}' at step 0"):
        fit(trainer, grpo_module())
    assert trainer.global_step <= 1


# ---------------------------------------------------------------------- non-finite numbers
NAN_AT_UPDATED, NAN_EVERYWHERE, HUGE_STEP = 1, 2, 3
NONFINITE_STEPS = 5


class NonFinite(lightning.Callback):
    """NaN logits in the probe's own (eval-mode) passes, and one huge optimizer step.

    Listed after the probe callback, so that at NAN_AT_UPDATED the NaNs start once the probe's
    before_step is done, and only in forwards at the live parameters: the passes at theta'
    (rescoring) see them, the derivative pass (at the theta snapshot, substituted into the
    model) does not. At NAN_EVERYWHERE every probe pass sees them, sampling included. The
    training passes (train mode) never do.
    At HUGE_STEP the learning rate is 1e4 times the schedule's (the scheduler resets it after).
    Keeps each step's ProbeResult as the engine returned it.
    """

    def __init__(self, probe: EntropyProbeCallback) -> None:
        self.nan = False
        self.probe = probe
        self.results: dict[int, ProbeResult] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        # the body's final norm: every pass runs it inside the pass's own functional_call (the
        # LM head may be applied in a separate call, per chunk of positions)
        norm = pl_module.model.get_base_model().model.norm
        norm.register_forward_hook(self._hook)
        self.lora = next(m for n, m in pl_module.model.named_modules() if n.endswith("lora_B"))

    def _hook(self, module, args, output):
        # functional_call swaps plain tensors in for the parameters: then the pass is at the
        # theta snapshot, not at the live parameters
        live = all(isinstance(p, torch.nn.Parameter) for p in self.lora.default.parameters())
        if self.nan and not module.training and live:
            return output * float("nan")
        return None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.nan = trainer.global_step == NAN_EVERYWHERE
        if trainer.global_step == HUGE_STEP:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] *= 1e4

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.nan = self.nan or trainer.global_step == NAN_AT_UPDATED

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.nan = False
        self.results[trainer.global_step - 1] = self.probe.last_result


@pytest.fixture(scope="module")
def nonfinite_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    callback = probe_callback(every=1)
    nonfinite = NonFinite(callback)
    trainer = make_trainer(root, [callback, nonfinite], NONFINITE_STEPS)
    messages = fit(trainer, grpo_module())
    lines = {r["step"]: r for r in jsonl_records(root)}
    return SimpleNamespace(root=root, trainer=trainer, warnings=messages, lines=lines,
                           results=nonfinite.results)


def test_nan_logits_at_updated_params_give_null_true_change_with_reasons(nonfinite_run):
    core = nonfinite_run.lines[NAN_AT_UPDATED]
    assert "error" not in core
    assert math.isfinite(core["deltaH1"]) and math.isfinite(core["H_orig"])
    result = nonfinite_run.results[NAN_AT_UPDATED]  # the engine's result: None, not NaN
    for name in ("deltaH_true", "deltaH_true_se", "H_upd", "ESS", "ess_fraction"):
        assert core[name] is None and getattr(result, name) is None
        assert "non-finite" in core["null_reasons"][name]
    assert core["reliable"] is False
    assert not [m for m in nonfinite_run.warnings if f"step {NAN_AT_UPDATED}" in m]


def test_nan_logits_in_every_probe_pass_are_contained(nonfinite_run):
    """No evaluation batch can be drawn from NaN probabilities: an error record that says so,
    and a warning."""
    core = nonfinite_run.lines[NAN_EVERYWHERE]
    assert core["error"]["phase"] == "sampling"
    assert "not finite" in core["error"]["message"]
    assert core["deltaH1"] is None and "sampling" in core["null_reasons"]["deltaH1"]
    assert [m for m in nonfinite_run.warnings if f"phase 'sampling' at step {NAN_EVERYWHERE}" in m]


def test_huge_step_collapses_ess_and_is_flagged_unreliable(nonfinite_run):
    core = nonfinite_run.lines[HUGE_STEP]
    assert "error" not in core
    assert core["ess_fraction"] is not None and core["ess_fraction"] < 0.5
    assert core["reliable"] is False
    for name, value in core.items():
        if value is None:
            assert name in core.get("null_reasons", {}), name


def test_training_goes_on_after_non_finite_probes(nonfinite_run):
    assert nonfinite_run.trainer.global_step == NONFINITE_STEPS
    assert sorted(nonfinite_run.lines) == list(range(NONFINITE_STEPS))
    for step in (0, NONFINITE_STEPS - 1):
        assert "error" not in nonfinite_run.lines[step]
        assert nonfinite_run.lines[step]["deltaH1"] is not None


# ---------------------------------------------------------------------- memory
def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def test_repeated_probes_hold_no_tensors():
    """A leak check that does not depend on the allocator: after warm-up, ten more probes leave
    exactly as many live tensors as before (benchmarks/probe_memory.py measures RSS)."""
    model, tokenizer = tiny_policy()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    probe = EntropyProbe(model, tokenizer, probe_prompts(), **SMALL_PROBE)

    def probed_step(step: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        backward_on(model, tokenizer)
        probe.before_step(optimizer, step=step)
        optimizer.step()
        assert probe.after_step().ok

    for step in range(2):
        probed_step(step)
    before = _live_tensors()
    for step in range(2, 12):
        probed_step(step)
    assert _live_tensors() == before
