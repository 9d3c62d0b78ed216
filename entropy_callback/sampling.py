"""The evaluation batch E: prompts drawn uniformly, responses sampled exactly from pi_theta.

The probe samples with its own loop (KV cache, its own ``torch.Generator``) rather than
``model.generate``: no logits processor from ``generation_config`` (top_k, top_p, repetition
penalty...) can touch the distribution, and the user's global RNG streams are never consumed.
"""

from __future__ import annotations

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


@torch.no_grad()
def sample_batch(
    model: torch.nn.Module,
    prompt_token_ids: list[list[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    eos_token_ids: tuple[int, ...],
    pad_token_id: int,
    generator: torch.Generator,
    microbatch_size: int,
    device: torch.device,
) -> EBatch:
    """Draw ``batch_size`` prompts uniformly with replacement and sample one response each.

    Each token is drawn from softmax(logits / temperature) over the full vocabulary, computed in
    float64. A response stops right after its first EOS (which is kept and scored) or after
    ``max_new_tokens`` tokens (any of ``eos_token_ids`` stops it). The model must be in eval
    mode (the caller arranges it).
    """
    pool = len(prompt_token_ids)
    prompt_index = torch.randint(pool, (batch_size,), generator=generator, device=device).cpu()
    parts = []
    for start in range(0, batch_size, microbatch_size):
        rows = prompt_index[start : start + microbatch_size].tolist()
        parts.append(
            _sample_rows(
                model,
                [prompt_token_ids[r] for r in rows],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                eos_token_ids=eos_token_ids,
                pad_token_id=pad_token_id,
                generator=generator,
                device=device,
            )
        )
    return _concat(parts, prompt_index, pad_token_id)


def _sample_rows(model, prompts, *, max_new_tokens, temperature, eos_token_ids, pad_token_id,
                 generator, device):
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, device)
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    B = prompt_ids.shape[0]
    prompt_lengths = prompt_mask.sum(-1)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        use_cache=True,
    )
    past = out.past_key_values
    logits = out.logits[:, -1, :]
    mask = prompt_mask
    alive = torch.ones(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    tokens = []
    for k in range(max_new_tokens):
        probs = torch.softmax(logits.double() / temperature, dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tok = torch.where(alive, tok, torch.full_like(tok, pad_token_id))
        tokens.append(tok)
        lengths += alive.long()
        hit_eos = alive & torch.isin(tok, eos)
        stopped |= hit_eos
        mask = torch.cat([mask, alive.long().unsqueeze(-1)], dim=-1)
        alive = alive & ~hit_eos
        if k == max_new_tokens - 1 or not bool(alive.any()):
            break
        out = model(
            input_ids=tok.unsqueeze(-1),
            attention_mask=mask,
            position_ids=(prompt_lengths + k).unsqueeze(-1),
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        logits = out.logits[:, -1, :]
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
