"""What the HF Trainer / TRL adapter needs to know about transformers: where its hooks sit, how
GRPOConfig's generation arguments map onto the probe's, how prompts are rendered, which layers
kernels replaced, which checkpoint a resume restored. Framework facts only; no hook logic.

Where the probe sits in one HF Trainer optimizer step (transformers 5.x ``_inner_training_loop``):
training_step (TRL: rollouts, rewards, loss) and backward on every accumulation micro-batch ->
gradient clipping to ``args.max_grad_norm`` -> ``on_pre_optimizer_step`` (gradients final and
clipped, theta unchanged, the lr of this step) -> ``optimizer.step()`` -> ``on_optimizer_step``
(theta' ready, gradients not yet zeroed) -> lr scheduler -> ``zero_grad`` ->
``state.global_step += 1`` -> ``on_step_end``. So the session's ``before_step`` runs in
``on_pre_optimizer_step`` and its ``after_step`` in ``on_optimizer_step``, and the probed step's
index is ``state.global_step`` read in ``on_pre_optimizer_step`` (0-based, like Lightning's).

TRL patches the policy's forward with a fused log-prob/entropy LM head that has no forward-mode
rule; it only runs on calls that pass ``fused_lm_head=True``, which the probe's passes never do,
so they take the model's original, differentiable forward. The input-require-grads hooks TRL
adds for gradient checkpointing are set aside by the engine during its passes. Liger's kernels
(``use_liger_kernel=True``) and layers actually replaced by Hub kernels
(``kernelcheck.kernel_layers``) are probed by the engine's reverse pass, and refused only with
``derivative="forward"``: the ``use_kernels`` flag alone decides nothing (transformers 5 sets
it for every ``from_pretrained`` when ``kernels`` is installed, and on a CPU no layer is
replaced).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import ProbeConfigError
from .kernelcheck import no_forward_rule_layers
from .observer import EntropyProbeWarning

# GRPOConfig fields that make TRL's rollouts differ from softmax(logits / temperature); the
# probe always samples E from the exact distribution.
_TRUNCATIONS = (("top_p", 1.0), ("top_k", 0), ("min_p", None), ("repetition_penalty", 1.0))


def from_args(args: Any, explicit: set[str]) -> dict[str, Any]:
    """Probe options that follow the trainer's generation arguments (GRPOConfig) where the
    user did not set them (``explicit``); warns once when the rollouts are not exact samples."""
    out: dict[str, Any] = {}
    temperature = getattr(args, "temperature", None)
    if "temperature" not in explicit and isinstance(temperature, (int, float)):
        out["temperature"] = float(temperature)
    length = getattr(args, "max_completion_length", None)
    if "max_new_tokens" not in explicit and isinstance(length, int) and length > 0:
        out["max_new_tokens"] = length
    if "derivative" not in explicit and getattr(args, "use_liger_kernel", False) is True:
        # Liger also patches module-level functions (RoPE, cross-entropy) no layer shows
        out["derivative"] = "reverse"
    changed = [f"{name}={getattr(args, name)!r}" for name, plain in _TRUNCATIONS
               if getattr(args, name, plain) not in (plain, None)
               and not (name == "top_k" and getattr(args, name) < 0)]
    if changed:
        warnings.warn(
            f"the trainer samples its rollouts with {', '.join(changed)}; the probe samples "
            "E from the exact softmax(logits / temperature), so its H_orig describes the "
            "untruncated policy, not the rollout distribution.",
            EntropyProbeWarning,
            stacklevel=4,
        )
    return out


def check_policy(policy: torch.nn.Module, args: Any, derivative: str) -> None:
    """Refuse, naming the option, the forward-mode derivative (``derivative="forward"``) of a
    policy running kernels without a forward-mode rule: Liger's (``use_liger_kernel=True``, or
    layers it patched) or layers replaced by Hub kernels. ``"auto"`` takes the reverse pass for
    them (``from_args`` asks for it under ``use_liger_kernel``)."""
    if derivative != "forward":
        return
    if getattr(args, "use_liger_kernel", False) is True:
        raise ProbeConfigError(
            "EntropyProbeTrainerCallback cannot take the forward-mode derivative "
            "(derivative='forward') with use_liger_kernel=True: Liger's kernels have no "
            "forward-mode rule. Pass derivative='auto' or 'reverse' (the reverse pass), or set "
            "use_liger_kernel=False.")
    replaced = [f"{name} ({kind} kernel)" for name, kind in no_forward_rule_layers(policy)]
    if replaced:
        shown = ", ".join(replaced[:4]) + (f" and {len(replaced) - 4} more" if
                                           len(replaced) > 4 else "")
        raise ProbeConfigError(
            f"EntropyProbeTrainerCallback cannot take the forward-mode derivative "
            f"(derivative='forward') of a model whose layers were replaced by Hub or Liger "
            f"kernels ({shown}), which have no forward-mode rule. Pass derivative='auto' or "
            "'reverse' (the reverse pass), or load the model without them (use_kernels=False, "
            "use_liger_kernel=False)."
        )


def saved_run(args: Any, state: Any, step: int, state_file: str) -> dict[str, Any] | None:
    """The probe state saved beside ``<output_dir>/checkpoint-<step>`` (``on_save``), if that
    is the checkpoint this train() resumed from: the trainer state it restored is the one saved
    with it (HF does not tell callbacks which checkpoint it resumed from: a checkpoint
    elsewhere, or another run's ``checkpoint-<step>``, is told apart by the fingerprint)."""
    path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}" / state_file
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("trainer_state") != fingerprint(state):
        return None
    return saved


def resolve_policy(own: torch.nn.Module | None, given: torch.nn.Module | None) -> torch.nn.Module:
    """The callback's own model, else the one the Trainer passes to its callbacks."""
    policy = own if own is not None else given
    if policy is None:
        raise ProbeConfigError(
            "EntropyProbeTrainerCallback got no model from the Trainer; pass model= (the "
            "policy, e.g. the PeftModel) to the callback.")
    return policy


def resolve_tokenizer(*candidates: Any) -> Any:
    """The first tokenizer given (the callback's, the Trainer's ``processing_class``, its
    ``tokenizer``); a multimodal processor's text tokenizer."""
    tok = next((t for t in candidates if t is not None), None)
    if tok is None:
        raise ProbeConfigError(
            "EntropyProbeTrainerCallback got no tokenizer: pass processing_class= to the "
            "Trainer, or tokenizer= to the callback.")
    if getattr(tok, "eos_token_id", None) is None and hasattr(tok, "tokenizer"):
        tok = tok.tokenizer
    return tok


def record_facts(every: int, state: Any) -> dict[str, Any]:
    """Facts of each record's run_metadata: ``every`` and the epoch (``state.epoch`` is
    fractional and not yet advanced for this step: its integer part, Lightning's epoch)."""
    epoch = getattr(state, "epoch", None)
    return {"every": every, **({} if epoch is None else {"epoch": int(epoch)})}


def checkpoint_dir(args: Any, state: Any) -> Path:
    """The directory the Trainer just saved a checkpoint to."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def fingerprint(state: Any) -> Any:
    """What identifies a checkpoint's trainer state (as saved, and as a resume restores it
    from ``trainer_state.json``): the step, the FLOs and the last log entry, JSON round-trip
    exact."""
    history = getattr(state, "log_history", None) or [None]
    return json.loads(json.dumps({"global_step": getattr(state, "global_step", None),
                                  "total_flos": getattr(state, "total_flos", None),
                                  "last_log": history[-1]}, default=str))


DEEPSPEED_REFUSAL = (
    "EntropyProbeTrainerCallback cannot probe a run under DeepSpeed: its optimizer is not a "
    "torch optimizer whose state holds the Adam moments of each LoRA tensor (ZeRO keeps them in "
    "flattened, partitioned buffers and steps with its own Adam kernel), so the step cannot be "
    "rebuilt exactly. Use FSDP2 (TrainingArguments(fsdp=True, fsdp_config={'version': 2})), DDP "
    "or a single device; docs/distributed.md says why.")


def check_parallelism(args: Any, model: torch.nn.Module) -> None:
    """ProbeConfigError for the parallelism whose optimizer state or parameters the probe cannot
    read, from the Trainer's arguments, accelerate's state and the model's
    ``config.distributed_config``: DeepSpeed, Megatron-LM, FSDP1 (``fsdp_config={'version':
    1}`` / accelerate's ``fsdp_version=1``), and tensor, pipeline, expert or context
    parallelism (ranks holding parts of the same rows; the probe shards E over every process).
    FSDP2 passes: the engine finds the sharded (DTensor) parameters on the model itself
    (``sharded.py``)."""
    state = _accelerator_state()
    layouts = (getattr(getattr(model, "config", None), "distributed_config", None),
               getattr(state, "parallelism_config", None))
    split = sorted({f"{name}_size={size}" for layout in layouts for name in ("tp", "pp", "ep", "cp")
                    if isinstance(size := getattr(layout, f"{name}_size", 1), int) and size > 1})
    if split:
        raise ProbeConfigError(
            f"EntropyProbeTrainerCallback supports data parallelism only (DDP, or FSDP2 over "
            f"every process), but the run splits the model or its sequences across ranks "
            f"({', '.join(split)}): those ranks hold parts of the same rows, and the probe "
            "shards E over every process. Use DistributedConfig(fsdp_size=<processes>) "
            "without tp/pp/ep sizes (or accelerate's FSDP2 without tp/cp), or remove the "
            "callback.")
    kind = getattr(getattr(state, "distributed_type", None), "name", None)
    if getattr(args, "deepspeed", None) or kind == "DEEPSPEED":
        raise ProbeConfigError(DEEPSPEED_REFUSAL)
    if kind == "MEGATRON_LM":
        raise ProbeConfigError(
            "EntropyProbeTrainerCallback cannot probe a run under Megatron-LM (its tensor- and "
            "pipeline-parallel parameters are not the model's); use FSDP2, DDP or one device.")
    plugin = getattr(state, "fsdp_plugin", None)
    versions = (getattr(plugin, "fsdp_version", None),
                (getattr(args, "fsdp_plugin_args", None) or {}).get("fsdp_version")
                if getattr(args, "fsdp", None) else None)
    if 1 in versions:
        raise ProbeConfigError(
            "EntropyProbeTrainerCallback cannot probe a run under FSDP1 (fsdp_version=1: its "
            "parameters are flattened into per-rank buffers whose slices the probe cannot map "
            "back to the LoRA tensors). Use FSDP2: fsdp_config={'version': 2} in the "
            "TrainingArguments (transformers' default), or fsdp_version: 2 in accelerate's "
            "config.")


def _accelerator_state() -> Any:
    """accelerate's ``AcceleratorState`` once an Accelerator made it (the Trainer's), else None."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover - accelerate ships with transformers' Trainer
        return None
    return AcceleratorState() if AcceleratorState._shared_state else None


def logging_dir(args: Any) -> Path:
    """Where the TensorBoard events go: ``args.logging_dir`` (transformers < 5), else
    ``$TENSORBOARD_LOGGING_DIR`` (what transformers 5's TensorBoardCallback reads), else
    ``<args.output_dir>/runs``."""
    for value in (getattr(args, "logging_dir", None), os.getenv("TENSORBOARD_LOGGING_DIR")):
        if value:
            return Path(os.path.expanduser(value))
    return Path(args.output_dir) / "runs"


def prompt_rows(prompts: Any) -> list[Any]:
    """The ``prompt`` column of a dataset, or the given sequence, as a list."""
    column_names = getattr(prompts, "column_names", None)
    if column_names is not None:
        if "prompt" not in column_names:
            raise ProbeConfigError(
                f"the prompt dataset has no 'prompt' column (columns: {list(column_names)}); "
                "rename the prompt column to 'prompt', or pass prompts= a list of strings."
            )
        return list(prompts["prompt"])
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ProbeConfigError(
            f"prompts must be a list of strings or conversations, or a dataset with a 'prompt' "
            f"column, got {type(prompts).__name__}. Wrap a single prompt in a list."
        )
    return list(prompts)


def _is_conversation(prompt: Any) -> bool:
    return (isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict)
            and "role" in prompt[0])


def format_prompts(prompts: list[Any], tokenizer: Any, chat_kwargs: dict[str, Any]) -> list[Any]:
    """Render conversations like GRPOTrainer does (the tokenizer's chat template with the
    generation prompt and ``args.chat_template_kwargs``); strings pass unchanged.

    The rendered text is tokenized again by the probe with the tokenizer's special tokens; a
    BOS that the template already wrote is dropped from the text so that it is not doubled.
    """
    out = []
    for prompt in prompts:
        if not _is_conversation(prompt):
            out.append(prompt)
            continue
        if getattr(tokenizer, "chat_template", None) is None:
            raise ProbeConfigError(
                "the prompts are conversations but the tokenizer has no chat template; set "
                "tokenizer.chat_template, or pass prompts= already formatted strings."
            )
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                             **chat_kwargs)
        bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id",
                                                                     None)
        if bos and text.startswith(bos) and tokenizer(text)["input_ids"][:2] == [bos_id, bos_id]:
            text = text[len(bos):]
        out.append(text)
    return out
