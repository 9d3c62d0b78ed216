"""The reconstructed step Δθ matches the optimizer's inside a real Lightning Trainer (float64).

Before each probed optimizer step the probe snapshots θ and the Adam/AdamW state; after the step
it rebuilds the update from that snapshot and the gradients the optimizer consumed, after the
trainer's clipping (``update.adam_replay``), and compares with the observed θ' − θ
(``update_cosine``, ``update_rel_error`` in every record). In float64
the two agree to round-off, so the bars are tight: cosine ≥ 1 − 1e-9 and relative error ≤ 1e-7
(measured: relative error 0, the replay being torch's own arithmetic; 1 − cosine ≤ 1.2e-15).
A reconstruction that read the gradients before clipping, forgot the amsgrad maximum or the
weight decay, or read the lr after the scheduler moved it, is off by far more (see
docs/validation.md, "Break it").

Each case runs a few optimizer steps of the demo GRPO task on the tiny policy
(``build_policy(dtype=torch.float64, attn_implementation="sdpa")``). The cases cover each
factor without the full product: Adam and AdamW; weight decay on and off (coupled for Adam,
decoupled for AdamW); amsgrad; gradient clipping by norm and by value (at values below the
gradients, so that clipping acts, which the test checks); accumulate_grad_batches 1 and 3; a
per-step lr scheduler (the demo's warmup-cosine) or a constant lr.
"""

from __future__ import annotations

from functools import partial

import lightning
import pytest
import torch
from probe_harness import Collect

from entropy_callback.demos.grpo import GRPOModule, make_prompts, warmup_cosine
from entropy_callback.demos.tiny import build_policy

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, lora_r=4)
def length_reward(prompt: str, response: str) -> float:
    """A dense reward (the response text's length): every group has non-zero advantages, so
    every step has a gradient (the demo's reward is often flat on an untrained policy)."""
    return float(len(response))


GRPO = dict(group_size=4, prompts_per_step=2, max_new_tokens=4, lr=3e-3, warmup_steps=4,
            total_steps=20, reward_fn=length_reward)
PROBE = dict(batch_size=8, microbatch_size=8, max_new_tokens=4, strict=True)
NORM_CLIP = 1.0  # below the gradient norms of this task (1.2 to 3.7): clipping acts
VALUE_CLIP = 0.05  # clips the largest 4% to 12% of the gradient entries (max |g| 0.35 to 0.86)


class OptimizerModule(GRPOModule):
    """The demo GRPO module with a chosen optimizer and an optional per-step schedule."""

    def __init__(self, *args, optimizer: str = "adamw", amsgrad: bool = False,
                 schedule: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.optimizer_name, self.amsgrad, self.schedule = optimizer, amsgrad, schedule

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.optimizer_name]
        optimizer = cls(params, lr=self.lr, weight_decay=self.weight_decay, amsgrad=self.amsgrad)
        if not self.schedule:
            return optimizer
        schedule = partial(warmup_cosine, warmup_steps=self.warmup_steps,
                           total_steps=self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Gradients(lightning.Callback):
    """Gradient norm and largest entry before clipping, and the lr, at each optimizer step."""

    def __init__(self):
        self.norm, self.max, self.lr, self.clipped = [], [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.flatten() for g in optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        self.norm.append(float(torch.linalg.vector_norm(torch.cat(grads))))
        self.max.append(float(torch.cat(grads).abs().max()))
        self.lr.append(optimizer.param_groups[0]["lr"])
        self.clipped.append(float((torch.cat(grads).abs() > VALUE_CLIP).double().mean()))


CASES = {
    # name: (module options, trainer options, every)
    "adamw-plain": (dict(optimizer="adamw"), dict(), 1),
    "adamw-wd-norm-acc3": (dict(optimizer="adamw", weight_decay=0.1),
                           dict(gradient_clip_val=NORM_CLIP, accumulate_grad_batches=3), 2),
    "adam-wd-value-const": (dict(optimizer="adam", weight_decay=0.1, schedule=False),
                            dict(gradient_clip_val=VALUE_CLIP, gradient_clip_algorithm="value"),
                            1),
    "adam-amsgrad-norm-acc3": (dict(optimizer="adam", amsgrad=True),
                               dict(gradient_clip_val=NORM_CLIP, accumulate_grad_batches=3), 1),
    "adamw-amsgrad-wd-value": (dict(optimizer="adamw", amsgrad=True, weight_decay=0.01),
                               dict(gradient_clip_val=VALUE_CLIP,
                                    gradient_clip_algorithm="value"), 2),
}
MAX_STEPS = 4


@pytest.mark.parametrize("case", list(CASES))
def test_reconstruction_matches_the_optimizer(case, tmp_path, heldout_prompts):
    module_options, trainer_options, every = CASES[case]
    lightning.seed_everything(0, verbose=False)
    model, tokenizer = build_policy(seed=0, dtype=torch.float64, attn_implementation="sdpa",
                                    **TINY)
    module = OptimizerModule(model, tokenizer, make_prompts(32, seed=0), seed=0,
                             **{**GRPO, **module_options})
    probe = Collect(heldout_prompts, every=every, log_dir=str(tmp_path), **PROBE)
    grads = Gradients()
    trainer = lightning.Trainer(
        accelerator="cpu", devices=1, max_steps=MAX_STEPS, logger=False,
        callbacks=[probe, grads], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, **trainer_options,
    )
    trainer.fit(module)

    assert next(model.parameters()).dtype == torch.float64
    assert [r.step for r in probe.results] == list(range(0, MAX_STEPS, every))
    for r in probe.results:
        assert r.error is None, r.error
        assert r.update_source == "adam_reconstruction"
        assert r.update_norm > 0
        assert r.update_cosine >= 1 - 1e-9, (r.step, r.update_cosine)
        assert r.update_rel_error <= 1e-7, (r.step, r.update_rel_error)
        assert r.learning_rate == pytest.approx(grads.lr[r.step], rel=1e-15)
    print(f"{case}: steps {[r.step for r in probe.results]}, min cosine - 1 "
          f"{min(r.update_cosine for r in probe.results) - 1:.1e}, max rel error "
          f"{max(r.update_rel_error for r in probe.results):.1e}, grad norms "
          f"{min(grads.norm):.1e}..{max(grads.norm):.1e}, max |g| {min(grads.max):.1e}.."
          f"{max(grads.max):.1e}, clipped {min(grads.clipped):.3f}..{max(grads.clipped):.3f}")
    # the case exercises what it names
    clip = trainer_options.get("gradient_clip_val")
    if clip is not None:
        by_value = trainer_options.get("gradient_clip_algorithm") == "value"
        seen = grads.max if by_value else grads.norm
        assert min(seen) > clip, (seen, clip)  # clipping acted at every optimizer step
    if module_options.get("schedule", True):
        assert len(set(grads.lr)) == MAX_STEPS  # the lr moved at every step (warmup)
