"""Teacher forcing on E: per-token log-prob l_k and Rao-Blackwellised entropy H_k in float64.

The model's body gives the hidden states; the LM head is applied to a chunk of response positions
at a time (``head.py``), its logits in the model's dtype, their log-softmax and entropy in float64.
Nothing of size batch x length x vocab is ever built: the working set is a few buffers of
chunk x vocab float64, about ``CHUNK_BYTES`` each when the chunk is sized automatically.

The forward-mode pass (``Scorer.score_with_tangent``) runs forward-mode AD
(``forward_mode.jvp``) through the body only, then pushes the hidden-state tangent dh through the
head per chunk (dz = W dh, plus the head's own parameter tangent when it is trained, e.g. LoRA on
lm_head), and takes the derivatives of log-softmax and entropy in closed form in the logit
tangent dx = dz / tau:

    d l_y = dx_y - sum_v p_v dx_v,        d H = -sum_v p_v (log p_v + H) dx_v.

A model whose head ``head.py`` does not understand is scored through its full forward (the
logits of a microbatch at once), with one warning. With ``compile_head`` the split path's head
maths run compiled, a head block per call (``compiled_head.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection
from contextlib import contextmanager
from functools import partial

import torch

from .compiled_head import CompiledHeadMaths
from .forward_mode import jvp, tangent_of
from .head import SplitModel, split_model
from .headmaths import (  # noqa: F401  (re-exported: scoring.CHUNK_BYTES, ...)
    CHUNK_BYTES,
    HEAD_BLOCK_BYTES,
    MATHS_CHUNK_BYTES,
    chunk_rows,
    head_block_rows,
    head_maths,
    logp_and_entropy_rows,
    token_logp_and_entropy,
)
from .sampling import EBatch, forward_accepts
from .variants import call_substituted, exact_variant_derivatives

_VERIFY_RTOL = 1e-3  # head(body(x)) vs the model's logits, relative to max |logit|


class Scorer:
    """Scores E microbatches with a fixed model, at the live or at substituted parameters.

    ``chunk_size``: positions per float64 chunk, or None to size chunks by ``CHUNK_BYTES``.
    ``before_body(model, body, head)``: called before each call of the body on the split path
    (``sharded.unshard_outer`` on an FSDP2 model: FSDP unshards the parameters of the modules
    around the body and head, the root's, only in their own forwards, which the split skips).
    ``compile_head``: the split path's head maths through ``compiled_head.CompiledHeadMaths``
    (a block per call).
    """

    def __init__(self, model: torch.nn.Module, temperature: float, chunk_size: int | None,
                 before_body: Callable[[torch.nn.Module, torch.nn.Module, torch.nn.Module],
                                       None] | None = None, compile_head: bool = False,
                 agree: Callable[[float], float] | None = None):
        self.model = model
        self.temperature = temperature
        self.chunk_size = chunk_size
        self._compiled = CompiledHeadMaths(temperature) if compile_head else None
        self._keep = forward_accepts(model, "logits_to_keep")
        self._split: SplitModel | None = split_model(model)
        if self._split is not None and before_body is not None:
            self._split.before_body = partial(before_body, model, self._split.body,
                                              self._split.head)
        self._verified = self._split is None
        self._agree = agree  # sharded: every rank takes the same path (the largest error)

    @property
    def device(self) -> torch.device:
        """Where the model lives now (a trainer may move it after the probe is built)."""
        return next(self.model.parameters()).device

    @property
    def split(self) -> SplitModel | None:
        """The body/head split, or None when scoring falls back to the full forward."""
        return self._split

    def _inputs(self, mb: EBatch) -> dict[str, torch.Tensor]:
        return dict(
            input_ids=mb.input_ids.to(self.device),
            attention_mask=mb.attention_mask.to(self.device),
            position_ids=mb.position_ids.to(self.device),
        )

    def check_split(self, mb: EBatch) -> None:
        """Once: head(body(x)) must reproduce the model's logits, else fall back with a warning.
        Call before ``hidden_states``/``head_rows``; then ``split`` is None on the fallback
        path (``full_forward``)."""
        if self._verified:
            return
        self._verified = True
        one = self._inputs(mb.slice(0, 1))
        try:
            error = self._split.verify(**one)
        except Exception as exc:  # the split does not even run: use the full forward
            error, why = float("inf"), f"{type(exc).__name__}: {exc}"
        else:
            why = f"relative logit error {error:.2g}"
        if self._agree is not None:
            error = self._agree(error)
        if not error <= _VERIFY_RTOL:
            self._split = None
            warnings.warn(
                f"the entropy probe could not reproduce {type(self.model).__name__}'s logits "
                f"from its body and output embeddings ({why}): it scores through the full "
                "forward, whose memory grows with microbatch x length x vocabulary. Lower "
                "microbatch_size if memory is short.",
                stacklevel=4,
            )

    # ------------------------------------------------------------------ the split path
    def hidden_states(self, mb: EBatch, params, tangents=None):
        """Last hidden states at the response-predicting positions [N, d] (N = real tokens in
        ``mb``), with their tangent along ``tangents`` when given."""
        L = mb.response_mask.shape[1]
        mask = mb.response_mask.to(self.device)
        inputs = dict(self._inputs(mb), use_cache=False)

        def body(p):
            h = call_substituted(self._split, _prefixed(p), args=(), kwargs=inputs)
            # position p predicts token p + 1: the last prompt position and the first L - 1
            # response positions predict the L response tokens
            return h[:, mb.prompt_width - 1 : mb.prompt_width - 1 + L][mask]

        if tangents is None:
            return body(params or {}), None
        with no_flash_attention():
            return jvp(body, (params,), (tangents,))

    def head_rows(self, hidden, dhidden, targets, params, tangents, head_tangent: bool = False):
        """(l, H[, D l, D H]) [N] float64 from hidden states [N, d] and their tangent ``dhidden``
        (or None), for ``targets`` [N], chunk by chunk; ``params``/``tangents`` may hold the
        head's own parameters (a trained head). ``head_tangent``: the head's own parameters'
        tangent enters through forward hooks instead (``sharded.TangentInjector``)."""
        split = self._split
        head_keys = [n for n in (params or {}) if n in split.head_names]
        hp = {k: params[k] for k in head_keys}

        def head(p, h):
            if not p:
                return split.logits(h)
            return call_substituted(split, _prefixed(p), args=(h,), kwargs={"part": "head"})

        rows = chunk_rows(split.vocab, self.chunk_size, self.device, MATHS_CHUNK_BYTES)
        block = head_block_rows(split.vocab, rows, self.chunk_size, self.device)
        closed_form = split.plain and not head_keys and not head_tangent
        n = hidden.shape[0]
        # results written in place: no small tensor outlives a chunk, so the allocator can
        # reuse (and give back) each chunk's buffers instead of piling them up
        out = torch.empty((2 if dhidden is None else 4, n), dtype=torch.float64,
                          device=hidden.device)
        scratch = torch.empty((3, min(rows, n), split.vocab), dtype=torch.float64,
                              device=hidden.device)  # one set of chunk buffers, reused
        for first in range(0, n, block):
            h = hidden[first : first + block]
            if dhidden is None:
                z, dz = head(hp, h), None
            elif closed_form:
                z, dz = split.logits_and_tangent(h, dhidden[first : first + block])
            else:
                ht = {k: tangents[k] for k in head_keys}
                z, dz = jvp(head, (hp, h), (ht, dhidden[first : first + block]))
            fused = None if self._compiled is None else self._compiled(
                z, targets[first : first + h.shape[0]], dz)  # the whole block in one pass
            for row, col in zip(out, () if fused is None else fused, strict=fused is not None):
                row[first : first + h.shape[0]] = col
            for start in range(0, 0 if fused else h.shape[0], rows):
                stop = min(start + rows, h.shape[0])
                t = targets[first + start : first + stop]
                cols = head_maths(z[start:stop], t, self.temperature,
                                  None if dz is None else dz[start:stop], scratch)
                for row, col in zip(out, cols, strict=True):
                    row[first + start : first + stop] = col
                del cols
            del z, dz
        return list(out)

    def _split_score(self, mb: EBatch, params, tangents=None,
                     injected: Collection[str] | None = None):
        """(l, H[, D l, D H]) [b, L] float64; ``injected``: the names of the parameters whose
        tangent enters through hooks (``score_with_injected_tangent``)."""
        mask = mb.response_mask.to(self.device)
        targets = mb.response_ids.to(self.device)[mask]
        if injected is None:
            hidden, dhidden = self.hidden_states(mb, params, tangents)
        else:
            with no_flash_attention():
                hidden, dhidden = tangent_of(lambda: self.hidden_states(mb, None)[0])
        rows = self.head_rows(hidden, dhidden, targets, params, tangents, head_tangent=bool(
            injected and set(injected) & self._split.head_names))
        out = []
        for r in rows:
            full = torch.zeros(mask.shape, dtype=torch.float64, device=self.device)
            full[mask] = r
            out.append(full)
        return tuple(out)

    # ------------------------------------------------------------------ the fallback path
    def full_forward(self, mb: EBatch, params: dict[str, torch.Tensor] | None):
        """(l, H) [b, L] float64 through the model's own forward (logits of the whole
        microbatch), at the live parameters or ``params`` substituted: the fallback path."""
        L = mb.response_mask.shape[1]
        kwargs = dict(self._inputs(mb), use_cache=False)
        if self._keep:
            kwargs["logits_to_keep"] = L + 1
        if params is None:
            out = self.model(**kwargs)
        else:
            out = call_substituted(self.model, params, args=(), kwargs=kwargs)
        logits = out.logits
        # logits at position p predict token p + 1: the L response tokens are predicted by
        # the last prompt position and the first L - 1 response positions.
        logits = logits[:, -(L + 1) : -1] if self._keep else logits[:, mb.prompt_width - 1 : -1]
        targets = mb.response_ids.to(self.device)
        rows = chunk_rows(logits.shape[-1], self.chunk_size, self.device)
        return token_logp_and_entropy(logits, targets, self.temperature, rows)

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def score(self, mb: EBatch, params: dict[str, torch.Tensor] | None = None):
        """(l, H) [b, L] float64 at the live parameters, or at ``params`` substituted.
        Entries past each response's stop are 0 (masked out downstream)."""
        self.check_split(mb)
        if self._split is None:
            return self.full_forward(mb, params)
        return self._split_score(mb, params)

    def score_with_tangent(
        self, mb: EBatch, primals: dict[str, torch.Tensor], tangents: dict[str, torch.Tensor]
    ):
        """(l, H, D_u l, D_u H), each [b, L] float64, from one forward-mode pass along u
        (through what peft's LoRA variants detach, e.g. DoRA's weight norm: ``variants.py``).
        No autograd graph: forward mode does not need one (and a variant's norm, undetached, may
        hang on a leaf peft creates, e.g. ``transpose`` of an embedding's weight)."""
        self.check_split(mb)
        with exact_variant_derivatives(self.model), torch.no_grad():
            if self._split is not None:
                return self._split_score(mb, primals, tangents)
            with no_flash_attention():
                (logp, ent), (dlogp, dent) = jvp(
                    lambda p: self.full_forward(mb, p), (primals,), (tangents,)
                )
        return logp, ent, dlogp, dent

    def score_with_injected_tangent(self, mb: EBatch, probed: Collection[str]):
        """(l, H, D_u l, D_u H) [b, L] float64 at the live parameters, the tangent of the
        parameters named in ``probed`` entering through hooks (``sharded.TangentInjector``,
        entered by the caller after ``check_split``, whose forwards must not carry a tangent):
        the body once and the head per chunk, or the full forward where the split failed."""
        with exact_variant_derivatives(self.model), torch.no_grad():
            if self._split is not None:
                return self._split_score(mb, None, injected=probed)
            with no_flash_attention():
                (logp, ent), (dlogp, dent) = tangent_of(lambda: self.full_forward(mb, None))
        return logp, ent, dlogp, dent


def _prefixed(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model parameter names as ``SplitModel`` spells them."""
    return {"model." + n: t for n, t in params.items()}


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
