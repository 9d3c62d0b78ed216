"""The Lightning adapter inside real training runs.

Real parts only: a ``lightning.Trainer`` on CPU fitting the demo GRPOModule (tiny Llama + peft
LoRA, AdamW, a per-step warmup-cosine schedule), gradient accumulation and clipping, a
TensorBoardLogger whose event files are read back with TensorBoard's EventAccumulator, and the
JSON logs read back with ``load_run`` / ``load_step``.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from entropy_callback import EntropyProbeCallback, ProbeConfigError
from entropy_callback.demos.grpo import (
    GRPOModule,
    make_prompts,
    prompt_dataloader,
    sample_responses,
    score_responses,
    warmup_cosine,
)
from entropy_callback.demos.tiny import build_policy
from entropy_callback.jsonlog import step_filename
from entropy_callback.runlog import RunLogError, load_run, load_step
from entropy_callback.tensorboard import LAYOUT_SUBDIR

pytestmark = pytest.mark.usefixtures("single_thread")

EVERY, MAX_STEPS = 3, 11  # optimizer steps 0..10; the last one (10) is not due
DUE = [t for t in range(MAX_STEPS) if t % EVERY == 0]  # [0, 3, 6, 9]
NORM_CLIP = 0.02  # below every step's gradient norm (0.04 - 0.26 here): clipping always acts
VALUE_CLIP = 1e-3  # about the 80th percentile of |g|: clips some entries of every step
TB_TAGS = ("deltaH1", "deltaH_true", "deltaH1_se", "deltaH_true_se", "H_orig", "H_upd",
           "ess_fraction", "learning_rate", "update_cosine", "bars_dot")


class StepRecorder(lightning.Callback):
    """The trainer's facts at each optimizer step, read where the probe reads them."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.lr: dict[int, float] = {}
        self.grad_norm: dict[int, float] = {}
        self.grad_max: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        t = trainer.global_step
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.steps.append(t)
        self.lr[t] = optimizer.param_groups[0]["lr"]
        self.grad_norm[t] = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
        self.grad_max[t] = max(float(g.abs().max()) for g in grads)


def _probed_run(make_grpo, make_probe, fit, root, *, every, max_steps, **trainer_options):
    module = make_grpo(seed=0)
    probe = make_probe(every, log_level="detailed", strict=True)
    recorder = StepRecorder()
    trainer = fit(module, root, max_steps=max_steps, callbacks=(probe, recorder),
                  accumulate_grad_batches=2, **trainer_options)
    log_dir = Path(trainer.logger.log_dir)
    return SimpleNamespace(module=module, probe=probe, recorder=recorder, trainer=trainer,
                           log_dir=log_dir, records={r["step"]: r for r in load_run(log_dir)},
                           clip=trainer_options["gradient_clip_val"],
                           algorithm=trainer_options.get("gradient_clip_algorithm", "norm"))


@pytest.fixture(scope="module")
def norm_run(single_thread, make_grpo, make_probe, fit, tmp_path_factory):
    """11 optimizer steps of 2 micro-batches each, norm clipping, probed every 3 steps."""
    return _probed_run(make_grpo, make_probe, fit, tmp_path_factory.mktemp("norm"),
                       every=EVERY, max_steps=MAX_STEPS, gradient_clip_val=NORM_CLIP)


@pytest.fixture(scope="module")
def value_run(single_thread, make_grpo, make_probe, fit, tmp_path_factory):
    """7 optimizer steps, clipping by value, probed every 2 steps."""
    return _probed_run(make_grpo, make_probe, fit, tmp_path_factory.mktemp("value"),
                       every=2, max_steps=7, gradient_clip_val=VALUE_CLIP,
                       gradient_clip_algorithm="value")


def _scalars(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


# ------------------------------------------------------------------ when the probe fires
def test_probes_fire_on_exactly_the_due_optimizer_steps(norm_run):
    run = norm_run
    # 11 optimizer steps from 22 micro-batches: the index is the optimizer step, not batch_idx.
    assert run.recorder.steps == list(range(MAX_STEPS))
    assert run.trainer.global_step == MAX_STEPS
    assert run.probe.probed_steps == DUE
    assert sorted(run.records) == DUE  # probes.jsonl
    probe_dir = run.log_dir / "entropy_probe"
    assert sorted(p.name for p in probe_dir.glob("step_*.json") if "summary" not in p.name) == [
        step_filename(t) for t in DUE
    ]
    for t in DUE:
        assert load_step(run.log_dir, t)["run_metadata"]["global_step"] == t
    events = _scalars(run.log_dir).Scalars("entropy_probe/deltaH1")
    assert [e.step for e in events] == DUE


# ------------------------------------------------------------------ the reconstructed step
@pytest.mark.parametrize("run_name", ["norm_run", "value_run"])
def test_reconstructed_update_matches_the_observed_one_under_clipping(run_name, request):
    run = request.getfixturevalue(run_name)
    assert run.records, "no probe ran"
    for t, rec in run.records.items():
        assert "error" not in rec
        if run.recorder.grad_norm[t] == 0:  # every group tied: no gradient, no step, no cosine
            assert rec["update_cosine"] is None
            continue
        # The trainer's clipping really acted on this step, so the probe had to model it.
        if run.algorithm == "norm":
            assert run.recorder.grad_norm[t] > 1.5 * run.clip
        else:
            assert run.recorder.grad_max[t] > 1.5 * run.clip
        assert rec["update_source"] == "adam_reconstruction"
        assert rec["update_cosine"] >= 1 - 1e-6, (t, rec["update_cosine"])
        assert rec["update_rel_error"] <= 1e-5, (t, rec["update_rel_error"])
    assert sum(run.recorder.grad_norm[t] > 0 for t in run.records) >= 3


# ------------------------------------------------------------------ the step JSON
def test_per_sequence_contributions_sum_to_the_totals(norm_run):
    moving = [t for t in DUE if norm_run.recorder.grad_norm[t] > 0]
    assert len(moving) >= 3
    for t in moving:
        record = load_step(norm_run.log_dir, t)
        core, rows = record["core_results"], record["sequences"]["E_batch"]
        assert len(rows) == core["B_E"] == 16
        assert sum(r["generation_length"] for r in rows) == core["T_E"]
        assert core["deltaH1"] != 0 and core["deltaH_true"] != 0
        assert math.fsum(r["deltaH1_contribution"] for r in rows) == pytest.approx(
            core["deltaH1"], rel=1e-9)
        assert math.fsum(r["deltaH_true_contribution"] for r in rows) == pytest.approx(
            core["deltaH_true"], rel=1e-9)
        assert record["ground_truth"]["deltaH_true"] == core["deltaH_true"]


# ------------------------------------------------------------------ TensorBoard
def test_tensorboard_scalars_equal_the_json_records(norm_run):
    run = norm_run
    acc = _scalars(run.log_dir)
    tags = set(acc.Tags()["scalars"])
    for name in TB_TAGS:
        tag = f"entropy_probe/{name}"
        assert tag in tags, f"missing TensorBoard tag {tag}"
        series = {e.step: e.value for e in acc.Scalars(tag)}
        # every probed step with a value, and only those (None is skipped, never written as 0)
        known = [t for t in DUE if run.records[t][name] is not None]
        assert sorted(series) == known, tag
        for t in known:
            assert series[t] == pytest.approx(run.records[t][name], rel=1e-6, abs=1e-30), (tag, t)
    # deltaH1 is defined at every probed step (0 for a step that does not move)
    assert len({e.step for e in acc.Scalars("entropy_probe/deltaH1")}) == len(DUE)
    # The user's own scalars are still there, in the same run.
    assert "train/reward" in tags


def test_custom_scalars_layout_lives_in_its_own_subdirectory(norm_run):
    run = norm_run
    assert "custom_scalars__config__" not in _scalars(run.log_dir).Tags()["tensors"]
    layout_dir = run.log_dir / LAYOUT_SUBDIR
    assert len(list(layout_dir.glob("events.out.tfevents.*"))) == 1
    proto = _scalars(layout_dir).Tensors("custom_scalars__config__")[0].tensor_proto
    (category,) = layout_pb2.Layout.FromString(proto.string_val[0]).category
    tags = {tag for chart in category.chart for tag in chart.multiline.tag}
    assert tags == {"entropy_probe/deltaH1$", "entropy_probe/deltaH_true$"}


def test_learning_rate_is_the_scheduled_lr_of_the_probed_step(norm_run):
    run = norm_run
    lrs = []
    for t in DUE:
        rec = run.records[t]
        # what the optimizer held at on_before_optimizer_step of step t ...
        assert rec["learning_rate"] == run.recorder.lr[t]
        # ... which is the demo's schedule at t (the scheduler steps after the optimizer)
        assert rec["learning_rate"] == pytest.approx(3e-3 * warmup_cosine(t, 5, 40), rel=1e-12)
        assert rec["bars_dot"] == pytest.approx(rec["deltaH1"] / rec["learning_rate"], rel=1e-12)
        lrs.append(rec["learning_rate"])
    assert len(set(lrs)) == len(lrs)  # warmup and decay: a stale lr would be caught


# ------------------------------------------------------------------ the probe only observes
def test_training_with_and_without_the_callback_is_bitwise_identical(
    make_grpo, make_probe, fit, observer, tmp_path
):
    final = {}
    for probed in (False, True):
        module = make_grpo(seed=0)
        initial_b = {n: p.detach().clone() for n, p in module.model.named_parameters()
                     if "lora_B" in n}
        callbacks = (make_probe(5, strict=True),) if probed else ()
        trainer = fit(module, tmp_path / str(probed), max_steps=30, callbacks=callbacks,
                      accumulate_grad_batches=2, gradient_clip_val=NORM_CLIP)
        optimizer = trainer.optimizers[0]
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        final[probed] = observer.capture(module.model, optimizer, scheduler)
        if probed:
            assert callbacks[0].probed_steps == [0, 5, 10, 15, 20, 25]
            assert callbacks[0].last_result.ok
    without, with_probe = final[False], final[True]
    # Not vacuous: the LoRA weights moved and Adam holds 30 steps of state.
    moved = [n for n, b in initial_b.items() if not torch.equal(without["params"][n], b)]
    assert moved
    adam = without["optimizer"]
    assert adam and all(float(s["step"]) == 30 for s in adam.values())
    lora = [n for n in without["params"] if "lora_" in n]
    for n in lora:
        assert torch.equal(with_probe["params"][n], without["params"][n]), n
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(with_probe["optimizer"][n][key], without["optimizer"][n][key]), n
    assert observer.differences(without, with_probe) == []


# ------------------------------------------------------------------ where the policy lives
class RenamedPolicyModule(lightning.LightningModule):
    """A user's REINFORCE module that calls its policy ``policy`` and its tokenizer ``tok``."""

    def __init__(self, policy, tok, prompts):
        super().__init__()
        self.policy = policy
        self.tok = tok
        self.prompts = prompts

    def train_dataloader(self):
        return prompt_dataloader(self.prompts, 4, seed=0)

    def training_step(self, batch, batch_idx):
        enc = self.tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        ids, lengths = sample_responses(
            self.policy, enc["input_ids"], enc["attention_mask"], max_new_tokens=4,
            eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)
        logp, _, _ = score_responses(self.policy, enc["input_ids"], enc["attention_mask"],
                                     ids, lengths)
        rewards = -lengths.float()  # prefer short answers
        return -((rewards - rewards.mean()) * logp.sum(-1)).mean()

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-3)


def _renamed_module() -> RenamedPolicyModule:
    lightning.seed_everything(0, verbose=False)
    policy, tok = build_policy(seed=0, hidden_size=32, num_layers=1, num_heads=2,
                               intermediate_size=64, lora_r=4)
    return RenamedPolicyModule(policy, tok, make_prompts(32, seed=0))


@pytest.mark.parametrize("how", ["attributes", "objects"])
def test_the_policy_can_live_under_other_names_or_be_passed(how, make_probe, fit, tmp_path):
    module = _renamed_module()
    assert not hasattr(module, "model") and not hasattr(module, "tokenizer")
    if how == "attributes":
        probe = make_probe(1, model_attr="policy", tokenizer_attr="tok", strict=True)
    else:
        probe = make_probe(1, model=module.policy, tokenizer=module.tok, strict=True)
    fit(module, tmp_path, max_steps=2, callbacks=(probe,))
    assert probe.probe.model is module.policy and probe.probe.tokenizer is module.tok
    assert probe.probed_steps == [0, 1]
    assert probe.last_result.ok and math.isfinite(probe.last_result.deltaH1)


def _grpo_module():
    lightning.seed_everything(0, verbose=False)
    policy, tok = build_policy(seed=0, hidden_size=32, num_layers=1, num_heads=2,
                               intermediate_size=64, lora_r=4)
    return GRPOModule(policy, tok, make_prompts(32, seed=0), group_size=2, prompts_per_step=2,
                      max_new_tokens=4)


@pytest.mark.parametrize(
    "make_module, options, missing",
    [
        (_grpo_module, {"model_attr": "policy_net"}, "policy_net"),
        (_grpo_module, {"tokenizer_attr": "my_tok"}, "my_tok"),
        (_renamed_module, {}, "model"),  # the default name, absent from the user's module
    ],
)
def test_a_missing_attribute_fails_at_setup_naming_it(make_module, options, missing,
                                                      heldout_prompts, fit, tmp_path):
    module = make_module()
    probe = EntropyProbeCallback(heldout_prompts, every=1, batch_size=4, max_new_tokens=4,
                                 **options)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.raises(ProbeConfigError, match=f"attribute '{missing}'"):
        fit(module, tmp_path, max_steps=2, callbacks=(probe,))
    # Raised at setup, before any training step.
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
    assert probe.probe is None


# ------------------------------------------------------------------ two probes, one Trainer
def test_two_named_probes_in_one_trainer_keep_their_own_tags_records_and_state(
        make_grpo, make_probe, fit, tmp_path):
    """Two prompt pools, two probes: the second is named. Each writes its own TensorBoard
    tags, layout and JSON run directory, and its own checkpoint state; the default-named one is
    unchanged (tags ``entropy_probe/*``, state key ``EntropyProbeCallback``)."""
    first = make_probe(2)
    second = EntropyProbeCallback(make_prompts(16, seed=99), every=3, name="ood",
                                  batch_size=4, max_new_tokens=4, microbatch_size=4)
    trainer = fit(make_grpo(seed=0), tmp_path, max_steps=6, callbacks=(first, second))
    log_dir = Path(trainer.logger.log_dir)
    assert first.probed_steps == [0, 2, 4] and second.probed_steps == [0, 3]
    # JSON: one run directory each, recorded with the probe's name
    assert first.json.root != second.json.root
    assert [r["step"] for r in load_run(first.json.root)] == [0, 2, 4]
    assert [r["step"] for r in load_run(second.json.root)] == [0, 3]
    assert load_step(second.json.root, 3)["run_metadata"]["probe_name"] == "ood"
    assert load_step(first.json.root, 2)["run_metadata"]["probe_name"] == "entropy_probe"
    with pytest.raises(RunLogError, match="holds 2 probe runs.*probe 'ood'"):
        load_run(log_dir)  # the parent directory: which one? the listing names the probe
    # TensorBoard: each probe's scalars under its own name, at its own steps
    acc = _scalars(log_dir)
    tags = set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("entropy_probe/deltaH1")] == [0, 2, 4]
    assert [e.step for e in acc.Scalars("ood/deltaH1")] == [0, 3]
    ood = {r["step"]: r for r in load_run(second.json.root)}
    assert acc.Scalars("ood/deltaH1")[1].value == pytest.approx(ood[3]["deltaH1"], rel=1e-6)
    assert not any(t.startswith("entropy_probe/") and "ood" in t for t in tags)
    for name in ("entropy_probe", "ood"):
        layout_dir = log_dir / f"{name}_layout"
        proto = _scalars(layout_dir).Tensors("custom_scalars__config__")[0].tensor_proto
        (category,) = layout_pb2.Layout.FromString(proto.string_val[0]).category
        assert category.title == name
        assert {tag for chart in category.chart for tag in chart.multiline.tag} == {
            f"{name}/deltaH1$", f"{name}/deltaH_true$"}
    # checkpoint state: two keys, the default one as before names existed
    assert first.state_key == "EntropyProbeCallback"
    assert second.state_key != first.state_key and "ood" in second.state_key
    checkpoint = tmp_path / "two.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]
    assert saved[first.state_key]["probed_steps"] == [0, 2, 4]
    assert saved[second.state_key]["probed_steps"] == [0, 3]


@pytest.mark.parametrize("name", ["", "has space", "a/b", "-lead", 7, None, "x" * 65,
                                  "entropy_probe-2"])
def test_a_bad_probe_name_is_refused_at_construction(name):
    with pytest.raises(ProbeConfigError, match="name must"):
        EntropyProbeCallback(make_prompts(4, seed=1), every=2, name=name)
