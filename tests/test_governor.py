"""The entropy governor: it only brakes, it restores the lr (scheduler and checkpoint unaffected),
Adam's step is linear in lr, its prediction is the step taken, its floor holds, bad input fails
at construction.

Real parts: the demo's tiny LoRA policy and GRPOModule, torch's AdamW with its LambdaLR
schedule, a real Lightning Trainer (its closure, clipping and checkpoint), a plain loop, and
TRL's GRPOTrainer for the HF adapter. The governor changes training by design, so these tests
compare governed runs with ungoverned ones where they must agree (alpha = 1; the lr schedule).
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import lightning
import numpy as np
import pytest
import torch
from conftest import TINY_PROBE
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from entropy_callback import EntropyProbeWarning, ProbeConfigError
from entropy_callback.demos.grpo import make_prompts
from entropy_callback.governor import EntropyGovernor
from entropy_callback.governor_lightning import EntropyGovernorCallback
from entropy_callback.governor_log import JSONL_NAME, read_records
from entropy_callback.update import adam_replay, optimizer_state, snapshot

STEPS = 8
# lr 1e-2 (the tiny task's default is 3e-3): the steps after warmup move the entropy by
# ~0.005-0.04 nats/token, enough for a policy to bind within a few steps, still nearly linear.
FAST = 1e-2


def plain_run(make_grpo, heldout, steps: int = STEPS, lr: float = FAST, spy=None, **governor):
    """A plain loop over the tiny demo (clipping at 1.0, the warmup-cosine LambdaLR); with
    ``governor`` options an EntropyGovernor attached, and ``spy(optimizer, scheduler)`` as a
    step pre-hook after the governor's. Returns (module, optimizer, scheduler, governor,
    [(theta, theta') per step])."""
    module = make_grpo(seed=0, lr=lr)
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    params = [p for p in module.model.parameters() if p.requires_grad]
    gov = None
    if governor:
        gov = EntropyGovernor(module.model, module.tokenizer, heldout,
                              **{**TINY_PROBE, **governor}).attach(opt)
    if spy is not None:
        opt.register_step_pre_hook(lambda o, args, kwargs: spy(o, sched))
    # right after each step (after the governor's post-hook): the lr Adam's group holds now
    module.lr_after_step = []
    opt.register_step_post_hook(
        lambda o, args, kwargs: module.lr_after_step.append(o.param_groups[0]["lr"]))
    batches = iter(module.train_dataloader())
    steps_taken = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        for t in range(steps):
            opt.zero_grad()
            module.training_step(next(batches), t)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            before = [p.detach().clone() for p in params]
            opt.step()
            sched.step()
            steps_taken.append((before, [p.detach().clone() for p in params]))
    return module, opt, sched, gov, steps_taken


def test_slack_policy_leaves_training_bitwise_unchanged(make_grpo, heldout_prompts):
    """alpha = 1 when the policy allows any predicted change: the governed run (which samples,
    scores and restores RNG, modes, grads and the lr) is bitwise the ungoverned run."""
    base, *_ = plain_run(make_grpo, heldout_prompts)
    governed, _, _, gov, _ = plain_run(make_grpo, heldout_prompts, max_drop=1e9)
    assert [r.alpha for r in gov.records] == [1.0] * STEPS
    for (n, a), (_, b) in zip(base.model.named_parameters(),
                              governed.model.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_alpha_only_brakes_and_the_step_is_alpha_times_the_rebuilt_one(make_grpo,
                                                                       heldout_prompts):
    """A binding max_drop: alpha in [alpha_min, 1], below 1 on steps whose predicted drop
    exceeds it, and the step taken is alpha times the step rebuilt at the pre-hook."""
    at_step = []  # (lr Adam reads, the full-lr step rebuilt from its state and p.grad)

    def spy(opt, sched):
        params = {str(i): p for i, p in enumerate(opt.param_groups[0]["params"])}
        lr = opt.param_groups[0]["lr"]
        opt.param_groups[0]["lr"] = sched.get_last_lr()[0]  # the schedule's, unscaled
        full = adam_replay(opt, params, snapshot(params), optimizer_state(opt, params),
                           {n: p.grad for n, p in params.items()}).delta
        opt.param_groups[0]["lr"] = lr
        at_step.append((lr, full))

    module, _, _, gov, taken = plain_run(make_grpo, heldout_prompts, max_drop=0.005,
                                         alpha_min=0.05, spy=spy)
    alphas = [r.alpha for r in gov.records]
    assert all(0.05 <= a <= 1.0 for a in alphas)
    assert any(a < 1.0 for a in alphas)  # steps 6-7 predict drops beyond 0.005 nats/token
    for r, (lr, full), (before, after) in zip(gov.records, at_step, taken, strict=True):
        if r.deltaH1 < -0.005:  # the predicted drop is exactly the allowed one
            assert r.binding == "max_drop" and r.predicted == pytest.approx(-0.005, rel=1e-12)
        else:
            assert r.alpha == 1.0 and r.binding == "none"
        assert lr == r.alpha * r.lr  # the lr Adam read: alpha times the schedule's
        for b, a, d in zip(before, after, full.values(), strict=True):
            # float32 parameters: theta + step rounds at ~1e-7 of theta
            torch.testing.assert_close((a - b).double(), r.alpha * d, rtol=1e-4, atol=1e-8)
    # the schedule's lr is back as soon as the step is over (a chainable scheduler, e.g.
    # ExponentialLR, would otherwise carry alpha into every later step)
    assert module.lr_after_step == [r.lr for r in gov.records]


class LrAfterStep(lightning.Callback):
    """Listed after the governor: its step post-hook reads the lr right after each step."""

    def __init__(self):
        self.lrs = []

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(
            lambda o, args, kwargs: self.lrs.append(o.param_groups[0]["lr"]))


def test_lr_restored_scheduler_and_checkpoint_unchanged(make_grpo, make_probe, fit, tmp_path):
    """Under a real Lightning Trainer (closure, clipping, LambdaLR per step): the governor
    brakes, yet the optimizer's lr, the scheduler's state and the checkpoint's lr entries equal
    those of an ungoverned run at the same step."""
    def train(root, callbacks):
        module = make_grpo(seed=0, lr=FAST)
        trainer = fit(module, root, max_steps=STEPS, callbacks=callbacks,
                      gradient_clip_val=1.0)
        trainer.save_checkpoint(root / "last.ckpt")
        return trainer, torch.load(root / "last.ckpt", weights_only=False)

    heldout = make_prompts(16, seed=123)
    base, base_ckpt = train(tmp_path / "base", [])
    cb = EntropyGovernorCallback(heldout, max_drop=0.005, alpha_min=0.05, **TINY_PROBE)
    spy = LrAfterStep()
    gov, gov_ckpt = train(tmp_path / "gov", [cb, spy])
    assert spy.lrs == [r.lr for r in cb.records]  # restored before the scheduler steps
    assert [r.step for r in cb.records] == list(range(STEPS))
    assert any(r.alpha < 1 for r in cb.records)
    assert base.optimizers[0].param_groups[0]["lr"] == gov.optimizers[0].param_groups[0]["lr"]
    assert base.lr_scheduler_configs[0].scheduler.state_dict() == (
        gov.lr_scheduler_configs[0].scheduler.state_dict())
    for key in ("lr", "initial_lr"):
        assert ([g[key] for g in base_ckpt["optimizer_states"][0]["param_groups"]]
                == [g[key] for g in gov_ckpt["optimizer_states"][0]["param_groups"]])
    assert base_ckpt["lr_schedulers"] == gov_ckpt["lr_schedulers"]
    # the controller's state rides in the checkpoint, and the records reached the JSON sink
    assert any("EntropyGovernorCallback" in k for k in gov_ckpt["callbacks"])
    records = read_records(tmp_path / "gov" / "run" / "version_0" / "entropy_governor")
    assert [r["step"] for r in records] == list(range(STEPS))
    assert (tmp_path / "gov" / "run" / "version_0" / "entropy_governor" / JSONL_NAME).is_file()
    # the TensorBoard scalars, read back from the trainer's own event file
    acc = EventAccumulator(str(tmp_path / "gov" / "run" / "version_0"),
                           size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("alpha", "predicted", "realized", "H", "target"):
        events = acc.Scalars(f"entropy_governor/{tag}")
        assert [e.step for e in events] == list(range(STEPS)), tag
    alphas = [e.value for e in acc.Scalars("entropy_governor/alpha")]
    assert alphas == pytest.approx([r.alpha for r in cb.records], rel=1e-6)  # float32 events


def test_adam_step_is_linear_in_lr(make_grpo):
    """With the state fixed, AdamW at alpha * lr moves theta by alpha times its step at lr,
    decoupled weight decay included (float64 parameters: the only difference is rounding)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float64)) for _ in range(2)]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.99))
    for _ in range(3):  # some Adam state
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    grads = [torch.randn_like(p) for p in params]
    named = {str(i): p for i, p in enumerate(params)}
    theta, state = snapshot(named), optimizer_state(opt, named)

    def step(alpha):
        o = copy.deepcopy(opt)
        ps = [p for g in o.param_groups for p in g["params"]]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        for group in o.param_groups:
            group["lr"] *= alpha
        before = [p.detach().clone() for p in ps]
        o.step()
        return [p.detach() - b for p, b in zip(ps, before, strict=True)]

    full = step(1.0)
    for alpha in (0.5, 0.137, 0.01):
        scaled = step(alpha)
        for a, b in zip(scaled, full, strict=True):
            # float64 rounding of theta + step: ~1e-16 relative to theta, far below 1e-10
            torch.testing.assert_close(a, alpha * b, rtol=1e-10, atol=1e-15)
    rebuilt = adam_replay(opt, named, theta, state, dict(zip(named, grads, strict=True))).delta
    for d, b in zip(rebuilt.values(), full, strict=True):
        torch.testing.assert_close(d, b, rtol=1e-12, atol=1e-18)


def test_prediction_agrees_with_realized(make_grpo, heldout_prompts):
    """Over a tiny governed run, realized Delta H_true follows alpha * delta H_1 in direction
    and in size (the realized change is on the same E tokens: a paired, low-noise comparison).
    """
    *_, gov, _ = plain_run(make_grpo, heldout_prompts, steps=16, lr=3e-3, floor=1.0,
                           batch_size=32, microbatch_size=32)
    assert all(r.governed and r.realized is not None for r in gov.records)
    p = np.array([r.predicted for r in gov.records])
    q = np.array([r.realized for r in gov.records])
    se = np.array([math.hypot(r.realized_se, r.alpha * r.deltaH1_se) for r in gov.records])
    # measured at seed 0: Pearson 0.986, slope 0.96, none of 16 outside 2 SE. The bounds leave
    # room for the second-order term; a prediction off by a factor 2 fails the slope.
    assert np.corrcoef(p, q)[0, 1] >= 0.95
    assert 0.8 <= (p @ q) / (p @ p) <= 1.25
    assert np.mean(np.abs(q - p) > 2 * se) <= 0.25
    assert all(r.in_band is not None for r in gov.records)


def test_floor_respected_on_a_short_run(make_grpo, heldout_prompts):
    """floor just below the start: alpha brakes so that no predicted entropy goes below the
    floor, and the measured entropy stays above it (0.05 nats/token: the realized minus the
    predicted change of the tiny run's steps, and E's sampling noise)."""
    floor = 3.3  # the ungoverned run reaches ~3.21 by step 19
    *_, gov, _ = plain_run(make_grpo, heldout_prompts, steps=20, floor=floor, alpha_min=1e-4)
    assert gov.records[0].H > floor
    for r in gov.records:
        if r.H > floor:
            assert r.H + r.predicted >= floor - 1e-12  # the policy's promise, exactly
        else:
            assert r.alpha == pytest.approx(1e-4)  # below the floor: the strongest brake
    assert min(r.H for r in gov.records) >= floor - 0.05
    assert any(r.alpha < 1 for r in gov.records)


def test_every_k_reuses_the_sensitivity(make_grpo, heldout_prompts):
    *_, gov, _ = plain_run(make_grpo, heldout_prompts, steps=5, max_drop=0.01, every=2)
    governed = [r.step for r in gov.records if r.governed]
    assert governed == [0, 2, 4]
    for r in gov.records:
        if not r.governed:
            last = gov.records[r.step - 1]
            assert r.sensitivity_from == last.step and r.realized is None
            assert r.deltaH1 == pytest.approx(last.bars_dot * r.lr, rel=1e-12)


@pytest.mark.parametrize("options, needle", [
    ({}, "needs a policy"),
    ({"alpha_min": 0.5}, "needs a policy"),
    ({"floor": 1.0, "alpha_min": 0.0}, "alpha_min"),
    ({"floor": 1.0, "alpha_min": 1.5}, "alpha_min"),
    ({"schedule": 2.0}, "schedule must be a callable"),
    ({"max_drop": -0.1}, "max_drop"),
    ({"floor": 1.0, "every": 0}, "every"),
    ({"floor": 1.0, "margin_se": -1.0}, "margin_se"),
    ({"floor": 1.0, "batch_sise": 8}, "batch_sise"),
])
def test_bad_input_fails_at_construction(options, needle, make_grpo, heldout_prompts):
    """The engine and both adapters refuse it when built, naming the argument."""
    from entropy_callback.governor_hf import EntropyGovernorTrainerCallback

    module = make_grpo(seed=0)
    builders = [
        lambda: EntropyGovernor(module.model, module.tokenizer, heldout_prompts, **options),
        lambda: EntropyGovernorCallback(heldout_prompts, **options),
        lambda: EntropyGovernorTrainerCallback(heldout_prompts, **options),
    ]
    for build in builders:
        with pytest.raises(ProbeConfigError, match=needle):
            build()


def test_refuses_a_non_adam_optimizer(make_grpo, heldout_prompts):
    module = make_grpo(seed=0)
    gov = EntropyGovernor(module.model, module.tokenizer, heldout_prompts, floor=1.0)
    sgd = torch.optim.SGD([p for p in module.model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ProbeConfigError, match="Adam"):
        gov.attach(sgd)


def test_inside_trl_grpo_trainer(tmp_path):
    """The HF callback inside TRL's GRPOTrainer, unmodified: every step governed and measured,
    E drawn at GRPOConfig's temperature, the Trainer's logged lr schedule that of an ungoverned
    run, the records in <output_dir>/entropy_governor."""
    from test_hf import grpo_trainer

    from entropy_callback.governor_hf import EntropyGovernorTrainerCallback

    base, _ = grpo_trainer(tmp_path / "base", callback=False)
    base.train()
    trainer, _ = grpo_trainer(tmp_path / "gov", callback=False)
    cb = EntropyGovernorTrainerCallback(trainer.eval_dataset, max_drop=1e-4, alpha_min=0.1,
                                        batch_size=8, microbatch_size=8)
    trainer.add_callback(cb)
    trainer.train()
    assert [r.step for r in cb.records] == list(range(trainer.state.global_step))
    assert all(0.1 <= r.alpha <= 1 and r.realized is not None for r in cb.records)
    assert any(r.alpha < 1 for r in cb.records)
    assert cb.governor.probe.config.temperature == pytest.approx(0.9)  # GRPOConfig's

    def lrs(t):
        return [h["learning_rate"] for h in t.state.log_history if "learning_rate" in h]

    assert lrs(trainer) == lrs(base)
    assert read_records(tmp_path / "gov" / "entropy_governor")[0]["framework"] == "hf"


def test_trust_region_tightens_when_the_linear_regime_breaks(make_grpo, heldout_prompts):
    """lr 3e-2: some steps of the tiny run leave the linear regime (realized far from predicted,
    measured: step 4 predicts +0.04, realizes -0.04). The record says why, the ceiling drops to
    shrink * alpha, the next step is held to it (the policy itself never binds here), and the
    ceiling grows back after steps in the band."""
    *_, gov, _ = plain_run(make_grpo, heldout_prompts, steps=12, lr=3e-2, max_drop=1e9)
    cuts = [i for i, r in enumerate(gov.records) if r.trust is not None]
    assert cuts and all(not gov.records[i].in_band for i in cuts)
    for i in cuts:
        r = gov.records[i]
        assert "linear regime broke" in r.trust
        assert r.next_ceiling == pytest.approx(max(r.alpha * 0.5, 0.001))
        if i + 1 < len(gov.records):
            nxt = gov.records[i + 1]
            assert nxt.alpha == pytest.approx(r.next_ceiling) and nxt.binding == "ceiling"
    for prev in gov.records:
        if prev.in_band:
            assert prev.next_ceiling == pytest.approx(min(1.0, prev.ceiling * 2.0))


def test_beside_the_probe(make_grpo, make_probe, fit, tmp_path):
    """EntropyProbeCallback listed first, the governor after it: the probe's post-hook sees the
    step taken at alpha * lr (its rebuilt step matches the observed one on braked steps), and
    the governor writes into the probe's run directory under the probe's run id."""
    from entropy_callback import load_run

    probe = make_probe(every=1)
    gov = EntropyGovernorCallback(make_prompts(16, seed=123), max_drop=0.005, alpha_min=0.05,
                                  **TINY_PROBE)
    fit(make_grpo(seed=0, lr=FAST), tmp_path, max_steps=STEPS, callbacks=[probe, gov],
        gradient_clip_val=1.0)
    assert any(r.alpha < 1 for r in gov.records)
    run_dir = probe.json.root
    rows = load_run(run_dir)
    assert [r["step"] for r in rows] == list(range(STEPS))
    for row, rec in zip(rows, gov.records, strict=True):
        assert row["update_rel_error"] < 1e-5, (row["step"], rec.alpha)
    # listed the other way round, the probe's rebuilt step misses alpha: a warning says so
    with pytest.warns(EntropyProbeWarning, match="List the probe first"):
        fit(make_grpo(seed=0, lr=FAST), tmp_path / "swapped", max_steps=1,
            callbacks=[EntropyGovernorCallback(make_prompts(16, seed=123), max_drop=0.005,
                                               **TINY_PROBE), make_probe(every=1)])
    governed = read_records(run_dir)
    assert [r["step"] for r in governed] == list(range(STEPS))
    assert {r["run_id"] for r in governed} == {probe.run_logger.run_id}


def test_a_failing_schedule_is_a_warning_not_a_crash(make_grpo, heldout_prompts):
    """A user's schedule that raises at step 3: that step's record holds the error (phase
    'choose'), alpha falls back to the ceiling, training goes on; strict=True raises."""
    from entropy_callback import ProbeFailure

    def schedule(step):
        if step == 4:  # read for the step before it (schedule(step + 1))
            raise ValueError("no target for step 4")
        return 3.0

    with pytest.warns(EntropyProbeWarning, match="phase 'choose' at step 3"):
        *_, gov, _ = plain_run(make_grpo, heldout_prompts, steps=5, schedule=schedule)
    assert [r.error is not None for r in gov.records] == [False, False, False, True, False]
    failed = gov.records[3]
    assert failed.error["phase"] == "choose" and "no target" in failed.error["message"]
    assert failed.alpha == 1.0 and failed.binding == "ceiling"
    with pytest.raises(ProbeFailure, match="no target"):
        plain_run(make_grpo, heldout_prompts, steps=5, schedule=schedule, strict=True)


def test_schedule_is_followed_from_above(make_grpo, heldout_prompts):
    """schedule(step) -> H*: a braked step's predicted entropy lands on the target of the next
    step plus the margin (H - margin_se SE(H) is what the policy reads), never below it."""
    def schedule(step):
        return 3.33 - 0.004 * step  # below the tiny run's start, falling slower than its drops

    *_, gov, _ = plain_run(make_grpo, heldout_prompts, steps=16, schedule=schedule,
                           alpha_min=1e-4)
    braked = [r for r in gov.records if r.binding == "schedule"]
    assert braked
    for r in braked:
        landing = r.H + r.predicted
        assert landing == pytest.approx(schedule(r.step + 1) + 2.0 * r.H_se, abs=1e-12)
    for r in gov.records:
        if r.binding == "none":
            assert r.H - 2.0 * r.H_se + r.deltaH1 >= schedule(r.step + 1) - 1e-12


def test_hf_checkpoint_carries_the_controller_state(tmp_path):
    """A plain transformers.Trainer saving at steps 2 and 4: each checkpoint holds the
    controller's state, and a train() resumed from checkpoint-2 starts from it (not afresh)."""
    from test_hf import plain_trainer

    from entropy_callback.governor_hf import STATE_FILE, EntropyGovernorTrainerCallback

    def governor():
        return EntropyGovernorTrainerCallback(make_prompts(8, seed=123), max_drop=1e-4,
                                              alpha_min=0.1, every=2, max_new_tokens=3,
                                              batch_size=8, microbatch_size=8)

    first = governor()
    plain_trainer(tmp_path, first, steps=4, save_strategy="steps", save_steps=2).train()
    saved = json.loads((tmp_path / "checkpoint-2" / STATE_FILE).read_text())
    assert saved["global_step"] == 2 and saved["governor"]["calls"] == 2
    assert saved["governor"]["bars_dot"] == first.records[0].bars_dot  # step 0's, reused at 1

    again = governor()
    trainer = plain_trainer(tmp_path, again, steps=4, save_strategy="steps", save_steps=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert [r.step for r in again.records] == [2, 3]
    assert again.records[1].sensitivity_from == 2  # every=2 continues from the resumed step
    # the count of governed-or-reused steps went on from the checkpoint's 2 (afresh: 2 in all)
    assert again.governor.state_dict()["calls"] == 4
    assert json.loads((tmp_path / "checkpoint-4" / STATE_FILE).read_text())["governor"] == (
        again.governor.state_dict())


def test_a_step_the_optimizer_skips_leaves_the_trust_region_alone(make_grpo, heldout_prompts):
    """A fused AdamW under GradScaler runs its step (and the governor's hooks) for a step it
    skips for inf gradients: the record says the step was not taken, nothing is realized, the
    ceiling is unchanged, and the lr is back; the predicted step is the unscaled one."""
    module = make_grpo(seed=0, lr=FAST)
    params = [p for p in module.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=FAST, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    gov = EntropyGovernor(module.model, module.tokenizer, heldout_prompts, max_drop=1e-4,
                          alpha_min=0.1, **TINY_PROBE).attach(opt)
    batches = iter(module.train_dataloader())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        for t in range(3):
            opt.zero_grad()
            loss = module.training_step(next(batches), t)["loss"]
            scaler.scale(loss * (math.inf if t == 1 else 1.0)).backward()
            ceiling = gov.ceiling
            before = [p.detach().clone() for p in params]
            scaler.step(opt)
            scaler.update()
            record = gov.records[-1]
            assert opt.param_groups[0]["lr"] == FAST
            if t == 1:  # skipped: parameters unchanged, nothing realized, ceiling kept
                assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
                assert "did not take this step" in record.trust
                assert record.realized is None and gov.ceiling == ceiling
            else:  # taken: the realized change follows the (unscaled) prediction
                assert record.realized is not None
                assert record.realized == pytest.approx(record.predicted, abs=5e-3, rel=0.5)


def test_a_second_fit_binds_the_governor_to_its_own_model(make_grpo, heldout_prompts, fit,
                                                          tmp_path):
    """The same EntropyGovernorCallback in two fits with two modules: the second fit governs
    its own model (the first fit's is unhooked), each step once."""
    cb = EntropyGovernorCallback(heldout_prompts, max_drop=0.005, alpha_min=0.05, **TINY_PROBE)
    fit(make_grpo(seed=0, lr=FAST), tmp_path / "a", max_steps=3, callbacks=[cb])
    first = cb.governor
    fit(make_grpo(seed=1, lr=FAST), tmp_path / "b", max_steps=3, callbacks=[cb])
    assert cb.governor is not first and not first._hooks
    assert [r.step for r in cb.records] == [0, 1, 2, 0, 1, 2]
    assert all(r.error is None for r in cb.records)


def test_hf_train_that_raised_leaves_no_governor_hooked(tmp_path):
    """A train() that raised mid-run never reaches on_train_end: the next train() with the same
    callback unhooks the old governor first, so each step is governed once."""
    from test_hf import plain_trainer

    from entropy_callback.governor_hf import EntropyGovernorTrainerCallback

    cb = EntropyGovernorTrainerCallback(make_prompts(8, seed=123), max_drop=1e-4, alpha_min=0.1,
                                        max_new_tokens=3, batch_size=8, microbatch_size=8)
    trainer = plain_trainer(tmp_path, cb, steps=4)
    boom = {"armed": True}

    def crash(optimizer, args, kwargs):
        if boom["armed"] and len(cb.records) == 2:
            boom["armed"] = False
            raise RuntimeError("crash mid-train")

    trainer.create_optimizer()
    trainer.optimizer.register_step_post_hook(crash)
    with pytest.raises(RuntimeError, match="crash mid-train"):
        trainer.train()
    old = cb.governor
    trainer.train()
    assert not old._hooks and cb.governor is not old
    steps = [r.step for r in cb.records[2:]]
    assert steps == sorted(set(steps)) == list(range(4))  # each step governed once


def test_refuses_a_sharding_strategy_at_setup(make_grpo, heldout_prompts, tmp_path):
    # ModelParallelStrategy shards the policy after setup (configure_model): the governor,
    # single-process and unsharded by design, says so instead of binding stale parameters.
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = lightning.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(),
                                default_root_dir=tmp_path, logger=False)
    cb = EntropyGovernorCallback(heldout_prompts, floor=1.0)
    with pytest.raises(ProbeConfigError, match="ModelParallelStrategy"):
        cb.setup(trainer, make_grpo(seed=0), "fit")
