"""The engine: ``EntropyProbe`` measures one optimizer step, framework-free.

    probe = EntropyProbe(model, tokenizer, prompts, ProbeConfig(batch_size=64))
    loss.backward()
    probe.before_step(optimizer)        # theta, gradients final: sample E, predict delta H_1
    optimizer.step()
    result = probe.after_step()         # theta': rescore E, Delta H_true by SNIS

A plain PyTorch loop can use it directly; the Lightning adapter decides when to call it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import records
from .config import ProbeConfig, ProbeConfigError
from .distributed import any_rank_failed, make_gather, shard
from .estimators import delta_h1, snis
from .observer import EntropyProbeWarning, PhaseRunner, preserved_state
from .progress import ProgressHook, log_phase, log_probe
from .result import ProbeResult
from .sampling import EBatch, draw_randomness, sample_batch
from .scoring import CHUNK_BYTES, Scorer, sequence_terms
from .update import (
    adam_update,
    clipped_gradients,
    flat_cosine_and_rel_error,
    is_adam,
    learning_rate,
    probed_parameters,
    snapshot,
)

Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Pending:
    """What before_step leaves for after_step."""

    result: ProbeResult
    runner: PhaseRunner
    started: float
    theta: dict[str, torch.Tensor] = field(default_factory=dict)
    predicted: dict[str, torch.Tensor] | None = None
    batch: EBatch | None = None
    terms: dict[str, torch.Tensor] | None = None
    tokens: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class EntropyProbe:
    """Predicted (delta H_1) and true (Delta H_true) entropy change of one optimizer step.

    Args:
        model: a causal LM (transformers ``PreTrainedModel``, usually a peft LoRA model).
        tokenizer: its tokenizer (needs an EOS token; the pad token defaults to EOS).
        prompts: the held-out prompt pool (strings, already formatted for the model).
        config: a ``ProbeConfig``; keyword overrides of its fields are accepted too.

    Entropies are in nats per token (``normalize="per_token"``) or per response.
    ``on_progress(phase, done, total)``, if set, is called on rank 0 during the long phases.
    """

    on_progress: ProgressHook | None = None
    _step: int = 0  # the step whose E batch the passes work on (log lines only)

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        prompts: Sequence[str],
        config: ProbeConfig | None = None,
        **overrides,
    ):
        ProbeConfig.check_names(overrides, "EntropyProbe")
        if config is None:
            config = ProbeConfig(**overrides)
        elif overrides:
            config = ProbeConfig(**{**config.to_dict(), **overrides})
        self.config = config
        self.model = _check_model(model)
        self.tokenizer = tokenizer
        self.eos_ids, self.pad_id = _special_ids(model, tokenizer)
        self.prompts = _check_prompts(prompts)
        self.prompt_token_ids = _tokenize(tokenizer, self.prompts)
        self.params = probed_parameters(model)
        if not self.params:
            raise ProbeConfigError(
                "model has no trainable parameters to probe: the probe measures the step of the "
                "trainable (LoRA) parameters; add adapters (peft.get_peft_model) or unfreeze some."
            )
        self.scorer = Scorer(model, config.temperature, config.chunk_size)
        self.rank, self.world_size = 0, 1
        self.gather: Gather = lambda x: x
        self._pending: _Pending | None = None
        self._calls = 0
        self._warned: set[str] = set()
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

    def before_step(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        clip_val: float | None = None,
        clip_algorithm: str | None = "norm",
        step: int | None = None,
    ) -> None:
        """At theta with the step's gradients final (before clipping): sample E, predict delta H_1.

        ``clip_val``/``clip_algorithm`` describe the clipping the trainer applies after this
        call and before the optimizer runs ("norm" or "value"; None for none).
        """
        step = self._calls if step is None else int(step)
        self._calls += 1
        cfg = self.config
        result = ProbeResult(step=step, normalize=cfg.normalize)
        runner = PhaseRunner(step, cfg.strict, result.timing)
        pending = _Pending(result, runner, time.perf_counter())
        self._pending = pending
        with preserved_state(self.model):
            with runner.phase("update"):
                result.learning_rate, mixed = learning_rate(optimizer, self.params)
                if mixed:
                    self.warn_once("lrs", "probed parameters sit in param groups with different "
                                   "learning rates; bars_dot divides by the first group's lr.")
                result.num_params = sum(p.numel() for p in self.params.values())
                pending.theta = snapshot(self.params)
                if is_adam(optimizer):
                    grads = clipped_gradients(optimizer, self.params, clip_val, clip_algorithm)
                    pending.predicted = adam_update(optimizer, self.params, grads)
                    result.update_source = "adam_reconstruction"
                else:
                    result.update_source = "observed"
                    self.warn_once("optim", f"{type(optimizer).__name__} is not Adam/AdamW: "
                                   "delta H_1 uses the observed step after the optimizer ran, so "
                                   "it is not a prediction.")
            if runner.failed:
                return
            with runner.phase("sampling"):
                pending.batch = self._sample(step)
            if runner.failed or pending.predicted is None:
                return
            with runner.phase("derivative"):
                pending.terms = self._derivative_pass(pending, pending.theta, pending.predicted)

    def after_step(self) -> ProbeResult | None:
        """At theta' (the optimizer has run): Delta H_true, the sweep, the update check.

        Returns the ProbeResult, or None when no before_step is pending.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        result, runner, cfg = pending.result, pending.runner, self.config
        with preserved_state(self.model):
            if not runner.failed:
                with runner.phase("update_check"):
                    observed = {n: p.detach() - pending.theta[n] for n, p in self.params.items()}
                    if pending.predicted is not None:
                        cos, rel, norm = flat_cosine_and_rel_error(pending.predicted, observed)
                        result.update_cosine, result.update_rel_error = cos, rel
                        if norm == 0:
                            for name in ("update_cosine", "update_rel_error"):
                                result.null_reasons[name] = (
                                    "the observed step is zero (no gradient signal, e.g. all "
                                    "advantages zero): the comparison is undefined"
                                )
                    else:
                        for name in ("update_cosine", "update_rel_error"):
                            result.null_reasons[name] = (
                                "no predicted step to compare: the optimizer is not Adam/AdamW "
                                "(update_source 'observed')"
                            )
                    result.update_norm = float(
                        torch.sqrt(sum((d.double() ** 2).sum() for d in observed.values()))
                    )
            if not runner.failed and pending.terms is None:
                with runner.phase("derivative"):
                    pending.terms = self._derivative_pass(pending, pending.theta, observed)
            if not runner.failed:
                with runner.phase("rescoring"):
                    upd = self._score_all(pending.batch, None)
            if not runner.failed:
                with runner.phase("sweep"):
                    sweep = {1.0: upd}
                    for m in cfg.multipliers[1:]:
                        moved = {n: pending.theta[n] + m * observed[n] for n in observed}
                        sweep[m] = self._score_all(pending.batch, moved)
            if self.world_size > 1 and any_rank_failed(runner.failed, self.device):
                if not runner.failed:
                    with runner.phase("distributed"):
                        raise RuntimeError("the probe failed on another rank; all ranks skip it")
            if not runner.failed:
                with runner.phase("estimators"):
                    self._estimate(pending, sweep)
        result.error = runner.error
        result.timing["total"] = time.perf_counter() - pending.started
        records.sanitize(result)
        log_probe(result)
        return result

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Shard E over ``world_size`` processes; statistics are all-gathered (torch.distributed
        must be initialised). Every rank must call before_step/after_step at the same steps."""
        self.rank, self.world_size = int(rank), int(world_size)
        if self.world_size > 1:
            self.gather = make_gather(self.config.batch_size, self.world_size, self.device)

    def cancel(self) -> None:
        """Drop a pending probe whose optimizer step never happened (e.g. skipped by AMP)."""
        self._pending = None

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
            yield batch.slice(start, stop)
            if phase:
                self._report(phase, stop, batch.size)

    def _derivative_pass(self, pending, theta, direction) -> dict[str, torch.Tensor]:
        """One forward-mode pass along Delta theta at theta: l, H and their derivatives."""
        start = time.perf_counter()
        tangents = {n: direction[n].to(theta[n].dtype) for n in theta}
        parts = []
        keep_tokens = self.config.wants("token_data")
        for mb in self._microbatches(pending.batch, "derivative"):
            logp, ent, dlogp, dent = self.scorer.score_with_tangent(mb, theta, tangents)
            mask = mb.response_mask.to(logp.device)
            parts.append(sequence_terms(logp, ent, mask, dlogp, dent))
            if keep_tokens:
                pending.tokens.append((logp.cpu(), ent.cpu()))
        log_phase(self._step, "derivative", pending.batch.size,
                  int(pending.batch.lengths.sum()), time.perf_counter() - start)
        return _cat(parts)

    def _score_all(self, batch: EBatch, params) -> dict[str, torch.Tensor]:
        """l and H sums of every sequence at the live parameters (``params`` None) or at
        ``params`` substituted."""
        start = time.perf_counter()
        phase = "rescoring" if params is None else "sweep"
        parts = []
        for mb in self._microbatches(batch, phase):
            logp, ent = self.scorer.score(mb, params)
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
    def _estimate(self, pending: _Pending, sweep: dict[float, dict]) -> None:
        cfg, result = self.config, pending.result
        g = {k: self.gather(v) for k, v in pending.terms.items()}
        T, h = g["T"], g["h"]
        d1 = delta_h1(g["A"], g["Bsum"], g["C"], h, T, cfg.normalize)
        result.B_E, result.T_E = int(T.numel()), int(T.sum())
        result.deltaH1, result.deltaH1_se = d1.deltaH1, d1.deltaH1_se
        eta = result.learning_rate
        result.bars_dot = d1.deltaH1 / eta if eta else None
        moved = {m: {k: self.gather(terms[k]) for k in ("S", "h")} for m, terms in sweep.items()}
        points = {m: snis(g["S"], u["S"], h, u["h"], T, cfg.normalize) for m, u in moved.items()}
        gt = points[1.0]
        result.deltaH_true, result.deltaH_true_se = gt.deltaH_true, gt.deltaH_true_se
        result.H_orig, result.H_upd = gt.H_orig, gt.H_upd
        result.ESS, result.ess_fraction = gt.ess, gt.ess / result.B_E
        result.reliable = bool(result.ess_fraction >= cfg.ess_threshold)
        result.diagnostics = dict(gt.diagnostics, ess_threshold=cfg.ess_threshold)
        result.eta_sweep = records.sweep_points(points, eta, d1.deltaH1)
        records.fill(self, result, pending, d1, gt, g, moved[1.0])


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k].cpu() for p in parts]) for k in parts[0]}


def _check_model(model) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "generate", None)):
        raise ProbeConfigError(
            f"model must be a causal language model (a transformers PreTrainedModel or peft model "
            f"with .generate), got {type(model).__name__}. Pass the policy, e.g. "
            "AutoModelForCausalLM wrapped with peft.get_peft_model."
        )
    return model


def _special_ids(model, tokenizer) -> tuple[tuple[int, ...], int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ProbeConfigError(
            "tokenizer has no EOS token (tokenizer.eos_token_id is None): responses stop at EOS. "
            "Set tokenizer.eos_token to the model's end-of-sequence token."
        )
    ids = {int(eos)}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(e) for e in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        warnings.warn(
            "tokenizer has no pad token; the probe pads with the EOS id (masks come from stop "
            "positions, so this is harmless). Set tokenizer.pad_token to silence this.",
            EntropyProbeWarning,
            stacklevel=3,
        )
        pad = eos
    return tuple(sorted(ids)), int(pad)


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        got = "an empty list" if isinstance(prompts, Sequence) and not isinstance(
            prompts, str) else f"a {type(prompts).__name__}"
        raise ProbeConfigError(
            f"prompts must be a non-empty list of strings (the held-out prompt pool), got {got}. "
            "Pass e.g. prompts=[\"2+3=\", ...]; wrap a single prompt in a list."
        )
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p]
    if bad:
        raise ProbeConfigError(
            f"prompts must all be non-empty strings; entries {bad[:5]} are not. Format them "
            "(chat template included) before passing them."
        )
    return list(prompts)


def _tokenize(tokenizer, prompts: list[str]) -> list[list[int]]:
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    empty = [i for i, t in enumerate(ids) if not t]
    if empty:
        raise ProbeConfigError(f"prompts {empty[:5]} tokenize to no tokens; drop or fix them.")
    return ids
