"""The engine: ``EntropyProbe`` measures one optimizer step, framework-free.

    probe = EntropyProbe(model, tokenizer, prompts, ProbeConfig(batch_size=64))
    loss.backward()
    probe.before_step(optimizer)        # at theta: sample E, snapshot theta and the Adam state
    optimizer.step()
    result = probe.after_step()         # p.grad as Adam read it: rebuild Delta theta, delta H_1
                                        # at theta; rescore E at theta', Delta H_true by SNIS

``after_step`` is ``finish(measure())``: an adapter whose update-batch facts (rewards,
rollouts) arrive after the optimizer step calls ``measure()`` in the step's post-hook and
``finish(measurement, batch_statistics=..., rollouts=...)`` once it has them. Either way the
engine builds one frozen ``ProbeResult``. ``session.ProbeSession`` decides when to call it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, closing, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from . import records
from .attribution_report import DDP_UNSUPPORTED, build_section, keep_inputs, rollout_problems
from .config import ProbeConfig, ProbeConfigError, check_optimizer, check_step
from .distributed import any_rank_failed, make_gather, shard, stack_vectors
from .headmaths import CHUNK_BYTES
from .observer import EntropyProbeWarning, PhaseRunner, contained, preserved_state
from .progress import ProgressHook, log_phase, log_probe, logger
from .prompts import check_model, check_prompts, prompt_texts, prompt_token_ids, special_ids
from .result import ProbeResult, ResultDraft
from .reverse import choose_derivative, reverse_pass
from .sampling import EBatch, draw_randomness, sample_batch
from .scoring import Scorer, sequence_terms
from .sharded import (
    Lockstep,
    agree_max,
    at_shards,
    check_sharded_config,
    check_sharded_model,
    forward_injectable,
    full_tensors,
    is_sharded,
    local,
    local_copies,
    local_state,
    refuse_fsdp1,
    sharded_forward,
    sharded_phase,
    unshard_outer,
)
from .sharded_reverse import fsdp_internals_known, sharded_reverse
from .update import (
    AdamReplay,
    adam_replay,
    check_moves_are_probed,
    consumed_gradients,
    is_adam,
    learning_rate,
    observed_step,
    optimizer_state,
    probed_parameters,
    snapshot,
    step_not_taken,
)

Gather = Callable[[torch.Tensor | None, int], torch.Tensor | None]


def _local_gather(x: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    return x


@dataclass
class Measurement:
    """One probed step between ``before_step`` and ``finish``: what before_step left, what
    ``measure`` derived from it. Adapters read ``step`` and ``skipped`` only.

    Pre-step quantities (delta H_1 is a function of these alone): ``theta`` (copies of the
    probed parameters at theta), ``optimizer_state`` (copies of their optimizer state before the
    step: exp_avg, exp_avg_sq, max_exp_avg_sq, step for Adam), ``grads`` (copies of the gradients
    the optimizer consumed, None where a parameter had none; filled by after_step), and
    ``predicted`` (Delta theta rebuilt from them, float64). ``observed`` is theta' - theta
    (float64). All dicts are keyed by parameter name. For a sharded model (``sharded.py``)
    ``theta``, ``optimizer_state`` and ``grads`` hold this rank's local shards,
    ``observed_local`` its shard of theta' - theta, ``predicted`` and ``observed`` the full
    (all-gathered) tensors, and ``lockstep`` the probe's checks.
    """

    result: ResultDraft
    runner: PhaseRunner
    started: float
    optimizer: torch.optim.Optimizer | None = None
    theta: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_state: dict[str, dict[str, object]] = field(default_factory=dict)
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    predicted: dict[str, torch.Tensor] | None = None
    replay: AdamReplay | None = None  # the Adam replay (its affine split with attribution=True)
    observed: dict[str, torch.Tensor] | None = None
    batch: EBatch | None = None
    terms: dict[str, torch.Tensor] | None = None
    tokens: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    attribution: dict | None = None  # attribution_report.keep_inputs, with attribution=True
    observed_local: dict[str, torch.Tensor] | None = None
    lockstep: Lockstep | None = None
    skip_reason: str | None = None

    @property
    def step(self) -> int:
        """The probed step's index."""
        return self.result.step

    @property
    def skipped(self) -> bool:
        """True when the optimizer did not take the step (its record is marked skipped)."""
        return self.skip_reason is not None


class EntropyProbe:
    """Predicted (delta H_1) and true (Delta H_true) entropy change of one optimizer step.

    Args:
        model: a causal LM (transformers ``PreTrainedModel``, usually a peft LoRA model).
        tokenizer: its tokenizer (needs an EOS token; the pad token defaults to EOS).
        prompts: the held-out prompt pool: strings already formatted for the model, or
            token-id lists (see ``prompts.py`` for the checks).
        config: a ``ProbeConfig`` or a mapping of its fields; keyword overrides of its fields
            are accepted too.

    Entropies are in nats per token (``normalize="per_token"``) or per response.
    ``on_progress(phase, done, total)``, if set, is called on rank 0 during the long phases.
    """

    on_progress: ProgressHook | None = None
    _step: int = 0  # the step whose E batch the passes work on (log lines only)

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        prompts: Sequence[str | Sequence[int]],
        config: ProbeConfig | Mapping[str, Any] | None = None,
        **overrides,
    ):
        config = ProbeConfig.resolve(config, overrides, "EntropyProbe")
        self.config = config
        refuse_fsdp1(model)
        self.model = check_model(model)
        self.tokenizer = tokenizer
        self.eos_ids, self.pad_id = special_ids(model, tokenizer)
        pool = check_prompts(prompts)
        self.prompt_token_ids = prompt_token_ids(model, tokenizer, pool, config)
        self.prompts = prompt_texts(tokenizer, pool)
        self.params = probed_parameters(model)
        if not self.params:
            raise ProbeConfigError(
                "model has no trainable parameters to probe: the probe measures the step of the "
                "trainable (LoRA) parameters; add adapters (peft.get_peft_model) or unfreeze some."
            )
        self.sharded = is_sharded(self.params, model)
        self.scorer = Scorer(model, config.temperature, config.chunk_size,
                             before_body=unshard_outer if self.sharded else None,
                             compile_head=config.compile_head,
                             agree=agree_max if self.sharded else None)
        self.rank, self.world_size = 0, 1
        self.gather: Gather = _local_gather
        self._lockstep: Lockstep | None = None  # the running probe's (sharded models)
        if self.sharded:  # refuses what it cannot probe; E sharded over the default group
            check_sharded_model(model)
            self.set_distributed(*check_sharded_config(config))
            if config.derivative == "forward" and not forward_injectable(model, self.params):
                raise ProbeConfigError(
                    "derivative='forward' on an FSDP2 model needs every probed parameter in a "
                    "Linear or Embedding layer (LoRA's); this model trains others (e.g. norms: "
                    "full fine-tuning). Use derivative='auto' or 'reverse'.")
        self._pending: Measurement | None = None
        self._calls = 0
        self._warned: set[str] = set()
        self._derivative_said: tuple[str, str] | None = None
        dtypes = {p.dtype for p in model.parameters()}
        if torch.bfloat16 in dtypes or torch.float16 in dtypes:
            self.warn_once(
                "half",
                "the model has bf16/fp16 weights: its log-probs are quantised, so Delta H_true "
                "flattens at small learning rates (a precision floor). Read small Delta H_true "
                "values with care, or probe a float32 copy.",
            )

    # ------------------------------------------------------------------ public API
    @property
    def pending(self) -> bool:
        """True between before_step and after_step."""
        return self._pending is not None

    def before_step(self, optimizer: torch.optim.Optimizer, *, step: int | None = None) -> None:
        """At theta, before the optimizer runs: sample E, snapshot theta and the optimizer state.

        Call it once the step's gradients exist (clipping or other changes to them may still
        follow: the prediction uses the gradients the optimizer consumes, read in after_step).
        ``step`` is the record's step index (default: a count of before_step calls).
        """
        check_optimizer(optimizer)
        step = self._calls if step is None else check_step(step)
        self._calls += 1
        cfg = self.config
        result = ResultDraft(step=step, normalize=cfg.normalize)
        runner = PhaseRunner(step, cfg.strict, result.timing)
        pending = Measurement(result, runner, time.perf_counter(), optimizer=optimizer)
        if self.sharded:
            pending.lockstep = Lockstep(self.device)
        self._pending, self._lockstep = pending, pending.lockstep
        self._warn_if_half()
        with contained("update", step, cfg.strict, runner), preserved_state(self.model):
            with self._phase(pending, "update"):
                check_moves_are_probed(optimizer, self.model, self.params)
                result.learning_rate, mixed = learning_rate(optimizer, self.params)
                if mixed:
                    self.warn_once("lrs", "probed parameters sit in param groups with different "
                                   "learning rates; bars_dot divides by the first group's lr.")
                result.num_params = sum(p.numel() for p in self.params.values())
                self._choose_derivative(result)
                pending.theta = (local_copies(self.params) if self.sharded
                                 else snapshot(self.params))
                pending.optimizer_state = optimizer_state(optimizer, self.params)
                if self.sharded:
                    pending.optimizer_state = local_state(pending.optimizer_state)
                if is_adam(optimizer):
                    result.update_source = "adam_reconstruction"
                    if cfg.attribution:
                        pending.attribution = keep_inputs(optimizer, self.params)
                else:
                    result.update_source = "observed"
                    self.warn_once("optim", f"{type(optimizer).__name__} is not Adam/AdamW: "
                                   "delta H_1 uses the observed step after the optimizer ran, so "
                                   "it is not a prediction.")
            if runner.failed:
                return
            with self._phase(pending, "sampling"):
                pending.batch = self._sample(step)

    def after_step(self, **facts: Any) -> ProbeResult | None:
        """After the optimizer's step (its step post-hook, or right after ``optimizer.step()``,
        while ``p.grad`` still holds what it read): ``finish(measure(), **facts)``.

        A step the optimizer did not take (see ``update.step_not_taken``) gives a record with
        ``update_source == "skipped"``, null estimates and the reason. Returns the ProbeResult,
        or None when no before_step is pending.
        """
        measurement = self.measure()
        return None if measurement is None else self.finish(measurement, **facts)

    def measure(self) -> Measurement | None:
        """Rebuild Delta theta from the snapshot and the consumed gradients, check it against
        theta' - theta, predict delta H_1 at theta along it, rescore E at theta' for
        Delta H_true. None when no before_step is pending. Every rank reaches the same
        collectives whatever fails (docs/distributed.md); nothing raises unless strict."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        result, runner, cfg = pending.result, pending.runner, self.config
        self._lockstep = pending.lockstep
        collected = None
        with contained("restore", pending.step, cfg.strict, runner), ExitStack() as stack:
            if not runner.failed:
                with self._phase(pending, "update_check"):
                    stack.enter_context(preserved_state(self.model))
                    pending.skip_reason = self._rebuild_step(pending)
            go = not runner.failed and pending.skip_reason is None
            if go:
                with self._phase(pending, "derivative"):
                    direction = pending.predicted if pending.predicted is not None else (
                        pending.observed)
                    pending.terms = self._derivative_pass(pending, pending.theta, direction,
                                                          result.derivative, result.diagnostics)
            if go and not runner.failed:
                with self._phase(pending, "rescoring"):
                    upd = self._score_all(pending.batch, None)
            if go and not runner.failed:
                with self._phase(pending, "sweep"):
                    sweep = {1.0: upd}
                    step = pending.observed if pending.observed_local is None else (
                        pending.observed_local)
                    for m in cfg.multipliers[1:]:
                        moved = {n: (pending.theta[n].to(torch.float64) + m * d).to(
                            pending.theta[n].dtype) for n, d in step.items()}
                        sweep[m] = self._score_all(pending.batch, moved)
            if go and not runner.failed:
                with self._phase(pending, "collect"):
                    collected = self._local_vectors(pending, sweep)
        # every rank arrives here (a skipped step too): one gather that is also the agreement
        vectors = self._gather(runner, collected)
        if vectors is not None and not runner.failed:
            with runner.phase("estimators"), preserved_state(self.model):
                d1, points = self._estimate(pending, vectors)
            if not runner.failed:
                with runner.phase("records"), preserved_state(self.model):
                    texts = (records.texts(pending.batch, self.prompts, self.tokenizer,
                                           pending.tokens, cfg) if self.world_size == 1 else None)
                    records.fill(result, cfg, vectors, d1, points[1.0], texts)
        self._agree(runner)  # a failure after the gather on one rank: every rank skips it
        return pending

    def finish(self, measurement: Measurement, *, batch_statistics: Mapping | None = None,
               rollouts: Sequence | None = None, per_token_loss=None,
               loss_scale: float = 1.0) -> ProbeResult:
        """The one ``ProbeResult`` of a measured step, frozen; the measurement's snapshots are
        released.

        Args:
            batch_statistics: the update batch's statistics (``records.u_statistics``), stored
                as ``batch_statistics["U_batch"]``.
            rollouts: with ``attribution=True``: the step's micro-batches' rollouts
                (docs/attribution.md); ``per_token_loss``: the loss protocol's method;
                ``loss_scale``: what each micro-batch's loss was multiplied by before backward
                (1 / accumulation steps). Without them the record's attribution section says why.
        """
        pending, result, runner = measurement, measurement.result, measurement.runner
        frozen = None
        with contained("finish", result.step, self.config.strict, runner):
            if batch_statistics is not None:
                result.batch_statistics["U_batch"] = dict(batch_statistics)
            if pending.skip_reason is not None:
                self._mark_skipped(result, pending.skip_reason)
            result.error = runner.error
            if self.config.attribution:
                result.attribution = self._attribution(pending, rollouts, per_token_loss,
                                                       loss_scale)
            result.timing["total"] = time.perf_counter() - pending.started
            frozen = result.freeze(error=runner.error)
        if frozen is None:  # the record itself could not be built: its error, nothing else
            frozen = ProbeResult(step=result.step, normalize=result.normalize,
                                 error=runner.error)
        with contained("log", result.step, self.config.strict):
            log_probe(frozen)
        return frozen

    def _attribution(self, pending: Measurement, rollouts, per_token_loss,
                     loss_scale: float) -> dict | None:
        """The record's attribution section of a finished probe (docs/attribution.md), or an
        ``{"error": ...}`` section saying why there is none; never fails the record."""
        result, cfg = pending.result, self.config
        if (pending.attribution is None or pending.replay is None or result.deltaH1 is None
                or result.error is not None):
            return None
        if self.world_size > 1:  # a known limitation, said once at setup by the adapter
            return {"error": {"phase": "attribution", "type": "NotSupported",
                              "message": DDP_UNSUPPORTED}}
        runner = PhaseRunner(result.step, cfg.strict, result.timing)
        section = None
        with runner.phase("attribution"), preserved_state(self.model):
            problems = rollout_problems(rollouts, per_token_loss)
            if problems:
                raise ValueError(problems)
            # the engine's copies of p.grad as the optimizer read it (None: no gradient)
            consumed = {n: torch.zeros_like(pending.theta[n]) if g is None else g
                        for n, g in pending.grads.items()}
            denominator = result.T_E if cfg.normalize == "per_token" else result.B_E
            section = build_section(
                model=self.model, scorer=self.scorer,
                microbatches=self._microbatches(pending.batch), tokenizer=self.tokenizer,
                per_token_loss=per_token_loss, rollouts=list(rollouts),
                theta=pending.theta, replay=pending.replay,
                raw_grads=pending.attribution["raw"], consumed_grads=consumed,
                H_hat=result.H_orig, denominator=float(denominator), normalize=cfg.normalize,
                deltaH1=result.deltaH1, learning_rate=result.learning_rate,
                loss_scale=loss_scale, detailed=cfg.log_level in ("detailed", "debug"))
        if runner.error is not None:
            return {"error": {k: v for k, v in runner.error.items() if k != "traceback"}}
        return section

    def _rebuild_step(self, pending: Measurement) -> str | None:
        """Read what the optimizer consumed, rebuild Delta theta, compare with the observed one.
        Returns why the step was not taken, or None."""
        optimizer = pending.optimizer
        grads = consumed_gradients(self.params)
        live = {n: local(p) for n, p in self.params.items()} if self.sharded else self.params
        pending.grads = {n: local(g) for n, g in grads.items()}
        pending.observed = observed_step(live, pending.theta)
        skipped = step_not_taken(optimizer, self.params, pending.optimizer_state, pending.grads,
                                 pending.observed)
        if skipped is None:
            if is_adam(optimizer):
                pending.replay = adam_replay(optimizer, self.params, pending.theta,
                                             pending.optimizer_state, pending.grads,
                                             split=pending.attribution is not None)
                pending.predicted = pending.replay.delta
            if self.sharded:  # every rank gets here unless one failed: the gathers follow a check
                self._lockstep.check()
                pending.observed_local = pending.observed
                pending.observed = full_tensors(self.params, pending.observed)
                if pending.predicted is not None:
                    pending.predicted = full_tensors(self.params, pending.predicted)
            records.update_check(pending.result, pending.predicted, pending.observed)
        return skipped

    def _mark_skipped(self, result: ResultDraft, reason: str) -> None:
        """A step not taken: null estimates, the reason, one warning per run."""
        records.mark_skipped(result, reason)
        self.warn_once(
            "skipped",
            f"the optimizer did not take step {result.step} ({reason}); its record is marked "
            "skipped (update_source 'skipped', null estimates). The callback probes the next "
            "step the optimizer takes instead. Said once per run.",
        )

    def _warn_if_half(self) -> None:
        """Weights may become half precision after construction (precision='bf16-true')."""
        dtypes = {p.dtype for p in self.model.parameters()}
        if torch.bfloat16 in dtypes or torch.float16 in dtypes:
            self.warn_once(
                "half",
                f"the model's weights are {' and '.join(sorted(str(d) for d in dtypes))} at step "
                "time (e.g. the trainer's precision='bf16-true' converted them): its log-probs "
                "are quantised, so Delta H_true flattens at small learning rates (a precision "
                "floor). Read small Delta H_true values with care, or probe a float32 copy.",
            )

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Shard E over ``world_size`` processes; statistics are all-gathered (torch.distributed
        must be initialised). Every rank must call before_step/after_step at the same steps.
        A sharded (FSDP2) model calls it itself with the default process group's rank and size;
        its E shards must be equal (``batch_size`` divisible by ``world_size``), so that every
        rank runs the same number of microbatches."""
        if self.sharded and int(batch_size := self.config.batch_size) % int(world_size):
            raise ProbeConfigError(
                f"batch_size={batch_size} is not divisible by world_size={world_size}: under "
                "FSDP2 every rank must run the same number of forwards (each all-gathers the "
                "parameters), so E's shards must be equal. Set batch_size to a multiple of "
                f"{world_size}.")
        self.rank, self.world_size = int(rank), int(world_size)
        self.gather = _local_gather
        if self.world_size > 1:
            self.gather = make_gather(self.config.batch_size, self.world_size, self.device)

    def _phase(self, pending: Measurement, name: str):
        return sharded_phase(pending.runner, pending.lockstep, self.model, name)

    def cancel(self) -> None:
        """Drop a pending probe without a record (its optimizer step will never be read).
        Adapters that can still reach the optimizer call after_step instead, which records a
        step not taken as skipped."""
        self._pending = None

    def sample_e(self, step: int) -> EBatch:
        """The E batch of ``step`` at the live parameters, drawn as ``before_step`` draws it
        (the engine's own generator, seeded by ``config.seed`` and ``step``). For the governor
        (``governor.py``); call it inside ``observer.preserved_state``. Single process."""
        return self._sample(check_step(step))

    def e_terms(self, batch: EBatch,
                direction: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per-sequence [B_E] float64 terms of ``batch`` at the live parameters: ``T``, ``h``,
        ``S`` (``scoring.sequence_terms``); with ``direction`` (a step per probed parameter
        name) the forward-mode pass along it, adding ``A``, ``Bsum``, ``C`` (the inputs of
        ``estimators.delta_h1``). For the governor; call it inside ``preserved_state``."""
        if direction is None:
            return self._score_all(batch, None)
        pending = Measurement(ResultDraft(step=self._step), None, time.perf_counter(),
                              batch=batch)
        live = {n: p.detach() for n, p in self.params.items()}
        return self._derivative_pass(pending, live, direction)

    @property
    def device(self) -> torch.device:
        return self.scorer.device

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, EntropyProbeWarning, stacklevel=3)

    # ------------------------------------------------------------------ passes
    def _sample(self, step: int) -> EBatch:
        """This rank's rows of the step's E batch (every rank draws the same global randomness),
        sampled in one decode loop."""
        cfg = self.config
        start = time.perf_counter()
        self._step = step  # for the log lines of the passes over this batch
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        prompt_index, uniforms = draw_randomness(
            len(self.prompt_token_ids), cfg.batch_size, cfg.max_new_tokens, generator
        )
        rows = shard(cfg.batch_size, self.world_size, self.rank)
        self._report("sampling", 0, len(prompt_index[rows]))
        batch = sample_batch(
            self.model,
            self.prompt_token_ids,
            prompt_index[rows],
            uniforms[rows],
            temperature=cfg.temperature,
            eos_token_ids=self.eos_ids,
            pad_token_id=self.pad_id,
            device=self.device,
            chunk_bytes=CHUNK_BYTES["cpu" if self.device.type == "cpu" else "accelerator"],
            sync=None if self._lockstep is None else (
                lambda running: self._lockstep.check(running=running)),
        )
        log_phase(step, "sampling", batch.size, int(batch.lengths.sum()),
                  time.perf_counter() - start)
        return batch

    def _microbatches(self, batch: EBatch, phase: str = ""):
        """Microbatches of ``microbatch_size`` rows; reports progress after each when ``phase``
        is named."""
        mbs = self.config.microbatch_size
        for start in range(0, batch.size, mbs):
            stop = min(start + mbs, batch.size)
            if self._lockstep is not None:  # before each forward (sharded.Lockstep)
                self._lockstep.check()
            yield batch.slice(start, stop)
            if phase:
                self._report(phase, stop, batch.size)

    def _choose_derivative(self, result: ResultDraft) -> None:
        """The derivative this probe takes (``config.derivative``, "auto" resolved on the model
        as it is now), into the record; said in a log line the first time and on a change."""
        mode, why = choose_derivative(self.model, self.config.derivative)
        if self.sharded and self.config.derivative == "auto":
            if mode == "forward" and not forward_injectable(self.model, self.params):
                mode, why = "reverse", ("auto: probed parameters outside Linear/Embedding "
                                        "layers (e.g. full fine-tuning), where the sharded "
                                        "forward-mode pass cannot inject their tangent")
            elif mode == "reverse" and not fsdp_internals_known(self.model):
                mode, why = "forward", ("auto: this torch's FSDP2 state is not the one the "
                                        "sharded reverse pass was checked on (torch 2.13)")
        result.derivative = mode
        if (mode, why) != self._derivative_said:
            self._derivative_said = (mode, why)
            logger.info("entropy probe: derivative %s (%s)", mode, why)

    def _derivative_pass(self, pending, theta, direction, derivative: str = "forward",
                         diagnostics: dict | None = None) -> dict[str, torch.Tensor]:
        """l, H and the per-sequence derivative terms along Delta theta at theta: one
        forward-mode pass, or the reverse pass (``reverse.py``; its check lands in
        ``diagnostics``)."""
        start = time.perf_counter()
        keep_tokens = self.config.wants("token_data")
        microbatches = self._microbatches(pending.batch, "derivative")
        if derivative == "reverse" and self.sharded:
            passes = sharded_reverse(self.scorer, self.params, microbatches, theta, direction,
                                     self.config.normalize,
                                     {} if diagnostics is None else diagnostics, self._lockstep)
        elif derivative == "reverse":
            passes = reverse_pass(self.scorer, self.params, microbatches, theta, direction,
                                  self.config.normalize, {} if diagnostics is None else diagnostics)
        elif self.sharded:
            passes = sharded_forward(self.scorer, self.params, microbatches, theta, direction)
        else:
            passes = self._forward(microbatches, theta, direction)
        parts = []
        with closing(passes):  # the passes' contexts (shards, hooks) close here, not at GC
            for logp, ent, terms in passes:
                parts.append(terms)
                if keep_tokens:
                    pending.tokens.append((logp.cpu(), ent.cpu()))
        log_phase(self._step, "derivative", pending.batch.size,
                  int(pending.batch.lengths.sum()), time.perf_counter() - start)
        return _cat(parts)

    def _forward(self, microbatches, theta, direction):
        """Per microbatch (l, H, terms) from one forward-mode pass along Delta theta."""
        tangents = {n: direction[n].to(theta[n].dtype) for n in theta}
        for mb in microbatches:
            logp, ent, dlogp, dent = self.scorer.score_with_tangent(mb, theta, tangents)
            mask = mb.response_mask.to(logp.device)
            yield logp, ent, sequence_terms(logp, ent, mask, dlogp, dent)

    def _score_all(self, batch: EBatch, params) -> dict[str, torch.Tensor]:
        """l and H sums of every sequence at the live parameters (``params`` None) or at
        ``params`` substituted."""
        start = time.perf_counter()
        phase = "rescoring" if params is None else "sweep"
        parts = []
        with (at_shards(self.model, self.params, params) if self.sharded and params is not None
              else nullcontext()):
            for mb in self._microbatches(batch, phase):
                logp, ent = self.scorer.score(mb, None if self.sharded else params)
                parts.append(sequence_terms(logp, ent, mb.response_mask.to(logp.device)))
        log_phase(self._step, phase, batch.size, int(batch.lengths.sum()),
                  time.perf_counter() - start)
        return _cat(parts)

    def _report(self, phase: str, done: int, total: int) -> None:
        """Progress to ``on_progress`` on rank 0; a failing hook is dropped with a warning."""
        if self.rank != 0 or self.on_progress is None:
            return
        try:
            self.on_progress(phase, done, total)
        except Exception as exc:  # the observer contract: a display never breaks the probe
            self.on_progress = None
            self.warn_once("progress", f"the progress hook failed ({exc!r}); progress is off.")

    # ------------------------------------------------------------------ estimators
    def _vector_names(self) -> list[str]:
        """The per-sequence vectors' names, in gather order (the same on every rank)."""
        names = ["T", "h", "S", "A", "Bsum", "C"]
        for j in range(len(self.config.multipliers)):
            names += [f"S_upd:{j}", f"h_upd:{j}"]
        return [*names, "prompt_length", "prompt_index", "stopped"]

    def _local_vectors(self, pending: Measurement, sweep: dict[float, dict]) -> torch.Tensor:
        """This rank's per-sequence vectors, stacked for the one gather ([k, n_rank])."""
        batch = pending.batch
        vectors = {k: pending.terms[k] for k in ("T", "h", "S", "A", "Bsum", "C")}
        for j, m in enumerate(self.config.multipliers):
            vectors[f"S_upd:{j}"], vectors[f"h_upd:{j}"] = sweep[m]["S"], sweep[m]["h"]
        vectors.update(prompt_length=batch.prompt_lengths, prompt_index=batch.prompt_index,
                       stopped=batch.stopped)
        return stack_vectors(vectors)

    def _gather(self, runner: PhaseRunner,
                local: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        """Every rank's vectors ({name: [B_E]}), or None when any rank has none (it failed,
        or the step was skipped). Under DDP this is the agreement too: every rank enters the
        one all_gather whatever happened before, its own failure included; a rank that was
        ready learns another's failure here (phase "distributed")."""
        names = self._vector_names()
        ready = local is not None and not runner.failed
        gathered = None
        with runner.phase("gather"):
            gathered = self.gather(local if ready else None, len(names))
        if gathered is None:
            if ready and not runner.failed:
                with runner.phase("distributed"):
                    raise RuntimeError("the probe failed on another rank; all ranks skip it")
            return None
        return dict(zip(names, gathered.unbind(0), strict=True))

    def _agree(self, runner: PhaseRunner) -> None:
        """Under DDP, every rank learns whether any rank failed; a rank that did not records
        the failure as its own (phase "distributed"). Reached by every rank, always."""
        if self.world_size > 1:
            failed = runner.failed
            with runner.phase("agreement"):
                failed = any_rank_failed(failed, self.device)
            if failed and not runner.failed:
                with runner.phase("distributed"):
                    raise RuntimeError("the probe failed on another rank; all ranks skip it")

    def _estimate(self, pending: Measurement, vectors: dict[str, torch.Tensor]):
        """delta H_1 and Delta H_true from the gathered vectors (pure: no collective)."""
        return records.estimate(pending.result, vectors, self.config)


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k].cpu() for p in parts]) for k in parts[0]}
