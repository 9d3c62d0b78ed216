"""Manual optimisation (``automatic_optimization = False``), common in RL modules.

The user calls ``opt.step()`` and ``self.clip_gradients`` themselves; Lightning still fires
``on_before_optimizer_step`` inside the step (after the user's clipping), and the probe must see
the same schedule and predict the step exactly.
"""

from __future__ import annotations

import pytest
import torch

from entropy_callback.demos.grpo import GRPOModule
from entropy_callback.runlog import load_run

CLIP = 0.02  # below the tiny run's gradient norms, so clipping acts on every step


class ManualGRPO(GRPOModule):
    """The demo module, stepping its optimizer and scheduler by hand."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        out = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(out["loss"])
        self.clip_gradients(opt, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
        opt.step()
        self.lr_schedulers().step()
        return out


@pytest.mark.parametrize("every", [2])
def test_manual_optimization_is_probed_on_schedule_and_predicted_exactly(
        make_grpo, make_probe, fit, tmp_path, every):
    module = make_grpo(seed=0)
    manual = ManualGRPO(module.model, module.tokenizer, module.prompts, group_size=2,
                        prompts_per_step=4, max_new_tokens=4, total_steps=7)
    probe = make_probe(every)
    fit(manual, tmp_path, max_steps=7, callbacks=(probe,))
    records = load_run(tmp_path / "run" / "version_0")
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    moved = [r for r in records if r["update_cosine"] is not None]
    assert moved, "no probed step moved the weights: the check would be vacuous"
    for r in moved:
        # the probe sees the gradients after the user's own clipping (trainer clip_val is None)
        assert r["update_cosine"] >= 1 - 1e-6
        assert r["update_rel_error"] <= 1e-5
    assert torch.is_tensor(next(manual.model.parameters()))
