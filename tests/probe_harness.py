"""Small real runs for the reliability tests (faults, bad input, resume).

Everything is real: the tiny character-level Llama with peft LoRA adapters, the toy GRPO
task, a Lightning ``Trainer`` on CPU with a ``TensorBoardLogger`` and AdamW. The sizes are the
smallest that still exercise every code path, so that a probed step costs well under a second.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils._python_dispatch import TorchDispatchMode

from entropy_callback import EntropyProbeCallback, EntropyProbeWarning
from entropy_callback.demos import GRPOModule, build_policy, make_prompts

TINY_MODEL = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
SMALL_PROBE = dict(batch_size=8, microbatch_size=8, max_new_tokens=4)


def tiny_policy(seed: int = 0, **kwargs: Any):
    """(LoRA model, tokenizer): a one-layer Llama of hidden size 16."""
    return build_policy(seed=seed, **{**TINY_MODEL, **kwargs})


def grpo_module(seed: int = 0, cls: type[GRPOModule] = GRPOModule, **kwargs: Any) -> GRPOModule:
    """The toy GRPO task: 4 prompts x 2 responses of at most 4 tokens per step."""
    model, tokenizer = tiny_policy(seed)
    options = dict(group_size=2, prompts_per_step=4, max_new_tokens=4, lr=1e-2,
                   warmup_steps=1, total_steps=50)
    return cls(model, tokenizer, make_prompts(32, seed=seed), **{**options, **kwargs})


def probe_prompts(n: int = 8) -> list[str]:
    return make_prompts(n, seed=123)


def probe_callback(every: int = 1, **kwargs: Any) -> EntropyProbeCallback:
    return EntropyProbeCallback(probe_prompts(), every, **{**SMALL_PROBE, **kwargs})


def make_trainer(root: Path, callbacks: list, max_steps: int, **kwargs: Any) -> lightning.Trainer:
    """A CPU trainer logging to ``<root>/run/version_0`` (a fixed version, so that a resumed
    run writes into the same directory)."""
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=TensorBoardLogger(str(root), name="run", version=0),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    return lightning.Trainer(**{**options, **kwargs})


def fit(trainer: lightning.Trainer, module: lightning.LightningModule, seed: int = 0,
        **kwargs: Any) -> list[str]:
    """Seed, run ``trainer.fit`` and return the messages of the EntropyProbeWarnings raised."""
    lightning.seed_everything(seed, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, **kwargs)
    return probe_warnings(caught)


def probe_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, EntropyProbeWarning)]


def probe_dir(root: Path) -> Path:
    return Path(root) / "run" / "version_0" / "entropy_probe"


def jsonl_records(root: Path) -> list[dict[str, Any]]:
    """The lines of ``probes.jsonl``, in file order (duplicates kept)."""
    path = probe_dir(root) / "probes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_record(root: Path, step: int) -> dict[str, Any]:
    return json.loads((probe_dir(root) / f"step_{step:08d}.json").read_text())


def backward_on(model: torch.nn.Module, tokenizer) -> None:
    """Real gradients on the trainable parameters (one unpadded sequence, its LM loss)."""
    ids = tokenizer(["1+2=3"], return_tensors="pt")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()


def lora_state(module: GRPOModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_" in n}


class StepClock(lightning.Callback):
    """Knows which optimizer step is running: ``trainer.global_step`` at its batch start."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self.step = None


class ListSink:
    """A sink keeping every result it is given, in order."""

    name = "collect"

    def __init__(self) -> None:
        self.results: list = []

    def log(self, result) -> None:
        self.results.append(result)

    def flush(self) -> None:
        """Nothing buffered."""

    def close(self) -> None:
        """Nothing to close."""


class Collect(EntropyProbeCallback):
    """The probe callback, keeping every result it emits, in order (through a sink)."""

    def __init__(self, *args, **kwargs):
        self._collected = ListSink()
        super().__init__(*args, sinks=[self._collected], **kwargs)

    @property
    def results(self) -> list:
        return self._collected.results


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces among those ``counts``
    accepts (e.g. float64 only)."""

    def __init__(self, counts=torch.Tensor.is_floating_point):
        super().__init__()
        self.counts = counts
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t) and self.counts(t):
                self.largest = max(self.largest, t.numel())
        return out
