"""Lightning adapter of the entropy governor: ``EntropyGovernorCallback``.

It CHANGES TRAINING (the lr of governed steps, restored after each step); see ``governor.py``.
The engine's hooks sit on the optimizer itself: its pre-hook wraps Lightning's closure, so alpha
is chosen after ``training_step``, backward, ``on_before_optimizer_step`` and gradient clipping,
and its post-hook restores the lr before the lr scheduler steps. Single process only.

Example::

    from entropy_callback.governor_lightning import EntropyGovernorCallback
    trainer = Trainer(callbacks=[EntropyProbeCallback(every=20),
                                 EntropyGovernorCallback(floor=1.0, batch_size=64)])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from .config import ProbeConfig, ProbeConfigError
from .governor import EntropyGovernor, GovernorPolicy, GovernorRecord, resolve_options
from .governor_log import PREFIX, GovernorLog
from .observer import EntropyProbeWarning
from .prompts import check_prompts


class EntropyGovernorCallback(Callback):
    """Scale each optimizer step's lr by alpha in [alpha_min, 1] so that its predicted entropy
    change respects ``floor`` / ``max_drop`` / ``schedule`` (nats/token). Not an observer: it
    changes the steps it brakes; ``EntropyProbeCallback`` stays one.

    Args:
        prompts: the held-out pool of E (default: ``pl_module.<prompts_attr>``).
        floor, max_drop, schedule, alpha_min, every, ...: the ``GovernorPolicy`` (or
            ``policy=``); other keywords are ``ProbeConfig`` fields (``batch_size=64``).
        model_attr, tokenizer_attr, prompts_attr: where the policy, tokenizer and prompts live
            on the LightningModule.
    Logs TensorBoard ``entropy_governor/{alpha, predicted, realized, H, target}`` into the
    trainer's TensorBoardLogger and ``governor.jsonl``: into the run directory of an
    ``EntropyProbeCallback`` listed before it (same run id), else ``<log_dir>/entropy_governor``.
    ``records`` holds every ``GovernorRecord`` of the fit.
    """

    def __init__(self, prompts: Sequence[str | Sequence[int]] | None = None, *,
                 policy: GovernorPolicy | None = None,
                 config: ProbeConfig | Mapping[str, Any] | None = None,
                 model_attr: str = "model", tokenizer_attr: str = "tokenizer",
                 prompts_attr: str = "probe_prompts",
                 on_record: Callable[[GovernorRecord], Any] | None = None, **options: Any):
        self.policy, self.config = resolve_options(config, policy, options,
                                                   "EntropyGovernorCallback")
        self.prompts = None if prompts is None else check_prompts(prompts)
        self.model_attr, self.tokenizer_attr, self.prompts_attr = (model_attr, tokenizer_attr,
                                                                   prompts_attr)
        self.governor: EntropyGovernor | None = None
        self.log: GovernorLog | None = None
        self.records: list[GovernorRecord] = []
        self._on_record = on_record
        self._state: dict[str, Any] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.governor is not None:  # a later fit: bind to this fit's model, keep the state
            self.governor.detach()
            if self._state is None:
                self._state = self.governor.state_dict()
            self.governor = None
        if trainer.world_size > 1:
            raise ProbeConfigError("EntropyGovernorCallback runs in a single process (it reads "
                                   "E on one rank); use devices=1 or remove the callback.")
        if any(name in cls.__name__ for cls in type(trainer.strategy).__mro__
               for name in ("ModelParallel", "FSDP", "DeepSpeed")):
            raise ProbeConfigError(
                f"EntropyGovernorCallback runs on an unsharded model in one process, not under "
                f"{type(trainer.strategy).__name__} (sharded parameters); use Trainer(devices=1) "
                "with the default strategy, or remove the callback.")
        prompts = self.prompts if self.prompts is not None else check_prompts(
            _attr(pl_module, self.prompts_attr, "prompts"))
        model = _attr(pl_module, self.model_attr, "model")
        tokenizer = _attr(pl_module, self.tokenizer_attr, "tokenizer")
        self.governor = EntropyGovernor(model, tokenizer, prompts, self.config,
                                        policy=self.policy)
        if self._state is not None:
            self.governor.load_state_dict(self._state)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.governor is None:
            return
        later = trainer.callbacks[trainer.callbacks.index(self) + 1:]
        if any(type(cb).__name__ == "EntropyProbeCallback" for cb in later):
            warnings.warn("EntropyProbeCallback is listed after EntropyGovernorCallback: its "
                          "post-hook then runs after the governor restored the lr, and its "
                          "rebuilt step misses alpha. List the probe first.",
                          EntropyProbeWarning, stacklevel=2)
        self.log = _open_log(trainer)
        self.governor.attach(trainer.optimizers[0], step=lambda: trainer.global_step,
                             on_record=self._emit)

    def _emit(self, record: GovernorRecord) -> None:
        self.records.append(record)
        if self.log is not None:
            self.log(record)
        if self._on_record is not None:
            self._on_record(record)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception) -> None:
        self._close()

    def _close(self) -> None:
        if self.governor is not None:
            self.governor.detach()  # restores the lr of a step that never finished
        if self.log is not None:
            self.log.close()
            self.log = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self.governor is None else self.governor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = dict(state_dict)
        if self.governor is not None:
            self.governor.load_state_dict(self._state)


def _open_log(trainer: Trainer) -> GovernorLog | None:
    """The probe's run (id and directory) when an EntropyProbeCallback has one open, else a
    run of its own under the first logger's log_dir; TensorBoard into the trainer's logger."""
    if not trainer.is_global_zero:
        return None
    tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    probe = next((cb.run_logger for cb in trainer.callbacks
                  if getattr(cb, "run_logger", None) is not None
                  and getattr(cb.run_logger, "run_dir", None) is not None), None)
    if probe is not None:
        return GovernorLog(probe.run_dir, tensorboard=tb.experiment if tb else None,
                           run_id=probe.run_id, metadata={"framework": "lightning"})
    first = trainer.loggers[0] if trainer.loggers else None
    root = Path(first.log_dir) if first is not None and getattr(first, "log_dir", None) else (
        Path(trainer.default_root_dir))
    return GovernorLog(root / PREFIX, tensorboard=tb.experiment if tb else root / PREFIX,
                       metadata={"framework": "lightning"})


def _attr(pl_module: LightningModule, name: str, what: str) -> Any:
    value = getattr(pl_module, name, None)
    if value is None:
        raise ProbeConfigError(f"EntropyGovernorCallback cannot find the {what}: "
                               f"{type(pl_module).__name__} has no attribute {name!r}; pass "
                               f"{what}_attr='<name>'" + (" or prompts=[...]" if what == "prompts"
                                                         else "") + ".")
    return value
