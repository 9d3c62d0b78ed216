"""The evaluation batch E: prompts drawn uniformly, responses sampled exactly from pi_theta.

The probe samples with its own loop (KV cache, randomness from its own ``torch.Generator``)
rather than ``model.generate``: no logits processor from ``generation_config`` (top_k, top_p,
repetition penalty...) can touch the distribution, and the user's global RNG streams are never
consumed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class EBatch:
    """One evaluation batch, left-padded prompts followed by right-padded responses.

    Shapes: B sequences, P = widest prompt, L = longest response in this batch.
    ``input_ids`` [B, P+L]; ``attention_mask`` [B, P+L] (1 on real prompt tokens and on response
    tokens up to and including the stop); ``position_ids`` [B, P+L] (cumsum of the mask, so a
    left-padded prompt starts at 0); ``response_mask`` [B, L] bool (k < T_i); ``lengths`` [B]
    T_i; ``prompt_index`` [B] index into the prompt pool; ``stopped`` [B] True where the
    response ended with EOS (otherwise it hit max_new_tokens).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    lengths: torch.Tensor
    prompt_index: torch.Tensor
    prompt_lengths: torch.Tensor
    stopped: torch.Tensor
    prompt_width: int

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def response_ids(self) -> torch.Tensor:
        """[B, L] sampled tokens (entries past the stop are padding, masked out)."""
        return self.input_ids[:, self.prompt_width :]

    def slice(self, start: int, stop: int) -> EBatch:
        """Rows start:stop, trimmed to their own longest response."""
        L = int(self.lengths[start:stop].max().item()) if stop > start else 0
        width = self.prompt_width + L
        return EBatch(
            input_ids=self.input_ids[start:stop, :width],
            attention_mask=self.attention_mask[start:stop, :width],
            position_ids=self.position_ids[start:stop, :width],
            response_mask=self.response_mask[start:stop, :L],
            lengths=self.lengths[start:stop],
            prompt_index=self.prompt_index[start:stop],
            prompt_lengths=self.prompt_lengths[start:stop],
            stopped=self.stopped[start:stop],
            prompt_width=self.prompt_width,
        )


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device):
    """Token lists -> (ids [B, P], mask [B, P]) left-padded."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def draw_randomness(
    pool: int, batch_size: int, max_new_tokens: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """All the randomness of one E batch, drawn up front on the CPU.

    Returns prompt indices [B] (uniform over the pool, with replacement) and uniforms [B, L] in
    float64, one per response position. Row i's response depends only on row i's draws, so the
    batch is the same however it is split into microbatches or across DDP ranks.
    """
    prompt_index = torch.randint(pool, (batch_size,), generator=generator)
    uniforms = torch.rand((batch_size, max_new_tokens), generator=generator, dtype=torch.float64)
    return prompt_index, uniforms


@torch.no_grad()
def sample_batch(
    model: torch.nn.Module,
    prompt_token_ids: list[list[int]],
    prompt_index: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    temperature: float,
    eos_token_ids: tuple[int, ...],
    pad_token_id: int,
    device: torch.device,
    microbatch_size: int | None = None,
    chunk_bytes: int = 10_000_000,
    sync: Callable[[bool], bool] | None = None,
) -> EBatch:
    """Sample one response for each of the prompts ``prompt_index`` [B], using ``uniforms``.

    Each token is drawn from softmax(logits / temperature) over the full vocabulary, computed in
    float64, by inverting its CDF at the row's uniform for that position. A response stops right
    after its first EOS (kept and scored; any of ``eos_token_ids``) or after L =
    ``uniforms.shape[1]`` tokens. The model must be in eval mode (the caller arranges it).

    All rows run in one decode loop (``microbatch_size`` rows per loop if given: the rows do not
    depend on it); each distinct prompt is prefilled once, with logits at its last position only,
    and the float64 softmax runs over about ``chunk_bytes`` per chunk of rows.

    ``sync(running) -> any rank running`` (a sharded model: ``sharded.Lockstep.check``) is
    called before every forward; the decode loop then runs until no rank has a row running, and
    each distinct prompt is prefilled with its rows (one prefill forward on every rank).
    """
    rows = len(prompt_index) if microbatch_size is None else microbatch_size
    parts = []
    for start in range(0, len(prompt_index), rows):
        part = slice(start, start + rows)
        parts.append(
            _sample_rows(
                model,
                [prompt_token_ids[r] for r in prompt_index[part].tolist()],
                uniforms[part].to(device),
                temperature=temperature,
                eos_token_ids=eos_token_ids,
                pad_token_id=pad_token_id,
                device=device,
                chunk_bytes=chunk_bytes,
                sync=sync,
            )
        )
    return _concat(parts, prompt_index, pad_token_id)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [b, V] (float64, rows sum to ~1), u [b] in [0, 1) -> token ids [b].

    The first v with cdf(v) > u * cdf(V): exact sampling, and a zero-probability token is never
    chosen.
    """
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1).clamp(
        max=probs.shape[-1] - 1
    )


def _next_tokens(logits, uniforms, temperature, chunk_bytes):
    """logits [b, V] (any dtype), uniforms [b] -> tokens [b], exact float64 inverse-CDF draws over
    chunks of about ``chunk_bytes`` of float64 probabilities."""
    rows = max(1, chunk_bytes // (8 * logits.shape[-1]))
    out = []
    for start in range(0, logits.shape[0], rows):
        probs = torch.softmax(logits[start : start + rows].double() / temperature, dim=-1)
        if not bool(torch.isfinite(probs).all()):  # else the CDF inversion draws garbage
            raise FloatingPointError(
                "the policy's next-token logits are not finite (NaN/inf): no evaluation batch "
                "can be sampled at theta (the model's own forward pass overflowed or diverged)."
            )
        out.append(inverse_cdf(probs, uniforms[start : start + rows]))
    return torch.cat(out)


def forward_accepts(model, name: str) -> bool:
    """Whether the model's forward (the base model's, under peft) names the argument ``name``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: ``cache`` where the model has it (transformers 5
    deprecates ``past_key_values``, to be removed in 5.40), else ``past_key_values``."""
    return "cache" if forward_accepts(model, "cache") else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned, under either name."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _prefill(model, prompts, prompt_ids, prompt_mask, share=True):
    """KV cache and last-position logits [B, V] of the left-padded prompts. Rows sharing a
    prompt share its prefill: each distinct prompt runs once, and its cache rows are repeated
    (where the model's cache can select rows)."""
    last_only = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}
    first: dict[tuple[int, ...], int] = {}
    inverse = [first.setdefault(tuple(p), len(first)) for p in prompts]
    shared = share and len(first) < len(prompts)
    rows = torch.tensor([inverse.index(u) for u in range(len(first))], device=prompt_ids.device)
    ids, mask = (prompt_ids[rows], prompt_mask[rows]) if shared else (prompt_ids, prompt_mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=True, **last_only)
    past, logits = returned_cache(out), out.logits[:, -1, :]
    if shared:
        if not hasattr(past, "reorder_cache"):  # a cache that cannot select rows: no sharing
            return _prefill(model, prompts, prompt_ids, prompt_mask, share=False)
        index = torch.tensor(inverse, device=prompt_ids.device)
        past.reorder_cache(index)
        logits = logits[index]
    return past, logits


def _sample_rows(
    model, prompts, uniforms, *, temperature, eos_token_ids, pad_token_id, device, chunk_bytes,
    sync=None,
):
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, device)
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    max_new_tokens = uniforms.shape[1]
    B = prompt_ids.shape[0]
    prompt_lengths = prompt_mask.sum(-1)
    if sync is not None:
        sync(True)
    past, logits = _prefill(model, prompts, prompt_ids, prompt_mask, share=sync is None)
    cache_name = cache_keyword(model)
    mask = prompt_mask
    alive = torch.ones(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    tokens = []
    for k in range(max_new_tokens):
        tok = _next_tokens(logits, uniforms[:, k], temperature, chunk_bytes)
        tok = torch.where(alive, tok, torch.full_like(tok, pad_token_id))
        tokens.append(tok)
        lengths += alive.long()
        hit_eos = alive & torch.isin(tok, eos)
        stopped |= hit_eos
        mask = torch.cat([mask, alive.long().unsqueeze(-1)], dim=-1)
        alive = alive & ~hit_eos
        running = bool(alive.any())
        if k < max_new_tokens - 1 and sync is not None:
            running = sync(running)
        if k == max_new_tokens - 1 or not running:
            break
        out = model(
            input_ids=tok.unsqueeze(-1),
            attention_mask=mask,
            position_ids=(prompt_lengths + k).unsqueeze(-1),
            use_cache=True,
            **{cache_name: past},
        )
        past = returned_cache(out)
        logits = out.logits[:, -1, :]
        del out
    del past
    response = torch.stack(tokens, dim=-1)
    return prompt_ids.cpu(), prompt_mask.cpu(), response.cpu(), lengths.cpu(), stopped.cpu()


def _concat(parts, prompt_index: torch.Tensor, pad_token_id: int) -> EBatch:
    P = max(p[0].shape[1] for p in parts)
    L = max(int(p[3].max().item()) for p in parts)
    ids, masks, resp_masks, lengths, stopped, plens = [], [], [], [], [], []
    for prompt_ids, prompt_mask, response, length, stop in parts:
        b, p = prompt_ids.shape
        pad_left = P - p
        pid = torch.cat([torch.full((b, pad_left), pad_token_id, dtype=torch.long), prompt_ids], 1)
        pm = torch.cat([torch.zeros((b, pad_left), dtype=torch.long), prompt_mask], 1)
        resp = torch.full((b, L), pad_token_id, dtype=torch.long)
        resp[:, : min(L, response.shape[1])] = response[:, :L]
        rmask = torch.arange(L).unsqueeze(0) < length.unsqueeze(1)
        resp = torch.where(rmask, resp, torch.full_like(resp, pad_token_id))
        ids.append(torch.cat([pid, resp], 1))
        masks.append(torch.cat([pm, rmask.long()], 1))
        resp_masks.append(rmask)
        lengths.append(length)
        stopped.append(stop)
        plens.append(prompt_mask.sum(-1))
    attention_mask = torch.cat(masks)
    return EBatch(
        input_ids=torch.cat(ids),
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        response_mask=torch.cat(resp_masks),
        lengths=torch.cat(lengths),
        prompt_index=prompt_index,
        prompt_lengths=torch.cat(plens),
        stopped=torch.cat(stopped),
        prompt_width=P,
    )
