"""What users see of an attribution: the parts record, Cui's covariance proxy, the top rollouts
and tokens (docs/attribution.md). The parts are declared in ``result.QUANTITIES`` (section
"attribution"); their tags are derived in :mod:`entropy_callback.tags`.

Units: every part is in the units of delta H_1 (nats per token, or per response with
``normalize="per_sequence"``); the parts plus ``residual`` sum to delta H_1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .attribution import (
    PerTokenLoss,
    Rollouts,
    StepAttribution,
    attribute_step,
    check_rollouts,
    concat_rollouts,
    surrogate_gradient,
)
from .result import ATTRIBUTION_PARTS
from .scoring import Scorer
from .update import AdamReplay

TOP_K = 8


def _per_token(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantages [N] or [N, L] -> [N, L] float64 (zero outside ``mask``)."""
    a = advantages.detach().to(torch.float64).cpu()
    if a.dim() == 1:
        a = a[:, None].expand_as(mask)
    return a[:, : mask.shape[1]] * mask


def cui_covariance(rollouts: Sequence[Rollouts]) -> float | None:
    """Cov_tokens(log pi, A) over every response token of the step's rollouts (population
    covariance; nats x advantage units). Cui et al.'s proxy of the entropy change is its
    negative, ``-learning_rate`` times it in their lr-scaled form. None without tokens."""
    merged = concat_rollouts(list(rollouts))
    mask = merged["response_mask"].to(torch.float64)
    n = float(mask.sum())
    if n == 0:
        return None
    logp = merged["token_logp"].to(torch.float64) * mask
    adv = _per_token(merged["advantages"], mask)
    mean_l, mean_a = float(logp.sum()) / n, float(adv.sum()) / n
    return float((((logp - mean_l) * (adv - mean_a)) * mask).sum()) / n


def parts(
    att: StepAttribution,
    rollouts: Sequence[Rollouts],
    deltaH1: float | None,
    learning_rate: float | None,
) -> dict[str, Any]:
    """The record's ``attribution.parts``: momentum, weight decay, the rollouts by sign of their
    advantage, the tokens by Cui's quadrants (advantage sign x probability above or below the
    step's mean log-probability), the residual and Cui's proxies."""
    merged = concat_rollouts(list(rollouts))
    mask = merged["response_mask"].to(torch.float64)
    dH = _cat_tokens(att.tokens, mask.shape[1]) * mask
    adv = _per_token(merged["advantages"], mask)
    logp = merged["token_logp"].to(torch.float64)
    n = float(mask.sum())
    high = logp >= (float((logp * mask).sum()) / n if n else 0.0)
    seq_adv = adv.sum(-1) / mask.sum(-1).clamp(min=1)
    per_rollout = dH.sum(-1)
    cov = cui_covariance(rollouts)
    out = {
        "momentum": att.momentum,
        "weight_decay": att.decay,
        "rollouts": float(per_rollout.sum()),
        "rollouts_pos_adv": float(per_rollout[seq_adv > 0].sum()),
        "rollouts_neg_adv": float(per_rollout[seq_adv < 0].sum()),
        "rollouts_zero_adv": float(per_rollout[seq_adv == 0].sum()),
        "tokens_pos_adv_high_p": float(dH[(adv > 0) & high].sum()),
        "tokens_pos_adv_low_p": float(dH[(adv > 0) & ~high].sum()),
        "tokens_neg_adv_high_p": float(dH[(adv < 0) & high].sum()),
        "tokens_neg_adv_low_p": float(dH[(adv < 0) & ~high].sum()),
        "residual": None if deltaH1 is None else deltaH1 - att.parts_sum,
        "gradient_consumed": att.gradient,
        "reverse_total": att.total,
        "clip_coefficient": att.c,
        "clip_offset": att.clip_offset,
        "protocol_error": att.protocol_error,
        "num_rollouts": int(mask.shape[0]),
        "num_tokens": int(n),
        "cui_proxy": None if cov is None else -cov,
        "cui_proxy_lr": None if cov is None or learning_rate is None else -learning_rate * cov,
    }
    return {q.name: out[q.name] for q in ATTRIBUTION_PARTS}  # declared order; cleaned in the result


def _cat_tokens(tokens: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tokens])


def top(
    att: StepAttribution,
    rollouts: Sequence[Rollouts],
    tokenizer,
    k: int = TOP_K,
) -> dict[str, list[dict[str, Any]]]:
    """The record's detailed part: the ``k`` rollouts and ``k`` tokens with the largest
    |delta H|, each with its text, advantage and probabilities (pi(y_t) at theta)."""
    merged = concat_rollouts(list(rollouts))
    mask = merged["response_mask"].to(torch.float64)
    dH = _cat_tokens(att.tokens, mask.shape[1]) * mask
    adv = _per_token(merged["advantages"], mask)
    prob = merged["token_logp"].to(torch.float64).exp() * mask
    ids = merged.get("response_ids")
    prompts = merged.get("prompts")
    lengths = mask.sum(-1).long()

    def text(i: int, t: int) -> str | None:
        return None if ids is None else tokenizer.decode([int(ids[i, t])])

    def rollout(i: int) -> dict[str, Any]:
        n = int(lengths[i])
        return {
            "index": i,
            "deltaH": float(dH[i].sum()),
            "advantage": float(adv[i, :n].mean()) if n else 0.0,
            "prompt": prompts[i] if prompts is not None else None,
            "tokens": [{"text": text(i, t), "deltaH": float(dH[i, t]),
                        "prob": float(prob[i, t]), "advantage": float(adv[i, t])}
                       for t in range(n)],
        }

    by_rollout = dH.sum(-1).abs().argsort(descending=True)[:k].tolist()
    flat = (dH.abs() + (mask - 1) * 1e300).flatten().argsort(descending=True)
    top_tokens = []
    for f in flat[: min(k, int(mask.sum()))].tolist():
        i, t = divmod(f, mask.shape[1])
        top_tokens.append({"rollout": i, "position": t, "text": text(i, t),
                           "deltaH": float(dH[i, t]), "prob": float(prob[i, t]),
                           "advantage": float(adv[i, t])})
    return {"top_rollouts": [rollout(i) for i in by_rollout], "top_tokens": top_tokens}


def build_section(
    *,
    model: torch.nn.Module,
    scorer: Scorer,
    microbatches: Iterable,
    tokenizer,
    per_token_loss: PerTokenLoss,
    rollouts: list[Rollouts],
    theta: Mapping[str, torch.Tensor],
    replay: AdamReplay,
    raw_grads: Mapping[str, torch.Tensor],
    consumed_grads: Mapping[str, torch.Tensor],
    H_hat: float,
    denominator: float,
    normalize: str,
    deltaH1: float | None,
    learning_rate: float | None,
    loss_scale: float,
    detailed: bool,
) -> dict[str, Any]:
    """The record's ``attribution`` section of one probed step: g_E by one reverse-mode pass
    over E at theta (``H_hat``, ``denominator`` = T_E or B_E as the engine computed them), the
    split by one forward-mode pass over the rollouts, then ``parts`` (and ``top_rollouts``,
    ``top_tokens`` when ``detailed``)."""
    g_E = surrogate_gradient(scorer, microbatches, theta, H_hat, denominator, normalize)
    att = attribute_step(model=model, per_token_loss=per_token_loss, rollouts=rollouts,
                         theta=theta, replay=replay, raw_grads=raw_grads,
                         consumed_grads=consumed_grads, g_E=g_E, loss_scale=loss_scale)
    out: dict[str, Any] = {"parts": parts(att, rollouts, deltaH1, learning_rate)}
    if detailed:
        out.update(top(att, rollouts, tokenizer))
    return out


def keep_inputs(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter]):
    """Before the step (engine's before_step): the raw gradients (copies, before any clipping).
    The Adam state is the engine's one snapshot, the step's split its one replay."""
    return {"raw": {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                    for n, p in params.items()}}


DDP_UNSUPPORTED = (
    "attribution runs on a single process only (DDP not supported yet: each rank's g_E and "
    "rollouts would need reducing); delta H_1 and Delta H_true are unaffected"
)


def rollout_problems(rollouts: Sequence[Rollouts] | None, per_token_loss) -> str | None:
    """Why the step's rollouts cannot be attributed (docs/attribution.md), or None."""
    reasons = [r for r in map(check_rollouts, rollouts or []) if r] or (
        [] if rollouts else ["no rollouts were given for this step (training_step returned "
                             "no 'rollouts')"])
    if not callable(per_token_loss):
        reasons.append("no per_token_loss(rollouts) method was given")
    return "; ".join(reasons) + " (see docs/attribution.md)" if reasons else None
