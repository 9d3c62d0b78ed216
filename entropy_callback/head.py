"""The model split into its body (hidden states) and its LM head, so logits are built per chunk.

A transformers causal LM computes ``logits = head(body(x))`` for every position at once:
[batch, length, vocab] floats, gigabytes at a real vocabulary. The probe instead takes the
body's last hidden states and applies the head (LoRA on it included, with the model's final
logit soft-capping or scaling) to a chunk of positions at a time. ``split_model`` finds the two
halves; ``SplitModel.verify`` checks once, numerically, that head(body(x)) reproduces the
model's own logits, so a model whose head does something else is caught (the caller falls back
to the model's full forward with one warning).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SplitModel", "split_model"]


class SplitModel(nn.Module):
    """Wraps a causal LM (parameters under ``model.``) to run its body and head separately.

    ``torch.func.functional_call(split, {"model." + name: t}, ...)`` substitutes parameters in
    both halves, so the probe can score at theta, theta' or theta + m Delta theta.
    """

    def __init__(self, model: nn.Module, body: nn.Module, head: nn.Module, config):
        super().__init__()
        self.model = model
        self._body = [body]  # not registered twice: both already live under ``model``
        self._head = [head]
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(config, "logit_scale", None)
        head_ids = {id(p) for p in head.parameters()}
        # names (as model.named_parameters() spells them) of the parameters the head uses; a
        # tied head's weight appears under the embedding's name
        self.head_names = {n for n, p in model.named_parameters() if id(p) in head_ids}
        self.vocab = 0  # set by verify
        # called before each body call (``sharded.unshard_outer`` on an FSDP2 model)
        self.before_body: Callable[[], None] | None = None

    @property
    def body(self) -> nn.Module:
        return self._body[0]

    @property
    def head(self) -> nn.Module:
        return self._head[0]

    def forward(self, *args, part: str = "body", **kwargs) -> torch.Tensor:
        """``part="body"``: kwargs of the body -> last hidden states [b, n, d].
        ``part="head"``: hidden states [r, d] -> logits [r, V] in the model's dtype."""
        if part == "head":
            return self.logits(*args)
        if self.before_body is not None:
            self.before_body()
        return self.body(*args, **kwargs).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head, then the model's final soft-capping or scaling, as its forward does."""
        z = self.head(hidden)
        if self.scale is not None:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    @property
    def plain(self) -> bool:
        """The head is a plain ``nn.Linear`` (its tangent has a closed form)."""
        return isinstance(self.head, nn.Linear)

    def logits_and_tangent(self, hidden: torch.Tensor, dhidden: torch.Tensor):
        """Logits and their tangent along the hidden-state tangent, for a plain linear head whose
        own parameters do not move: dz = W dh, then the scaling and soft-capping chain rule.
        (Two matmuls; forward-mode AD of the same linear layer cost about 2.5x as much.)"""
        z = F.linear(hidden, self.head.weight, self.head.bias)
        dz = F.linear(dhidden, self.head.weight)
        if self.scale is not None:
            z, dz = z * self.scale, dz * self.scale
        if self.softcap is not None:
            t = torch.tanh(z / self.softcap)
            z, dz = t * self.softcap, dz * (1 - t * t)
        return z, dz

    @torch.no_grad()
    def verify(self, **inputs) -> float:
        """Largest |head(body(x)) - model(x).logits| over the real (unpadded) positions of
        ``inputs``, relative to the largest |logit| there."""
        reference = self.model(**inputs, use_cache=False).logits
        self.vocab = int(reference.shape[-1])
        mine = self.logits(self.forward(**inputs, use_cache=False))
        real = inputs["attention_mask"].bool()
        reference, mine = reference[real].double(), mine[real].double()
        return float((mine - reference).abs().max() / reference.abs().max().clamp(min=1.0))


def split_model(model: nn.Module) -> SplitModel | None:
    """The model's body and head, or None when it does not expose them the transformers way
    (``get_decoder()`` returning a module with ``last_hidden_state`` output and
    ``get_output_embeddings()`` returning the head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_body = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if get_body is None or get_head is None:
        return None
    try:
        body, head = get_body(), get_head()
    except Exception:  # a model without a decoder/head accessor raises here
        return None
    if not isinstance(body, nn.Module) or not isinstance(head, nn.Module) or body is base:
        return None
    inside = {id(m) for m in model.modules()}
    if id(body) not in inside or id(head) not in inside:
        return None
    return SplitModel(model, body, head, getattr(base, "config", None))
