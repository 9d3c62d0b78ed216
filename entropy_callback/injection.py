"""Tangent injection: per-sequence directional derivatives from one backward pass.

A backward pass of sum_i f_i gives the gradient of the sum; the reverse derivative pass
(``reverse.py``) needs D_u f_i for every sequence i. ``Injector`` puts forward hooks on every
module that owns a probed parameter (directly, or in a ``ParameterDict``/``ParameterList`` child
its forward reads: peft's LoRA on embeddings, trainable tokens). Each hook returns

    out + eps_i * (D_u out)_i

where D_u out is the module's own derivative along u with its input held fixed (``F.linear(x,
U)`` for a linear layer, ``U[ids]`` for an embedding, forward-mode AD of that one module
otherwise) and eps is a zero leaf with one entry per row of the pass (a sequence in the body, a
position in the head's chunks). The output is unchanged (eps = 0), and because the rows of a
causal LM do not interact, d(sum_i f_i)/d eps_i = D_u f_i by the chain rule: one backward per
objective gives every per-sequence value. A module called on a tensor shared by every row
(peft's DoRA builds its weight norm from ``lora_B(lora_A(I))``) is injected through one extra
entry of eps, the last: a non-zero gradient there means the parameters reach the outputs through
a tensor common to all rows, whose per-row parts cannot be separated (``per_row`` refuses).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from .forward_mode import jvp

__all__ = ["Injector", "injecting", "leaf", "per_row"]

_CONTAINERS = (nn.ParameterDict, nn.ParameterList)


def _attribute(module: nn.Module, dotted: str) -> torch.Tensor:
    """``module.a.b`` for "a.b": the tensor there now (substituted by ``functional_call`` or
    not, which ``get_parameter`` refuses)."""
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


class Injector:
    """Forward hooks adding eps_row * (D_u output) to the output of every module that owns a
    probed parameter (module docstring), directly or in a ``ParameterDict``/``ParameterList``
    child (peft's LoRA on embeddings, trainable tokens: the layer reads them in its forward).
    Inactive (the hooks return None) outside ``rows``.

    Args:
        model: the model whose modules are hooked.
        params: the probed parameters by name (``update.probed_parameters``).
        tangents: u by the same names (any float dtype; cast to each parameter's dtype).
    """

    def __init__(self, model: nn.Module, params: Mapping[str, torch.Tensor],
                 tangents: Mapping[str, torch.Tensor]):
        names = {id(p): n for n, p in params.items()}
        self.tangents = tangents
        self.eps: torch.Tensor | None = None
        self._busy = False
        self.owners: dict[nn.Module, list[tuple[str, str]]] = {}
        for module in model.modules():
            if isinstance(module, _CONTAINERS):  # never called: its parent reads it
                continue
            held = [(k, p) for k, p in module._parameters.items() if p is not None]
            held += [(f"{c}.{k}", p) for c, child in module._modules.items()
                     if isinstance(child, _CONTAINERS)
                     for k, p in child._parameters.items() if p is not None]
            own = [(local, names[id(p)]) for local, p in held if id(p) in names]
            if own:
                self.owners[module] = own
        self._handles = []

    def __enter__(self) -> Injector:
        for module in self.owners:
            self._handles.append(module.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def rows(self, eps: torch.Tensor | None) -> Iterator[None]:
        """Inject along the leading dimension with ``eps`` [n + 1] (None: no injection); entry n
        for the calls on a tensor shared by all rows (module docstring). The rows injected
        before come back on exit."""
        before, self.eps = self.eps, eps
        try:
            yield
        finally:
            self.eps = before

    def replay(self):
        """A factory of ``rows`` with the eps injected now: a checkpointed layer recomputed in
        the backward pass (``checkpointing.py``) injects as its forward did."""
        return partial(self.rows, self.eps)

    def _hook(self, module, args, kwargs, output):
        if self.eps is None or self._busy:
            return None
        if not torch.is_tensor(output):
            raise RuntimeError(
                f"the reverse derivative pass needs the output of {type(module).__name__} (it "
                f"owns probed parameters) as a tensor, got {type(output).__name__}. Use "
                "derivative='forward' for this model.")
        own = self.owners[module]
        u = {local: self.tangents[full].to(_attribute(module, local).dtype)
             for local, full in own}
        n = self.eps.shape[0] - 1
        # at least float32: the eps gradients are sums over a row, kept out of bf16 rounding
        wide = torch.promote_types(output.dtype, torch.float32)
        d = self._local_tangent(module, u, args, kwargs).to(wide)
        if output.shape[:1] != (n,):  # called on a tensor shared by every row
            return output + (self.eps[n].to(wide) * d).to(output.dtype)
        eps = self.eps[:n].to(wide).reshape(n, *([1] * (output.dim() - 1)))
        return output + (eps * d).to(output.dtype)

    def _local_tangent(self, module, u, args, kwargs) -> torch.Tensor:
        """D_u of the module's output along its own probed parameters ``u`` (by local name),
        its input held fixed."""
        x = args[0].detach() if args and torch.is_tensor(args[0]) else None
        if type(module) is nn.Linear and x is not None:
            if "weight" in u:
                return F.linear(x, u["weight"], u.get("bias"))
            return u["bias"].expand(*x.shape[:-1], module.out_features)
        if type(module) is nn.Embedding and set(u) == {"weight"} and module.max_norm is None:
            return F.embedding(args[0], u["weight"])
        primals = {local: _attribute(module, local).detach() for local in u}
        args_, kwargs_ = tree_map(lambda t: t.detach() if torch.is_tensor(t) else t,
                                  (args, kwargs))
        self._busy = True
        try:
            with torch.no_grad():
                _, d = jvp(lambda p: functional_call(module, p, args_, kwargs_, strict=False),
                           (primals,), (u,))
        finally:
            self._busy = False
        return d


def leaf(n: int, injector: Injector | None, device) -> torch.Tensor | None:
    """The injection leaf [n + 1] (``Injector.rows``), or None without an injector."""
    if injector is None:
        return None
    return torch.zeros(n + 1, dtype=torch.float64, device=device, requires_grad=True)


def per_row(grad: torch.Tensor) -> torch.Tensor:
    """The eps gradient [n + 1] -> the per-row part [n]; refuses a shared use that reaches the
    objective (module docstring)."""
    shared = float(grad[-1])
    if shared != 0.0:
        raise RuntimeError(
            "reverse derivative pass: probed parameters reach the outputs through a tensor "
            f"shared by every sequence (its derivative {shared:.3g}; e.g. DoRA's weight norm "
            "without its detach), whose per-sequence parts cannot be separated. Use "
            "derivative='forward' for this model.")
    return grad[:-1].to(torch.float64)


@contextmanager
def injecting(injector: Injector | None, eps: torch.Tensor | None) -> Iterator[None]:
    if injector is None:
        yield
        return
    with injector.rows(eps):
        yield
