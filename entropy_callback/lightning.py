"""Lightning adapter: decides *when* to probe and hands the trainer's facts to the engine."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from .attribution_report import DDP_UNSUPPORTED
from .config import ProbeConfig, ProbeConfigError, integer, name_of_attribute, probe_name
from .observer import EntropyProbeWarning
from .probe import EntropyProbe
from .progress import lightning_postfix
from .prompts import check_prompts
from .result import ProbeResult
from .sinks import RunLogger
from .tensorboard import PREFIX

UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel")


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
    one batch each get a record.

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
        **config_fields: Any,
    ):
        self.every = integer("every", every)
        self.name = probe_name(name)
        self.config = ProbeConfig.resolve(config, config_fields, "EntropyProbeCallback")
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
        self.probe: EntropyProbe | None = None
        self.run_logger: RunLogger | None = None
        self.log_dir: Path | None = None
        self._resume_state: dict[str, Any] | None = None
        self.probed_steps: list[int] = []
        self.last_result: ProbeResult | None = None
        self._hooks: list[Any] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._results: list[ProbeResult] = []
        self._rearm = False
        self._u_outputs: list[Any] = []
        self._u_step: int | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Each fit builds its own engine on that fit's model, tokenizer and prompts (one
        callback instance reused for a second fit probes the second model), and starts with
        nothing left from the last fit (one that failed may have left unwritten results)."""
        if stage != "fit":
            return
        self.probe = None
        for handle in self._hooks:  # left by a fit that ended in an exception
            handle.remove()
        self._hooks, self._results, self._rearm, self._optimizer = [], [], False, None
        self._u_outputs, self._u_step = [], None
        strategy = unsupported_strategy(trainer.strategy)
        if strategy is not None:
            warnings.warn(
                f"EntropyProbeCallback is disabled under {strategy}: sharded parameters and "
                "optimizer state are not supported yet (use DDP, or a single device).",
                EntropyProbeWarning,
                stacklevel=2,
            )
            return
        if self.config.attribution and not callable(getattr(pl_module, "per_token_loss", None)):
            raise ProbeConfigError(
                f"attribution=True needs {type(pl_module).__name__}.per_token_loss(rollouts) and "
                "training_step outputs carrying 'rollouts' (docs/attribution.md); add them, or "
                "pass attribution=False."
            )
        model = self._model if self._model is not None else _attr(pl_module, self.model_attr,
                                                                  "model")
        tok = self._tokenizer if self._tokenizer is not None else _attr(
            pl_module, self.tokenizer_attr, "tokenizer")
        prompts = self.prompts if self.prompts is not None else _attached_prompts(
            trainer, pl_module, self.prompts_attr)
        self.probe = EntropyProbe(model, tok, prompts, self.config)

    def _setup_sinks(self, trainer: Trainer) -> None:
        """Rank 0: open this fit's RunLogger; a resume of this callback's run (its state came
        from the checkpoint) keeps the run id and replaces only the steps it runs again."""
        self._close_sinks()
        resume, self._resume_state = self._resume_state, None
        if not trainer.is_global_zero:
            return
        tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        first = trainer.loggers[0] if trainer.loggers else None
        if self.config.log_dir is not None:
            self.log_dir = Path(self.config.log_dir)
        elif first is not None and getattr(first, "log_dir", None):
            self.log_dir = Path(first.log_dir)
        else:
            self.log_dir = Path(trainer.default_root_dir)
        self.run_logger = RunLogger(
            self.config,
            self.log_dir,
            tensorboard=tb.experiment if tb is not None else None,
            metric_loggers=[lg.log_metrics for lg in trainer.loggers
                            if not isinstance(lg, TensorBoardLogger)],
            metadata={"framework": "lightning", "every": self.every,
                      "logger_version": None if first is None else first.version},
            name=self.name,
        )
        self.run_logger.open(resume_state=resume, start_step=trainer.global_step)

    def _close_sinks(self) -> None:
        if self.run_logger is not None:
            self.run_logger.close()

    @property
    def json(self):
        """The run's JSON sink (``JsonLogWriter``; ``.root`` is the run directory), or None."""
        return None if self.run_logger is None else self.run_logger.json

    @property
    def tensorboard(self):
        """The run's ``TensorBoardSink``, or None."""
        return None if self.run_logger is None else self.run_logger.tensorboard

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probe is None:
            return
        self._setup_sinks(trainer)
        self._forget_from(trainer.global_step)
        if trainer.world_size > 1:
            self.probe.set_distributed(trainer.global_rank, trainer.world_size)
            if self.config.attribution and trainer.is_global_zero:
                warnings.warn(f"attribution=True under {trainer.world_size} processes: "
                              f"{DDP_UNSUPPORTED}. Each record's attribution section says so.",
                              EntropyProbeWarning, stacklevel=2)
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if trainer.is_global_zero:  # the probe's phase and rows in the progress bar's postfix
            self.probe.on_progress = lightning_postfix(trainer)

    # ------------------------------------------------------------------ the step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._u_step != trainer.global_step:
            self._u_outputs, self._u_step = [], trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.probe is None:
            return
        if self.probe.pending:  # the probed step never reached the optimizer's post-hook
            self._finish()
        t = trainer.global_step
        if t % self.every != 0 and not self._rearm:
            return
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        if not _holds_any(optimizer, self.probe.params):
            return
        self._optimizer, self._rearm = optimizer, False
        self.probe.before_step(optimizer, step=t)

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self.probe is None or not self.probe.pending or optimizer is not self._optimizer:
            return
        self._finish()

    def _finish(self) -> None:
        """Read the pending probe's step from the optimizer and queue its result. A step the
        optimizer did not take (GradScaler skipped it: no post-hook) is recorded as skipped, and
        the probe re-arms for the next optimizer step that happens."""
        result = self.probe.after_step()
        if result is None:
            return
        if result.update_source == "skipped":
            self._rearm = True
        self._results.append(result)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._u_outputs.append(outputs)
        if self.probe is not None and self.probe.pending:
            self._finish()
        results, self._results = self._results, []
        for result in results:
            result.batch_statistics["U_batch"] = _u_statistics(self._u_outputs)
            if self.config.attribution:
                self.probe.attribute(
                    result,
                    [o["rollouts"] for o in self._u_outputs
                     if isinstance(o, dict) and "rollouts" in o],
                    getattr(pl_module, "per_token_loss", None),
                    loss_scale=1.0 / trainer.accumulate_grad_batches,
                )
            self._emit(trainer, result)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.probe is not None and self.probe.pending:
            self._finish()
        results, self._results = self._results, []
        for result in results:
            self._emit(trainer, result)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._close_sinks()

    def on_exception(self, trainer, pl_module, exception) -> None:
        """Write the probes that finished before the exception, then close the sinks."""
        results, self._results = self._results, []
        for result in results:
            self._emit(trainer, result)
        self._close_sinks()

    # ------------------------------------------------------------------ sinks
    def _emit(self, trainer: Trainer, result: ProbeResult) -> None:
        self.last_result = result
        self.probed_steps.append(result.step)
        if self.run_logger is not None:
            self.run_logger.emit(result, {"global_step": result.step,
                                          "epoch": trainer.current_epoch})

    def _forget_from(self, step: int) -> None:
        """Steps >= ``step`` are about to run: forget them (the run logger drops their records
        when this is a resume of the same run)."""
        self.probed_steps = [t for t in self.probed_steps if t < step]

    # ------------------------------------------------------------------ checkpointing
    @property
    def state_key(self) -> str:
        """``EntropyProbeCallback`` (as before names existed), or with the name when one is
        given, so that two probes in one Trainer keep their own checkpoint state."""
        if self.name == PREFIX:
            return super().state_key
        return self._generate_state_key(name=self.name)

    def state_dict(self) -> dict[str, Any]:
        run = self.run_logger.state_dict() if self.run_logger is not None else None
        return {"every": self.every, "probed_steps": list(self.probed_steps),
                "config_hash": self.config.config_hash(), "run": run}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A checkpoint of this callback's run: the next fit resumes that run (same run id),
        unless the probe was changed (``every`` or the config): then it is a new run, so that a
        run's config.yaml describes all its records, and the checkpoint's run is left as it is."""
        self.probed_steps = list(state_dict.get("probed_steps", []))
        run = state_dict.get("run")
        changed = [name for name, saved, now in (
            ("every", state_dict.get("every"), self.every),
            ("config", state_dict.get("config_hash"), self.config.config_hash()))
            if saved is not None and saved != now]
        if changed and isinstance(run, dict):
            warnings.warn(
                f"the checkpoint's probe run {run.get('run_id')} was made with another "
                f"{' and '.join(changed)} than this callback's: this fit logs a new run (a "
                "directory of its own); the checkpoint's run keeps its records.",
                EntropyProbeWarning,
                stacklevel=2,
            )
            run = None
        self._resume_state = dict(run) if isinstance(run, dict) else None


def unsupported_strategy(strategy: Any) -> str | None:
    """The strategy's class name when it shards parameters (FSDP, DeepSpeed, ModelParallel),
    itself or through a base class; else None."""
    for cls in type(strategy).__mro__:
        if any(name in cls.__name__ for name in UNSUPPORTED_STRATEGIES):
            return type(strategy).__name__
    return None


def _attr(pl_module: LightningModule, name: str, what: str):
    value = getattr(pl_module, name, None)
    if value is None:
        raise ProbeConfigError(
            f"EntropyProbeCallback cannot find the {what}: {type(pl_module).__name__} has no "
            f"attribute {name!r}. Expose it as pl_module.{name}, pass {what}_attr='<name>', or "
            f"pass {what}= to the callback."
        )
    return value


def _attached_prompts(trainer: Trainer, pl_module: LightningModule, name: str) -> list:
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


def _holds_any(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]) -> bool:
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return any(id(p) in ids for p in params.values())


def _u_statistics(outputs: list[Any]) -> dict[str, Any]:
    """Update-batch statistics from training_step outputs carrying ``rewards``/``advantages``."""
    out: dict[str, Any] = {}
    for key in ("rewards", "advantages"):
        values = [o[key].detach().reshape(-1).to(torch.float64).cpu() for o in outputs
                  if isinstance(o, dict) and torch.is_tensor(o.get(key))]
        if values:
            v = torch.cat(values)
            name = "reward" if key == "rewards" else "advantages"
            out["num_sequences"] = int(v.numel())
            out[f"avg_{name}"] = float(v.mean())
            out[f"{name}_std"] = float(v.std()) if v.numel() > 1 else 0.0
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in out.items()}
