"""What the probe's passes need to be exact in peft's LoRA variants.

**DoRA's weight norm.** peft's DoRA layer (``peft/tuners/lora/dora.py``) computes

    W' = m (W + s B A) / ||W + s B A||_c

and detaches the column norm in its forward (``lora_weight.detach()`` into the norm,
``weight_norm.detach()`` after it), as the DoRA paper suggests for training: the norm gets no
gradient. The policy's entropy still depends on the norm, so a derivative taken through that
forward (the probe's forward-mode pass, a reverse-mode g_E) misses the norm's dependence on A
and B (on the tiny test policy the per-token tangents of log-probs and entropies were 22% and
14% off central differences). ``exact_variant_derivatives`` undoes exactly those detaches while
its block runs:

    with exact_variant_derivatives(model):
        ...  # forward-mode or reverse-mode derivative passes through the model

Inside the block a ``TorchFunctionMode`` turns ``Tensor.detach`` into the identity when it is
called from the ``forward`` of one of the model's DoRA layers, and leaves every other call
alone. Values are untouched (a detach does not change them), so the forward is bitwise the same;
nothing of peft or of the model is patched (torch's mode stack is per thread, so another
thread's forward is unaffected), and leaving the block, by an exception too, restores it all.

**Embeddings' padding rows.** ``F.embedding(..., padding_idx=p)`` gives row p no gradient in
reverse mode, although the forward reads it when a token is p (a sampled ``<pad>`` is an
ordinary token) and the row may be trained: reverse-mode derivatives of the entropy missed it
(the oracle's D_u H was 15% off a finite difference with LoRA on the embedding). Inside the
same block embeddings run without ``padding_idx`` (the same values; forward mode is unchanged).

**Shared parameter containers.** ``torch.func.functional_call`` substitutes a tied parameter
under every name it has. peft's ``trainable_token_indices`` on a tied embedding shares one
``ParameterDict`` between the embedding and the LM head, so the same slot is reached by two
names: functional_call swaps it twice and, on the way out, puts the *substituted* tensor back
(the live model keeps a detached copy of theta; the optimizer's parameter is no longer in it).
``call_substituted`` substitutes each tensor once per place the module holds it.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Mapping
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["call_substituted", "exact_variant_derivatives"]

_DETACH = frozenset({torch.Tensor.detach, torch.detach})
_EMBEDDING = F.embedding
_EMBEDDING_SIGNATURE = inspect.signature(F.embedding)


def _dora_forward_codes(model: torch.nn.Module) -> frozenset:
    """The code objects of the ``forward`` methods of the model's DoRA layers (their classes
    and DoRA base classes); empty without DoRA layers."""
    try:
        from peft.tuners.lora.dora import DoraLinearLayer
    except ImportError:  # a peft without DoRA: nothing to undo
        return frozenset()
    codes = set()
    for module in model.modules():
        if isinstance(module, DoraLinearLayer):
            for cls in type(module).__mro__:
                forward = cls.__dict__.get("forward")
                if issubclass(cls, DoraLinearLayer) and forward is not None:
                    codes.add(forward.__code__)
    return frozenset(codes)


def _has_padded_embedding(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Embedding) and m.padding_idx is not None
               for m in model.modules())


class _TrueDerivatives(TorchFunctionMode):
    """``Tensor.detach`` called from one of ``codes`` returns its input (value and
    derivative); with ``embeddings``, ``F.embedding`` runs without ``padding_idx`` and
    ``scale_grad_by_freq`` (they change only its backward). Every other call goes to torch
    unchanged."""

    def __init__(self, codes: frozenset, embeddings: bool):
        super().__init__()
        self.codes = codes
        self.embeddings = embeddings

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DETACH and not kwargs and len(args) == 1 and self._called_from_variant():
            return args[0]
        if func is _EMBEDDING and self.embeddings:
            bound = _EMBEDDING_SIGNATURE.bind(*args, **kwargs)
            bound.arguments.update(padding_idx=None, scale_grad_by_freq=False)
            return func(*bound.args, **bound.kwargs)
        return func(*args, **kwargs)

    def _called_from_variant(self) -> bool:
        # skip this method's frame and every mode's __torch_function__ between the call and us
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_name == "__torch_function__":
            frame = frame.f_back
        return frame is not None and frame.f_code in self.codes


def exact_variant_derivatives(model: torch.nn.Module):
    """A context manager: inside it, derivatives through ``model`` are those of the values its
    forward computes, including what its layers hide from autograd:

    - peft's DoRA layers detach their weight norm (forward and reverse mode);
    - an embedding's ``padding_idx`` (and ``scale_grad_by_freq``) changes its backward only:
      reverse mode gives the padding row no gradient although a sampled token may be that id
      and the row may be trained (LoRA on the embedding, an unfrozen embedding); inside the
      block embeddings run without it (forward mode includes the row either way).

    Forward values are bitwise unchanged. Use it around derivative passes only; sampling and
    rescoring need nothing. Nothing is patched: a per-thread ``TorchFunctionMode``, gone when
    the block is left (by an exception too); re-entrant. A no-op when none of this applies.
    docs/usage.md, "LoRA variants", lists what was checked."""
    codes = _dora_forward_codes(model)
    embeddings = _has_padded_embedding(model)
    return _TrueDerivatives(codes, embeddings) if codes or embeddings else nullcontext()


# ---------------------------------------------------------------------- parameter substitution
_SLOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _slot_names(module: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Each parameter name (as ``named_parameters()`` gives it) -> one name per (module,
    attribute) slot that holds the same tensor. A ``ParameterDict`` shared by two modules is
    one slot; an embedding tied to the head (two modules' ``weight``) is two."""
    by_id: dict[int, list[str]] = {}
    seen: set[tuple[int, str]] = set()
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for key, p in sub._parameters.items():
            if p is None or (id(sub), key) in seen:
                continue
            seen.add((id(sub), key))
            by_id.setdefault(id(p), []).append(f"{prefix}.{key}" if prefix else key)
    return {n: tuple(by_id[id(p)]) for n, p in module.named_parameters()}


def _slots(module: torch.nn.Module, names) -> dict[str, tuple[str, ...]]:
    """``_slot_names`` of ``module``, cached per module (recomputed when a name is unknown)."""
    slots = _SLOTS.get(module)
    if slots is None or any(n not in slots for n in names):
        slots = _slot_names(module)
        _SLOTS[module] = slots
    return slots


def call_substituted(module: torch.nn.Module, params: Mapping[str, torch.Tensor],
                     args=(), kwargs=None):
    """``torch.func.functional_call(module, params, args, kwargs, strict=False)`` with every
    tensor of ``params`` (keyed by ``module.named_parameters()`` names) substituted in each
    place the module holds it, once per place, so the live module gets its own parameters back
    even when two names reach one container (see the module docstring)."""
    slots = _slots(module, params)
    expanded = {alias: t for n, t in params.items() for alias in slots.get(n, (n,))}
    return torch.func.functional_call(module, expanded, args, kwargs or {}, tie_weights=False,
                                      strict=False)
