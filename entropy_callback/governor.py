"""The predictive entropy governor: brake an optimizer step *before* it is taken.

Unlike ``EntropyProbe`` (an observer), the governor CHANGES TRAINING by design: it scales the
learning rate of the step about to be taken by alpha in [alpha_min, 1]. Everything else it
touches (RNG streams, modes, gradients, optimizer state, the lr after the step) it restores.

At the optimizer's step pre-hook (inside the closure when there is one, so the gradients are
final: after clipping, GradScaler's unscale, any repair) it rebuilds the step Adam/AdamW is about
to take from the live state and the current ``p.grad`` (``update.adam_replay``), samples E at theta
(the engine's own RNG), predicts delta H_1 along that step (one forward-mode pass) and chooses

    alpha = clip(min(D / -delta H_1, ceiling), alpha_min, 1)  when delta H_1 < -D, else ceiling

where D >= 0 is the drop the policy allows this step (nats/token), read at the lower bound
H_low = H - margin_se * SE(H) of E's entropy: ``floor=H_min``: fraction * (H_low - H_min);
``max_drop=r``: r; ``schedule(step) -> H*``: H_low - H*(step + 1); the smallest one binds.
Adam's step is linear in lr with its state fixed (decoupled weight decay included), so the step
at alpha * lr is alpha * Delta theta and its first-order entropy change is alpha * delta H_1,
with no second pass. alpha never exceeds 1.

After the step (its post-hook) the lr is restored and Delta H_true is measured on the same E
tokens (SNIS, bias-corrected). When it leaves the trust band
|Delta H_true - alpha delta H_1| <= trust_se * SE_combined + trust_rel * |alpha delta H_1|,
the ceiling drops to ``shrink * alpha`` (a trust region) and the record says why; each step in
the band lets it grow back by ``grow``, up to 1. Steps not governed (``every`` > 1) reuse the last
measured sensitivity bars_dot = delta H_1 / lr (no E batch), and their record says so.

Example (a plain loop)::

    governor = EntropyGovernor(model, tokenizer, heldout, floor=1.0, batch_size=64)
    governor.attach(optimizer, on_record=print)
    for batch in data:
        loss(batch).backward(); clip_grad_norm_(params, 1.0)
        optimizer.step()          # the hooks govern and measure this step
        scheduler.step(); optimizer.zero_grad()
    governor.detach()
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .config import ProbeConfig, ProbeConfigError
from .estimators import delta_h1, snis
from .observer import PhaseRunner, preserved_state
from .probe import EntropyProbe
from .update import adam_replay, is_adam

POLICY_DEFAULTS = dict(fraction=0.5, alpha_min=0.001, every=1, margin_se=2.0, trust_se=2.0,
                       trust_rel=0.5, shrink=0.5, grow=2.0)


@dataclass(frozen=True)
class GovernorPolicy:
    """What the governor allows one step to do to the entropy (nats/token), checked here.

    floor: H_min, never predicted below it; each step may take ``fraction`` of H - H_min.
    max_drop: r, at most r nats/token of predicted decrease per step.
    schedule: ``schedule(step) -> H*``; the step's predicted H stays >= H*(step + 1).
    alpha_min: the smallest lr factor, in (0, 1]. every: govern every this many steps.
    margin_se: the policy reads H - margin_se * SE(H), a lower confidence bound: a fresh E
        each step makes H noisy, and braking on an H that noise lifted would let the entropy
        ratchet down (a step allowed on an overestimate is never taken back).
    trust_se, trust_rel, shrink, grow: the trust band and the ceiling's cut and regrowth.
    """

    floor: float | None = None
    max_drop: float | None = None
    schedule: Callable[[int], float] | None = None
    fraction: float = POLICY_DEFAULTS["fraction"]
    alpha_min: float = POLICY_DEFAULTS["alpha_min"]
    every: int = POLICY_DEFAULTS["every"]
    margin_se: float = POLICY_DEFAULTS["margin_se"]
    trust_se: float = POLICY_DEFAULTS["trust_se"]
    trust_rel: float = POLICY_DEFAULTS["trust_rel"]
    shrink: float = POLICY_DEFAULTS["shrink"]
    grow: float = POLICY_DEFAULTS["grow"]

    def __post_init__(self) -> None:
        if self.floor is None and self.max_drop is None and self.schedule is None:
            raise ProbeConfigError(
                "EntropyGovernor needs a policy: pass floor=H_min (nats/token), max_drop=r "
                "(nats/token per step) or schedule=callable(step) -> H*; none was given.")
        if self.schedule is not None and not callable(self.schedule):
            raise ProbeConfigError(f"schedule must be a callable step -> target entropy "
                                   f"(nats/token), got {type(self.schedule).__name__}.")
        _number("floor", self.floor, low=0.0, closed=True, optional=True)
        _number("max_drop", self.max_drop, low=0.0, optional=True)
        _number("fraction", self.fraction, low=0.0, high=1.0)
        _number("alpha_min", self.alpha_min, low=0.0, high=1.0)
        _number("margin_se", self.margin_se, low=0.0, closed=True)
        _number("trust_se", self.trust_se, low=0.0)
        _number("trust_rel", self.trust_rel, low=0.0, closed=True)
        _number("shrink", self.shrink, low=0.0, high=1.0)
        _number("grow", self.grow, low=1.0, closed=True)
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ProbeConfigError(f"every must be an integer >= 1 (govern every N optimizer "
                                   f"steps), got {self.every!r}.")

    def allowed_drop(self, H: float, step: int) -> tuple[float, float, str]:
        """(D, H - D, which bound binds): the largest predicted decrease this step may make."""
        bounds = []
        if self.floor is not None:
            bounds.append((self.fraction * (H - self.floor), "floor"))
        if self.max_drop is not None:
            bounds.append((self.max_drop, "max_drop"))
        if self.schedule is not None:
            bounds.append((H - float(self.schedule(step + 1)), "schedule"))
        drop, binding = min(bounds)
        drop = max(drop, 0.0)
        return drop, H - drop, binding


def resolve_options(config: ProbeConfig | Mapping[str, Any] | None,
                    policy: GovernorPolicy | None, options: Mapping[str, Any],
                    owner: str) -> tuple[GovernorPolicy, ProbeConfig]:
    """Split keyword ``options`` into the policy's fields and the probe's config fields; both
    checked (ProbeConfigError naming ``owner``)."""
    names = set(GovernorPolicy.__dataclass_fields__)
    chosen = {k: v for k, v in options.items() if k in names}
    rest = {k: v for k, v in options.items() if k not in names}
    if policy is not None and chosen:
        raise ProbeConfigError(f"{owner}: pass policy= or its fields {sorted(chosen)}, not both.")
    if policy is not None and not isinstance(policy, GovernorPolicy):
        raise ProbeConfigError(f"{owner}: policy= must be a GovernorPolicy, got "
                               f"{type(policy).__name__}.")
    policy = policy if policy is not None else GovernorPolicy(**chosen)
    return policy, ProbeConfig.resolve(config, rest, owner)


def entropy_se(h: torch.Tensor, T: torch.Tensor, normalize: str) -> float:
    """SE of H_hat over E's [B] sequences (delta method for the per-token ratio sum h / sum T:
    IF_i = (h_i - H_hat T_i) / T_bar; per_sequence: the sd of h), nats/token."""
    if h.numel() < 2:
        return 0.0
    if normalize == "per_token":
        H = h.sum() / T.sum()
        return float(((h - H * T) / T.mean()).std() / math.sqrt(h.numel()))
    return float(h.std() / math.sqrt(h.numel()))


def _number(name: str, value: Any, *, low: float, high: float | None = None,
            closed: bool = False, optional: bool = False) -> None:
    """Raise ProbeConfigError unless ``value`` is a finite number in (low, high] ([low, ...]
    with ``closed``)."""
    if value is None and optional:
        return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (value >= low if closed else value > low)
          and (high is None or value <= high))
    if not ok:
        span = (f"{'[' if closed else '('}{low}, "
                f"{'inf)' if high is None else f'{high}]'}")
        raise ProbeConfigError(f"{name} must be a finite number in {span}, got {value!r}.")


@dataclass
class GovernorRecord:
    """One step the governor acted on. Entropies in nats/token (``normalize``), lr unitless.

    ``governed``: E was sampled and delta H_1 measured this step; otherwise ``sensitivity_from``
    names the step whose bars_dot was reused and there is no realized value. ``deltaH1`` is the
    prediction at the full lr, ``predicted`` = alpha * deltaH1 the one at the step taken,
    ``realized`` Delta H_true on the same E tokens (SNIS, bias-corrected). ``target`` = H - D,
    the lowest predicted entropy the policy allows after the step; ``binding`` what set alpha.
    """

    step: int
    governed: bool
    sensitivity_from: int | None = None
    lr: float | None = None
    H: float | None = None
    H_se: float | None = None
    target: float | None = None
    allowed_drop: float | None = None
    deltaH1: float | None = None
    deltaH1_se: float | None = None
    bars_dot: float | None = None
    alpha: float = 1.0
    alpha_policy: float = 1.0
    ceiling: float = 1.0
    binding: str = "none"
    predicted: float | None = None
    realized: float | None = None
    realized_se: float | None = None
    realized_raw: float | None = None
    ess_fraction: float | None = None
    in_band: bool | None = None
    band: float | None = None
    trust: str | None = None
    next_ceiling: float = 1.0
    timing: dict[str, float] = field(default_factory=dict)
    error: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EntropyGovernor:
    """Chooses each step's lr factor alpha from its predicted entropy change (module docstring).

    This changes training (the lr of governed steps); ``EntropyProbe`` never does.

    Args:
        model, tokenizer, prompts, config: as ``EntropyProbe`` (E is drawn from ``prompts``;
            ``config`` fields may be given as keywords, e.g. ``batch_size=64``).
        floor, max_drop, schedule, fraction, alpha_min, every, margin_se, trust_se,
            trust_rel, shrink, grow: the ``GovernorPolicy``; ``policy=`` passes one whole.
    Failures inside it are warnings and an ``error`` in the record, with alpha set from the
    last sensitivity (or the ceiling); ``strict=True`` raises instead.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, prompts: Sequence[str | Sequence[int]],
                 config: ProbeConfig | Mapping[str, Any] | None = None, *,
                 policy: GovernorPolicy | None = None, **options: Any):
        self.policy, config = resolve_options(config, policy, options, "EntropyGovernor")
        self.probe = EntropyProbe(model, tokenizer, prompts, config)
        self.records: list[GovernorRecord] = []
        self.ceiling = 1.0
        self.bars_dot: float | None = None  # delta H_1 / lr of the last governed step
        self.sensitivity_step: int | None = None
        self.H: float | None = None  # the latest entropy estimate (nats/token)
        self.H_se: float | None = None  # its standard error
        self._on_record: list[Callable[[GovernorRecord], Any]] = []
        self._hooks: list[Any] = []
        self._step_fn: Callable[[], int] | None = None
        self._calls = 0
        self._active: dict[str, Any] | None = None

    # ------------------------------------------------------------------ wiring
    def attach(self, optimizer: torch.optim.Optimizer, *, step: Callable[[], int] | None = None,
               on_record: Callable[[GovernorRecord], Any] | None = None) -> EntropyGovernor:
        """Register the step pre- and post-hooks on ``optimizer`` (an Adam/AdamW holding the
        model's trainable parameters). ``step()`` gives the step index (default: a count of
        steps); ``on_record(record)`` receives each step's record."""
        if not is_adam(optimizer):
            raise ProbeConfigError(f"EntropyGovernor needs torch.optim.Adam or AdamW (its step "
                                   f"is linear in lr), got {type(optimizer).__name__}.")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(p) in held for p in self.probe.params.values()):
            raise ProbeConfigError("the optimizer holds none of the model's trainable "
                                   "parameters; attach the governor to the policy's optimizer.")
        self.detach()
        self._step_fn = step
        if on_record is not None:
            self._on_record.append(on_record)
        self._hooks = [optimizer.register_step_pre_hook(self._pre_hook),
                       optimizer.register_step_post_hook(self._post_hook)]
        return self

    def detach(self) -> None:
        """Remove the hooks and restore the lr of a step that never finished."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.restore_lr()

    def restore_lr(self) -> None:
        """Put back the lr of a governed step whose post-hook never ran (an exception)."""
        active, self._active = self._active, None
        if active is not None:
            for group, lr in zip(active["optimizer"].param_groups, active["lrs"], strict=True):
                group["lr"] = lr

    def _pre_hook(self, optimizer, args, kwargs):
        self.restore_lr()
        # torch passes args as (optimizer, *the positional arguments of step)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.govern(optimizer)
            return None

        def governed_closure():  # the trainer's closure clips/unscales: govern after it
            loss = closure()
            self.govern(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": governed_closure}
        return (args[0], governed_closure, *args[2:]), kwargs

    def _post_hook(self, optimizer, args, kwargs) -> None:
        self.finish()

    # ------------------------------------------------------------------ before the step
    def govern(self, optimizer: torch.optim.Optimizer) -> GovernorRecord:
        """With the step's gradients final and theta unchanged: choose alpha, scale every param
        group's lr by it until ``finish``."""
        step = self._step_fn() if self._step_fn is not None else self._calls
        self._calls += 1
        record = GovernorRecord(step=int(step), governed=False, ceiling=self.ceiling)
        runner = PhaseRunner(record.step, self.probe.config.strict, record.timing)
        lrs = [group["lr"] for group in optimizer.param_groups]
        record.lr = float(lrs[0])
        active = {"optimizer": optimizer, "lrs": lrs, "record": record, "runner": runner,
                  "counts": _step_counts(optimizer, self.probe.params)}
        if step % self.policy.every == 0 or self.bars_dot is None:
            with preserved_state(self.probe.model), runner.phase("predict"):
                active.update(self._predict(optimizer, record))
        if not record.governed and self.bars_dot is not None and self.H is not None:
            record.sensitivity_from = self.sensitivity_step
            record.H, record.H_se, record.bars_dot = self.H, self.H_se, self.bars_dot
            record.deltaH1 = self.bars_dot * record.lr
        record.alpha, record.binding = self.ceiling, "ceiling"  # if choosing fails
        with runner.phase("choose"):
            self._choose(record)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * record.alpha
        self._active = active
        return record

    def _predict(self, optimizer, record: GovernorRecord) -> dict[str, Any]:
        """Sample E at theta, rebuild the step from the live Adam state and p.grad, delta H_1."""
        probe, start = self.probe, time.perf_counter()
        params = probe.params
        theta = {n: p.detach() for n, p in params.items()}
        state = {n: dict(optimizer.state.get(p, {})) for n, p in params.items()}
        grads = {n: None if p.grad is None else p.grad.detach() for n, p in params.items()}
        scale = getattr(optimizer, "grad_scale", None)  # GradScaler with a fused Adam: the
        if torch.is_tensor(scale):                      # kernel unscales inside its step
            grads = {n: None if g is None else g / scale.to(g.device, g.dtype)
                     for n, g in grads.items()}
        direction = adam_replay(optimizer, params, theta, state, grads).delta
        batch = probe.sample_e(record.step)
        terms = probe.e_terms(batch, direction)
        cfg = probe.config
        d1 = delta_h1(terms["A"], terms["Bsum"], terms["C"], terms["h"], terms["T"],
                      cfg.normalize)
        record.governed = True
        record.H, record.deltaH1, record.deltaH1_se = d1.H_hat, d1.deltaH1, d1.deltaH1_se
        record.H_se = entropy_se(terms["h"], terms["T"], cfg.normalize)
        record.bars_dot = d1.deltaH1 / record.lr if record.lr else None
        record.timing["predict_total"] = time.perf_counter() - start
        return {"batch": batch, "terms": terms}

    def _choose(self, record: GovernorRecord) -> None:
        """alpha from the policy, the ceiling and alpha_min (unknown delta H_1: the ceiling)."""
        pol = self.policy
        alpha, binding = 1.0, "none"
        if record.H is not None and record.deltaH1 is not None:
            low = record.H - pol.margin_se * (record.H_se or 0.0)
            drop, _, bound = pol.allowed_drop(low, record.step)
            record.target = record.H - drop
            record.allowed_drop = drop
            if record.deltaH1 < -drop:
                alpha, binding = (drop / -record.deltaH1 if drop > 0 else 0.0), bound
        record.alpha_policy = alpha
        if self.ceiling < alpha:
            alpha, binding = self.ceiling, "ceiling"
        if alpha < pol.alpha_min:
            alpha, binding = pol.alpha_min, "alpha_min"
        record.alpha, record.binding = alpha, binding
        if record.deltaH1 is not None:
            record.predicted = alpha * record.deltaH1

    # ------------------------------------------------------------------ after the step
    def finish(self) -> GovernorRecord | None:
        """After the optimizer's step: restore the lr, measure Delta H_true on E at theta',
        update the trust region, hand the record on. None when no step is active."""
        active = self._active
        if active is None:
            return None
        self.restore_lr()
        record, runner = active["record"], active["runner"]
        counts = _step_counts(active["optimizer"], self.probe.params)
        if not any(now > before for now, before in zip(counts, active["counts"], strict=True)):
            # a fused Adam under GradScaler runs its step (and the hooks) for a step it skips
            record.trust = ("the optimizer did not take this step (its step count did not "
                            "advance, e.g. GradScaler skipped it): nothing realized, the trust "
                            "region unchanged")
            record.next_ceiling = self.ceiling
        else:
            if record.governed and not runner.failed:
                with preserved_state(self.probe.model), runner.phase("realize"):
                    self._realize(record, active["batch"], active["terms"])
            self._update_trust(record)
        record.error = runner.error
        self.records.append(record)
        for sink in self._on_record:
            sink(record)
        return record

    def _realize(self, record: GovernorRecord, batch, terms: dict[str, torch.Tensor]) -> None:
        start = time.perf_counter()
        upd = self.probe.e_terms(batch)
        gt = snis(terms["S"], upd["S"], terms["h"], upd["h"], terms["T"],
                  self.probe.config.normalize)
        record.realized, record.realized_se = gt.deltaH_true, gt.deltaH_true_se
        record.realized_raw, record.ess_fraction = gt.deltaH_true_raw, gt.ess / gt.w.numel()
        record.timing["realize_total"] = time.perf_counter() - start

    def _update_trust(self, record: GovernorRecord) -> None:
        """The ceiling for the next steps, and the entropy and sensitivity they reuse."""
        pol = self.policy
        if record.governed and record.realized is not None and record.predicted is not None:
            se = math.hypot(record.realized_se or 0.0, record.alpha * (record.deltaH1_se or 0.0))
            record.band = pol.trust_se * se + pol.trust_rel * abs(record.predicted)
            record.in_band = abs(record.realized - record.predicted) <= record.band
            if record.in_band:
                self.ceiling = min(1.0, self.ceiling * pol.grow)
            else:
                new = max(pol.alpha_min, pol.shrink * record.alpha)
                record.trust = (f"realized {record.realized:+.4g} vs predicted "
                                f"{record.predicted:+.4g} (band +-{record.band:.3g}): the linear "
                                f"regime broke; ceiling {self.ceiling:.3g} -> {new:.3g}")
                self.ceiling = new
            self.H, self.H_se = record.H + record.realized, record.H_se
            self.bars_dot, self.sensitivity_step = record.bars_dot, record.step
        elif record.H is not None and record.predicted is not None:
            self.H = record.H + record.predicted
        record.next_ceiling = self.ceiling

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The controller's state (ceiling, reused sensitivity, entropy estimate, step count)."""
        return {"ceiling": self.ceiling, "bars_dot": self.bars_dot, "H": self.H, "H_se": self.H_se,
                "sensitivity_step": self.sensitivity_step, "calls": self._calls}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ceiling = float(state.get("ceiling", 1.0))
        self.bars_dot, self.H, self.H_se = state.get("bars_dot"), state.get("H"), state.get("H_se")
        self.sensitivity_step = state.get("sensitivity_step")
        self._calls = int(state.get("calls", 0))


def _step_counts(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor]) -> list:
    """Adam's step count of each parameter (0 before its first step): a step was taken when
    one of them advanced."""
    counts = []
    for p in params.values():
        step = optimizer.state.get(p, {}).get("step", 0)
        counts.append(float(step.item()) if torch.is_tensor(step) else float(step))
    return counts
