"""Attribution of delta H_1 to momentum, weight decay, and the step's update rollouts and tokens.

With Adam's second moment of this step held at its value s' (computed with this step's gradient),
the Adam/AdamW step is linear in the step's gradient g (docs/attribution.md):

    dtheta = momentum + decay + kappa * g / D,     D = sqrt(s' / (1 - b2^t)) + eps
    momentum = -lr b1 m / ((1 - b1^t) D),          kappa = -lr (1 - b1) / (1 - b1^t)  (-kappa if
    decay    = -lr wd theta            (AdamW)                                         maximize)
             = kappa wd theta / D      (Adam: wd theta is added to g)

so delta H_1 = g_E . dtheta splits exactly. The gradient part splits over the update rollouts i
and their tokens t because g = c * sum_it grad loss_it (c: the clipping coefficient times the
loss scale of gradient accumulation):

    dH_it = c * D_u loss_it,     u = kappa g_E / D   (per tensor)

g_E is the gradient of the surrogate L(theta) = (1/T_E) sum_ik [H_ik + l_ik stopgrad(R_ik)]
(docs/estimators.md: D_u L is delta H_1), from one reverse-mode pass over E
(``surrogate_gradient``: ``reverse.surrogate_backward`` with one objective); the D_u loss_it
come from one forward-mode pass over the rollouts' per-token losses (``rollout_derivatives``).
The split of the step itself comes from the engine's one Adam replay
(``update.adam_replay(..., split=True)``). Nothing here writes to parameters, ``.grad`` or the
optimizer state.

The protocol a LightningModule follows to be attributed (the demo's ``GRPOModule`` does):

- ``training_step`` returns a dict whose ``"rollouts"`` entry is a dict of tensors of the
  micro-batch: ``response_mask`` [N, L] (1 on response tokens), ``advantages`` [N] or [N, L],
  ``token_logp`` [N, L] (detached log pi(y_t) at theta), ``response_ids`` [N, L] (for text), and
  whatever the module's loss needs; ``prompts`` (list of N strings) is optional.
- ``per_token_loss(rollouts) -> [N, L]`` recomputes, at the current parameters, the per-token
  losses whose sum is the loss ``training_step`` returned (before Lightning divides it by
  ``accumulate_grad_batches``), zero outside the response mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from .forward_mode import jvp
from .reverse import surrogate_backward
from .scoring import Scorer, no_flash_attention
from .update import AdamReplay
from .variants import call_substituted

Rollouts = Mapping[str, object]
PerTokenLoss = Callable[[Rollouts], torch.Tensor]
ROLLOUT_KEYS = ("response_mask", "advantages", "token_logp")


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return float(sum((a[n].to(torch.float64) * b[n].to(torch.float64)).sum().cpu() for n in b))


def surrogate_gradient(
    scorer: Scorer,
    microbatches: Iterable,
    theta: Mapping[str, torch.Tensor],
    H_hat: float,
    denominator: float,
    normalize: str = "per_token",
) -> dict[str, torch.Tensor]:
    """g_E: the gradient at ``theta`` of L = (1/denominator) sum_ik [H_ik + l_ik stopgrad(R_ik)]
    over the E micro-batches, float64, by reverse mode (``torch.autograd.grad``; no ``.grad``).

    R_ik = sum_{j>k} (H_ij - H_hat) per token (denominator T_E), sum_{j>k} H_ij per sequence
    (denominator B), so that g_E . u is delta H_1 along any u (docs/estimators.md). The true
    gradient: through what the forward hides from autograd (DoRA's weight norm, an embedding's
    padding row: ``variants.exact_variant_derivatives``).
    """
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in theta.items()}
    total = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in leaves.items()}

    def weights(ent: torch.Tensor, mask: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
        return [(1.0 / denominator, _remainders(ent, mask, H_hat, normalize) / denominator)]

    for mb in microbatches:
        for name, g in surrogate_backward(scorer, mb, leaves, weights).grads[0].items():
            total[name] += g
    return total


def _remainders(ent: torch.Tensor, mask: torch.Tensor, H_hat: float, normalize: str):
    """R_ik = sum_{j>k} (H_ij - H_hat) per token, sum_{j>k} H_ij per sequence; [b, L]."""
    Hm = ent * mask
    R = Hm.flip(-1).cumsum(-1).flip(-1) - Hm
    if normalize == "per_token":
        R = R - H_hat * (mask.flip(-1).cumsum(-1).flip(-1) - mask)
    return R


class _Bound(torch.nn.Module):
    """Calls ``fn(rollouts)`` with ``model`` registered, so ``functional_call`` can substitute
    the model's parameters under a module method such as ``per_token_loss``."""

    def __init__(self, model: torch.nn.Module, fn: PerTokenLoss):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, rollouts: Rollouts) -> torch.Tensor:
        return self.fn(rollouts)


def rollout_derivatives(
    model: torch.nn.Module,
    per_token_loss: PerTokenLoss,
    rollouts: Rollouts,
    theta: Mapping[str, torch.Tensor],
    u: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_it, D_u loss_it), each [N, L] float64, from one forward-mode pass at ``theta``
    (names as in ``model.named_parameters()``) along ``u``; the live parameters are untouched.
    Through the model's forward as training runs it (DoRA's norm detached, as in the gradient
    the optimizer consumed), so the parts add up to g_E . dtheta."""
    bound = _Bound(model, per_token_loss)
    primals = {f"model.{n}": t.detach() for n, t in theta.items()}
    tangents = {f"model.{n}": u[n].to(theta[n].device, theta[n].dtype) for n in theta}

    def run(p):
        return call_substituted(bound, p, (rollouts,))

    with no_flash_attention():
        loss, dloss = jvp(run, (primals,), (tangents,))
    return loss.detach().to(torch.float64), dloss.detach().to(torch.float64)


def clip_coefficient(
    raw: Mapping[str, torch.Tensor], consumed: Mapping[str, torch.Tensor]
) -> tuple[float, float]:
    """c_clip = <consumed, raw> / <raw, raw> over the probed tensors, and how far the consumed
    gradient is from c_clip * raw (relative norm; 0 for norm clipping, > 0 for value clipping)."""
    rr = _dot(raw, raw)
    if rr == 0:
        return 0.0, 0.0
    c = _dot(consumed, raw) / rr
    off = sum(
        float(((consumed[n].double() - c * raw[n].double()) ** 2).sum().cpu()) for n in raw
    )
    cc = _dot(consumed, consumed)
    return c, math.sqrt(off / cc) if cc > 0 else 0.0


def check_rollouts(rollouts: object) -> str | None:
    """Why ``rollouts`` does not follow the protocol, or None when it does."""
    if not isinstance(rollouts, Mapping):
        return f"training_step's 'rollouts' must be a dict, got {type(rollouts).__name__}"
    missing = [k for k in ROLLOUT_KEYS if not torch.is_tensor(rollouts.get(k))]
    if missing:
        return f"training_step's 'rollouts' lacks the tensor(s) {missing}"
    return None


def concat_rollouts(parts: list[Rollouts]) -> dict[str, object]:
    """The micro-batches' rollouts of one step as one (tensors padded on the right and stacked
    along the first dimension; lists concatenated). Only for reporting: the per-token loss is
    evaluated per micro-batch."""
    out: dict[str, object] = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if all(torch.is_tensor(v) for v in values):
            if values[0].dim() >= 2:
                width = max(v.shape[1] for v in values)
                values = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values]
            out[key] = torch.cat([v.detach().cpu() for v in values])
        elif all(isinstance(v, list) for v in values):
            out[key] = [x for v in values for x in v]
    return out


@dataclass
class StepAttribution:
    """delta H_1 of one step in parts (units of delta H_1: nats per token or per response).

    ``tokens[k]`` is dH_it of micro-batch k, [N_k, L_k] float64, zero outside the mask.
    ``total`` = g_E . dtheta (reverse-mode, the consumed gradient): the parts sum to it exactly
    unless the consumed gradient is not c * (the rollouts' gradient) (value clipping, dropout, a
    per_token_loss that does not match the loss), which ``clip_offset`` and ``protocol_error``
    measure.
    """

    momentum: float
    decay: float
    gradient: float
    total: float
    tokens: list[torch.Tensor]
    c: float
    clip_offset: float
    protocol_error: float

    @property
    def rollouts_sum(self) -> float:
        return float(sum(t.sum() for t in self.tokens))

    @property
    def parts_sum(self) -> float:
        return self.momentum + self.decay + self.rollouts_sum


def attribute_step(
    *,
    model: torch.nn.Module,
    per_token_loss: PerTokenLoss,
    rollouts: list[Rollouts],
    theta: Mapping[str, torch.Tensor],
    replay: AdamReplay,
    raw_grads: Mapping[str, torch.Tensor],
    consumed_grads: Mapping[str, torch.Tensor],
    g_E: Mapping[str, torch.Tensor],
    loss_scale: float = 1.0,
) -> StepAttribution:
    """Split g_E . dtheta of one Adam/AdamW step (module docstring).

    Args:
        rollouts: the step's micro-batches' ``rollouts`` (protocol in the module docstring).
        theta: the probed parameters before the step.
        replay: the step's ``update.adam_replay(..., split=True)`` (its affine split in g).
        raw_grads: the gradients before clipping (``p.grad`` at ``on_before_optimizer_step``).
        consumed_grads: the gradients the optimizer read (after clipping).
        g_E: ``surrogate_gradient`` at theta.
        loss_scale: what the trainer multiplied each micro-batch's loss by before backward
            (1 / ``accumulate_grad_batches`` in Lightning's automatic optimization).
    """
    step = replay
    names = list(step.scale)
    # u only where g != 0: u . g is unchanged, and where torch's backward gave every token a zero
    # gradient (an embedding's padding row) forward mode would count a derivative g never had
    u = {n: torch.where(consumed_grads[n].to(step.scale[n].device) != 0,
                        step.scale[n] * g_E[n].to(step.scale[n].device), 0.0) for n in names}
    c_clip, clip_offset = clip_coefficient(
        {n: raw_grads[n] for n in names}, {n: consumed_grads[n] for n in names}
    )
    c = c_clip * loss_scale
    probed = {n: theta[n] for n in names}
    tokens, directional = [], 0.0
    for part in rollouts:
        _, dloss = rollout_derivatives(model, per_token_loss, part, probed, u)
        mask = part["response_mask"].to(dloss.device, torch.float64)
        dloss = dloss * mask
        directional += float(dloss.sum())
        tokens.append((c * dloss).cpu())
    raw_u = _dot(u, {n: raw_grads[n] for n in names})
    protocol_error = (
        abs(loss_scale * directional - raw_u) / abs(raw_u) if raw_u != 0 else 0.0
    )
    return StepAttribution(
        momentum=_dot(g_E, step.momentum),
        decay=_dot(g_E, step.decay),
        gradient=_dot(u, consumed_grads),
        total=_dot(g_E, step.step(consumed_grads)),
        tokens=tokens,
        c=c,
        clip_offset=clip_offset,
        protocol_error=protocol_error,
    )
