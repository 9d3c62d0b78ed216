"""HF Trainer / TRL adapter of the entropy governor: ``EntropyGovernorTrainerCallback``.

It CHANGES TRAINING (the lr of governed steps, restored after each step); see ``governor.py``.
At the first ``on_pre_optimizer_step`` it registers the engine's hooks on the torch optimizer
inside accelerate's wrapper; they fire inside ``optimizer.step()``: after the Trainer's
clipping and accelerate's unscale, and before the lr scheduler steps. The step index is
``state.global_step`` (0-based, as the probe's). Single process only.

Example::

    from entropy_callback.governor_hf import EntropyGovernorTrainerCallback
    trainer = GRPOTrainer(..., eval_dataset=heldout)
    trainer.add_callback(EntropyGovernorTrainerCallback(heldout, floor=1.0, batch_size=64))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import ProbeConfig, ProbeConfigError
from .fileio import atomic_write
from .governor import EntropyGovernor, GovernorPolicy, GovernorRecord, resolve_options
from .governor_log import PREFIX, GovernorLog
from .hf_support import format_prompts, logging_dir
from .session import unwrap_optimizer

STATE_FILE = "entropy_governor.state.json"


class EntropyGovernorTrainerCallback(TrainerCallback):
    """Scale each optimizer step's lr by alpha in [alpha_min, 1] so that its predicted entropy
    change respects ``floor`` / ``max_drop`` / ``schedule`` (nats/token). Not an observer.

    Args:
        prompts: the held-out pool of E: strings, conversations (rendered with the chat
            template as GRPOTrainer does) or a dataset with a ``prompt`` column.
        floor, max_drop, schedule, alpha_min, every, ...: the ``GovernorPolicy`` (or
            ``policy=``); other keywords are ``ProbeConfig`` fields. ``temperature`` and
            ``max_new_tokens`` follow GRPOConfig's ``temperature`` / ``max_completion_length``
            unless given.
    Logs TensorBoard ``entropy_governor/*`` under the logging directory and ``governor.jsonl``
    under ``<output_dir>/entropy_governor``. ``records`` holds every ``GovernorRecord``. Each
    checkpoint gets the controller's state (``entropy_governor.state.json``), which
    ``train(resume_from_checkpoint=...)`` reloads.
    """

    def __init__(self, prompts: Any, *, policy: GovernorPolicy | None = None,
                 config: ProbeConfig | Mapping[str, Any] | None = None, **options: Any):
        self.policy, self.config = resolve_options(config, policy, options,
                                                   "EntropyGovernorTrainerCallback")
        self._explicit = set(options) if config is None else set(ProbeConfig.field_names())
        self.prompts = _rows(prompts)
        self.governor: EntropyGovernor | None = None
        self.log: GovernorLog | None = None
        self.records: list[GovernorRecord] = []
        self._attached = False

    def on_train_begin(self, args, state, control, model=None, processing_class=None,
                       **kwargs) -> None:
        if self.governor is not None:  # a train() that raised never reached on_train_end:
            self.governor.detach()     # unhook it (and restore its lr) before a new one
            self.governor = None
        if self.log is not None:
            self.log.close()
            self.log = None
        if args.world_size > 1:
            raise ProbeConfigError("EntropyGovernorTrainerCallback runs in a single process; "
                                   "train on one device or remove the callback.")
        if model is None or processing_class is None:
            raise ProbeConfigError("EntropyGovernorTrainerCallback needs the Trainer's model "
                                   "and processing_class (pass processing_class= to it).")
        follow = {}
        if "temperature" not in self._explicit and isinstance(getattr(args, "temperature", None),
                                                               (int, float)):
            follow["temperature"] = float(args.temperature)
        length = getattr(args, "max_completion_length", None)
        if "max_new_tokens" not in self._explicit and isinstance(length, int) and length > 0:
            follow["max_new_tokens"] = length
        config = ProbeConfig(**{**self.config.to_dict(), **follow})
        chat = getattr(args, "chat_template_kwargs", None) or {}
        prompts = format_prompts(self.prompts, processing_class, chat)
        self.governor = EntropyGovernor(model, processing_class, prompts, config,
                                        policy=self.policy)
        self._attached = False
        saved = self._saved_state(args, state)
        if saved is not None:
            self.governor.load_state_dict(saved)
        if state.is_world_process_zero:
            self.log = GovernorLog(f"{args.output_dir}/{PREFIX}",
                                   tensorboard=logging_dir(args), metadata={"framework": "hf"})

    def _state_path(self, args, step: int) -> Path:
        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}" / STATE_FILE

    def _saved_state(self, args, state) -> dict[str, Any] | None:
        """The controller state saved beside ``checkpoint-<global_step>`` (a resumed train());
        HF does not tell callbacks which checkpoint it resumed from, so the one of that step in
        ``output_dir`` is taken for it."""
        step = int(getattr(state, "global_step", 0) or 0)
        if step == 0:
            return None
        try:
            saved = json.loads(self._state_path(args, step).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        ok = isinstance(saved, dict) and saved.get("global_step") == step
        return saved.get("governor") if ok and isinstance(saved.get("governor"), dict) else None

    def on_save(self, args, state, control, **kwargs) -> None:
        """Beside the checkpoint just written: the controller's state (ceiling, sensitivity,
        entropy estimate), which a train() resumed from it reloads."""
        if self.governor is None or not state.is_world_process_zero:
            return
        path = self._state_path(args, state.global_step)
        if path.parent.is_dir():
            payload = {"global_step": state.global_step, "governor": self.governor.state_dict()}
            try:
                atomic_write(path, json.dumps(payload).encode())
            except OSError as exc:  # a checkpoint is never lost to the governor
                self.governor.probe.warn_once("save", f"could not write {path} ({exc}); a "
                                              "resume from it starts the controller afresh.")

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs) -> None:
        if self.governor is None or self._attached or optimizer is None:
            return
        self.governor.attach(unwrap_optimizer(optimizer), step=lambda: state.global_step,
                             on_record=self._emit)
        self._attached = True

    def _emit(self, record: GovernorRecord) -> None:
        self.records.append(record)
        if self.log is not None:
            self.log(record)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.governor is not None:
            self.governor.detach()
        if self.log is not None:
            self.log.close()
            self.log = None


def _rows(prompts: Any) -> list[Any]:
    """The ``prompt`` column of a dataset, or the given list."""
    names = getattr(prompts, "column_names", None)
    if names is not None:
        if "prompt" not in names:
            raise ProbeConfigError(f"the prompt dataset has no 'prompt' column ({list(names)}); "
                                   "pass prompts= a list of strings.")
        return list(prompts["prompt"])
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ProbeConfigError("prompts must be a non-empty list of strings or conversations, "
                               f"or a dataset with a 'prompt' column, got {prompts!r:.80}.")
    return list(prompts)
