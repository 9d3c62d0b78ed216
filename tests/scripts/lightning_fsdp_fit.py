"""One Lightning fit of the float64 tiny LoRA Llama, for tests/test_lightning_fsdp.py.

    python tests/scripts/lightning_fsdp_fit.py MODE OUT [STEPS [CKPT]]

MODE: "sharded" (ModelParallelStrategy on 2 CPU processes, each decoder layer and the policy
sharded with FSDP2 in configure_model, the probe at every step, a failure injected on rank 1
in one phase per step, by ``test_distributed.FAILURES``'s order, after a clean step 0),
"sharded-unprobed" (the same fit without the probe), "sharded-root" (fully_shard applied to the
LightningModule too: the probe refuses it at train start) or "single" (one process,
unsharded, probed at every step, no failure), or "sharded-resume" (sharded and probed, a
TensorBoard logger and a distributed checkpoint after every step, resuming from CKPT when
given). Lightning's launcher runs this script again
for rank 1. Each rank saves ``rank<r>.pt`` in OUT: the probe's result per step, and its local
shards of the LoRA parameters, gradients and AdamW state and the RNG state after the fit.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fixtures
from test_distributed import FAILURES, inject  # noqa: E402

from entropy_callback import EntropyProbeCallback, ProbeConfigError  # noqa: E402
from entropy_callback.demos.tiny import (  # noqa: E402
    LORA_TARGET_MODULES,
    add_lora,
    build_char_tokenizer,
    build_tiny_llama,
)
from entropy_callback.testing import randomize_lora_b  # noqa: E402

PROMPTS = ["1+2=", "33+4=", "5=", "7+8+9="]
PROBE = dict(batch_size=24, microbatch_size=5, max_new_tokens=5, eta_multipliers=(0.5, 1.0),
             log_level="detailed", seed=0)
PHASES = [None, *FAILURES, None]  # step t fails in PHASES[t] on rank 1


class Policy(L.LightningModule):
    """Supervised steps on a fixed batch (the same on every rank: FSDP's averaged gradient is
    the single process's), LoRA dropout on, LoRA on every linear layer and the LM head (the
    head's LoRA sits in the root's FSDP unit)."""

    def __init__(self, shard: bool, shard_root: bool = False):
        super().__init__()
        self.tokenizer = build_char_tokenizer()
        base = build_tiny_llama(self.tokenizer, seed=0, dtype=torch.float64,
                                attn_implementation="sdpa")
        self.model = add_lora(base, r=8, alpha=16, dropout=0.1, seed=0,
                              target_modules=(*LORA_TARGET_MODULES, "lm_head"))
        randomize_lora_b(self.model, std=0.05, seed=1)
        self.probe_prompts = PROMPTS
        self.enc = self.tokenizer(["3+4=7", "1+1=2", "9+9=8"], return_tensors="pt",
                                  padding=True)
        self.shard, self.shard_root = shard, shard_root

    def configure_model(self) -> None:
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            for layer in self.model.get_base_model().model.layers:
                fully_shard(layer)
            fully_shard(self.model)
            if self.shard_root:
                fully_shard(self)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(64), batch_size=1)

    def training_step(self, batch, batch_idx):
        return self.model(**self.enc, labels=self.enc["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                 lr=2e-3, weight_decay=0.01)


class Record(L.Callback):
    """After the probe's hooks: its result for this step (rank 1 fails in PHASES[step])."""

    def __init__(self, probe: EntropyProbeCallback | None, fail: bool):
        self.probe, self.fail, self.results = probe, fail, {}
        self._stack = contextlib.ExitStack()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._stack.close()
        step = trainer.global_step
        if self.probe is not None and self.fail and trainer.global_rank == 1:
            self._stack.enter_context(inject(self.probe.probe, PHASES[step]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._stack.close()
        result = None if self.probe is None else self.probe.last_result
        if result is not None and result.step == trainer.global_step - 1:
            self.results[result.step] = {"core": result.core(), "error": result.error,
                                         "sequences": result.sequences}


def main(mode: str, out: Path, steps: int, ckpt: str | None = None) -> None:
    torch.set_num_threads(1)
    L.seed_everything(1234, verbose=False)
    sharded = mode.startswith("sharded")
    probe = None if mode == "sharded-unprobed" else EntropyProbeCallback(every=1, **PROBE)
    record = Record(probe, fail=mode == "sharded")
    strategy = (dict(devices=2, strategy=ModelParallelStrategy(data_parallel_size=2,
                                                               tensor_parallel_size=1))
                if sharded else dict(devices=1))
    callbacks = [c for c in (probe, record) if c is not None]
    logging = dict(logger=False, enable_checkpointing=False)
    if mode == "sharded-resume":
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1,
                                         save_last=True))
        logging = dict(logger=TensorBoardLogger(str(out), name="run", version=0))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(out),
                        callbacks=callbacks, **logging, **strategy)
    module = Policy(sharded, shard_root=mode == "sharded-root")
    try:
        trainer.fit(module, ckpt_path=ckpt)
    except ProbeConfigError as exc:  # saved for the test, which expects it in sharded-root
        torch.save({"refusal": str(exc), "steps": trainer.global_step},
                   out / f"rank{trainer.global_rank}.pt")
        return
    state = {"results": record.results, "rng": torch.get_rng_state(),
             "sharded": all(type(p).__name__ == "DTensor" for p in module.model.parameters())}
    optimizer = trainer.optimizers[0]
    for name, p in module.model.named_parameters():
        if p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            state[f"param:{name}"] = local.detach().clone()
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            state[f"grad:{name}"] = grad.clone()
            for key, value in optimizer.state[p].items():
                value = value.to_local() if hasattr(value, "to_local") else value
                state[f"state:{key}:{name}"] = value.clone()
    torch.save(state, out / f"rank{trainer.global_rank}{'_resumed' if ckpt else ''}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else len(PHASES),
         sys.argv[4] if len(sys.argv) > 4 else None)
