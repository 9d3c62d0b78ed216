"""The step Delta theta: which parameters are probed, and AdamW reconstructed from live state.

``adam_update`` reproduces torch's Adam/AdamW arithmetic (estimators.md section 2) from the
optimizer's state and the step's gradients *before* the optimizer runs, so delta H_1 is a true
prediction. Nothing here writes to parameters, gradients or optimizer state.
"""

from __future__ import annotations

import math

import torch


def probed_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """theta: the LoRA parameters of a peft model, else every trainable parameter."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if hasattr(model, "peft_config"):
        lora = {n: p for n, p in trainable.items() if "lora_" in n}
        if lora:
            return lora
    return trainable


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


def clipped_gradients(
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    clip_val: float | None,
    clip_algorithm: str | None,
) -> dict[str, torch.Tensor]:
    """The gradients the optimizer will see, after the trainer's clipping (copies).

    Norm clipping follows ``torch.nn.utils.clip_grad_norm_`` over every parameter of the
    optimizer (as Lightning clips): coef = min(1, c / (||g|| + 1e-6)).
    """
    grads = {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in params.items()
    }
    if not clip_val or clip_val <= 0:
        return grads
    if clip_algorithm in (None, "norm"):
        every = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not every:
            return grads
        norms = [torch.linalg.vector_norm(g.detach(), 2.0) for g in every]
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)
        coef = torch.clamp(float(clip_val) / (total + 1e-6), max=1.0)
        return {n: g.mul_(coef.to(g.device, g.dtype)) for n, g in grads.items()}
    if clip_algorithm == "value":
        return {n: g.clamp_(-float(clip_val), float(clip_val)) for n, g in grads.items()}
    raise ValueError(f"clip_algorithm must be 'norm' or 'value', got {clip_algorithm!r}.")


def adam_update(
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    grads: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Delta theta of the coming Adam/AdamW step, per tensor, in float64.

        t  = step + 1;  m' = b1 m + (1 - b1) g;  s' = b2 s + (1 - b2) g^2  (amsgrad: max)
        D  = sqrt(s' / (1 - b2^t)) + eps
        dtheta = -lr (wd theta + m' / ((1 - b1^t) D))     (AdamW; Adam adds wd theta to g)

    Computed in float64; the result is the difference between theta' rounded to the parameter's
    dtype and theta, i.e. the change the stored float32 (or bf16) parameter will really show.
    """
    groups = group_of(optimizer)
    out = {}
    for name, p in params.items():
        group = groups.get(id(p))
        if group is None:
            out[name] = torch.zeros_like(p, dtype=torch.float64)
            continue
        lr = _value(group["lr"])
        beta1, beta2 = (_value(b) for b in group["betas"])
        eps, wd = float(group["eps"]), float(group["weight_decay"])
        theta = p.detach().to(torch.float64)
        g = grads[name].to(torch.float64)
        if group.get("maximize", False):
            g = -g
        state = optimizer.state.get(p, {})
        t = (_value(state["step"]) if "step" in state else 0.0) + 1.0
        m = state["exp_avg"].to(torch.float64) if "exp_avg" in state else torch.zeros_like(g)
        s = state["exp_avg_sq"].to(torch.float64) if "exp_avg_sq" in state else torch.zeros_like(g)
        decoupled = _decoupled(optimizer, group)
        if wd != 0 and not decoupled:
            g = g + wd * theta
        m_new = beta1 * m + (1 - beta1) * g
        s_new = beta2 * s + (1 - beta2) * g * g
        if group.get("amsgrad", False):
            s_max = state.get("max_exp_avg_sq")
            s_max = s_max.to(torch.float64) if s_max is not None else torch.zeros_like(g)
            s_new = torch.maximum(s_max, s_new)
        D = (s_new.sqrt() / math.sqrt(1 - beta2**t)) + eps
        step = -(lr / (1 - beta1**t)) * m_new / D
        if wd != 0 and decoupled:
            step = step - lr * wd * theta
        # the step the stored parameter actually takes: theta' rounded to the parameter's dtype
        out[name] = (theta + step).to(p.dtype).to(torch.float64) - theta
    return out


def learning_rate(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]):
    """eta: the lr of the first param group (in the optimizer's order) holding probed
    parameters, and whether the groups holding probed parameters disagree."""
    probed = {id(p) for p in params.values()}
    lrs = [_value(g["lr"]) for g in optimizer.param_groups
           if any(id(p) in probed for p in g["params"])]
    if not lrs:
        return None, False
    return lrs[0], len(set(lrs)) > 1


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


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
