"""Forward-mode AD for the derivative pass, without torch's slow path for constant operands.

``torch.func.jvp`` and ``torch.autograd.forward_ad`` give a binary op whose other operand has
no tangent (``x + lora(x)`` where x is the frozen layer's output, ``h * weight`` in a norm, ``q
* cos`` in rotary embeddings, ``a * 2.0``) an *efficient zero tensor* as that operand's
tangent; adding or multiplying by it goes through torch's Python reference decompositions (the
zero tensor's kernel computes its output shape with the Python meta function), about 0.3 ms per
op whatever the tensor size, and then materialises the zeros. In a small model's forward that
is most of the pass: measured on the demo policy (2 layers, hidden 64, 32 sequences), the body's
forward-mode pass took 33 ms with ``torch.func.jvp`` and 16 ms with ``jvp`` below, against 5.8
ms for a plain forward, with bitwise the same primal and tangent.

``jvp`` runs ``fn`` on dual tensors (``torch.autograd.forward_ad``) inside ``_ConstantOperands``,
a ``TorchFunctionMode`` that handles add, sub, mul and div with exactly one dual operand itself:
the primal is the op on the primals, the tangent the closed form (d(a + c) = da, d(a * c) = da *
c, d(a / c) = da / c). Every other call, and these ops with any keyword argument, goes to torch
unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

__all__ = ["jvp"]

_T = torch.Tensor
_ADD = frozenset({torch.add, _T.add, _T.__add__, _T.__radd__})
_SUB = frozenset({torch.sub, _T.sub, _T.__sub__})
_RSUB = frozenset({torch.rsub, _T.__rsub__})
_MUL = frozenset({torch.mul, _T.mul, _T.__mul__, _T.__rmul__})
_DIV = frozenset({torch.div, _T.div, _T.__truediv__})
_HANDLED = _ADD | _SUB | _RSUB | _MUL | _DIV


def _unpack(x):
    if isinstance(x, torch.Tensor):
        return fwAD.unpack_dual(x)
    return x, None


class _ConstantOperands(TorchFunctionMode):
    """The tangent of add/sub/mul/div with one dual and one constant operand, in closed form."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs or len(args) != 2 or func not in _HANDLED:
            return func(*args, **(kwargs or {}))
        (pa, ta), (pb, tb) = _unpack(args[0]), _unpack(args[1])
        if (ta is None) == (tb is None):  # both dual (torch's own rule is fast) or neither
            return func(*args)
        if func in _ADD:
            primal, tangent = pa + pb, ta if ta is not None else tb
        elif func in _SUB:
            primal, tangent = pa - pb, ta if ta is not None else -tb
        elif func in _RSUB:  # rsub(a, b) = b - a
            primal, tangent = pb - pa, -ta if ta is not None else tb
        elif func in _MUL:
            primal, tangent = pa * pb, ta * pb if ta is not None else pa * tb
        elif ta is not None:  # a / c
            primal, tangent = pa / pb, ta / pb
        else:  # c / a: torch's rule
            return func(*args)
        # the output gets a tangent of its own, as torch's rule gives it: never an input's
        # tangent itself or a broadcast view of one (an in-place op on the output would write
        # through to the input)
        shared = tangent is ta or tangent is tb
        if tangent.shape != primal.shape:
            tangent, shared = tangent.expand(primal.shape), True
        if tangent.dtype != primal.dtype:
            tangent = tangent.to(primal.dtype, memory_format=torch.contiguous_format)
        elif shared:
            tangent = tangent.clone(memory_format=torch.contiguous_format)
        return fwAD.make_dual(primal, tangent)


def jvp(fn: Callable, primals: tuple, tangents: tuple):
    """``torch.func.jvp``'s contract for what the probe passes: ``fn(*primals)`` and its
    directional derivative along ``tangents``. Primals are tensors or dicts of tensors (the
    tangents mirror them); the output is a tensor or a tuple of tensors. An output that does not
    depend on the primals gets a zero tangent."""
    def call():
        duals = tree_map(lambda p, t: fwAD.make_dual(p, t.to(p.dtype, copy=True)), primals,
                         tangents)  # copies: nothing done inside reaches the caller's tangents
        return fn(*duals)

    return tangent_of(call)


def tangent_of(fn: Callable):
    """``fn()`` and its tangent, where the tangent enters inside ``fn`` (forward hooks making
    duals, ``sharded.TangentInjector``) instead of through primals: the output is a tensor or a
    tuple of tensors, as for ``jvp``."""
    with fwAD.dual_level():
        with _ConstantOperands():
            out = fn()
        flat = out if isinstance(out, tuple) else (out,)
        pairs = [fwAD.unpack_dual(o) for o in flat]
        primal_out = tuple(p for p, _ in pairs)
        tangent_out = tuple(torch.zeros_like(p) if t is None else t for p, t in pairs)
    if isinstance(out, tuple):
        return primal_out, tangent_out
    return primal_out[0], tangent_out[0]
