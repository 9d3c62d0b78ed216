"""Teacher forcing on E: per-token log-prob l_k and Rao-Blackwellised entropy H_k in float64.

Log-softmax and entropies are computed in float64 over chunks of ``chunk_size`` positions, so the
float64 working set is about chunk_size x vocab, never batch x length x vocab. The same code runs
under ``torch.func.jvp``, which returns the directional derivatives D_u l_k and D_u H_k of every
token in the same pass.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch.func import functional_call, jvp

from .sampling import EBatch


def token_logp_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [b, L, V] (any dtype), targets [b, L] -> (l, H), each [b, L] float64 in nats."""
    b, L, V = logits.shape
    rows = logits.reshape(b * L, V)
    flat_targets = targets.reshape(b * L, 1)
    logps, entropies = [], []
    for start in range(0, b * L, chunk_size):
        x = rows[start : start + chunk_size].to(torch.float64) / temperature
        logp = torch.log_softmax(x, dim=-1)
        logps.append(logp.gather(-1, flat_targets[start : start + chunk_size]).squeeze(-1))
        entropies.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(logps).reshape(b, L), torch.cat(entropies).reshape(b, L)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


class Scorer:
    """Scores E microbatches with a fixed model, at the live or at substituted parameters."""

    def __init__(self, model: torch.nn.Module, temperature: float, chunk_size: int):
        self.model = model
        self.temperature = temperature
        self.chunk_size = chunk_size
        self._keep = _accepts_logits_to_keep(model)

    @property
    def device(self) -> torch.device:
        """Where the model lives now (a trainer may move it after the probe is built)."""
        return next(self.model.parameters()).device

    def _forward(self, mb: EBatch, params: dict[str, torch.Tensor] | None):
        L = mb.response_mask.shape[1]
        kwargs = dict(
            input_ids=mb.input_ids.to(self.device),
            attention_mask=mb.attention_mask.to(self.device),
            position_ids=mb.position_ids.to(self.device),
            use_cache=False,
        )
        if self._keep:
            kwargs["logits_to_keep"] = L + 1
        if params is None:
            out = self.model(**kwargs)
        else:
            out = functional_call(self.model, params, args=(), kwargs=kwargs, strict=False)
        logits = out.logits
        # logits at position p predict token p + 1: the L response tokens are predicted by
        # the last prompt position and the first L - 1 response positions.
        logits = logits[:, -(L + 1) : -1] if self._keep else logits[:, mb.prompt_width - 1 : -1]
        targets = mb.response_ids.to(self.device)
        return token_logp_and_entropy(logits, targets, self.temperature, self.chunk_size)

    @torch.no_grad()
    def score(self, mb: EBatch, params: dict[str, torch.Tensor] | None = None):
        """(l, H) [b, L] float64 at the live parameters, or at ``params`` substituted."""
        return self._forward(mb, params)

    def score_with_tangent(
        self, mb: EBatch, primals: dict[str, torch.Tensor], tangents: dict[str, torch.Tensor]
    ):
        """(l, H, D_u l, D_u H), each [b, L] float64, from one forward-mode pass along u."""
        with no_flash_attention():
            (logp, ent), (dlogp, dent) = jvp(
                lambda p: self._forward(mb, p), (primals,), (tangents,)
            )
        return logp, ent, dlogp, dent


@contextmanager
def no_flash_attention():
    """Forward-mode AD does not go through SDPA's fused kernels: use the math backend."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def sequence_terms(
    logp: torch.Tensor,
    ent: torch.Tensor,
    mask: torch.Tensor,
    dlogp: torch.Tensor | None = None,
    dent: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sequence sums from per-token terms, all [b] float64, vectorised over the batch.

    T = sum_k 1, S = sum_k l_k, h = sum_k H_k; with tangents also
    A = sum_k D H_k, Bsum = sum_k D l_k * sum_{j>k} H_j, C = sum_k D l_k * (T - k)
    (k 1-indexed, so T - k counts the tokens after k). These are the sufficient statistics of
    the causal centred estimator: n_i = A_i + Bsum_i - H_hat * C_i.
    """
    m = mask.to(torch.float64)
    out = {
        "T": m.sum(-1),
        "S": (logp * m).sum(-1),
        "h": (ent * m).sum(-1),
    }
    if dlogp is not None:
        Hm = ent * m
        after = Hm.flip(-1).cumsum(-1).flip(-1) - Hm  # sum_{j>k} H_j
        count_after = m.flip(-1).cumsum(-1).flip(-1) - m  # T - k on real tokens
        dl = dlogp * m
        out["A"] = (dent * m).sum(-1)
        out["Bsum"] = (dl * after).sum(-1)
        out["C"] = (dl * count_after).sum(-1)
    return out
