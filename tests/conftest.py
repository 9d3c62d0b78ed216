"""Shared fixtures: the tiny demo policy, the demo GRPO module and real Lightning runs on CPU.

Everything is small enough for a 2-core machine: a one-layer Llama of hidden size 32 with rank-4
LoRA, 8 sequences of at most 4 tokens per micro-batch, E batches of 16 sequences.
"""

from __future__ import annotations

import random
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from entropy_callback import EntropyProbeCallback
from entropy_callback.demos.grpo import GRPOModule, make_prompts
from entropy_callback.demos.tiny import build_policy

# The tiny policy of the Lightning tests (about 15k parameters, 3k of them LoRA).
TINY_POLICY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, lora_r=4)
# The demo GRPO task, shrunk: 4 prompts x 2 responses of <= 4 tokens per micro-batch.
TINY_GRPO = dict(group_size=2, prompts_per_step=4, max_new_tokens=4, lr=3e-3, warmup_steps=5,
                 total_steps=40)
# The probe's E batch: 16 sequences of <= 4 tokens, scored in one micro-batch.
TINY_PROBE = dict(batch_size=16, microbatch_size=16, max_new_tokens=4)
HELDOUT_SEED = 123


@pytest.fixture(scope="session", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread for the whole suite, restored afterwards.

    On a small shared machine torch's default thread pool oversubscribes the cores and a
    30-step tiny run takes a minute instead of a second; results do not depend on it (every
    comparison is between runs made under the same setting).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def heldout_prompts() -> list[str]:
    """The probe's held-out prompt pool (a different seed from the training pool)."""
    return make_prompts(16, seed=HELDOUT_SEED)


@pytest.fixture(scope="session")
def make_grpo() -> Callable[..., GRPOModule]:
    """``make_grpo(seed=0, lora_dropout=0.0, **grpo_overrides)``: seeds everything, then builds
    the tiny LoRA policy and the demo's GRPOModule (AdamW + per-step warmup-cosine schedule)."""

    def make(seed: int = 0, *, lora_dropout: float = 0.0, **overrides: Any) -> GRPOModule:
        lightning.seed_everything(seed, verbose=False)
        model, tokenizer = build_policy(seed=seed, lora_dropout=lora_dropout, **TINY_POLICY)
        return GRPOModule(model, tokenizer, make_prompts(64, seed=seed), seed=seed,
                          **{**TINY_GRPO, **overrides})

    return make


@pytest.fixture(scope="session")
def make_probe(heldout_prompts) -> Callable[..., EntropyProbeCallback]:
    """``make_probe(every, **probe_options)``: an EntropyProbeCallback with the tiny E batch."""

    def make(every: int, **options: Any) -> EntropyProbeCallback:
        return EntropyProbeCallback(heldout_prompts, every=every, **{**TINY_PROBE, **options})

    return make


@pytest.fixture(scope="session")
def fit() -> Callable[..., lightning.Trainer]:
    """``fit(module, root, max_steps=..., callbacks=(), **trainer_options)``: a real CPU Trainer
    with a TensorBoardLogger under ``root``, fitted; returns the trainer."""

    def run(module: lightning.LightningModule, root: str | Path, *, max_steps: int,
            callbacks: tuple = (), **options: Any) -> lightning.Trainer:
        trainer = lightning.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            logger=TensorBoardLogger(save_dir=str(root), name="run", version=0),
            callbacks=list(callbacks),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            log_every_n_steps=1,
            **options,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            trainer.fit(module)
        return trainer

    return run


# ------------------------------------------------------------------ the observer contract
def capture_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                  scheduler: Any = None) -> dict[str, Any]:
    """Everything the probe must leave as it found it, copied."""
    state: dict[str, Any] = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: (None if p.grad is None else p.grad.detach().clone())
                  for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "config": model.config.to_dict() if hasattr(model, "config") else None,
        "torch_rng": torch.get_rng_state().clone(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "matmul_precision": precision_settings(),
    }
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        state["optimizer"] = {
            names[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
            for p, s in optimizer.state.items()
        }
        state["param_groups"] = [{k: v for k, v in g.items() if k != "params"}
                                 for g in optimizer.param_groups]
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


# every (backend, op) pair of torch's fp32_precision API (torch/backends/*/__init__.py)
FP32_PRECISION = [(b, op) for b in ("cuda", "mkldnn") for op in ("all", "matmul", "conv", "rnn")]


def precision_settings() -> dict[str, str]:
    """torch's float32 precision settings, every (backend, op) of its ``fp32_precision`` API
    (torch >= 2.9; the legacy getter raises once that API is used), else the legacy value."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if getter is None:
        return {"legacy": torch.get_float32_matmul_precision()}
    return {f"{b}.{op}": getter(b, op) for b, op in [("generic", "all"), *FP32_PRECISION]}


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two ``capture_state`` snapshots (bitwise), as readable lines."""
    out = []
    for key in ("params", "grads"):
        if a[key].keys() != b[key].keys():
            out.append(f"{key}: different names")
        out += [f"{key}[{n}]" for n in a[key] if not _same_tensor(a[key][n], b[key].get(n))]
    for key in ("requires_grad", "training"):
        out += [f"{key}[{n}]: {v} vs {b[key].get(n)}" for n, v in a[key].items()
                if b[key].get(n) != v]
    if a["config"] != b["config"]:
        out.append("model config")
    if not torch.equal(a["torch_rng"], b["torch_rng"]):
        out.append("torch CPU RNG state")
    na, nb = a["numpy_rng"], b["numpy_rng"]
    if na[0] != nb[0] or not np.array_equal(na[1], nb[1]) or tuple(na[2:]) != tuple(nb[2:]):
        out.append("numpy RNG state")
    if a["python_rng"] != b["python_rng"]:
        out.append("python RNG state")
    if a["matmul_precision"] != b["matmul_precision"]:
        out.append("float32 matmul precision settings")
    if "optimizer" in a:
        if a["optimizer"].keys() != b["optimizer"].keys():
            out.append("optimizer state: different parameters")
        for name, sa in a["optimizer"].items():
            sb = b["optimizer"].get(name, {})
            for k, v in sa.items():
                same = _same_tensor(v, sb.get(k)) if torch.is_tensor(v) else v == sb.get(k)
                if not same:
                    out.append(f"optimizer state[{name}][{k}]")
        if a["param_groups"] != b["param_groups"]:
            out.append("optimizer param_groups")
    if a.get("scheduler") != b.get("scheduler"):
        out.append("lr scheduler state")
    return out


@pytest.fixture(scope="session")
def observer() -> types.SimpleNamespace:
    """``observer.capture(model, optimizer, scheduler)``, ``observer.differences(a, b)`` and
    ``observer.precision()`` (torch's float32 precision settings)."""
    return types.SimpleNamespace(capture=capture_state, differences=differences,
                                 precision=precision_settings)
