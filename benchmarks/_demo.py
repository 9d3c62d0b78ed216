"""The demo's run part-way through training, and a way to probe one step many times.

Shared by ``se_vs_batch.py`` and ``linearity.py``. It reproduces configs/demo.yaml without a
Trainer: the default tiny policy (``build_policy()``: character Llama, hidden 64, 2 layers, LoRA
r = 8, float32), the demo's Dr-GRPO task (``GRPOModule``: 8 prompts x 4 responses of <= 6
tokens), its AdamW at lr 1e-3 with the warmup-cosine schedule (``configure_optimizers``) and
gradient-norm clipping at 1.0, for ``train_steps`` steps; then the (clipped) gradients of the
next step, ready for the probe. The probe's prompts are the demo's held-out pool.
"""

from __future__ import annotations

import copy
import warnings

import lightning
import torch

from entropy_callback import EntropyProbe
from entropy_callback.demos import GRPOModule, build_policy, make_prompts
from entropy_callback.update import snapshot

SEED = 0
HELDOUT = make_prompts(100, seed=SEED + 1)  # as examples/grpo_demo.py
DEMO = dict(group_size=4, prompts_per_step=8, max_new_tokens=6, lr=1e-3, warmup_steps=10,
            total_steps=200)
CLIP = 1.0


def demo_state(train_steps: int = 20):
    """(model, tokenizer, optimizer) after ``train_steps`` optimizer steps of the demo; the
    clipped gradients of step ``train_steps`` are in ``.grad`` and the lr is that step's."""
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    lightning.seed_everything(SEED, verbose=False)
    model, tokenizer = build_policy(seed=SEED)
    module = GRPOModule(model, tokenizer, make_prompts(4096, seed=SEED), seed=SEED, **DEMO)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(module.train_dataloader())
    for t in range(train_steps + 1):
        optimizer.zero_grad()
        module.training_step(next(batches), t)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        if t < train_steps:
            optimizer.step()
            scheduler.step()
    return model, tokenizer, optimizer


class RepeatedStep:
    """Probe the same optimizer step again and again on fresh E batches.

    Each call restores theta, the gradients and the optimizer state, so every probe sees the
    same Delta theta; ``step`` picks the probe's randomness (independent E batches)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.theta = snapshot(self.params)
        self.grads = {n: p.grad.detach().clone() for n, p in self.params.items()}
        self.state = copy.deepcopy(optimizer.state_dict())

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def probe(self, probe: EntropyProbe, step: int):
        for n, p in self.params.items():
            p.grad = self.grads[n].clone()
        probe.before_step(self.optimizer, step=step)
        self.optimizer.step()
        result = probe.after_step()
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.theta[n])
        self.optimizer.load_state_dict(copy.deepcopy(self.state))
        if result.error is not None:
            raise RuntimeError(result.error)
        return result
