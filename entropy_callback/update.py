"""The step Delta theta: which parameters are probed, what the optimizer held before the step,
and the step rebuilt from what the optimizer consumed.

Before the step the probe copies theta and the optimizer state of the probed parameters
(``snapshot``, ``optimizer_state``: the one snapshot). After it, ``adam_replay`` replays torch's
Adam/AdamW once on those copies with the gradients the optimizer really read
(``consumed_gradients``: torch's Adam leaves ``p.grad`` as it read it), so whatever ran between
the probe's hook and the Adam math (a trainer's or module's clipping, gradient repair,
GradScaler's unscale, parameters left without gradients) is in the prediction, and delta H_1
stays a function of pre-step quantities only. The same replay gives the step's affine split in
the gradient, which the attribution needs (``AdamReplay``).
``step_not_taken`` tells a step the optimizer skipped. Nothing here writes to parameters,
gradients or optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import ProbeConfigError


def probed_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """theta: every trainable parameter of the model, LoRA or not, by its
    ``model.named_parameters()`` name (a tied parameter once, under its first name).

    Besides the LoRA matrices of a peft model that is whatever else it trains: the copies of
    ``modules_to_save``, the biases of ``bias="lora_only"`` / ``"all"``, the rows of
    ``trainable_token_indices``, DoRA's magnitudes, an unfrozen embedding. Every probed pass
    substitutes all of them, so none is left at theta' while the others are at theta. A
    trainable parameter outside the optimizer costs a copy and moves by zero in the rebuild.
    """
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def check_moves_are_probed(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
) -> None:
    """Raise ProbeConfigError naming the model's parameters that the optimizer holds and will
    move (they have a gradient) but theta lacks: made trainable after the probe was built, or
    given a gradient while frozen. Probing without them would put theta-side passes at a mixed
    point (those tensors already at theta'). Tensors the optimizer holds outside the model do
    not enter the policy's forward and are not theta's concern."""
    probed = {id(p) for p in params.values()}
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [names[id(p)] for g in optimizer.param_groups for p in g["params"]
               if id(p) in names and id(p) not in probed and p.grad is not None]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ProbeConfigError(
            f"the optimizer moves {len(missing)} parameter(s) of the model that the probe does "
            f"not hold ({shown}): they were frozen when the probe was built, so delta H_1 and "
            "Delta H_true would be measured with them already moved. Make them trainable "
            "(requires_grad=True) before the probe is built (the callbacks build it at setup / "
            "on_train_begin), or keep them out of the optimizer."
        )


def is_adam(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _decoupled(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    if "decoupled_weight_decay" in group:
        return bool(group["decoupled_weight_decay"])
    return isinstance(optimizer, torch.optim.AdamW)


def _value(x) -> float:
    return float(x.item()) if torch.is_tensor(x) else float(x)


def group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """id(param) -> its param group."""
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """theta: copies of the probed parameters (their dtype and device)."""
    return {n: p.detach().clone() for n, p in params.items()}


def optimizer_state(
    optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]
) -> dict[str, dict[str, object]]:
    """Copies of the optimizer's state of each probed parameter (for Adam: exp_avg,
    exp_avg_sq, max_exp_avg_sq with amsgrad, step); an empty dict before its first step."""
    return {
        n: {k: (v.detach().clone() if torch.is_tensor(v) else v)
            for k, v in optimizer.state.get(p, {}).items()}
        for n, p in params.items()
    }


def consumed_gradients(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor | None]:
    """Copies of ``p.grad`` as the optimizer read it (read in its step post-hook); None where a
    parameter had no gradient, which the optimizer then left alone."""
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in params.items()}


def observed_step(
    params: dict[str, torch.nn.Parameter], theta: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """theta' - theta per tensor, in float64 (exact for float32 and bf16 parameters)."""
    return {n: p.detach().to(torch.float64) - theta[n].to(torch.float64)
            for n, p in params.items()}


def step_not_taken(
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    state: dict[str, dict[str, object]],
    grads: dict[str, torch.Tensor | None],
    observed: dict[str, torch.Tensor],
) -> str | None:
    """Why the optimizer did not take this step for the probed parameters, or None if it did.

    Read from the optimizer itself: Adam/AdamW advance ``state['step']`` of every parameter they
    update, so a step is taken when some probed parameter's count moved past the snapshot's;
    other optimizers have taken it when some probed parameter moved.
    """
    if all(g is None for g in grads.values()):
        return ("no probed parameter had a gradient (e.g. training_step returned None, or the "
                "loss did not depend on them): the optimizer left them unchanged")
    if is_adam(optimizer):
        def count(s: dict) -> float:
            return _value(s["step"]) if "step" in s else 0.0
        taken = any(count(optimizer.state.get(p, {})) > count(state[n]) for n, p in params.items())
    else:
        taken = any(bool(d.ne(0).any()) for d in observed.values())
    if taken:
        return None
    return ("its step count did not advance and no probed parameter moved (e.g. GradScaler "
            "skipped it for inf/NaN gradients)")


@dataclass
class AdamReplay:
    """The Adam/AdamW step of the probed parameters, replayed once from the snapshot.

    ``delta``: Delta theta per tensor, float64, from torch's own arithmetic in the parameter's
    dtype (what the optimizer did, rounding included). With ``split``, the same step as an
    affine function of the consumed gradient g, per tensor, float64, with this step's second
    moment s' (so D) held fixed (docs/attribution.md)::

        Delta theta = momentum + decay + scale * g,    D = sqrt(s' / (1 - b2^t)) + eps
        momentum = -lr b1 m / ((1 - b1^t) D),          scale = kappa / D (-kappa if maximize),
        decay = -lr wd theta (AdamW),  kappa wd theta / D (Adam),  kappa = -lr (1 - b1) / (1 - b1^t)

    A parameter without a gradient or outside the optimizer has a zero step and no split entry.
    """

    delta: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    decay: dict[str, torch.Tensor] = field(default_factory=dict)
    scale: dict[str, torch.Tensor] = field(default_factory=dict)

    def step(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Delta theta of the split for the gradient ``grads`` (with this step's D), float64."""
        return {n: self.momentum[n] + self.decay[n] + self.scale[n] * grads[n].to(torch.float64)
                for n in self.scale}


def adam_replay(
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    theta: dict[str, torch.Tensor],
    state: dict[str, dict[str, object]],
    grads: dict[str, torch.Tensor | None],
    split: bool = False,
) -> AdamReplay:
    """The one replay of an Adam/AdamW step: from theta, the state before it (``optimizer_state``)
    and the gradients it consumed, with the param groups' hyperparameters as the optimizer used
    them (read right after its step). ``split``: also the affine split (``AdamReplay``).

    ``delta`` is torch's single-tensor arithmetic, op for op, on copies in the parameter's own
    dtype (so a bf16 step is rounded where torch rounds it):

        t = step + 1
        AdamW: theta <- theta (1 - lr wd)        Adam: g <- g + wd theta
        m' = lerp(m, g, 1 - b1);  s' = b2 s + (1 - b2) g^2   (amsgrad: s' = max(s_max, s'))
        theta' = theta - lr / (1 - b1^t) * m' / (sqrt(s') / sqrt(1 - b2^t) + eps)

    then theta' - theta in float64. A parameter whose gradient is None gets no update, exactly as
    torch skips it. The split is the same formulas in float64.
    """
    groups = group_of(optimizer)
    replay = AdamReplay(delta={})
    for name, theta0 in theta.items():
        g, group = grads.get(name), groups.get(id(params[name]))
        if g is None or group is None:
            replay.delta[name] = torch.zeros_like(theta0, dtype=torch.float64)
            continue
        h = _Hyper(optimizer, group, state.get(name, {}))
        replay.delta[name] = _torch_step(h, theta0, g)
        if split:
            replay.momentum[name], replay.decay[name], replay.scale[name] = _affine(h, theta0, g)
    return replay


class _Hyper:
    """One parameter's step: its group's hyperparameters (as the optimizer used them) and its
    state before the step (``st``; ``t`` the step count this step reaches)."""

    def __init__(self, optimizer: torch.optim.Optimizer, group: dict, st: dict) -> None:
        self.lr = _value(group["lr"])
        self.beta1, self.beta2 = (_value(b) for b in group["betas"])
        self.eps, self.wd = float(group["eps"]), float(group["weight_decay"])
        self.decoupled = _decoupled(optimizer, group)
        self.maximize = bool(group.get("maximize", False))
        self.amsgrad = bool(group.get("amsgrad", False))
        self.t = (_value(st["step"]) if "step" in st else 0.0) + 1.0
        self.st = st


def _torch_step(h: _Hyper, theta0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """theta' - theta by torch's arithmetic in the parameter's dtype, float64 out."""
    if h.maximize:
        g = -g
    new = theta0.clone()
    if h.wd != 0:
        if h.decoupled:
            new.mul_(1 - h.lr * h.wd)
        else:
            g = g.add(theta0, alpha=h.wd)
    m = _moment(h.st, "exp_avg", theta0)
    s = _moment(h.st, "exp_avg_sq", theta0)
    m.lerp_(g, 1 - h.beta1)
    s.mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
    if h.amsgrad:
        s = torch.maximum(_moment(h.st, "max_exp_avg_sq", theta0), s)
    bias_correction2_sqrt = (1 - h.beta2**h.t) ** 0.5
    denom = (s.sqrt() / bias_correction2_sqrt).add_(h.eps)
    new.addcdiv_(m, denom, value=-(h.lr / (1 - h.beta1**h.t)))
    return new.to(torch.float64) - theta0.to(torch.float64)


def _affine(h: _Hyper, theta0: torch.Tensor, g: torch.Tensor):
    """(momentum, decay, scale) of the step, float64, s' held at this step's value."""
    th = theta0.detach().to(torch.float64)
    sign = -1.0 if h.maximize else 1.0
    g_eff = sign * g.detach().to(torch.float64)
    coupled = h.wd != 0 and not h.decoupled
    if coupled:
        g_eff = g_eff + h.wd * th
    m = _moment(h.st, "exp_avg", th).to(torch.float64)
    s_new = h.beta2 * _moment(h.st, "exp_avg_sq", th).to(torch.float64) + (
        1 - h.beta2) * g_eff * g_eff
    if h.amsgrad:
        s_new = torch.maximum(_moment(h.st, "max_exp_avg_sq", th).to(torch.float64), s_new)
    D = s_new.sqrt() / math.sqrt(1 - h.beta2**h.t) + h.eps
    bias1 = 1 - h.beta1**h.t
    kappa = -h.lr * (1 - h.beta1) / bias1
    momentum = -h.lr * h.beta1 * m / (bias1 * D)
    decay = kappa * h.wd * th / D if coupled else -h.lr * h.wd * th
    return momentum, decay, sign * kappa / D


def _moment(state: dict, key: str, like: torch.Tensor) -> torch.Tensor:
    """A copy of an Adam moment (on ``like``'s device), or zeros as torch initialises it before
    the first step."""
    value = state.get(key)
    if torch.is_tensor(value):
        return value.to(like.device, copy=True)
    return torch.zeros_like(like, memory_format=torch.preserve_format)


def learning_rate(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]):
    """eta: the lr of the first param group (in the optimizer's order) holding probed
    parameters, and whether the groups holding probed parameters disagree."""
    probed = {id(p) for p in params.values()}
    lrs = [_value(g["lr"]) for g in optimizer.param_groups
           if any(id(p) in probed for p in g["params"])]
    if not lrs:
        return None, False
    return lrs[0], len(set(lrs)) > 1


def flat_cosine_and_rel_error(
    predicted: dict[str, torch.Tensor], observed: dict[str, torch.Tensor]
) -> tuple[float, float, float]:
    """cosine(pred, obs), ||pred - obs|| / ||obs||, ||obs|| over all probed tensors (float64)."""
    a = torch.cat([predicted[n].reshape(-1).to(torch.float64).cpu() for n in observed])
    b = torch.cat([observed[n].reshape(-1).to(torch.float64).cpu() for n in observed])
    nb = float(b.norm())
    na = float(a.norm())
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")
    rel = float((a - b).norm()) / nb if nb > 0 else float("nan")
    return cos, rel, nb
