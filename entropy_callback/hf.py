"""Hugging Face Trainer / TRL adapter: translates the Trainer's callback hooks into
``session.ProbeSession`` calls (where each hook sits in a step: ``hf_support``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .config import ProbeConfig, ProbeConfigError
from .fileio import atomic_write
from .hf_support import (
    check_parallelism,
    check_policy,
    checkpoint_dir,
    fingerprint,
    format_prompts,
    from_args,
    logging_dir,
    prompt_rows,
    record_facts,
    resolve_policy,
    resolve_tokenizer,
    saved_run,
)
from .observer import contained
from .prompts import check_model
from .session import ProbeSession
from .tags import PREFIX

__all__ = ["EntropyProbeTrainerCallback", "format_prompts"]


class EntropyProbeTrainerCallback(TrainerCallback):
    r"""Every ``every`` optimizer steps of a ``transformers.Trainer`` (TRL's ``GRPOTrainer``
    included), predict and measure the step's policy-entropy change.

    At step t (``state.global_step`` in ``on_pre_optimizer_step``, t % every == 0, t = 0
    included) the probe does what ``EntropyProbeCallback`` does, with the same records and
    scalars: TensorBoard tags ``entropy_probe/*`` under the logging directory, JSON under
    ``<args.output_dir>/entropy_probe/``. Only the main process writes.

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

    Under FSDP2 (accelerate's ``fsdp_config={"version": 2}``, or transformers'
    ``from_pretrained(distributed_config=...)``) the probe runs on the sharded model the Trainer
    hands its callbacks, on every rank; FSDP1, DeepSpeed and Megatron-LM raise a
    ``ProbeConfigError`` at ``on_train_begin`` (docs/distributed.md).

    ``config.log_dir``, when set, holds the JSON records and the TensorBoard events. ``sinks``:
    extra sinks. ``attribution=True`` is refused (the Trainer hands callbacks no rollouts). A
    ``train()`` that raised is released at the next ``on_train_begin`` (or when collected).

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
        config: ProbeConfig | Mapping[str, Any] | None = None,
        sinks: Iterable[Any] = (),
        **config_fields: Any,
    ):
        resolved = ProbeConfig.resolve(config, config_fields, "EntropyProbeTrainerCallback")
        self.session = ProbeSession(resolved, every, name=name, framework="hf",
                                    rollouts=False, sinks=sinks)
        self._base = resolved
        self._explicit = set(ProbeConfig.field_names()) if config is not None else set(
            config_fields)
        self.prompts = prompt_rows(prompts) if prompts is not None else None
        if model is not None:
            check_model(model)
        self._model, self._tokenizer = model, tokenizer

    config = property(lambda self: self.session.config)
    every = property(lambda self: self.session.every)
    name = property(lambda self: self.session.name)
    probe = property(lambda self: self.session.probe)
    run_logger = property(lambda self: self.session.run_logger)
    run_dir = property(lambda self: self.session.run_dir)
    probed_steps = property(lambda self: self.session.probed_steps)
    last_result = property(lambda self: self.session.last_result)
    # the file this callback writes into each checkpoint directory
    state_file = property(lambda self: f"{self.name}.probe_state.json")

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
        """Each train() binds the engine to the Trainer's current model and optimizer and
        opens its run: a resume from a checkpoint this callback saved beside (``on_save``)
        continues that run, any other train() is a new run with a directory of its own."""
        session = self.session
        session.end()  # a train() that raised never reached on_train_end: release its run
        policy = resolve_policy(self._model, model)
        with contained("setup", None, self._base.strict, allow=(ProbeConfigError,)):
            check_parallelism(args, policy)
            check_policy(policy, args, self._base.derivative)
            tok = resolve_tokenizer(self._tokenizer, processing_class, kwargs.get("tokenizer"))
            if self.prompts is None:
                raise ProbeConfigError(
                    "EntropyProbeTrainerCallback has no prompts: pass prompts= (strings, "
                    "conversations or a dataset with a 'prompt' column), or build it with "
                    "EntropyProbeTrainerCallback.attach(trainer) to use trainer.eval_dataset.")
            chat = getattr(args, "chat_template_kwargs", None) or {}
            prompts = format_prompts(self.prompts, tok, chat if isinstance(chat, dict) else {})
            session.config = ProbeConfig(**{**self._base.to_dict(),
                                            **from_args(args, self._explicit)})
            session.bind(policy, tok, prompts)
        if session.probe is None:  # the setup failed (one warning): no probe in this train()
            return
        with contained("setup", None, session.config.strict):
            session.set_distributed(args.process_index, args.world_size)
            start = int(getattr(state, "global_step", 0) or 0)
            saved = saved_run(args, state, start, self.state_file) if start > 0 else None
            if saved is not None:
                session.load_state_dict(saved, stacklevel=5)
            if session.config.log_dir is not None:
                json_dir = tb_dir = Path(session.config.log_dir)
            else:
                json_dir, tb_dir = Path(args.output_dir), logging_dir(args)
            session.open(json_dir, start_step=start, tensorboard=tb_dir)
            if kwargs.get("optimizer") is not None:
                session.watch(kwargs["optimizer"])

    def on_save(self, args, state, control, **kwargs) -> None:
        """Beside the checkpoint the Trainer just wrote, the probe run's state (main process
        only), so that resuming from that checkpoint continues this run."""
        session = self.session
        folder = checkpoint_dir(args, state)
        if session.run_logger is None or not state.is_world_process_zero or not folder.is_dir():
            return
        with contained("save", state.global_step, session.config.strict):
            payload = {**session.state_dict(), "trainer_state": fingerprint(state)}
            # a failed write is a warning from ``contained`` (a resume from this checkpoint
            # then logs a new probe run): a checkpoint is never lost to the probe
            atomic_write(folder / self.state_file, json.dumps(payload).encode())

    # ------------------------------------------------------------------ the step
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs) -> None:
        if optimizer is not None:  # gradients final (clipped by the Trainer), theta unchanged
            self.session.before_step(optimizer, state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.session.after_step()
        self.session.step_end(extra=record_facts(self.every, state))

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.session.end(extra=record_facts(self.every, state))
