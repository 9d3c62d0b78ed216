"""Setups found by the field matrix (benchmarks/field_matrix.py) that lost records or misled."""

from __future__ import annotations

import lightning
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from probe_harness import fit as harness_fit
from probe_harness import grpo_module, make_trainer, probe_callback, probe_dir

from entropy_callback import EntropyProbeCallback
from entropy_callback.demos.grpo import GRPOModule
from entropy_callback.runlog import load_run, load_step


def test_one_callback_reused_for_a_second_fit_probes_the_second_model(make_grpo, make_probe,
                                                                      fit, tmp_path):
    # A notebook habit: the same callback object passed to two Trainers, each fitting a newly
    # built module. The second fit must probe its own model, on schedule.
    probe = make_probe(2)
    fit(make_grpo(seed=0), tmp_path / "one", max_steps=3, callbacks=(probe,))
    first_root = probe.json.root
    second = make_grpo(seed=1)
    fit(second, tmp_path / "two", max_steps=3, callbacks=(probe,))
    assert probe.probe.model is second.model
    assert probe.json.root != first_root
    assert [r["step"] for r in load_run(first_root)] == [0, 2]
    assert [r["step"] for r in load_run(probe.json.root)] == [0, 2]


class PPOEpochs(GRPOModule):
    """PPO-style manual optimisation: one rollout batch, three optimizer steps on it (the later
    losses recomputed by ``per_token_loss``), so one training batch holds three steps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        out = super().training_step(batch, batch_idx)
        for epoch in range(3):
            loss = out["loss"] if epoch == 0 else self.per_token_loss(out["rollouts"]).sum()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return out


def test_every_step_of_a_batch_with_several_optimizer_steps_is_attributed(
        make_grpo, make_probe, fit, tmp_path):
    module = make_grpo(seed=0)
    ppo = PPOEpochs(module.model, module.tokenizer, module.prompts, group_size=2,
                    prompts_per_step=4, max_new_tokens=4)
    fit(ppo, tmp_path, max_steps=3, callbacks=(make_probe(1, attribution=True),))
    log_dir = tmp_path / "run" / "version_0"
    assert [r["step"] for r in load_run(log_dir)] == [0, 1, 2]
    for step in (0, 1, 2):
        record = load_step(log_dir, step)
        parts = record["attribution"]["parts"]
        deltaH1 = record["core_results"]["deltaH1"]
        # float32 model: the parts close to round-off (docs/attribution.md: <= 1e-3 relative)
        assert abs(parts["residual"]) <= 1e-3 * abs(deltaH1), (step, parts["residual"], deltaH1)


@pytest.mark.parametrize("changed", [dict(every=3), dict(batch_size=4, microbatch_size=4)])
def test_a_resume_with_another_probe_config_is_a_new_run(changed, tmp_path):
    # Resuming with the probe changed (another schedule or E batch) must not extend the
    # checkpoint's run: that run's config.yaml would describe records it did not make.
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path, [probe_callback(every=2), checkpoints], 4,
                           enable_checkpointing=True)
    assert harness_fit(trainer, grpo_module()) == []
    first = probe_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
    every = changed.get("every", 2)
    callback = probe_callback(**{"every": 2, **changed})
    trainer = make_trainer(tmp_path, [callback], 7)
    messages = harness_fit(trainer, grpo_module(),
                           ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert len(messages) == 1 and "new run" in messages[0], messages
    assert callback.json.root != first
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == before
    assert [r["step"] for r in load_run(callback.json.root)] == [
        t for t in range(2, 7) if t % every == 0]


class FailAtFirstBatchEnd(lightning.Callback):
    """Another callback failing in the first batch's end hooks, before the probe's (which come
    after this one's): the probe's step-0 result is computed but not yet written."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        raise RuntimeError("a bug in another callback")


def test_a_failed_fit_leaves_nothing_for_the_next_fit(make_grpo, make_probe, fit, tmp_path):
    # The notebook routine: a run fails, the bug is fixed, fit again with the same callback.
    probe = make_probe(2)
    with pytest.raises(RuntimeError, match="another callback"):
        fit(make_grpo(seed=0), tmp_path / "one", max_steps=4,
            callbacks=(FailAtFirstBatchEnd(), probe))
    first_root = probe.json.root
    assert [r["step"] for r in load_run(first_root)] == [0]  # finished before the failure
    second = make_grpo(seed=1)
    fit(second, tmp_path / "two", max_steps=3, callbacks=(probe,))
    records = load_run(probe.json.root)
    assert [r["step"] for r in records] == [0, 2]
    # the step-0 record is the second run's own: measured on the second model
    assert probe.last_result.step == 2 and probe.probed_steps == [0, 2]


def test_the_one_line_callback_runs_on_the_demo_policy(make_grpo, fit, heldout_prompts,
                                                       tmp_path):
    # README's one line, all defaults (max_new_tokens=128), on the demo's tiny policy: the
    # prompts plus 128 new tokens fit its context.
    module = make_grpo(seed=0, probe_prompts=heldout_prompts)
    probe = EntropyProbeCallback(every=20)
    fit(module, tmp_path, max_steps=1, callbacks=(probe,))
    assert [r["step"] for r in load_run(probe.json.root)] == [0]
