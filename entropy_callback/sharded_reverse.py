"""The reverse derivative pass on a model sharded with FSDP2 (``fully_shard``).

The unsharded reverse pass (``reverse.py``) differentiates with respect to substituted copies of
theta, which DTensor parameters do not allow. Here theta is written into the live local shards
(``sharded.at_shards``), the microbatch runs through the sharded model's body with its graph
(FSDP all-gathers each block as usual, the model's own attention kernel runs; the root's
parameters, embedding, final norm and LM head, are unsharded around it by
``sharded.unshard_outer``), the LM head runs per chunk of positions with its own backward, as in
``reverse._split_backward`` (no [microbatch, L, V] logits; the model's full forward where the
split cannot reproduce its logits), and one ``torch.autograd.grad`` per objective through the
body differentiates with respect to

- the injection leaf eps (``injection.Injector``): its gradient is the per-sequence terms, and
- the tensors the probed parameters *are* during that forward (FSDP's unsharded parameters, full
  size, recorded by the hooks): their gradient g gives the check sum_i P_i = <g, Delta theta>
  exactly as the unsharded pass makes it, summed over the ranks.

What FSDP2's backward machinery does in such a backward (torch 2.13, ``_fsdp_state.py`` and
``_fsdp_param_group.py``): the pre-backward hooks on each block's outputs all-gather the block
again (every rank runs the same backwards, so they meet); ``torch.autograd.grad`` with
``inputs`` given runs no ``AccumulateGrad`` node, so no unsharded parameter gets a ``.grad``;
each block's post-backward then finds no unsharded gradient, reshards and reduce-scatters
nothing (``post_backward``: ``if len(fsdp_params_with_grad) == 0: return``); the final callback
queued on the engine resets the training states and, as the last backward, clears the
post-forward order and the (empty) reduce-scatter states. That is only harmless when FSDP holds
nothing of the training step's: ``fsdp_pending`` lists what would be swept up (an accumulated
unsharded gradient that post-backward would reduce-scatter into ``.grad``, a reduce-scatter
still in flight that it would wait on and drop, ``set_reduce_scatter_unused_params`` that would
reduce-scatter zeros, ``set_is_last_backward(False)`` that would leave the probe's post-forward
order behind); the pass refuses to start unless it is empty, and checks it is empty again after
each microbatch. Each backward through the body ends in that final callback, which also
reshards the root (whose forward did not run: its parameter group is post-backwarded there): the
root is unsharded again before the next backward, whose graph holds its parameters' storage.
A failure between a forward and its backwards, or inside a backward (whose
final callback then never runs), resets FSDP's per-iteration state
(``FSDPModule.reset_iter_state``: nothing of the step's is pending, so nothing is lost). The
post-forward records of the probe's forwards are put back by ``sharded.sharded_phase``.

Lockstep: the microbatch loop checks before each forward (``probe._microbatches``); one more
check between the forward and the backwards keeps a rank whose objective failed from leaving the
others in a backward's all-gather. A failure on one rank inside a forward or a backward, between
two of FSDP's own collectives, is not covered (as in the forward-mode pass).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .checkpointing import checkpointing
from .injection import Injector, _attribute, injecting, leaf, per_row
from .reverse import (
    Backward,
    Check,
    _plain_head,
    check_rtol,
    estimator_weights,
    head_then_body,
    reverse_terms,
)
from .sharded import Lockstep, at_shards, reshard_all
from .variants import exact_variant_derivatives


def _fsdp_states(model: nn.Module) -> list[tuple[str, object]]:
    from torch.distributed.fsdp import FSDPModule

    return [(name or "<root>", module._get_fsdp_state()) for name, module
            in model.named_modules() if isinstance(module, FSDPModule)]


def fsdp_pending(model: nn.Module) -> list[str]:
    """What FSDP2 holds of an iteration (module docstring): empty when every state and
    parameter group is idle and resharded, no all-gather, reduce-scatter or (HSDP) partial
    reduction is pending, no unsharded gradient exists, and a backward would be the last one
    (``reset_iter_state`` would discard any of them). Reads FSDP's private per-iteration fields
    (torch 2.13); the post-forward records are not among them (``sharded.sharded_phase`` puts
    them back). On a torch whose FSDP lacks one of those fields, one entry saying so: the pass
    then refuses to run (``fsdp_internals_known``)."""
    try:
        return _pending(model)
    except AttributeError as exc:
        return [f"FSDP2 internals this probe does not know (torch {torch.__version__}: {exc}); "
                "the reverse pass on sharded models was checked on torch 2.13"]


def fsdp_internals_known(model: nn.Module) -> bool:
    """Whether ``fsdp_pending`` can read this torch's FSDP2 state (else the reverse pass on a
    sharded model refuses to run, an error record; ``derivative="auto"`` takes the forward
    pass). Asked once FSDP has run a forward (its communication state is made lazily)."""
    return not any(entry.startswith("FSDP2 internals") for entry in fsdp_pending(model))


def _pending(model: nn.Module) -> list[str]:
    out = []
    for name, state in _fsdp_states(model):
        if state._training_state.name != "IDLE":
            out.append(f"{name}: training state {state._training_state.name}")
        for group in state._fsdp_param_groups:
            if group._training_state.name != "IDLE" or not group.is_sharded:
                out.append(f"{name}: parameter group {group._training_state.name}, "
                           f"{group._sharded_state.name}")
            if group._all_gather_result is not None:
                out.append(f"{name}: a pending all-gather")
            if (group._post_reduce_event is not None or group._all_reduce_state is not None
                    or group._partial_reduce_output is not None):
                out.append(f"{name}: a gradient reduction in flight")
            if group.reduce_scatter_unused_params:
                out.append(f"{name}: set_reduce_scatter_unused_params(True)")
            for param in group.fsdp_params:
                unsharded = getattr(param, "_unsharded_param", None)
                if param.unsharded_accumulated_grad is not None or (
                        unsharded is not None and unsharded.grad is not None):
                    out.append(f"{name}: an unsharded gradient not yet reduce-scattered")
        ctx, comm = state._state_ctx, state._comm_ctx
        if ctx.iter_forward_root is not None or ctx.post_backward_final_callback_queued:
            out.append(f"{name}: a forward or backward in progress")
        if not ctx.is_last_backward:
            out.append(f"{name}: set_is_last_backward(False)")
        if comm.reduce_scatter_states or comm._last_post_reduce_events:
            out.append(f"{name}: reduce-scatter states")
    return sorted(set(out))


def _reset(model: nn.Module) -> None:
    """``reset_iter_state`` on every FSDP root under ``model``."""
    for _, state in _fsdp_states(model):
        if state._is_root:
            state._reset_iter_state()


@contextmanager
def idle_fsdp(model: nn.Module) -> Iterator[None]:
    """Runs the block only when FSDP holds nothing of the training step (``fsdp_pending``
    empty); an exception leaving it resets FSDP's per-iteration state."""
    pending = fsdp_pending(model)
    if pending:
        raise RuntimeError(
            "the reverse derivative pass on an FSDP2 model runs a backward, which would sweep up "
            f"what FSDP holds of the training step ({'; '.join(pending)}). Call after_step "
            "after the step's last backward, or use derivative='forward'.")
    try:
        yield
    except BaseException:
        try:
            _reset(model)
        except AttributeError:  # a torch whose FSDP has no _reset_iter_state: nothing to reset
            pass
        raise


def _still_idle(model: nn.Module) -> None:
    """Raises (inside ``idle_fsdp``: FSDP is then reset) when a microbatch's backwards left
    anything of FSDP's pending."""
    left = fsdp_pending(model)
    if left:
        raise RuntimeError(f"the probe's backward left FSDP state behind: {'; '.join(left)}")


class _Recording(Injector):
    """``Injector`` that also records, per probed parameter name, the tensor the parameter is
    in the forward (FSDP's unsharded parameter, or the parameter itself where not sharded)."""

    def __init__(self, model, params, tangents):
        super().__init__(model, params, tangents)
        self.live: dict[str, torch.Tensor] = {}

    def _hook(self, module, args, kwargs, output):
        if self.eps is not None and not self._busy:
            for local_name, full in self.owners[module]:
                self.live.setdefault(full, _attribute(module, local_name))
        return super()._hook(module, args, kwargs, output)


def _backward(scorer, mb, injector: _Recording, weights, lockstep: Lockstep) -> Backward:
    """One microbatch: the full forward with its graph at the live (theta) shards, a lockstep
    check, then one ``autograd.grad`` per objective with respect to eps and the recorded
    parameters (never ``.grad``). The decoder layers the user's training checkpoints are
    recomputed in each backward (``checkpointing.py``), as unsharded: FSDP's pre-backward hook
    on a layer's output has unsharded it again by then, and the recomputation calls the
    layer's own forward, not the module, so FSDP's forward hooks do not run twice."""
    device = scorer.device
    b = mb.response_mask.shape[0]
    eps = leaf(b, injector, device)
    injector.live = {}
    with injecting(injector, eps):
        logp, ent = scorer.full_forward(mb, None)
    mask = mb.response_mask.to(device, torch.float64)
    objectives = weights(ent.detach(), mask)
    names = list(injector.live)
    inputs = [eps, *injector.live.values()]
    lockstep.check()  # every rank enters the backwards (FSDP all-gathers in them) or none
    raw = [torch.autograd.grad(((alpha * ent + logp * w) * mask).sum(), inputs,
                               retain_graph=j + 1 < len(objectives), allow_unused=True)
           for j, (alpha, w) in enumerate(objectives)]
    rows, grads = [], []
    for g in raw:
        rows.append(torch.zeros(b, dtype=torch.float64, device=device) if g[0] is None
                    else per_row(g[0]))
        grads.append({n: t.detach().to(torch.float64) for n, t in zip(names, g[1:], strict=True)
                      if t is not None})
    mask_b = mb.response_mask.to(device)
    return Backward(logp.detach() * mask_b, ent.detach() * mask_b, grads, rows)


def _split_backward(scorer, mb, injector: _Recording, weights, lockstep: Lockstep) -> Backward:
    """``reverse._split_backward`` on the sharded model, with respect to the recorded tensors:
    the body once with its graph (FSDP gathers each decoder layer; the root's parameters are
    unsharded around it, ``sharded.unshard_outer``), l and H per chunk without a graph, a
    lockstep check, the head per chunk with its own backwards (no collective: d/d hidden, the
    head's probed parameters and their injection leaf), then one backward through the body per
    objective. FSDP's final callback reshards the root after each backward, freeing the storage
    the body's graph holds of its parameters: they are unsharded again (into that storage)
    before each. No [microbatch, L, V] logits are built."""
    split, device = scorer.split, scorer.device
    mask = mb.response_mask.to(device)
    b = mask.shape[0]
    targets = mb.response_ids.to(device)[mask]
    sequence = torch.arange(b, device=device).unsqueeze(1).expand_as(mask)[mask]  # row -> i
    eps_body = leaf(b, injector, device)
    injector.live = {}
    with injecting(injector, eps_body):
        hidden, _ = scorer.hidden_states(mb, None)  # [N, d], with the body's graph
    body = dict(injector.live)
    head = [full for module in split.head.modules() for _, full in injector.owners.get(module, ())]
    closed_form = split.plain and not head
    with torch.no_grad():
        if closed_form:
            logp_rows, ent_rows, d_ent, d_logp = _plain_head(scorer, hidden.detach(), targets)
        else:
            logp_rows, ent_rows = scorer.head_rows(hidden.detach(), None, targets, None, None)
    logp = torch.zeros(mask.shape, dtype=torch.float64, device=device)
    ent = torch.zeros_like(logp)
    logp[mask], ent[mask] = logp_rows, ent_rows
    objectives = weights(ent, mask.to(torch.float64))
    w_rows = [w[mask] for _, w in objectives]
    lockstep.check()  # every rank enters the backwards (FSDP all-gathers in them) or none
    grads = [{n: torch.zeros_like(t, dtype=torch.float64) for n, t in body.items()}
             for _ in objectives]
    rows = [torch.zeros(b, dtype=torch.float64, device=device) for _ in objectives]

    def head_call(h: torch.Tensor):
        z = split.logits(h)
        return z, {n: injector.live[n] for n in head}

    head_then_body(scorer, hidden, targets, sequence, objectives, w_rows,
                   (d_ent, d_logp) if closed_form else None,
                   head_call, injector if head else None, body, eps_body, grads, rows, injector,
                   before_body=split.before_body)
    return Backward(logp, ent, grads, rows)


def sharded_reverse(scorer, params: Mapping[str, torch.Tensor], microbatches,
                    theta: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor],
                    normalize: str, diagnostics: dict, lockstep: Lockstep):
    """Per microbatch (l, H, terms) as ``scoring.sequence_terms`` gives them (``A`` holds
    P_i = A_i + Bsum_i, as in ``reverse.reverse_terms``), from backward passes at this rank's
    ``theta`` shards written into the live parameters, the tangent along the full
    ``direction``. At the end the check of ``reverse.reverse_pass`` over every rank's rows (one
    all-reduce after a lockstep check): ``reverse_check_gap`` in ``diagnostics``, raising when
    the gap exceeds rounding."""
    weights = estimator_weights(normalize)
    check = Check([0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    model = scorer.model
    dtypes = {t.dtype for t in theta.values()}  # and the unsharded parameters' (compute) dtype
    with at_shards(model, params, theta), idle_fsdp(model), _Recording(
            model, params, direction) as injector:
        for mb in microbatches:
            scorer.check_split(mb)  # once, no injection: the split or the full forward
            with torch.enable_grad(), checkpointing(model, injector.replay), \
                    exact_variant_derivatives(model):
                backward = (_backward if scorer.split is None else _split_backward)(
                    scorer, mb, injector, weights, lockstep)
            reshard_all(model)  # the root stays unsharded where no backward reached the body
            dtypes |= {t.dtype for t in injector.live.values()}
            _still_idle(model)
            check.add(backward, direction)
            mask = mb.response_mask.to(backward.logp.device)
            yield backward.logp, backward.ent, reverse_terms(backward, mask)
    sums = lockstep.sum([*check.rows, *check.dots, *check.scale])
    total = Check(sums[0:2], sums[2:4], sums[4:6])
    # FSDP's MixedPrecisionPolicy computes in its param_dtype (bf16) from float32 shards: the
    # check's rounding is the compute dtype's (the loosest), the same on every rank
    gap, rtol = total.gap(), max(check_rtol(dtype) for dtype in dtypes)
    diagnostics["reverse_check_gap"] = gap
    if not gap <= rtol:
        raise RuntimeError(
            f"reverse derivative pass: the per-sequence derivatives sum to {total.rows} but the "
            f"gradient gives {total.dots} (relative gap {gap:.2g} > {rtol:g}) over the ranks: a "
            "probed parameter is used outside the module that owns it. Use "
            "derivative='forward' for this model.")
