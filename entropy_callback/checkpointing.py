"""Activation checkpointing of the reverse derivative pass, where the user's training has it.

A transformers model with gradient checkpointing enabled (``gradient_checkpointing_enable()`` /
``activation_checkpointing_enable()``, ``TrainingArguments(gradient_checkpointing=True)``, TRL,
peft's wrapper forwarding to the base model) sets ``gradient_checkpointing = True`` on its
decoder layers (``transformers.modeling_layers.GradientCheckpointingLayer``; ``every_n_layers``
flags only some). Such a layer recomputes its forward in the backward pass, but only when
``self.training`` and grad mode are on: the probe runs the model in eval mode with the flags off
(``observer.preserved_state``), so without this module its reverse pass would keep every layer's
activations of a whole microbatch, at 4k-8k-token responses the memory of a whole training step.

``checkpointing(model, replay)`` checkpoints the same layers in the reverse pass, in eval mode:

- **What is switched.** Nothing of the model's flags or modes: while the block runs each flagged
  layer gets an instance ``forward`` that calls its own ``forward`` through
  ``torch.utils.checkpoint`` (non-reentrant: it supports ``torch.autograd.grad`` and needs no
  input that requires grad, so the input-require-grads hooks TRL and peft add, which the probe
  detaches, are not needed); on exit the instance attribute is removed (or an earlier one put
  back). LoRA dropout stays off: the recomputation runs in eval mode like the forward.
- **Randomness.** ``preserve_rng_state=False``: in eval mode the layers draw no random numbers,
  so no RNG state is read, forked or set (the observer restores every stream anyway).
- **Substituted parameters.** The probe's passes substitute theta with ``functional_call``; the
  recomputation runs in the backward pass, after that substitution has ended. Each checkpointed
  call records the tensors in the layer's parameter slots as its forward saw them (the
  substituted leaves) and puts them back in those slots while it is recomputed (the live
  parameters return afterwards), so the recomputed activations are the forward's, not the live
  theta' ones.
- **Injection.** The tangent-injection hooks (``injection.Injector``) live on modules inside the
  layers and fire again on recomputation; ``replay`` (``Injector.replay``) is called at forward
  time and its context manager entered around the recomputation, so the hooks inject with the
  same eps rows as in the forward. They record nothing: each call returns its output plus
  eps * (D_u output), and the recomputation only refills the tensors the original graph saved.

With checkpointing a layer runs once in the forward and once more in each backward through it:
the reverse pass takes one backward per objective (two per token, one per sequence), so
1 + 2 or 1 + 1 forwards of the body per microbatch; its memory per microbatch is the layers'
inputs plus one layer's activations, as in the user's training step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from contextvars import ContextVar
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed_layers", "checkpointing", "suspended"]

Replay = Callable[[], Callable[[], AbstractContextManager]]
"""Called when a checkpointed layer runs forward; returns a factory of the context each of its
recomputations runs in (one per backward through it)."""

_SUSPENDED: ContextVar[frozenset[int]] = ContextVar("entropy_probe_suspended_checkpointing",
                                                    default=frozenset())


@contextmanager
def suspended(modules: list[nn.Module]) -> Iterator[None]:
    """Marks ``modules`` as checkpointed by the user while ``observer.without_training_hooks``
    has switched their flags off (``checkpointed_layers`` still finds them)."""
    token = _SUSPENDED.set(_SUSPENDED.get() | {id(m) for m in modules})
    try:
        yield
    finally:
        _SUSPENDED.reset(token)


def _layer_class() -> type | None:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers: no layer checkpoints itself this way
        return None
    return GradientCheckpointingLayer


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers (``GradientCheckpointingLayer``) the user's training checkpoints: flag
    on now, or switched off by the observer for the probe; in eval mode (a layer in training mode
    with its flag on checkpoints itself)."""
    cls = _layer_class()
    if cls is None:
        return []
    off = _SUSPENDED.get()
    return [m for m in model.modules() if isinstance(m, cls)
            and (m.gradient_checkpointing is True or id(m) in off)
            and not (m.training and m.gradient_checkpointing)]


def _slots(layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every parameter slot in ``layer``, each once."""
    return [(sub, key) for sub in layer.modules() for key in sub._parameters]


@contextmanager
def _holding(held: list[tuple[nn.Module, str, torch.Tensor | None]]) -> Iterator[None]:
    """The slots hold the given tensors inside; what they held before comes back on exit."""
    before = [(sub, key, sub._parameters[key]) for sub, key, _ in held]
    try:
        for sub, key, tensor in held:
            sub._parameters[key] = tensor
        yield
    finally:
        for sub, key, tensor in before:
            sub._parameters[key] = tensor


class _Recomputation:
    """The context of one checkpointed call's recomputation, entered once per backward through
    it: the parameter slots as the forward saw them, and a fresh ``replay`` context."""

    def __init__(self, held: list[tuple[nn.Module, str, torch.Tensor | None]],
                 replayed: Callable[[], AbstractContextManager] | None):
        self.held = held
        self.replayed = replayed
        self._stack: ExitStack | None = None

    def __enter__(self) -> None:
        stack = ExitStack()
        stack.enter_context(_holding(self.held))
        if self.replayed is not None:
            stack.enter_context(self.replayed())
        self._stack = stack

    def __exit__(self, *exc) -> bool | None:
        stack, self._stack = self._stack, None
        return stack.__exit__(*exc)


def _checkpointed(layer: nn.Module, forward: Callable, replay: Replay | None) -> Callable:
    """``forward`` (the layer's own) run through a non-reentrant checkpoint whose recomputation
    sees the parameter slots and the ``replay`` context the forward saw."""
    slots = _slots(layer)

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # no backward to recompute for
            return forward(*args, **kwargs)
        held = [(sub, key, sub._parameters[key]) for sub, key in slots]
        recomputation = _Recomputation(held, None if replay is None else replay())
        return checkpoint(partial(forward, **kwargs), *args, use_reentrant=False,
                          preserve_rng_state=False,
                          context_fn=lambda: (nullcontext(), recomputation))

    return run


@contextmanager
def checkpointing(model: nn.Module, replay: Replay | None = None) -> Iterator[int]:
    """Inside, the layers ``checkpointed_layers`` finds recompute their forward in backward
    (module docstring); yields how many. Every layer's own attributes come back on exit."""
    layers = checkpointed_layers(model)
    saved = [(layer, layer.__dict__.get("forward")) for layer in layers]
    try:
        for layer in layers:
            layer.forward = _checkpointed(layer, layer.forward, replay)
        yield len(layers)
    finally:
        for layer, own in saved:
            if own is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = own
