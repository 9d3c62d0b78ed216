"""``ProbeSession``: one probe run, framework-free. Adapters only translate hooks into it.

    session = ProbeSession(config, every=20, framework="plain")
    session.bind(model, tokenizer, prompts)          # at setup: the CURRENT model
    session.open("runs/exp1")                        # rank 0: the run's sinks
    for t, batch in enumerate(loader):
        loss = ...; loss.backward()
        session.before_step(optimizer, t)            # due steps: sample E, snapshot theta
        optimizer.step()
        session.after_step(optimizer)                # measure the pending probe, if any
        session.step_end({"rewards": rewards})       # U-batch facts -> one record per probe
        optimizer.zero_grad()
    session.end()                                    # write what is left, release the run

What it owns, so that every adapter behaves the same by construction:

- **schedule**: step t is due when ``t % every == 0`` (from the step index alone), or when the
  last probe's step was not taken (re-armed: the next step taken is probed instead);
- **pending**: a probe still pending when the next step begins never reached its post-step
  call; it is measured then, found not taken, and recorded as skipped (and the probe re-arms);
- the engine's calls, the U-batch statistics and rollouts handed INTO the engine, the emit to
  the ``RunLogger``, the run's state for checkpoints and its resume;
- **the barrier**: every public method runs its whole body contained (``observer.contained``):
  nothing raises into training unless ``strict=True``.

``before_step_hooks`` / ``after_step_hooks``: callables ``(session, step)`` run after the
session's own work at those points (a governor sits here); a failing hook is contained too.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import ProbeConfig, ProbeConfigError, check_step, integer, probe_name
from .observer import EntropyProbeWarning, contained
from .probe import EntropyProbe, Measurement
from .result import ProbeResult
from .sinks import RunLogger
from .tags import PREFIX

StepHook = Callable[["ProbeSession", int], Any]
_OPEN: weakref.WeakSet[ProbeSession] = weakref.WeakSet()  # sessions of this process with a run


class ProbeSession:
    """One probe run: when to probe, the engine's calls, the sinks, the checkpointed state.

    Args:
        config: the probe's ``ProbeConfig``.
        every: probe every this many optimizer steps (t = 0 included).
        name: the probe's name (TensorBoard tag prefix, checkpoint key).
        framework: recorded in ``config.yaml`` ("lightning", "hf", "plain", ...).
        rollouts: whether this adapter can hand the step's rollouts to ``step_end``; with
            ``config.attribution`` and no rollouts, a ``ProbeConfigError`` here.
        sinks: extra sinks for the ``RunLogger`` (each with ``name``, ``log(result)``,
            ``flush()``, ``close()``), added to the built-in ones.
    """

    def __init__(self, config: ProbeConfig, every: int, *, name: str = PREFIX,
                 framework: str = "plain", rollouts: bool = True,
                 sinks: Iterable[Any] = ()) -> None:
        if not isinstance(config, ProbeConfig):
            raise ProbeConfigError(f"ProbeSession needs a ProbeConfig, got "
                                   f"{type(config).__name__}.")
        self.config = config
        self.every = integer("every", every)
        self.name = probe_name(name)
        self.framework = framework
        if config.attribution and not rollouts:
            raise ProbeConfigError(
                f"attribution=True needs the step's rollouts and a per_token_loss, which the "
                f"{framework} adapter cannot supply (docs/attribution.md); pass "
                "attribution=False, or use the Lightning callback or the engine's "
                "after_step(rollouts=..., per_token_loss=...)."
            )
        self.sinks = list(sinks)
        for sink in self.sinks:
            if not all(callable(getattr(sink, m, None)) for m in ("log", "flush", "close")):
                raise ProbeConfigError(
                    f"sinks= must hold sinks with log(result), flush() and close() methods "
                    f"and a name, got {type(sink).__name__}.")
        self.probe: EntropyProbe | None = None
        self.run_logger: RunLogger | None = None
        self._writing = False
        self.probed_steps: list[int] = []
        self.last_result: ProbeResult | None = None
        self.before_step_hooks: list[StepHook] = []
        self.after_step_hooks: list[StepHook] = []
        self.rank, self.world_size = 0, 1
        self._resume: dict[str, Any] | None = None
        self._reset()

    def _reset(self) -> None:
        """Nothing left from a previous fit (one that failed may have left a pending probe)."""
        for _, handle in getattr(self, "_handles", []):
            handle.remove()
        self._handles: list[tuple[torch.optim.Optimizer, Any]] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._measured: list[Measurement] = []
        self._outputs: list[Any] = []
        self._outputs_step: int | None = None
        self._rearm = False

    # ------------------------------------------------------------------ setup
    def bind(self, model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any]) -> None:
        """Build the engine on this fit's model, tokenizer and prompts, dropping anything left
        from the last fit. Raises ``ProbeConfigError`` for bad input (a setup error)."""
        self._reset()
        self.probe = None
        self.probe = EntropyProbe(model, tokenizer, prompts, self.config)

    def set_distributed(self, rank: int, world_size: int, kind: str = "ddp") -> None:
        """Shard E over ``world_size`` data-parallel processes (``kind`` "ddp"). A model with
        FSDP2-sharded parameters needs nothing more: the engine set itself up from the default
        process group when ``bind`` built it, and this call repeats the same rank and size."""
        self.rank, self.world_size = int(rank), int(world_size)
        if kind != "ddp":
            raise ProbeConfigError(f"parallel kind {kind!r} is not supported yet; use 'ddp'.")
        if self.probe is not None and self.world_size > 1:
            self.probe.set_distributed(self.rank, self.world_size)

    def watch(self, optimizer: Any) -> None:
        """Measure from ``optimizer``'s step post-hook (registered once per optimizer), so that
        a probed step is read the moment the optimizer took it, under every adapter; a probe
        still pending at the next step is then one whose optimizer step never ran. Adapters
        call it at train start, so that the hook runs before those of callbacks listed after
        the probe (a governor restoring its lr); ``before_step`` calls it too."""
        with contained("watch", None, self.config.strict):
            inner = unwrap_optimizer(optimizer)
            if not any(watched is inner for watched, _ in self._handles):
                handle = inner.register_step_post_hook(
                    lambda opt, args, kwargs: self.after_step(opt))
                self._handles.append((inner, handle))

    def open(self, log_dir: str | Path | None, *, start_step: int = 0, **logger_options: Any
             ) -> None:
        """Rank 0: open this fit's ``RunLogger`` (``logger_options``: its ``tensorboard``,
        ``metric_loggers``, ``metadata``). A run whose state came through
        ``load_state_dict`` continues (same run id; its records from ``start_step`` on are
        replaced); otherwise this is a new run. Other ranks open nothing."""
        self.close()
        resume, self._resume = self._resume, None
        if resume is None:
            self.probed_steps = []
        self.probed_steps = [t for t in self.probed_steps if t < start_step]
        if self.rank != 0:
            return
        run_id = None if resume is None else resume.get("run_id")
        for other in [s for s in _OPEN if s is not self and run_id is not None
                      and s.run_logger is not None and s.run_logger.run_id == run_id]:
            other.close()  # this process resumes that run: the training that held it is over
        with contained("open", None, self.config.strict):
            metadata = {"framework": self.framework, "every": self.every,
                        **logger_options.pop("metadata", {})}
            if resume is not None and resume.get("run_dir") is not None:
                metadata["resumed_from_dir"] = str(resume["run_dir"])  # the earlier segment
            logger = RunLogger(self.config, log_dir, metadata=metadata, name=self.name,
                               sinks=self.sinks, **logger_options)
            self.run_logger = logger
            logger.open(resume_state=resume, start_step=int(start_step))
            self._writing = True
            _OPEN.add(self)

    def close(self) -> None:
        """Close the run's sinks and release its directory (``run_logger`` stays readable).
        Safe to call twice."""
        logger, self._writing = self.run_logger, False
        _OPEN.discard(self)
        if logger is not None:
            with contained("close", None, self.config.strict):
                logger.close()

    # ------------------------------------------------------------------ the step
    def due(self, step: int) -> bool:
        """Whether step ``step`` is probed: ``step % every == 0``, or re-armed after a step the
        optimizer did not take."""
        return step % self.every == 0 or self._rearm

    def before_step(self, optimizer: Any, step: int) -> None:
        """Before the optimizer's step ``step`` (gradients final): a probe still pending is
        recorded as skipped; a due step is snapshot and its E batch sampled."""
        with contained("before_step", step, self.config.strict):
            step = check_step(step)
            if self.probe is not None and self.probe.pending:
                self._measure()  # never reached its post-step call: not taken, skipped
            if self.probe is not None and self.due(step):
                inner = unwrap_optimizer(optimizer)
                if holds_any(inner, self.probe.params):
                    self._optimizer, self._rearm = inner, False
                    self.watch(inner)
                    self.probe.before_step(inner, step=step)
                else:
                    self.probe.warn_once("foreign_optimizer", "an optimizer holds none of the "
                                         "model's trainable parameters; the probe skips its "
                                         "steps.")
        self._run_hooks(self.before_step_hooks, step)

    def after_step(self, optimizer: Any = None) -> None:
        """After an optimizer step (its post-hook, or right after ``optimizer.step()``):
        measure the pending probe if ``optimizer`` is the one it snapshot (None: any)."""
        step = None
        with contained("after_step", None, self.config.strict):
            if self.probe is None or not self.probe.pending:
                return
            if optimizer is not None and unwrap_optimizer(optimizer) is not self._optimizer:
                return
            step = self._measure()
        if step is not None:
            self._run_hooks(self.after_step_hooks, step)

    def _measure(self) -> int | None:
        measurement = self.probe.measure()
        if measurement is None:
            return None
        if measurement.skipped:
            self._rearm = True
        self._measured.append(measurement)
        return measurement.step

    def add_outputs(self, outputs: Any, step: int) -> None:
        """One micro-batch's ``training_step`` output (a dict with ``rewards``/``advantages``
        tensors and, for attribution, ``rollouts``), the micro-batch having started at
        optimizer step ``step``; the outputs of an earlier step are dropped."""
        with contained("outputs", step, self.config.strict):
            if step != self._outputs_step:
                self._outputs, self._outputs_step = [], step
            self._outputs.append(outputs)

    def step_end(self, outputs: Any = None, *, per_token_loss=None, loss_scale: float = 1.0,
                 extra: Mapping[str, Any] | None = None) -> list[ProbeResult]:
        """The step's micro-batches are done: each probe measured since the last call becomes
        its one frozen ``ProbeResult`` (with the U-batch statistics and, with attribution, the
        rollouts of ``outputs`` and of ``add_outputs``), written to the sinks; returns them.
        ``extra``: merged into each record's ``run_metadata`` (e.g. the epoch)."""
        results: list[ProbeResult] = []
        with contained("step_end", None, self.config.strict):
            measured, self._measured = self._measured, []
            facts: dict[str, Any] = {}
            if measured:
                gathered = self._outputs + ([] if outputs is None else [outputs])
                facts = self._facts(gathered, per_token_loss, loss_scale)
            for measurement in measured:
                results.append(self.probe.finish(measurement, **facts))
        for result in results:
            self._emit(result, extra)
        return results

    def _facts(self, outputs: list[Any], per_token_loss, loss_scale: float) -> dict[str, Any]:
        facts: dict[str, Any] = {"batch_statistics": None}
        with contained("u_batch", None, self.config.strict):
            facts["batch_statistics"] = u_statistics(outputs)
        if self.config.attribution:
            facts.update(rollouts=[o["rollouts"] for o in outputs
                                   if isinstance(o, Mapping) and "rollouts" in o],
                         per_token_loss=per_token_loss, loss_scale=loss_scale)
        return facts

    def _emit(self, result: ProbeResult, extra: Mapping[str, Any] | None) -> None:
        self.last_result = result
        self.probed_steps.append(result.step)
        if self.run_logger is None or not self._writing:
            return
        with contained("emit", result.step, self.config.strict):
            self.run_logger.emit(result, {"global_step": result.step, **(extra or {})})

    def _run_hooks(self, hooks: list[StepHook], step: int) -> None:
        for hook in hooks:
            with contained("hook", step, self.config.strict):
                hook(self, step)

    def end(self, extra: Mapping[str, Any] | None = None) -> None:
        """The fit ended (normally or by an exception): measure a pending probe, write what
        finished, remove the post-hooks, release the run."""
        with contained("end", None, self.config.strict):
            if self.probe is not None and self.probe.pending:
                self._measure()
        self.step_end(extra=extra)
        self._reset()
        self.close()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the run: ``every``, the probed steps, the measurement's
        identity (``config_hash``) and the run's identity (``run``)."""
        run = self.run_logger.state_dict() if self.run_logger is not None else None
        return {"every": self.every, "probed_steps": list(self.probed_steps),
                "config_hash": self.config.config_hash(), "run": run}

    def load_state_dict(self, state: Mapping[str, Any], *, stacklevel: int = 3) -> bool:
        """A checkpoint's state: the next ``open`` continues its run (same run id), unless the
        probe measures something else (``every`` or the measurement config changed): then it
        is a new run, with a warning. Logging options may change freely. Returns whether the
        run continues."""
        if not isinstance(state, Mapping):
            return False
        self.probed_steps = [t for t in state.get("probed_steps", []) if isinstance(t, int)]
        run = state.get("run")
        if not isinstance(run, Mapping):
            self._resume = None
            return False
        changed = [name for name, saved, now in (
            ("every", state.get("every"), self.every),
            ("measurement config", state.get("config_hash"), self.config.config_hash()))
            if saved is not None and saved != now]
        if changed:
            warnings.warn(
                f"the checkpoint's probe run {run.get('run_id')} was made with another every "
                f"or probe config ({' and '.join(changed)} changed) than this probe's: this "
                "fit logs a new run (a directory of its own); the checkpoint's run keeps its "
                "records.",
                EntropyProbeWarning, stacklevel=stacklevel)
            self._resume = None
            return False
        self._resume = dict(run)
        return True

    # ------------------------------------------------------------------ views
    @property
    def json(self):
        """The run's JSON sink (``.root`` is the run directory), or None."""
        return None if self.run_logger is None else self.run_logger.json

    @property
    def tensorboard(self):
        """The run's TensorBoard sink, or None."""
        return None if self.run_logger is None else self.run_logger.tensorboard

    @property
    def run_dir(self) -> Path | None:
        """The directory of this run's JSON records, or None."""
        return None if self.run_logger is None else self.run_logger.run_dir


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Lightning's ``LightningOptimizer`` (``_optimizer``) and
    accelerate's ``AcceleratedOptimizer`` (``optimizer``)."""
    for _ in range(8):
        inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def holds_any(optimizer: Any, params: Mapping[str, torch.nn.Parameter]) -> bool:
    """Whether ``optimizer`` holds any of ``params``."""
    groups = getattr(optimizer, "param_groups", None) or []
    ids = {id(p) for g in groups for p in g.get("params", [])}
    return any(id(p) in ids for p in params.values())


def u_statistics(outputs: list[Any]) -> dict[str, Any]:
    """Update-batch statistics from training-step outputs carrying ``rewards``/``advantages``
    tensors (any layout, sparse included: densified); float64; non-finite values None."""
    out: dict[str, Any] = {}
    for key in ("rewards", "advantages"):
        values = []
        for o in outputs:
            value = o.get(key) if isinstance(o, Mapping) else None
            if torch.is_tensor(value):
                value = value.detach()
                if value.layout != torch.strided:
                    value = value.to_dense()
                values.append(value.reshape(-1).to(device="cpu", dtype=torch.float64))
        if values:
            v = torch.cat(values)
            name = "reward" if key == "rewards" else "advantages"
            out["num_sequences"] = int(v.numel())
            out[f"avg_{name}"] = float(v.mean())
            out[f"{name}_std"] = float(v.std()) if v.numel() > 1 else 0.0
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in out.items()}
