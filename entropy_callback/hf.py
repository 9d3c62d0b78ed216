"""Hugging Face Trainer / TRL adapter: decides *when* to probe and hands the trainer's facts to
the engine; the run logger writes the same TensorBoard tags and JSON records as Lightning's.

Where the probe sits in one HF Trainer optimizer step (transformers 5.x ``_inner_training_loop``):
training_step (TRL: rollouts, rewards, loss) and backward on every accumulation micro-batch ->
gradient clipping to ``args.max_grad_norm`` -> ``on_pre_optimizer_step`` (gradients final and
clipped, theta unchanged, the lr of this step) -> ``optimizer.step()`` -> ``on_optimizer_step``
(theta' ready, gradients not yet zeroed) -> lr scheduler -> ``zero_grad`` ->
``state.global_step += 1`` -> ``on_step_end``. So ``before_step`` runs in
``on_pre_optimizer_step`` and ``after_step`` in ``on_optimizer_step``, and the probed step's
index is ``state.global_step`` read in ``on_pre_optimizer_step`` (0-based, like Lightning's).

TRL patches the policy's forward with a fused log-prob/entropy LM head that has no forward-mode
rule; it only runs on calls that pass ``fused_lm_head=True``, which the probe's passes never do,
so they take the model's original, differentiable forward. The input-require-grads hooks TRL
adds for gradient checkpointing are set aside by the engine during its passes. Liger and Hub
kernels replace layers outright and are refused at ``on_train_begin``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import ProbeConfig, ProbeConfigError, probe_name
from .fileio import atomic_write
from .observer import EntropyProbeWarning
from .probe import EntropyProbe
from .result import ProbeResult
from .sinks import RunLogger
from .tensorboard import PREFIX

# GRPOConfig fields that make TRL's rollouts differ from softmax(logits / temperature); the
# probe always samples E from the exact distribution.
_TRUNCATIONS = (("top_p", 1.0), ("top_k", 0), ("min_p", None), ("repetition_penalty", 1.0))


class EntropyProbeTrainerCallback(TrainerCallback):
    r"""Every ``every`` optimizer steps of a ``transformers.Trainer`` (TRL's ``GRPOTrainer``
    included), predict and measure the step's policy-entropy change.

    At step t (``state.global_step`` read in ``on_pre_optimizer_step``, t % every == 0, t = 0
    included) the probe samples a held-out batch E from the current policy and snapshots theta
    and the AdamW state; after the step it rebuilds Delta theta from the gradients AdamW
    consumed (after the Trainer's clipping), predicts delta H_1 = g_hat . Delta theta, and
    measures Delta H_true on the same E tokens by self-normalised importance sampling;
    entropies in nats per token
    (``normalize="per_token"``). Records and scalars are those of ``EntropyProbeCallback``:
    TensorBoard tags ``entropy_probe/*`` (and the Custom Scalars layout) under the logging
    directory, JSON under ``<args.output_dir>/entropy_probe/``. Only the main process writes.

    Args:
        prompts: the held-out prompt pool: strings already formatted for the model,
            conversations (lists of ``{"role", "content"}`` messages, rendered with the
            tokenizer's chat template and the generation prompt, as GRPOTrainer renders them),
            or a ``datasets.Dataset`` with a ``prompt`` column (e.g. the trainer's
            ``eval_dataset``). ``attach(trainer)`` takes ``trainer.eval_dataset`` when omitted.
        every: probe every this many optimizer steps.
        model, tokenizer: the policy and its tokenizer; by default the ``model`` and
            ``processing_class`` the Trainer passes to its callbacks (the PeftModel under LoRA).
        name: the probe's name, the prefix of its TensorBoard tags (``<name>/deltaH1``); two
            probes on one Trainer need two names.
        config: a ``ProbeConfig``; any of its fields may also be given as keywords
            (batch_size, max_new_tokens, temperature, normalize, log_level, strict, log_dir...).
            When neither ``config`` nor the keyword is given, ``temperature`` follows
            ``args.temperature`` and ``max_new_tokens`` follows ``args.max_completion_length``
            (GRPOConfig), so that E is drawn like the rollouts.

    ``config.log_dir``, when set, holds both the JSON records and the TensorBoard events.

    Example::

        from entropy_callback.hf import EntropyProbeTrainerCallback
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...),
                              train_dataset=train, eval_dataset=heldout, peft_config=lora)
        EntropyProbeTrainerCallback.attach(trainer, every=20, batch_size=64)
        trainer.train()
    """

    def __init__(
        self,
        prompts: Any = None,
        every: int = 20,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        name: str = PREFIX,
        config: ProbeConfig | None = None,
        **config_fields: Any,
    ):
        self.name = probe_name(name)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ProbeConfigError(
                f"every must be an integer >= 1 (probe every N optimizer steps), got {every!r}."
            )
        ProbeConfig.check_names(config_fields, "EntropyProbeTrainerCallback")
        base = config.to_dict() if config is not None else {}
        self.config = ProbeConfig(**{**base, **config_fields})
        self._explicit = set(ProbeConfig.field_names()) if config is not None else set(
            config_fields)
        self.prompts = _prompt_rows(prompts) if prompts is not None else None
        self.every = every
        self._model, self._tokenizer = model, tokenizer
        self.probe: EntropyProbe | None = None
        self.run_logger: RunLogger | None = None
        self.probed_steps: list[int] = []
        self.last_result: ProbeResult | None = None
        self.run_dir: Path | None = None  # this run's JSON records, once training starts
        self._disabled = False
        self._rearm = False

    @classmethod
    def attach(cls, trainer: Any, prompts: Any = None, every: int = 20,
               **kwargs: Any) -> EntropyProbeTrainerCallback:
        """Build the callback (prompts default to ``trainer.eval_dataset``), add it to
        ``trainer`` and return it."""
        if prompts is None:
            prompts = getattr(trainer, "eval_dataset", None)
            if prompts is None:
                raise ProbeConfigError(
                    "EntropyProbeTrainerCallback.attach found no prompts: the trainer has no "
                    "eval_dataset. Pass prompts= (strings, conversations or a dataset with a "
                    "'prompt' column), or give the trainer an eval_dataset of held-out prompts."
                )
        callback = cls(prompts, every, **kwargs)
        trainer.add_callback(callback)
        return callback

    # ------------------------------------------------------------------ setup
    def on_train_begin(self, args, state, control, model=None, processing_class=None,
                       **kwargs) -> None:
        if self._disabled:
            return
        if self.probe is not None:  # a second train() call: a new run of the same probe
            if state.is_world_process_zero:
                self._open(args, state)
            return
        sharded = sharding(args)
        if sharded is not None:
            self._disabled = True
            warnings.warn(
                f"EntropyProbeTrainerCallback is disabled under {sharded}: sharded parameters "
                "and optimizer state are not supported yet (use DDP, or a single device).",
                EntropyProbeWarning,
                stacklevel=2,
            )
            return
        if getattr(args, "use_liger_kernel", False):
            raise ProbeConfigError(
                "EntropyProbeTrainerCallback cannot run with use_liger_kernel=True: Liger "
                "replaces the model's layers with kernels that have no forward-mode derivative, "
                "so delta H_1 cannot be computed. Set use_liger_kernel=False, or remove the "
                "callback."
            )
        policy = self._model if self._model is not None else model
        if policy is None:
            raise ProbeConfigError(
                "EntropyProbeTrainerCallback got no model from the Trainer; pass model= (the "
                "policy, e.g. the PeftModel) to the callback."
            )
        if any(isinstance(m, PreTrainedModel) and getattr(m, "use_kernels", False) is True
               for m in policy.modules()):
            raise ProbeConfigError(
                "EntropyProbeTrainerCallback cannot run on a model with Hub kernels "
                "(use_kernels=True, e.g. GRPOConfig(model_init_kwargs={'use_kernels': True})): "
                "they replace the model's layers with kernels that have no forward-mode "
                "derivative, so delta H_1 cannot be computed. Load the model without "
                "use_kernels, or remove the callback."
            )
        tok = self._resolve_tokenizer(processing_class, kwargs.get("tokenizer"))
        if self.prompts is None:
            raise ProbeConfigError(
                "EntropyProbeTrainerCallback has no prompts: pass prompts= (strings, "
                "conversations or a dataset with a 'prompt' column), or build it with "
                "EntropyProbeTrainerCallback.attach(trainer) to use trainer.eval_dataset."
            )
        chat_kwargs = getattr(args, "chat_template_kwargs", None) or {}
        prompts = format_prompts(self.prompts, tok, chat_kwargs if isinstance(chat_kwargs, dict)
                                 else {})
        self.config = ProbeConfig(**{**self.config.to_dict(), **self._from_args(args)})
        self.probe = EntropyProbe(policy, tok, prompts, self.config)
        if args.world_size > 1:
            self.probe.set_distributed(args.process_index, args.world_size)
        if state.is_world_process_zero:
            self._open(args, state)

    def _resolve_tokenizer(self, processing_class: Any, tokenizer: Any) -> Any:
        tok = next((t for t in (self._tokenizer, processing_class, tokenizer) if t is not None),
                   None)
        if tok is None:
            raise ProbeConfigError(
                "EntropyProbeTrainerCallback got no tokenizer: pass processing_class= to the "
                "Trainer, or tokenizer= to the callback."
            )
        if getattr(tok, "eos_token_id", None) is None and hasattr(tok, "tokenizer"):
            tok = tok.tokenizer  # a multimodal processor: its text tokenizer
        return tok

    def _from_args(self, args: Any) -> dict[str, Any]:
        """Probe options that follow the trainer's generation arguments (GRPOConfig) when the
        user did not set them; warns once when the rollouts are not exact samples."""
        out: dict[str, Any] = {}
        temperature = getattr(args, "temperature", None)
        if "temperature" not in self._explicit and isinstance(temperature, (int, float)):
            out["temperature"] = float(temperature)
        length = getattr(args, "max_completion_length", None)
        if "max_new_tokens" not in self._explicit and isinstance(length, int) and length > 0:
            out["max_new_tokens"] = length
        changed = [f"{name}={getattr(args, name)!r}" for name, plain in _TRUNCATIONS
                   if getattr(args, name, plain) not in (plain, None)
                   and not (name == "top_k" and getattr(args, name) < 0)]
        if changed:
            warnings.warn(
                f"the trainer samples its rollouts with {', '.join(changed)}; the probe samples "
                "E from the exact softmax(logits / temperature), so its H_orig describes the "
                "untruncated policy, not the rollout distribution.",
                EntropyProbeWarning,
                stacklevel=3,
            )
        return out

    def _open(self, args: Any, state: Any) -> None:
        """The run logger of this ``train()`` call (main process only): TensorBoard events and
        the Custom Scalars layout under the logging directory, JSON under ``args.output_dir``
        (all under ``config.log_dir`` when set). A ``train(resume_from_checkpoint=...)`` from
        a checkpoint this callback saved beside (``on_save``) continues that run, its records
        from the resumed step on replaced; any other ``train()`` is a new run with a directory
        of its own."""
        self._close()  # a train() that raised never reached on_train_end
        if self.config.log_dir is not None:
            json_dir = tb_dir = Path(self.config.log_dir)
        else:
            json_dir, tb_dir = Path(args.output_dir), logging_dir(args)
        start = int(getattr(state, "global_step", 0) or 0)
        resume = self._saved_run(args, state, start) if start > 0 else None
        if resume is None:
            self.probed_steps = []
        self.run_logger = RunLogger(
            self.config,
            json_dir,
            tensorboard=tb_dir,
            metadata={"framework": "hf", "every": self.every},
            name=self.name,
        ).open(resume_state=resume, start_step=start)
        self.run_dir = self.run_logger.run_dir

    @property
    def state_file(self) -> str:
        """The file this callback writes into each checkpoint directory."""
        return f"{self.name}.probe_state.json"

    def _saved_run(self, args: Any, state: Any, step: int) -> dict[str, Any] | None:
        """The run saved beside ``<output_dir>/checkpoint-<step>`` by ``on_save``, if that is
        the checkpoint this train() resumed from (the trainer state it restored is the one saved
        with it) and it was made with this probe's ``every`` and config; else None (a new run).

        HF does not tell callbacks which checkpoint it resumed from: a checkpoint elsewhere, or
        another run's ``checkpoint-<step>`` in the same output_dir, is told apart by the trainer
        state's fingerprint."""
        path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}" / self.state_file
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        run = saved.get("run") if isinstance(saved, dict) else None
        if not isinstance(run, dict) or saved.get("trainer_state") != _fingerprint(state):
            return None
        if saved.get("every") != self.every or saved.get("config_hash") != (
                self.config.config_hash()):
            warnings.warn(
                f"the checkpoint's probe run {run.get('run_id')} was made with another every or "
                "probe config than this callback's: this train() logs a new run (a directory of "
                "its own); the checkpoint's run keeps its records.",
                EntropyProbeWarning,
                stacklevel=3,
            )
            return None
        self.probed_steps = [t for t in saved.get("probed_steps", []) if isinstance(t, int)
                             and t < step]
        return run

    def on_save(self, args, state, control, **kwargs) -> None:
        """Beside the checkpoint the Trainer just wrote, the probe run's identity (main process
        only), so that resuming from that checkpoint continues this run."""
        if self.run_logger is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            return
        payload = {"every": self.every, "config_hash": self.config.config_hash(),
                   "probed_steps": list(self.probed_steps), "run": self.run_logger.state_dict(),
                   "trainer_state": _fingerprint(state)}
        try:
            atomic_write(folder / self.state_file, json.dumps(payload).encode())
        except OSError as exc:  # the observer contract: a checkpoint is never lost to us
            self.probe.warn_once("save", f"could not write {folder / self.state_file} ({exc}); "
                                 "a resume from this checkpoint will log a new probe run.")

    # ------------------------------------------------------------------ the step
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs) -> None:
        t = state.global_step
        if self.probe is None or optimizer is None or (t % self.every != 0 and not self._rearm):
            return
        if self.probe.pending:  # the last probed step never reached the optimizer: drop it
            self.probe.cancel()
        torch_optimizer = unwrap_optimizer(optimizer)
        if not _holds_any(torch_optimizer, self.probe.params):
            self.probe.warn_once(
                "foreign_optimizer", "the Trainer's optimizer holds none of the model's "
                "trainable parameters; the probe skips its steps.")
            return
        # theta and the AdamW state are snapshot here; after_step rebuilds the step from the
        # gradients AdamW read (the Trainer clipped them before this hook).
        self._rearm = False
        self.probe.before_step(torch_optimizer, step=t)

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        if self.probe is None or not self.probe.pending:
            return
        result = self.probe.after_step()
        if result is None:
            return
        if result.update_source == "skipped":  # e.g. GradScaler found inf: probe the next step
            self._rearm = True
        self._emit(result, state)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.probe is not None and self.probe.pending:
            self.probe.cancel()
        self._close()

    def _close(self) -> None:
        if self.run_logger is not None:
            self.run_logger.close()
            self.run_logger = None

    def _emit(self, result: ProbeResult, state: Any) -> None:
        self.last_result = result
        self.probed_steps.append(result.step)
        if self.run_logger is not None:
            # state.epoch is fractional and not yet advanced for this step: its integer part is
            # the epoch the step belongs to (Lightning's current_epoch)
            extra = {"global_step": result.step, "every": self.every}
            if state.epoch is not None:
                extra["epoch"] = int(state.epoch)
            self.run_logger.emit(result, extra)


def _fingerprint(state: Any) -> Any:
    """What identifies a checkpoint's trainer state (as saved, and as a resume restores it
    from ``trainer_state.json``): the step, the FLOs and the last log entry, JSON round-trip
    exact."""
    history = getattr(state, "log_history", None) or [None]
    return json.loads(json.dumps({"global_step": getattr(state, "global_step", None),
                                  "total_flos": getattr(state, "total_flos", None),
                                  "last_log": history[-1]}, default=str))


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers
    exposing ``.optimizer``); without it the engine would not recognise AdamW and would fall
    back to the observed step."""
    seen = 0
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def sharding(args: Any) -> str | None:
    """The sharding the Trainer runs under ("FSDP", "DeepSpeed", "Megatron-LM"), from its
    arguments or accelerate's state; None for a single device or DDP."""
    if getattr(args, "deepspeed", None):
        return "DeepSpeed"
    if getattr(args, "fsdp", None):
        return "FSDP"
    try:
        from accelerate.state import AcceleratorState, DistributedType
    except ImportError:  # pragma: no cover - accelerate ships with transformers' Trainer
        return None
    if not AcceleratorState._shared_state:
        return None
    kind = AcceleratorState().distributed_type
    names = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed",
             DistributedType.MEGATRON_LM: "Megatron-LM"}
    return names.get(kind)


def logging_dir(args: Any) -> Path:
    """Where the TensorBoard events go: ``args.logging_dir`` (transformers < 5), else
    ``$TENSORBOARD_LOGGING_DIR`` (what transformers 5's TensorBoardCallback reads), else
    ``<args.output_dir>/runs``."""
    for value in (getattr(args, "logging_dir", None), os.getenv("TENSORBOARD_LOGGING_DIR")):
        if value:
            return Path(os.path.expanduser(value))
    return Path(args.output_dir) / "runs"


def _prompt_rows(prompts: Any) -> list[Any]:
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


def _holds_any(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]) -> bool:
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return any(id(p) in ids for p in params.values())
