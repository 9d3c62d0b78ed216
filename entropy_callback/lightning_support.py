"""What the Lightning adapter needs to know about a Lightning run: which strategies shard
parameters, where the policy, tokenizer and prompts live. Framework facts only; no hook logic."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer

from .config import ProbeConfigError
from .prompts import check_prompts

DEEPSPEED_REFUSAL = (
    "EntropyProbeCallback cannot probe a DeepSpeed run ({strategy}): DeepSpeed's optimizer is "
    "not a torch optimizer whose state holds each LoRA tensor's Adam moments (ZeRO keeps them, "
    "and the fp32 master weights, in flattened partitions, and steps with its own kernel), so "
    "the step cannot be rebuilt exactly. Use ModelParallelStrategy with fully_shard (FSDP2), "
    "DDP or a single device, or remove the callback (docs/distributed.md)."
)
FSDP1_REFUSAL = (
    "EntropyProbeCallback cannot probe Lightning's FSDPStrategy ({strategy}): it wraps the "
    "model with FSDP1 (FullyShardedDataParallel), whose flat per-rank buffers the probe cannot "
    "map back to the LoRA tensors. Use ModelParallelStrategy(data_parallel_size=<processes>, "
    "tensor_parallel_size=1) and apply torch.distributed.fsdp.fully_shard (FSDP2) in "
    "configure_model(), which the probe supports, or DDP (docs/distributed.md)."
)


def strategy_refusal(strategy: Any) -> str | None:
    """Why the probe cannot run under ``strategy`` (DeepSpeed; FSDPStrategy, i.e. FSDP1; a
    ModelParallelStrategy with tensor parallelism), or None: a single device, DDP, or
    ModelParallelStrategy sharding data-parallel with FSDP2."""
    name = type(strategy).__name__
    for cls in type(strategy).__mro__:
        if "DeepSpeed" in cls.__name__:
            return DEEPSPEED_REFUSAL.format(strategy=name)
        if cls.__name__ == "FSDPStrategy":
            return FSDP1_REFUSAL.format(strategy=name)
    if shards_with_fsdp2(strategy):
        mesh = getattr(strategy, "_device_mesh", None)
        size = (mesh["tensor_parallel"].size() if mesh is not None
                else getattr(strategy, "_tensor_parallel_size", 1))
        if size not in (1, "auto") or (size == "auto" and strategy.world_size > 1):
            return (f"EntropyProbeCallback supports ModelParallelStrategy with data parallelism "
                    f"only (FSDP2 fully_shard over every process), but tensor_parallel_size is "
                    f"{size}: tensor-parallel ranks hold parts of the same rows. Pass "
                    "ModelParallelStrategy(data_parallel_size=<processes>, "
                    "tensor_parallel_size=1), or remove the callback.")
    return None


def shards_with_fsdp2(strategy: Any) -> bool:
    """Whether the fit runs under Lightning's ModelParallelStrategy (the model sharded in
    ``configure_model`` with FSDP2's ``fully_shard``, after the callbacks' ``setup``)."""
    import lightning.pytorch.strategies as strategies

    cls = getattr(strategies, "ModelParallelStrategy", None)  # Lightning >= 2.3
    return cls is not None and isinstance(strategy, cls)


def check_fsdp2_root(pl_module: LightningModule, model: Any) -> None:
    """ProbeConfigError when the FSDP2 root is the LightningModule rather than the policy: the
    probe calls the policy's forward, which would not unshard the root's own parameters."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: the engine refuses the sharded model, saying so
        return
    if model is not pl_module and isinstance(pl_module, FSDPModule):
        raise ProbeConfigError(
            f"EntropyProbeCallback: fully_shard was applied to the LightningModule "
            f"({type(pl_module).__name__}); the probe runs the policy's own forward, which "
            "does not unshard the LightningModule's parameters. In configure_model(), shard "
            "the policy instead: fully_shard(layer) for its blocks, then "
            "fully_shard(self.model) (Lightning's FSDP2 recipe).")


def module_attr(pl_module: LightningModule, name: str, what: str):
    value = getattr(pl_module, name, None)
    if value is None:
        raise ProbeConfigError(
            f"EntropyProbeCallback cannot find the {what}: {type(pl_module).__name__} has no "
            f"attribute {name!r}. Expose it as pl_module.{name}, pass {what}_attr='<name>', or "
            f"pass {what}= to the callback."
        )
    return value


def attached_prompts(trainer: Trainer, pl_module: LightningModule, name: str) -> list:
    """``pl_module.<name>``, else ``trainer.datamodule.<name>``: the callback's prompt pool."""
    for where, owner in (("pl_module", pl_module), ("trainer.datamodule", trainer.datamodule)):
        prompts = getattr(owner, name, None) if owner is not None else None
        if prompts is not None:
            try:
                return check_prompts(prompts)
            except ProbeConfigError as exc:
                raise ProbeConfigError(f"{where}.{name}: {exc}") from None
    raise ProbeConfigError(
        f"EntropyProbeCallback has no prompts: pass prompts=[...] to the callback, or set "
        f"{type(pl_module).__name__}.{name} (pl_module.{name}), or trainer.datamodule.{name}; "
        f"another attribute name can be given as prompts_attr= (now {name!r})."
    )


def fit_inputs(callback: Any, trainer: Trainer, pl_module: LightningModule) -> tuple:
    """(model, tokenizer, prompts) of this fit: the callback's own, else the module's (and the
    DataModule's prompts); attribution's protocol checked. Raises ProbeConfigError."""
    if callback.config.attribution and not callable(getattr(pl_module, "per_token_loss", None)):
        raise ProbeConfigError(
            f"attribution=True needs {type(pl_module).__name__}.per_token_loss(rollouts) and "
            "training_step outputs carrying 'rollouts' (docs/attribution.md); add them, or "
            "pass attribution=False."
        )
    model = callback._model if callback._model is not None else module_attr(
        pl_module, callback.model_attr, "model")
    tok = callback._tokenizer if callback._tokenizer is not None else module_attr(
        pl_module, callback.tokenizer_attr, "tokenizer")
    prompts = callback.prompts if callback.prompts is not None else attached_prompts(
        trainer, pl_module, callback.prompts_attr)
    return model, tok, prompts
