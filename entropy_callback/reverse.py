"""The reverse-mode derivative pass: delta H_1 from backward passes, no forward-mode rule needed.

delta H_1 = g_E . u, where g_E is the gradient at theta of the estimator's surrogate over E,

    L(theta) = sum_ik [ H_ik(theta) + l_ik(theta) stopgrad(R_ik) ]      (docs/estimators.md)

and u = Delta theta. The standard error needs more than the sum: per sequence i, the two
scalars of ``scoring.sequence_terms`` that the estimator combines once H_hat is known,

    P_i = A_i + Bsum_i = D_u sum_k [ H_ik + l_ik stopgrad(sum_{j>k} H_ij) ]
    C_i = D_u sum_k l_ik stopgrad(T_i - k)          (per_token only: the plug-in H_hat in R)

A directional derivative per sequence is not a gradient: one backward of sum_i P_i gives
sum_i P_i only. The per-sequence values come from the same backward by tangent injection
(``injection.py``). One backward per objective (P, and C per token) gives every per-sequence
value *and* g_E; ``reverse_pass`` checks that sum_i P_i equals <g_P, u> (float64), so a use of a
parameter the hooks did not see (a module that reads another module's weight directly) fails
loudly instead of biasing delta H_1. The pass runs inside ``variants.exact_variant_derivatives``,
so the gradient includes what the forward hides from autograd (an embedding's ``padding_idx``
row, DoRA's detached norm). DoRA itself is refused: its weight norm is one tensor shared by
every sequence (``choose_derivative`` takes the forward pass for it).

The attention kernel, fused kernels, and everything else in the model only run forward and
backward: no forward-mode rule is needed except in the modules that own probed parameters
(LoRA's linear layers, embeddings, norms). The LM head is applied per chunk of positions, as in
scoring (no [mb, L, V] tensor); ``attribution.surrogate_gradient`` is this pass with one
objective and no injection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import checkpointing
from .headmaths import chunk_rows, head_block_rows, logp_and_entropy_rows
from .injection import Injector, injecting, leaf, per_row
from .kernelcheck import no_forward_rule_layers
from .scoring import Scorer, _prefixed
from .variants import call_substituted, exact_variant_derivatives

Weights = Callable[[torch.Tensor, torch.Tensor], list[tuple[float, torch.Tensor]]]
"""(H [b, L] float64 at theta, mask [b, L] float64) -> one (alpha, w [b, L]) per objective:
objective_j = sum_ik (alpha H_ik + w_ik l_ik), w held fixed (stopgrad)."""

# sum_i P_i against <g_P, u>: relative gap allowed per dtype of the model's parameters (rounding
# of the two float orders of summation; a missed parameter use is a gap of order one)
CHECK_RTOL = {torch.float64: 1e-8, torch.float32: 1e-3}
HALF_RTOL = 5e-2


@dataclass
class Backward:
    """One microbatch's reverse pass: l and H [b, L] float64 at theta (0 past each stop), then
    per objective j the gradient of objective_j by name (float64) and, with an injector, the
    per-sequence directional derivatives D_u objective_j restricted to sequence i, [b]
    float64."""

    logp: torch.Tensor
    ent: torch.Tensor
    grads: list[dict[str, torch.Tensor]]
    rows: list[torch.Tensor] | None


def surrogate_backward(scorer: Scorer, mb, leaves: Mapping[str, torch.Tensor], weights: Weights,
                       injector: Injector | None = None) -> Backward:
    """The gradients of the objectives ``weights`` defines over microbatch ``mb`` at ``leaves``
    (tensors that require grad, substituted by ``functional_call``; nothing live is written),
    one backward each. The head runs per chunk of positions on the split path."""
    scorer.check_split(mb)
    replay = None if injector is None else injector.replay
    with (torch.enable_grad(), exact_variant_derivatives(scorer.model),
          checkpointing(scorer.model, replay)):
        if scorer.split is None:
            return _full_backward(scorer, mb, leaves, weights, injector)
        return _split_backward(scorer, mb, leaves, weights, injector)


def _zeros(leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v, dtype=torch.float64) for k, v in leaves.items()}


def _add(total: dict[str, torch.Tensor], names, grads) -> None:
    """Adds each gradient (float64) to ``total`` under its name in ``names``."""
    for name, g in zip(names, grads, strict=True):
        if g is not None:
            g = g.detach().to(torch.float64)
            total[name] = total[name] + g if name in total else g


def _split_backward(scorer, mb, leaves, weights, injector) -> Backward:
    """Body once with its graph; the head per chunk (its backward gives d/d hidden and the head's
    own parameters' part); one backward through the body per objective."""
    split, device = scorer.split, scorer.device
    mask = mb.response_mask.to(device)
    b = mask.shape[0]
    targets = mb.response_ids.to(device)[mask]
    sequence = torch.arange(b, device=device).unsqueeze(1).expand_as(mask)[mask]  # row -> i
    eps_body = leaf(b, injector, device)
    with injecting(injector, eps_body):
        hidden, _ = scorer.hidden_states(mb, leaves)  # [N, d], with the body's graph
    head_leaves = {k: v for k, v in leaves.items() if k in split.head_names}
    fixed = {k: v.detach() for k, v in head_leaves.items()}
    closed_form = split.plain and not head_leaves
    with torch.no_grad():  # l and H at theta (a head weight may be trainable, not probed)
        if closed_form:
            logp_rows, ent_rows, d_ent, d_logp = _plain_head(scorer, hidden.detach(), targets)
        else:
            logp_rows, ent_rows = scorer.head_rows(hidden.detach(), None, targets, fixed, None)
    logp = torch.zeros(mask.shape, dtype=torch.float64, device=device)
    ent = torch.zeros_like(logp)
    logp[mask], ent[mask] = logp_rows, ent_rows
    objectives = weights(ent, mask.to(torch.float64))
    w_rows = [w[mask] for _, w in objectives]
    grads = [_zeros(leaves) for _ in objectives]
    rows = [torch.zeros(b, dtype=torch.float64, device=device) for _ in objectives]

    def head(h: torch.Tensor):
        if not head_leaves:
            return split.logits(h), {}
        return call_substituted(split, _prefixed(head_leaves), args=(h,),
                                kwargs={"part": "head"}), head_leaves

    head_then_body(scorer, hidden, targets, sequence, objectives, w_rows,
                   (d_ent, d_logp) if closed_form else None,
                   head, injector if head_leaves else None, leaves, eps_body, grads, rows,
                   injector)
    return Backward(logp, ent, grads, rows if injector is not None else None)


def head_then_body(scorer: Scorer, hidden, targets, sequence, objectives, w_rows, closed,
                   head, head_injector, body: Mapping[str, torch.Tensor], eps_body, grads, rows,
                   injector, before_body=None) -> None:
    """The backwards of the split path, shared by this pass and the sharded one
    (``sharded_reverse.py``). With ``closed`` = (dH/dh, dl/dh) [N, d] from the head's closed
    form (``_plain_head``), d objective_j / d hidden = alpha_j dH/dh + w_j dl/dh row by row;
    without (None): the head per chunk of the N response rows of ``hidden`` [N, d] with its own
    backward per objective, ``head(h) -> (logits, {name: head parameter tensor in the graph})``,
    giving ``d_hidden[j]`` and the head parameters' gradients, with an injection leaf per chunk
    when ``head_injector`` is given (the head owns probed parameters). Then, when the body has a
    graph, one backward through it per objective (``before_body()`` first, if given) with respect to
    ``body``'s tensors and ``eps_body``. Gradients add into ``grads[j]`` (float64, by name), the
    injection leaves' per-sequence rows into ``rows[j]`` (``sequence``: row -> sequence)."""
    device = hidden.device
    if closed is not None:
        d_hidden = [alpha * closed[0] + w.unsqueeze(-1).to(hidden.dtype) * closed[1]
                    for (alpha, _), w in zip(objectives, w_rows, strict=True)]
    else:
        d_hidden = [torch.zeros_like(hidden) for _ in objectives]
    step = chunk_rows(scorer.split.vocab, scorer.chunk_size, device)
    for start in range(0, 0 if closed is not None else hidden.shape[0], step):
        stop = min(start + step, hidden.shape[0])
        h = hidden[start:stop].detach().requires_grad_(True)
        eps_tok = leaf(stop - start, head_injector, device)
        with injecting(injector, eps_tok):
            z, params = head(h)
        lp, en = logp_and_entropy_rows(z, targets[start:stop], scorer.temperature)
        inputs = [h, *params.values(), *([eps_tok] if eps_tok is not None else [])]
        for j, (alpha, _) in enumerate(objectives):
            objective = (alpha * en + lp * w_rows[j][start:stop]).sum()
            g = torch.autograd.grad(objective, inputs, retain_graph=j + 1 < len(objectives),
                                    allow_unused=True)
            d_hidden[j][start:stop] = g[0]
            _add(grads[j], params, g[1 : 1 + len(params)])
            if eps_tok is not None and g[-1] is not None:
                rows[j].index_add_(0, sequence[start:stop], per_row(g[-1]))
        del z, lp, en
    if hidden.requires_grad:  # False with LoRA on the head alone
        inputs = [*body.values(), *([eps_body] if eps_body is not None else [])]
        for j in range(len(objectives)):
            if before_body is not None:
                before_body()
            g = torch.autograd.grad(hidden, inputs, grad_outputs=d_hidden[j],
                                    retain_graph=j + 1 < len(objectives), allow_unused=True)
            _add(grads[j], body, g[: len(body)])
            if eps_body is not None and g[-1] is not None:
                rows[j] += per_row(g[-1])


def _plain_head(scorer: Scorer, hidden: torch.Tensor, targets: torch.Tensor):
    """A plain linear head whose parameters are not probed, in one pass and closed form:
    l, H [N] float64 and their gradients with respect to the hidden states, dH/dh and dl/dh
    [N, d] (hidden's dtype). In the logits x = z / tau (after the model's scaling and
    soft-capping, whose chain rule is applied), dl_y/dx = onehot(y) - p and
    dH/dx = -p (log p + H); then one matmul with the head's weight per block of positions."""
    split, device, tau = scorer.split, scorer.device, scorer.temperature
    weight, bias = split.head.weight, split.head.bias
    n = hidden.shape[0]
    rows = chunk_rows(split.vocab, scorer.chunk_size, device)
    # half scoring's block: the two gradients of a block live beside its logits
    block = max(rows, head_block_rows(split.vocab, rows, scorer.chunk_size, device) // 2)
    out = torch.empty((2, n), dtype=torch.float64, device=device)
    grads = torch.empty((2, *hidden.shape), dtype=hidden.dtype, device=device)
    for first in range(0, n, block):
        z = F.linear(hidden[first : first + block], weight, bias)
        factor = None
        if split.scale is not None:
            z, factor = z * split.scale, split.scale
        if split.softcap is not None:
            t = torch.tanh(z / split.softcap)
            z, factor = t * split.softcap, (1 - t * t) * (1.0 if factor is None else factor)
        g = torch.empty((2, *z.shape), dtype=z.dtype, device=device)  # dH/dz, dl/dz
        for start in range(0, z.shape[0], rows):
            stop = min(start + rows, z.shape[0])
            x = z[start:stop].to(torch.float64)
            logp = torch.log_softmax(x if tau == 1.0 else x / tau, dim=-1)
            del x
            p = logp.exp()
            idx = targets[first + start : first + stop].unsqueeze(-1)
            out[0, first + start : first + stop] = logp.gather(-1, idx).squeeze(-1)
            ent = -torch.linalg.vecdot(p, logp)
            out[1, first + start : first + stop] = ent
            # in place, one float64 buffer each: p (log p + H) and p - onehot; the common
            # factor -1/tau is applied after the matmul, on [r, d]
            g[0, start:stop] = logp.add_(ent.unsqueeze(-1)).mul_(p)
            g[1, start:stop] = p.scatter_add_(-1, idx, torch.full(idx.shape, -1.0, dtype=p.dtype,
                                                                  device=device))
            del logp, p
        stop = first + z.shape[0]
        del z
        if factor is not None:
            g.mul_(factor)
        grads[:, first:stop] = (g @ weight).mul_(-1.0 / tau)  # [2, r, V] @ [V, d]
        del g
    return out[0], out[1], grads[0], grads[1]


def _full_backward(scorer, mb, leaves, weights, injector) -> Backward:
    """A head the split cannot reproduce: the model's full forward (its logits at once)."""
    device = scorer.device
    b = mb.response_mask.shape[0]
    eps = leaf(b, injector, device)
    with injecting(injector, eps):
        logp, ent = scorer.full_forward(mb, leaves)
    mask = mb.response_mask.to(device, torch.float64)
    objectives = weights(ent.detach(), mask)
    inputs = [*leaves.values(), *([eps] if eps is not None else [])]
    grads, rows = [], []
    for j, (alpha, w) in enumerate(objectives):
        objective = ((alpha * ent + logp * w) * mask).sum()
        g = torch.autograd.grad(objective, inputs, retain_graph=j + 1 < len(objectives),
                                allow_unused=True)
        total = _zeros(leaves)
        _add(total, leaves, g[: len(leaves)])
        grads.append(total)
        rows.append(torch.zeros(b, dtype=torch.float64, device=device)
                    if eps is None or g[-1] is None else per_row(g[-1]))
    mask_b = mb.response_mask.to(device)
    return Backward(logp.detach() * mask_b, ent.detach() * mask_b, grads,
                    rows if injector is not None else None)


def after_and_count(ent: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_{j>k} H_j and T - k (the tokens after k) per token, [b, L] float64, 0 past the stop."""
    Hm = ent * mask
    after = Hm.flip(-1).cumsum(-1).flip(-1) - Hm
    count = mask.flip(-1).cumsum(-1).flip(-1) - mask
    return after * mask, count * mask


def estimator_weights(normalize: str) -> Weights:
    """The objectives of the per-sequence terms: P (alpha 1, w = sum_{j>k} H_j) and, per token,
    C (alpha 0, w = T - k)."""

    def weights(ent: torch.Tensor, mask: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
        after, count = after_and_count(ent, mask)
        return [(1.0, after), (0.0, count)] if normalize == "per_token" else [(1.0, after)]

    return weights


@dataclass
class Check:
    """sum_i of the injected per-sequence values against <g_j, u> in float64, per objective."""

    rows: list[float]
    dots: list[float]
    scale: list[float]  # sum_i |per-sequence value|: the size the gap is measured against

    def add(self, backward: Backward, u: Mapping[str, torch.Tensor]) -> None:
        for j, (r, g) in enumerate(zip(backward.rows, backward.grads, strict=True)):
            self.rows[j] += float(r.sum())
            self.scale[j] += float(r.abs().sum())
            self.dots[j] += float(sum((g[n] * u[n].to(g[n].device, torch.float64)).sum()
                                      for n in g))

    def gap(self) -> float:
        """Largest relative gap |sum_i - dot| / max(|sum_i|, |dot|, sum_i |value_i|) over the
        objectives (the last term keeps a sum that cancels from magnifying rounding)."""
        gaps = [abs(r - d) / max(abs(r), abs(d), a)
                for r, d, a in zip(self.rows, self.dots, self.scale, strict=True) if r or d]
        return max(gaps, default=0.0)


def check_rtol(dtype: torch.dtype) -> float:
    return CHECK_RTOL.get(dtype, HALF_RTOL)


def reverse_terms(backward: Backward, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``scoring.sequence_terms`` from one reverse pass: T, S, h from l and H; A holds
    P_i = A_i + Bsum_i (Bsum 0), C the injected C_i (0 per sequence, where it is not used)."""
    from .scoring import sequence_terms

    terms = sequence_terms(backward.logp, backward.ent, mask)
    terms["A"] = backward.rows[0]
    terms["Bsum"] = torch.zeros_like(terms["A"])
    terms["C"] = backward.rows[1] if len(backward.rows) > 1 else torch.zeros_like(terms["A"])
    return terms


def _has_dora(model: nn.Module) -> bool:
    return any(type(m).__name__ == "DoraLinearLayer" for m in model.modules())


def choose_derivative(model: nn.Module, requested: str) -> tuple[str, str]:
    """("forward" | "reverse", why). ``auto`` takes the reverse pass where forward-mode AD cannot
    run or would cost too much: layers replaced by Hub kernels (``kernels``: no forward-mode
    rules), or fused SDPA/flash attention on an accelerator (the forward pass would fall back to
    the math kernel, O(L^2) memory per head); but forward with DoRA layers (their weight norm
    is a use shared by every sequence, which the reverse pass refuses). The same choice for
    sharded (FSDP2) models, whose passes are ``sharded.sharded_forward`` and
    ``sharded_reverse.sharded_reverse``."""
    if requested != "auto":
        return requested, "requested"
    if _has_dora(model):
        return "forward", ("auto: DoRA's weight norm is shared by every sequence (the reverse "
                           "pass cannot split it per sequence)")
    kernels = no_forward_rule_layers(model)
    if kernels:
        return "reverse", (f"auto: {len(kernels)} layers run {kernels[0][1]} kernels without a "
                           f"forward-mode rule (e.g. {kernels[0][0]})")
    device = next(model.parameters()).device
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if device.type != "cpu" and attention != "eager":
        return "reverse", f"auto: {attention} attention on {device.type}"
    return "forward", "auto: every op has a forward-mode rule"


def reverse_pass(scorer: Scorer, params: Mapping[str, torch.Tensor], microbatches, theta,
                 direction: Mapping[str, torch.Tensor], normalize: str, diagnostics: dict):
    """Per microbatch (l, H, terms) as ``scoring.sequence_terms`` gives them, from backward passes
    of the estimator's objectives with tangent injection, at a substituted copy of theta (never
    the live parameters, never ``.grad``). At the end, checks sum_i P_i (and C_i) against the
    float64 dot product of the gradient with ``direction`` (``reverse_check_gap`` in
    ``diagnostics``) and raises when they differ by more than rounding."""
    if _has_dora(scorer.model):  # refused up front: its identity-matrix call could pass for rows
        raise RuntimeError(
            "reverse derivative pass: DoRA's weight norm is one tensor shared by every sequence, "
            "whose per-sequence parts cannot be separated. Use derivative='forward' (or 'auto').")
    leaves = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
    weights = estimator_weights(normalize)
    check = Check([0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    with Injector(scorer.model, params, direction) as injector:
        for mb in microbatches:
            backward = surrogate_backward(scorer, mb, leaves, weights, injector)
            check.add(backward, direction)
            mask = mb.response_mask.to(backward.logp.device)
            yield backward.logp, backward.ent, reverse_terms(backward, mask)
    gap, rtol = check.gap(), check_rtol(next(iter(theta.values())).dtype)
    diagnostics["reverse_check_gap"] = gap
    if not gap <= rtol:
        raise RuntimeError(
            f"reverse derivative pass: the per-sequence derivatives sum to {check.rows} but the "
            f"gradient gives {check.dots} (relative gap {gap:.2g} > {rtol:g}): a probed "
            "parameter is used outside the module that owns it (e.g. DoRA's weight norm). Use "
            "derivative='forward' for this model.")
