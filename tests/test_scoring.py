"""Scoring and sampling mechanics: float64 chunks, bounded memory, padding, exact sampling."""

from __future__ import annotations

import inspect

import torch
from probe_harness import LargestTensor

from entropy_callback.demos import build_policy
from entropy_callback.observer import preserved_state
from entropy_callback.sampling import draw_randomness, inverse_cdf, sample_batch
from entropy_callback.scoring import (
    Scorer,
    head_maths,
    logp_and_entropy_rows,
    sequence_terms,
    token_logp_and_entropy,
)
from entropy_callback.testing import randomize_lora_b

PROMPTS = ["1+2=", "33+44=", "5=", "7+8+9+0="]  # different lengths: left padding matters


def test_chunked_float64_scoring_equals_one_chunk():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen)
    targets = torch.randint(11, (3, 5), generator=gen)
    ref_l, ref_h = token_logp_and_entropy(logits, targets, 0.7, chunk_size=10_000)
    for chunk in (1, 4, 7):
        logp, ent = token_logp_and_entropy(logits, targets, 0.7, chunk_size=chunk)
        assert logp.dtype == ent.dtype == torch.float64
        torch.testing.assert_close(logp, ref_l, rtol=0, atol=0)
        torch.testing.assert_close(ent, ref_h, rtol=0, atol=0)
    p = torch.softmax(logits.double() / 0.7, -1)
    torch.testing.assert_close(ref_h, -(p * p.log()).sum(-1))
    torch.testing.assert_close(ref_l, p.log().gather(-1, targets.unsqueeze(-1)).squeeze(-1))


def test_head_maths_is_the_float64_log_softmax_in_fewer_passes():
    """The chunk loop's head_maths (one float64 copy, one exp, in-place products) gives what the
    float64 log-softmax reference gives, derivatives included, on float32 and float64 logits.
    Tolerance 1e-12: float64 rounding of the two formulas is ~1e-14 here (values up to ~15 nats);
    any float32 element, e.g. exp in float32, is off by ~1e-8 (measured), which moved Delta
    H_true at a tiny step by about 0.1 SE (docs/performance.md)."""
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float64):
        z = 3 * torch.randn(6, 5000, generator=gen).to(dtype)  # peaked and flat rows
        z[0] /= 30
        dz = torch.randn(6, 5000, generator=gen).to(dtype)
        targets = torch.randint(5000, (6,), generator=gen)
        for temperature in (1.0, 0.7):
            ref = logp_and_entropy_rows(z.double(), targets, temperature, dz.double().clone())
            got = head_maths(z.clone(), targets, temperature, dz.clone())
            primal = head_maths(z.clone(), targets, temperature)
            for a, b in zip((*got, *primal), (*ref, *ref[:2]), strict=True):
                assert a.dtype == torch.float64
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            # the primal is bitwise the same with or without the tangent: Delta H_true takes
            # theta's terms from the derivative pass and theta''s from rescoring
            assert all(torch.equal(a, b) for a, b in zip(got[:2], primal, strict=True))
            # the chunk loop's reused buffers (more rows than this chunk) change nothing
            scratch = torch.full((3, 8, 5000), float("nan"), dtype=torch.float64)
            reused = head_maths(z.clone(), targets, temperature, dz.clone(), scratch)
            assert all(torch.equal(a, b) for a, b in zip(reused, got, strict=True))


def test_float64_memory_is_bounded_by_the_chunk_not_the_batch():
    batch, length, vocab, chunk = 8, 16, 50, 4
    logits = torch.randn(batch, length, vocab)
    targets = torch.randint(vocab, (batch, length))
    with LargestTensor(lambda t: t.dtype == torch.float64) as sizes:
        token_logp_and_entropy(logits, targets, 1.0, chunk_size=chunk)
    # the largest float64 tensor is one chunk of rows x the vocabulary, never batch x length x V
    assert sizes.largest == chunk * vocab
    assert sizes.largest < batch * length * vocab / 10


def _tiny():
    model, tok = build_policy(seed=0, dtype=torch.float64, attn_implementation="sdpa")
    randomize_lora_b(model, std=0.05, seed=3)
    return model, tok


def test_left_padded_batch_scores_exactly_what_each_unpadded_sequence_scores():
    model, tok = _tiny()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    index, uniforms = draw_randomness(len(ids), 12, 5, torch.Generator().manual_seed(0))
    with preserved_state(model):
        batch = sample_batch(model, ids, index, uniforms, temperature=1.0,
                             eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id,
                             microbatch_size=5, device=torch.device("cpu"))
        logp, ent = Scorer(model, 1.0, 64).score(batch)
        for i in range(batch.size):
            prompt = ids[int(batch.prompt_index[i])]
            T = int(batch.lengths[i])
            full = torch.tensor([prompt + batch.response_ids[i, :T].tolist()])
            logits = model(input_ids=full).logits[0, len(prompt) - 1 : -1]
            l_ref, h_ref = token_logp_and_entropy(logits[None], full[:, len(prompt):], 1.0, 64)
            torch.testing.assert_close(logp[i, :T], l_ref[0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(ent[i, :T], h_ref[0], rtol=1e-10, atol=1e-12)


def test_the_batch_does_not_depend_on_the_microbatch_size():
    # one row per decode loop (no prompt shared) vs 3 and 10 rows (rows sharing a prompt share
    # its prefill, the KV cache rows repeated): the same tokens
    model, tok = _tiny()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    index, uniforms = draw_randomness(len(ids), 10, 5, torch.Generator().manual_seed(1))
    with preserved_state(model):
        batches = [sample_batch(model, ids, index, uniforms, temperature=1.0,
                                eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id,
                                microbatch_size=mbs, device=torch.device("cpu"))
                   for mbs in (1, 3, 10)]
    for other in batches[1:]:
        assert torch.equal(other.lengths, batches[0].lengths)
        for i in range(10):
            T = int(batches[0].lengths[i])
            assert torch.equal(other.response_ids[i, :T], batches[0].response_ids[i, :T])


def test_inverse_cdf_never_picks_a_zero_probability_token_and_matches_probabilities():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    u = torch.linspace(0, 1 - 1e-12, 100_001, dtype=torch.float64)
    for row in range(2):
        tokens = inverse_cdf(probs[row].expand(len(u), 4), u)
        freq = torch.bincount(tokens, minlength=4).double() / len(u)
        torch.testing.assert_close(freq, probs[row], atol=1e-4, rtol=0)  # a uniform grid
    assert int(inverse_cdf(probs[:1], torch.tensor([0.5], dtype=torch.float64))) == 3


def test_sequence_terms_match_their_definitions():
    gen = torch.Generator().manual_seed(2)
    logp, ent, dl, dh = (torch.randn(2, 4, generator=gen, dtype=torch.float64) for _ in range(4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    terms = sequence_terms(logp, ent, mask, dl, dh)
    for i in range(2):
        T = int(mask[i].sum())
        assert terms["T"][i] == T
        Bsum = sum(dl[i, k] * ent[i, k + 1:T].sum() for k in range(T))
        C = sum(dl[i, k] * (T - (k + 1)) for k in range(T))
        torch.testing.assert_close(terms["Bsum"][i], Bsum)
        torch.testing.assert_close(terms["C"][i], C)
        torch.testing.assert_close(terms["A"][i], dh[i, :T].sum())
        torch.testing.assert_close(terms["S"][i], logp[i, :T].sum())


def test_decode_steps_pass_the_cache_under_the_models_own_name():
    """transformers 5 renamed the forward's KV-cache argument to ``cache`` (``past_key_values``
    is deprecated, to be removed in 5.40): the probe's sampler and the demo's pass the name the
    model's forward declares, and the decode steps do receive the cache."""
    from entropy_callback.demos.grpo import sample_responses
    from entropy_callback.sampling import cache_keyword

    model, tok = _tiny()
    name = cache_keyword(model)
    base = model.get_base_model()
    declared = inspect.signature(base.forward).parameters
    assert name == ("cache" if "cache" in declared else "past_key_values")
    seen = []
    handle = base.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(
            {k for k in ("cache", "past_key_values") if kwargs.get(k) is not None}),
        with_kwargs=True)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    index, uniforms = draw_randomness(len(ids), 4, 4, torch.Generator().manual_seed(1))
    try:
        with preserved_state(model):
            sample_batch(model, ids, index, uniforms, temperature=1.0,
                         eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id,
                         device=torch.device("cpu"))
        probe_calls = len(seen)
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
        torch.manual_seed(0)
        sample_responses(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=4,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    finally:
        handle.remove()
    assert probe_calls >= 2 and len(seen) > probe_calls + 1
    assert seen[0] == set()  # the prefill starts a cache
    # every decode step of both samplers gets the cache, under the model's name only
    decode = seen[1:probe_calls] + seen[probe_calls + 1:]
    assert decode and all(s == {name} for s in decode)
