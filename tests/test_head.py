"""The LM head applied chunk by chunk: equal to the full forward, bounded by the chunk, precise.

The split path (body hidden states, then the head and the closed-form derivatives of log-softmax
and entropy per chunk of positions) must give what ``torch.func.jvp`` through the model's full
forward gives (the fallback path, the code before the split) for untied, tied, LoRA-on-the-head
and soft-capped heads, without ever building a microbatch x length x vocab tensor.
"""

from __future__ import annotations

import peft
import pytest
import torch
from probe_harness import LargestTensor
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from entropy_callback.demos.tiny import build_char_tokenizer
from entropy_callback.estimators import snis
from entropy_callback.observer import preserved_state
from entropy_callback.sampling import draw_randomness, sample_batch
from entropy_callback.scoring import Scorer, sequence_terms
from entropy_callback.testing import randomize_lora_b
from entropy_callback.update import probed_parameters, snapshot

PROMPTS = ["1+2=", "33+44=", "5=", "7+8+9+0="]
VOCAB = 300  # larger than the hidden size, so a [b, L, V] tensor stands out


def _policy(kind: str, dtype=torch.float64, vocab: int = VOCAB):
    """A tiny LoRA policy whose head is untied, tied, LoRA-adapted or soft-capped."""
    torch.manual_seed(0)
    sizes = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                 pad_token_id=0, eos_token_id=1, bos_token_id=None)
    if kind == "softcap":
        base = Gemma2ForCausalLM(Gemma2Config(**sizes, head_dim=8, final_logit_softcapping=2.0,
                                              attn_implementation="eager"))
    else:
        base = LlamaForCausalLM(LlamaConfig(**sizes, tie_word_embeddings=kind == "tied"))
    base.to(dtype)
    targets = ["q_proj", "v_proj"] + (["lm_head"] if kind == "lora_head" else [])
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_lora_b(model, std=0.05, seed=3)
    return model


def _batch(model, size=12, length=6, seed=0):
    tok = build_char_tokenizer()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    index, uniforms = draw_randomness(len(ids), size, length, torch.Generator().manual_seed(seed))
    return sample_batch(model, ids, index, uniforms, temperature=0.7, eos_token_ids=(1,),
                        pad_token_id=0, device=torch.device("cpu"))


def _fallback(model, temperature, chunk_size):
    scorer = Scorer(model, temperature, chunk_size)
    scorer._split, scorer._verified = None, True  # the full forward: the code before the split
    return scorer


@pytest.mark.parametrize("kind", ["untied", "tied", "lora_head", "softcap"])
def test_chunked_head_derivatives_equal_the_full_forward_jvp_in_float64(kind):
    model = _policy(kind)
    with preserved_state(model):
        batch = _batch(model)
        theta = snapshot(probed_parameters(model))
        gen = torch.Generator().manual_seed(1)
        tangents = {n: torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in theta.items()}
        split = Scorer(model, 0.7, 5)
        new = split.score_with_tangent(batch, theta, tangents)
        old = _fallback(model, 0.7, 5).score_with_tangent(batch, theta, tangents)
        moved = {n: t + 0.01 * tangents[n] for n, t in theta.items()}
        new_moved, old_moved = split.score(batch, moved), _fallback(model, 0.7, 5).score(batch,
                                                                                          moved)
    assert split.split is not None, "the split path must be taken for this head"
    if kind == "lora_head":
        assert split.split.head_names & set(theta), "LoRA on the head is probed"
    mask = batch.response_mask
    for a, b in zip((*new, *new_moved), (*old, *old_moved), strict=True):
        torch.testing.assert_close(a[mask], b[mask], rtol=1e-12, atol=1e-12)


def test_byte_sized_chunks_inside_larger_head_blocks_score_the_same(monkeypatch):
    """chunk_size=None: head matmuls over blocks of 7 positions, float64 work over chunks of 3
    (budgets shrunk to this tiny vocabulary), equal to one fixed chunk size."""
    import entropy_callback.scoring as scoring

    monkeypatch.setitem(scoring.MATHS_CHUNK_BYTES, "cpu", 3 * 8 * VOCAB)
    monkeypatch.setitem(scoring.HEAD_BLOCK_BYTES, "cpu", 7 * 4 * VOCAB)
    model = _policy("untied")
    with preserved_state(model):
        batch = _batch(model)
        theta = snapshot(probed_parameters(model))
        tangents = {n: torch.ones_like(t) for n, t in theta.items()}
        auto = Scorer(model, 0.7, None)
        got = (*auto.score(batch), *auto.score_with_tangent(batch, theta, tangents))
        fixed = Scorer(model, 0.7, 5)
        ref = (*fixed.score(batch), *fixed.score_with_tangent(batch, theta, tangents))
    assert scoring.head_block_rows(VOCAB, 3, None, torch.device("cpu")) == 7
    mask = batch.response_mask
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a[mask], b[mask], rtol=1e-12, atol=1e-12)


def test_no_pass_builds_logits_for_the_whole_microbatch():
    model = _policy("lora_head", dtype=torch.float32, vocab=2000)
    chunk = 4
    with preserved_state(model):
        batch = _batch(model, size=32, length=8)
        theta = snapshot(probed_parameters(model))
        tangents = {n: torch.ones_like(t) for n, t in theta.items()}
        scorer = Scorer(model, 1.0, chunk)
        scorer.score(batch.slice(0, 1))  # the one-row check against the full forward, done once
        with LargestTensor() as sizes:
            scorer.score(batch)
            scorer.score_with_tangent(batch, theta, tangents)
    b, L = batch.response_mask.shape
    # every tensor is at most one chunk of positions x the vocabulary or the head's weight
    # (vocab x hidden 16, its LoRA delta too); the full forward would build b x (P + L) x V
    assert sizes.largest <= max(chunk, 16) * 2000, sizes.largest
    assert sizes.largest * 4 < b * L * 2000


def test_a_head_the_probe_cannot_reproduce_falls_back_to_the_full_forward_with_a_warning():
    model = _policy("untied")
    model.get_base_model().config.logit_scale = 3.0  # the split would scale; Llama does not
    with preserved_state(model):
        batch = _batch(model)
        scorer = Scorer(model, 1.0, 7)
        with pytest.warns(UserWarning, match="full forward"):
            got = scorer.score(batch)
        ref = _fallback(model, 1.0, 7).score(batch)
    assert scorer.split is None
    mask = batch.response_mask
    torch.testing.assert_close(got[0][mask], ref[0][mask], rtol=0, atol=0)


def test_delta_h_true_at_a_tiny_step_agrees_with_the_float64_reference():
    """Float32 weights and head matmul, float64 log-softmax: at eta = 1e-5 (every probed weight
    moves by 1e-5, Adam's typical step) Delta H_true is within 0.1 SE of the same computation
    with the model in float64, on the same tokens (sampled once from the float64 model)."""
    ref_model = _policy("untied", dtype=torch.float64, vocab=2000)
    f32_model = _policy("untied", dtype=torch.float32, vocab=2000)
    f32_model.load_state_dict({k: v.float() for k, v in ref_model.state_dict().items()})
    gen = torch.Generator().manual_seed(5)
    estimates = {}
    with preserved_state(ref_model), preserved_state(f32_model):
        batch = _batch(ref_model, size=64, length=8, seed=2)
        signs = None
        for name, model in (("f64", ref_model), ("f32", f32_model)):
            theta = snapshot(probed_parameters(model))
            if signs is None:
                signs = {n: torch.randint(0, 2, t.shape, generator=gen) * 2 - 1
                         for n, t in theta.items()}
            moved = {n: t + 1e-5 * signs[n].to(t.dtype) for n, t in theta.items()}
            scorer = Scorer(model, 1.0, None)
            before = sequence_terms(*scorer.score(batch), batch.response_mask)
            after = sequence_terms(*scorer.score(batch, moved), batch.response_mask)
            estimates[name] = snis(before["S"], after["S"], before["h"], after["h"], before["T"])
    ref, got = estimates["f64"], estimates["f32"]
    assert ref.deltaH_true != 0 and ref.deltaH_true_se > 0
    assert abs(got.deltaH_true - ref.deltaH_true) <= 0.1 * ref.deltaH_true_se, (
        got.deltaH_true, ref.deltaH_true, ref.deltaH_true_se)


@pytest.mark.parametrize("kind", ["untied", "tied", "lora_head", "softcap"])
@pytest.mark.parametrize("normalize", ["per_token", "per_sequence"])
def test_attribution_gradient_through_the_chunked_head_equals_the_full_forward(kind, normalize):
    """Attribution's reverse pass over E (g_E of the surrogate) takes the head per chunk of
    5 positions, then one backward through the body; it must equal autograd through the model's
    full forward (the fallback) in float64, LoRA on the head and soft-capping included."""
    from entropy_callback.attribution import surrogate_gradient

    model = _policy(kind)
    tok = build_char_tokenizer()
    # prompts of one length: reverse mode through eager attention (Gemma2 here) gives NaN
    # gradients from fully masked left-padding rows, in either path (docs/attribution.md)
    ids = [tok(p)["input_ids"] for p in ("1+2=", "3+4=", "5+6=", "7+8=")]
    index, uniforms = draw_randomness(4, 12, 6, torch.Generator().manual_seed(0))
    with preserved_state(model):
        batch = sample_batch(model, ids, index, uniforms, temperature=0.7, eos_token_ids=(1,),
                             pad_token_id=0, device=torch.device("cpu"))
        theta = snapshot(probed_parameters(model))
        split = Scorer(model, 0.7, 5)
        args = ([batch], theta, 1.3, float(batch.lengths.sum()), normalize)
        new = surrogate_gradient(split, *args)
        old = surrogate_gradient(_fallback(model, 0.7, 5), *args)
    assert split.split is not None, "the split path must be taken for this head"
    assert any(float(g.abs().max()) > 0 for g in new.values())
    for name in theta:
        torch.testing.assert_close(new[name], old[name], rtol=1e-10, atol=1e-13)
