"""Lightning adapter: translates the Trainer's hooks into ``session.ProbeSession`` calls."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from .attribution_report import DDP_UNSUPPORTED
from .config import ProbeConfig, ProbeConfigError, name_of_attribute
from .lightning_support import check_fsdp2_root, fit_inputs, shards_with_fsdp2, strategy_refusal
from .observer import EntropyProbeWarning, contained
from .progress import lightning_postfix
from .prompts import check_prompts
from .session import ProbeSession
from .tags import PREFIX


class EntropyProbeCallback(Callback):
    r"""Every ``every`` optimizer steps, predict and measure the step's policy-entropy change.

    At step t (``trainer.global_step`` read in ``on_before_optimizer_step``, t % every == 0,
    t = 0 included) the probe samples a held-out batch E from the current policy and snapshots
    theta and the AdamW state; in the optimizer's step post-hook it rebuilds the step from the
    gradients AdamW consumed (after any clipping or repair), predicts delta H_1 = g_hat . Delta
    theta, and measures Delta H_true on the same E tokens by self-normalised importance
    sampling. Both go to TensorBoard under ``entropy_probe/`` and to the run's JSON directory
    (``<log_dir>/entropy_probe/``, or ``entropy_probe-<run_id>/`` when another run has that
    one), at step t, through a ``sinks.RunLogger``. Each ``fit`` is a new run, unless it resumes
    from a checkpoint holding this callback's state. A step the optimizer skips (GradScaler) is
    recorded as skipped and the next step taken is probed instead; several optimizer steps in
    one batch each get a record. A fit that raises writes the finished probes and releases its
run (``on_exception``); ``fit(ckpt_path=...)`` continues the checkpoint's run, in whatever
logger version directory this fit writes to.

    Args:
        prompts: held-out prompt pool (strings formatted for the model, or token-id lists);
            None = ``pl_module.<prompts_attr>``, else ``trainer.datamodule.<prompts_attr>``,
            read at setup.
        every: probe every this many optimizer steps.
        model, tokenizer: the policy and its tokenizer; by default read from
            ``pl_module.<model_attr>`` and ``pl_module.<tokenizer_attr>``.
        model_attr, tokenizer_attr: attribute names on the LightningModule.
        prompts_attr: attribute name of the prompt pool on the LightningModule or DataModule.
        name: the probe's name: the prefix of its TensorBoard tags (``<name>/deltaH1``) and,
            when not the default, part of its checkpoint ``state_key``. Two probes in one
            Trainer (e.g. two prompt pools) need two names; each gets its own JSON run
            directory either way.
        config: a ``ProbeConfig`` or a mapping of its fields; any field may also be a keyword
            (batch_size, max_new_tokens, temperature, normalize, log_level, strict...).
        sinks: extra sinks (``log(result)``, ``flush()``, ``close()``, ``name``) beside
            TensorBoard, the trainer's other loggers and the JSON records.

    Example::

        from entropy_callback import EntropyProbeCallback
        probe = EntropyProbeCallback(every=20, batch_size=64)  # prompts: pl_module.probe_prompts
        trainer = Trainer(callbacks=[probe], logger=TensorBoardLogger("runs"))
    """

    def __init__(
        self,
        prompts: Sequence[str | Sequence[int]] | None = None,
        every: int = 20,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        model_attr: str = "model",
        tokenizer_attr: str = "tokenizer",
        prompts_attr: str = "probe_prompts",
        name: str = PREFIX,
        config: ProbeConfig | Mapping[str, Any] | None = None,
        sinks: Iterable[Any] = (),
        **config_fields: Any,
    ):
        config = ProbeConfig.resolve(config, config_fields, "EntropyProbeCallback")
        self.session = ProbeSession(config, every, name=name, framework="lightning",
                                    sinks=sinks)
        self.prompts = None if prompts is None else check_prompts(prompts)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ProbeConfigError(
                f"model must be None (read pl_module.{model_attr}) or the policy module, got "
                f"{type(model).__name__}; pass the model object, not its name."
            )
        if tokenizer is not None and not callable(tokenizer):
            raise ProbeConfigError(
                f"tokenizer must be None (read pl_module.{tokenizer_attr}) or a tokenizer object, "
                f"got {type(tokenizer).__name__}; pass e.g. AutoTokenizer.from_pretrained(...)."
            )
        self._model, self._tokenizer = model, tokenizer
        self.model_attr = name_of_attribute("model_attr", model_attr)
        self.tokenizer_attr = name_of_attribute("tokenizer_attr", tokenizer_attr)
        self.prompts_attr = name_of_attribute("prompts_attr", prompts_attr)
        self.log_dir: Path | None = None
        self._batch_step = 0  # trainer.global_step when the current batch started
        self._bind_at_start = False  # ModelParallelStrategy: bind in on_train_start

    # the session's state, as attributes of the callback
    config = property(lambda self: self.session.config)
    every = property(lambda self: self.session.every)
    name = property(lambda self: self.session.name)
    probe = property(lambda self: self.session.probe)
    run_logger = property(lambda self: self.session.run_logger)
    json = property(lambda self: self.session.json)
    tensorboard = property(lambda self: self.session.tensorboard)
    probed_steps = property(lambda self: self.session.probed_steps)
    last_result = property(lambda self: self.session.last_result)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Each fit binds the engine to that fit's model, tokenizer and prompts (one callback
        reused for a second fit probes the second model)."""
        if stage != "fit":
            return
        self.session.end()  # a previous fit that ended without on_train_end / on_exception
        self.session.probe = None
        self._bind_at_start = False
        with contained("setup", None, self.config.strict, allow=(ProbeConfigError,)):
            refusal = strategy_refusal(trainer.strategy)
            if refusal is not None:
                raise ProbeConfigError(refusal)
            if shards_with_fsdp2(trainer.strategy):
                # configure_model() shards the policy after this hook: bind at train start
                self._bind_at_start = True
                return
            self.session.bind(*fit_inputs(self, trainer, pl_module))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        session = self.session
        if self._bind_at_start:  # ModelParallelStrategy: the policy is sharded by now
            self._bind_at_start = False
            with contained("setup", None, self.config.strict, allow=(ProbeConfigError,)):
                model, tokenizer, prompts = fit_inputs(self, trainer, pl_module)
                check_fsdp2_root(pl_module, model)
                session.bind(model, tokenizer, prompts)
        if session.probe is None:
            return
        with contained("setup", None, self.config.strict):
            session.set_distributed(trainer.global_rank, trainer.world_size)
            if trainer.world_size > 1 and self.config.attribution and trainer.is_global_zero:
                warnings.warn(f"attribution=True under {trainer.world_size} processes: "
                              f"{DDP_UNSUPPORTED}. Each record's attribution section says so.",
                              EntropyProbeWarning, stacklevel=2)
            tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
            first = trainer.loggers[0] if trainer.loggers else None
            if self.config.log_dir is not None:
                self.log_dir = Path(self.config.log_dir)
            elif first is not None and getattr(first, "log_dir", None):
                self.log_dir = Path(first.log_dir)
            else:
                self.log_dir = Path(trainer.default_root_dir)
            session.open(self.log_dir, start_step=trainer.global_step,
                         tensorboard=tb.experiment if trainer.is_global_zero and tb else None,
                         metric_loggers=[lg.log_metrics for lg in trainer.loggers
                                         if not isinstance(lg, TensorBoardLogger)],
                         metadata={"logger_version": None if first is None else first.version})
            for optimizer in trainer.optimizers:
                session.watch(optimizer)
            if trainer.is_global_zero:  # the probe's phase and rows in the progress bar
                session.probe.on_progress = lightning_postfix(trainer)

    # ------------------------------------------------------------------ the step
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.session.before_step(optimizer, trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """A probe whose step the optimizer skipped (no post-hook) is measured here; every
        probe of this batch gets the outputs of its step's micro-batches (U statistics,
        rollouts)."""
        self.session.add_outputs(outputs, self._batch_step)
        self.session.after_step()
        self.session.step_end(per_token_loss=getattr(pl_module, "per_token_loss", None),
                              loss_scale=1.0 / trainer.accumulate_grad_batches,
                              extra={"epoch": trainer.current_epoch})

    def on_train_end(self, trainer, pl_module) -> None:
        self.session.end(extra={"epoch": trainer.current_epoch})

    def on_exception(self, trainer, pl_module, exception) -> None:
        """Write the probes that finished before the exception, release the run."""
        self.session.end(extra={"epoch": trainer.current_epoch})

    # ------------------------------------------------------------------ checkpointing
    @property
    def state_key(self) -> str:
        """``EntropyProbeCallback`` (as before names existed), or with the name when one is
        given, so that two probes in one Trainer keep their own checkpoint state."""
        if self.name == PREFIX:
            return super().state_key
        return self._generate_state_key(name=self.name)

    def state_dict(self) -> dict[str, Any]:
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A checkpoint of this callback's run: the next fit continues that run (same run id,
        in this fit's log directory), unless ``every`` or the measurement config changed."""
        self.session.load_state_dict(state_dict, stacklevel=4)
