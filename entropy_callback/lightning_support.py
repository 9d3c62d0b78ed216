"""What the Lightning adapter needs to know about a Lightning run: which strategies shard
parameters, where the policy, tokenizer and prompts live. Framework facts only; no hook logic."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer

from .config import ProbeConfigError
from .prompts import check_prompts

UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel")


def unsupported_strategy(strategy: Any) -> str | None:
    """The strategy's class name when it shards parameters (FSDP, DeepSpeed, ModelParallel),
    itself or through a base class; else None."""
    for cls in type(strategy).__mro__:
        if any(name in cls.__name__ for name in UNSUPPORTED_STRATEGIES):
            return type(strategy).__name__
    return None


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
