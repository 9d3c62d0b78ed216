"""Setups found by the field matrix (benchmarks/field_matrix.py) that lost records or misled."""

from __future__ import annotations

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
