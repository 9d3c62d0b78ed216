"""Lightning adapter: decides *when* to probe and hands the trainer's facts to the engine."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from .config import ProbeConfig, ProbeConfigError
from .jsonlog import JsonLogWriter
from .observer import EntropyProbeWarning, PhaseRunner
from .probe import EntropyProbe, _check_prompts
from .progress import lightning_postfix
from .result import ProbeResult
from .tensorboard import TensorBoardSink, scalars

UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel")


class EntropyProbeCallback(Callback):
    r"""Every ``every`` optimizer steps, predict and measure the step's policy-entropy change.

    At step t (``trainer.global_step`` read in ``on_before_optimizer_step``, t % every == 0,
    t = 0 included) the probe samples a held-out batch E from the current policy, predicts
    delta H_1 = g_hat . Delta theta from the live AdamW state (with the trainer's gradient
    clipping), and after the optimizer step measures Delta H_true on the same E tokens by
    self-normalised importance sampling. Both go to TensorBoard under ``entropy_probe/`` and to
    ``<log_dir>/entropy_probe/`` as JSON, at step t.

    Args:
        prompts: held-out prompt pool (strings formatted for the model).
        every: probe every this many optimizer steps.
        model, tokenizer: the policy and its tokenizer; by default read from
            ``pl_module.<model_attr>`` and ``pl_module.<tokenizer_attr>``.
        model_attr, tokenizer_attr: attribute names on the LightningModule.
        config: a ``ProbeConfig``; any of its fields may also be given as keywords
            (batch_size, max_new_tokens, temperature, normalize, log_level, strict...).

    Example::

        from entropy_callback import EntropyProbeCallback
        probe = EntropyProbeCallback(prompts=heldout_prompts, every=20, batch_size=64)
        trainer = Trainer(callbacks=[probe], logger=TensorBoardLogger("runs"))
    """

    def __init__(
        self,
        prompts: list[str],
        every: int = 20,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        model_attr: str = "model",
        tokenizer_attr: str = "tokenizer",
        config: ProbeConfig | None = None,
        **config_fields: Any,
    ):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ProbeConfigError(
                f"every must be an integer >= 1 (probe every N optimizer steps), got {every!r}."
            )
        ProbeConfig.check_names(config_fields, "EntropyProbeCallback")
        base = config.to_dict() if config is not None else {}
        self.config = ProbeConfig(**{**base, **config_fields})
        self.prompts = _check_prompts(prompts)
        self.every = every
        self._model, self._tokenizer = model, tokenizer
        self.model_attr, self.tokenizer_attr = model_attr, tokenizer_attr
        self.probe: EntropyProbe | None = None
        self.tensorboard: TensorBoardSink | None = None
        self.json: JsonLogWriter | None = None
        self.log_dir: Path | None = None
        self.probed_steps: list[int] = []
        self.last_result: ProbeResult | None = None
        self._hooks: list[Any] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._ready: ProbeResult | None = None
        self._u_outputs: list[Any] = []
        self._u_step: int | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.probe is not None:
            return
        strategy = unsupported_strategy(trainer.strategy)
        if strategy is not None:
            warnings.warn(
                f"EntropyProbeCallback is disabled under {strategy}: sharded parameters and "
                "optimizer state are not supported yet (use DDP, or a single device).",
                EntropyProbeWarning,
                stacklevel=2,
            )
            return
        model = self._model if self._model is not None else _attr(pl_module, self.model_attr,
                                                                  "model")
        tok = self._tokenizer if self._tokenizer is not None else _attr(
            pl_module, self.tokenizer_attr, "tokenizer")
        self.probe = EntropyProbe(model, tok, self.prompts, self.config)
        if trainer.is_global_zero:
            self._setup_sinks(trainer)

    def _setup_sinks(self, trainer: Trainer) -> None:
        tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if self.config.log_dir is not None:
            self.log_dir = Path(self.config.log_dir)
        elif trainer.loggers and getattr(trainer.loggers[0], "log_dir", None):
            self.log_dir = Path(trainer.loggers[0].log_dir)
        else:
            self.log_dir = Path(trainer.default_root_dir)
        try:
            self.tensorboard = TensorBoardSink(
                experiment=tb.experiment if tb is not None else None,
                log_dir=None if tb is not None else self.log_dir,
            )
        except Exception as exc:
            self._sink_failed("tensorboard", exc)
        try:  # an unwritable log_dir costs the layout and the JSON records, with one warning
            if self.tensorboard is not None:
                self.tensorboard.write_layout(self.log_dir)
            self.json = JsonLogWriter(self.log_dir / "entropy_probe", self.config)
            self.json.write_config()
        except OSError as exc:
            self.json = None
            still = ("TensorBoard scalars are still logged" if self.tensorboard is not None
                     else "nothing of the probe is logged")
            warnings.warn(
                f"EntropyProbeCallback cannot write under log_dir={str(self.log_dir)!r} ({exc}): "
                f"no JSON records and no Custom Scalars layout; {still}. Pass log_dir= a "
                "writable directory.",
                EntropyProbeWarning,
                stacklevel=2,
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probe is None:
            return
        self._forget_from(trainer.global_step)
        if trainer.world_size > 1:
            self.probe.set_distributed(trainer.global_rank, trainer.world_size)
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if trainer.is_global_zero:  # the probe's phase and rows in the progress bar's postfix
            self.probe.on_progress = lightning_postfix(trainer)

    # ------------------------------------------------------------------ the step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._u_step != trainer.global_step:
            self._u_outputs, self._u_step = [], trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        t = trainer.global_step
        if self.probe is None or t % self.every != 0:
            return
        if self.probe.pending:  # the last probed step never reached the optimizer: drop it
            self.probe.cancel()
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        if not _holds_any(optimizer, self.probe.params):
            return
        self._optimizer = optimizer
        clip_val = trainer.gradient_clip_val
        # Lightning stores an explicit algorithm as GradClipAlgorithmType, whose str() is
        # "GradClipAlgorithmType.NORM": take the enum's value ("norm" / "value").
        algorithm = trainer.gradient_clip_algorithm
        self.probe.before_step(
            optimizer,
            clip_val=float(clip_val) if clip_val else None,
            clip_algorithm=str(getattr(algorithm, "value", algorithm) or "norm"),
            step=t,
        )

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self.probe is None or not self.probe.pending or optimizer is not self._optimizer:
            return
        self._ready = self.probe.after_step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._u_outputs.append(outputs)
        if self._ready is not None:
            result, self._ready = self._ready, None
            result.batch_statistics["U_batch"] = _u_statistics(self._u_outputs)
            self._emit(trainer, result)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._ready is not None:
            result, self._ready = self._ready, None
            self._emit(trainer, result)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self.tensorboard is not None:
            self.tensorboard.flush()

    # ------------------------------------------------------------------ sinks
    def _emit(self, trainer: Trainer, result: ProbeResult) -> None:
        self.last_result = result
        self.probed_steps.append(result.step)
        if not trainer.is_global_zero:
            return
        runner = PhaseRunner(result.step, self.config.strict, result.timing)
        if self.tensorboard is not None:
            with runner.phase("tensorboard"):
                self.tensorboard.log(result)
        for lg in trainer.loggers:
            if not isinstance(lg, TensorBoardLogger):
                with runner.phase("logger"):
                    lg.log_metrics(scalars(result), step=result.step)
        if runner.error is not None and result.error is None:
            result.error = runner.error
        if self.json is not None:
            with runner.phase("json"):
                self.json.write(result, {"global_step": result.step, "every": self.every,
                                         "epoch": trainer.current_epoch})

    def _forget_from(self, step: int) -> None:
        """Steps >= ``step`` are about to run (again, when resuming from a checkpoint older than
        the last probe): drop their records so that each probed step is logged once."""
        self.probed_steps = [t for t in self.probed_steps if t < step]
        if self.json is None:
            return
        try:
            dropped = self.json.drop_from(step)
        except OSError as exc:
            self._sink_failed("json", exc)
            return
        if dropped:
            warnings.warn(
                f"the run starts at step {step}: dropped the probe records of steps {dropped} "
                f"from {self.json.root}: an earlier run went past this point, and this run "
                "logs its own probes of those steps.",
                EntropyProbeWarning,
                stacklevel=2,
            )

    def _sink_failed(self, phase: str, exc: Exception) -> None:
        if self.config.strict:
            raise exc
        warnings.warn(f"entropy probe sink '{phase}' failed ({type(exc).__name__}: {exc}); "
                      "training continues.", EntropyProbeWarning, stacklevel=3)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "probed_steps": list(self.probed_steps),
                "config_hash": self.config.config_hash()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probed_steps = list(state_dict.get("probed_steps", []))


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
