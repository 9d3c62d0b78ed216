"""The probe in peft's LoRA variants: theta is every trainable tensor, DoRA's norm is
differentiated, shared parameter containers are substituted once (docs/validation.md, "LoRA
variants").

The policies: the tiny float64 Llama of the oracle tests (vocabulary of 8 ids, L = 4, three
prompts) made float64-exact (``exact_float64``), rank-4 LoRA on q_proj and v_proj with random B,
plus what each variant trains besides the LoRA matrices:

- ``modules_to_save``: a trained copy of lm_head (``ModulesToSaveWrapper``);
- ``lora_only``: the biases of the adapted layers, on a model with attention biases (Qwen2-style);
- ``bias_all``: every bias of that model (``bias="all"``);
- ``tokens``: ``trainable_token_indices`` rows of the input embedding;
- ``tied_tokens``: the same on a tied embedding (one ``ParameterDict`` shared by the embedding
  and the head);
- ``dora``: ``use_dora=True`` (a magnitude vector per adapted layer, the weight norm detached in
  peft's forward).

The step is one real AdamW step (lr 1e-3) of every trainable tensor on a loss that rewards
stopping at the first response position; the probe sees it through before_step / after_step.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import peft
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import entropy_callback.scoring as scoring
import entropy_callback.testing as oracle
from entropy_callback import EntropyProbe
from entropy_callback.attribution import attribute_step, surrogate_gradient
from entropy_callback.demos.tiny import build_char_tokenizer, build_tiny_llama
from entropy_callback.estimators import delta_h1
from entropy_callback.observer import ProbeFailure
from entropy_callback.scoring import no_flash_attention, sequence_terms
from entropy_callback.testing import (
    exact_delta,
    exact_directional_derivative,
    exact_entropy,
    exact_float64,
    randomize_lora_b,
)
from entropy_callback.update import adam_replay, optimizer_state, probed_parameters
from entropy_callback.variants import call_substituted, exact_variant_derivatives

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ("a", "bca", "ddeab")  # 1, 3 and 5 tokens: the E batch is left-padded
MAX_NEW = 4  # L
B_E = 1024
LR = 1e-3
VARIANTS = ("modules_to_save", "lora_only", "bias_all", "tokens", "tied_tokens", "dora")


def _policy(variant: str):
    """(peft model in float64, made float64-exact, char tokenizer) for one variant."""
    tokenizer = build_char_tokenizer(alphabet="abcde")
    base = build_tiny_llama(
        tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
        dtype=torch.float64, attn_implementation="sdpa", seed=0,
        attention_bias=variant in ("lora_only", "bias_all"),
        tie_word_embeddings=variant == "tied_tokens")
    if base.config.attention_bias:  # non-zero biases, so that they matter from the start
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in base.named_parameters():
                if name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config.update({
        "modules_to_save": dict(modules_to_save=["lm_head"]),
        "lora_only": dict(bias="lora_only"),
        "bias_all": dict(bias="all"),
        "tokens": dict(trainable_token_indices=[1, 3, 4, 5]),
        "tied_tokens": dict(trainable_token_indices=[1, 3, 4, 5]),
        "dora": dict(use_dora=True),
        "dora_embedding": dict(use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        "plain": {},
    }[variant])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = peft.get_peft_model(base, peft.LoraConfig(**config))
    model = exact_float64(model)
    randomize_lora_b(model, std=0.05, seed=1234)
    gen = torch.Generator().manual_seed(4321)
    with torch.no_grad():  # peft starts an embedding's adapter at A = 0 (B is random)
        for name, p in model.named_parameters():
            if "lora_embedding_A" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.eval()
    return model, tokenizer


def _stop_loss(model, tokenizer) -> torch.Tensor:
    """Reward <eos> and penalise <pad> at the first response position, over the prompts."""
    total = torch.zeros((), dtype=torch.float64)
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -1], dim=-1)
        total = total - logp[tokenizer.eos_token_id] + logp[tokenizer.pad_token_id]
    return total / len(PROMPTS)


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _probe(model, tokenizer, **options) -> EntropyProbe:
    options = {"batch_size": B_E, "microbatch_size": B_E, "max_new_tokens": MAX_NEW, **options}
    return EntropyProbe(model, tokenizer, list(PROMPTS), **options)


def _probed_step(model, tokenizer, probe, tamper=None):
    """One AdamW step of every trainable tensor, probed; theta restored afterwards.
    Returns (result, the full observed step theta' - theta)."""
    params = _trainable(model)
    theta = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=0.01)
    _stop_loss(model, tokenizer).backward()
    probe.before_step(optimizer, step=0)
    optimizer.step()
    if tamper is not None:
        tamper(params)
    result = probe.after_step()
    step = {n: p.detach() - theta[n] for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(theta[n])
            p.grad = None
    return result, step


# ------------------------------------------------------------------------- against the oracle
@pytest.mark.parametrize("variant", VARIANTS)
def test_estimates_match_the_exact_oracle_along_the_full_step(variant, monkeypatch):
    """δH₁ within 3 SE of the exact D_Δθ H and ΔH_true within 3 SE of the exact
    H(θ + Δθ) − H(θ), Δθ the full observed step of every trainable tensor, B_E = 1024."""
    model, tokenizer = _policy(variant)
    params = _trainable(model)
    extra = [n for n in params if "lora_" not in n]
    assert extra or variant == "dora"  # the variant trains more than the LoRA matrices
    probe = _probe(model, tokenizer)
    assert set(probe.params) == set(params)
    result, step = _probed_step(model, tokenizer, probe)
    assert result.error is None, result.error
    assert result.update_rel_error < 1e-12  # the rebuild covers every tensor of the step
    assert result.num_params == sum(p.numel() for p in params.values())
    kw = {"max_new_tokens": MAX_NEW}
    D = exact_directional_derivative(model, tokenizer, PROMPTS, step, **kw)
    dH = exact_delta(model, tokenizer, PROMPTS, step, **kw)
    # One probe at B_E = 1024: both estimates are close to Gaussian (|z| <= 2.1 measured over
    # the six variants, bias_all's 2.1 being 0.2 to 0.9 at B_E = 4096 with other seeds; seeded,
    # so deterministic), and the O(1/B) ratio bias of ΔH_true is a small fraction of its SE
    # (tests/test_validation.py). A correct probe fails a 3 SE check with probability 0.3%; the
    # wrong ones were 12 to 115 SE off (the lora_ filter) and 4.5 SE (DoRA's norm detached).
    assert abs(result.deltaH1 - D) < 3 * result.deltaH1_se, (result.deltaH1, D)
    assert abs(result.deltaH_true - dH) < 3 * result.deltaH_true_se, (result.deltaH_true, dH)

    # the check has power: what a probe missing the variant's part would target is > 4 SE away
    if variant == "dora":  # the derivative with the norm detached, as peft's forward gives it
        monkeypatch.setattr(oracle, "exact_variant_derivatives", lambda m: nullcontext())
        partial = exact_directional_derivative(model, tokenizer, PROMPTS, step, **kw)
    else:  # the LoRA part of the step alone
        partial = exact_directional_derivative(
            model, tokenizer, PROMPTS, {n: d for n, d in step.items() if "lora_" in n}, **kw)
    assert abs(partial - D) > 4 * result.deltaH1_se, (partial, D, result.deltaH1_se)


def test_rebuild_check_covers_non_lora_tensors():
    """update_rel_error compares the rebuilt and the observed step over every probed tensor:
    a change made to the lm_head copy alone (after the optimizer, before the probe reads the
    step) shows in it; the untouched step rebuilds exactly."""
    model, tokenizer = _policy("modules_to_save")
    head = "base_model.model.lm_head.modules_to_save.default.weight"
    assert head in _trainable(model)
    probe = _probe(model, tokenizer, batch_size=16, microbatch_size=16)
    clean, _ = _probed_step(model, tokenizer, probe)
    assert clean.update_rel_error < 1e-12 and clean.update_cosine == pytest.approx(1.0)

    def tamper(params):
        with torch.no_grad():
            params[head].add_(1e-3)

    tampered, _ = _probed_step(model, tokenizer, probe, tamper)
    # the lm_head's own step is about lr = 1e-3 per entry, so adding 1e-3 to each entry is a
    # relative error of order 1 of the whole step
    assert tampered.update_rel_error > 0.1, tampered.update_rel_error
    assert tampered.update_cosine < 0.99


@pytest.mark.parametrize("strict", [True, False])
def test_a_tensor_the_optimizer_moves_but_the_probe_lacks_is_a_named_error(strict):
    """lm_head made trainable after the probe was built: the probe names it instead of
    measuring at a mixed point (strict: raised; else an error record and a warning)."""
    model, tokenizer = _policy("plain")
    probe = _probe(model, tokenizer, batch_size=16, microbatch_size=16, strict=strict)
    head = model.base_model.model.lm_head.weight
    head.requires_grad_(True)
    try:
        if strict:
            with pytest.raises(ProbeFailure, match=r"lm_head\.weight.*frozen when the probe"):
                _probed_step(model, tokenizer, probe)
        else:
            with pytest.warns(UserWarning, match="lm_head"):
                result, _ = _probed_step(model, tokenizer, probe)
            assert result.error["type"] == "ProbeConfigError"
            assert "base_model.model.lm_head.weight" in result.error["message"]
            assert result.deltaH1 is None and result.deltaH_true is None
    finally:
        head.requires_grad_(False)
        head.grad = None


def _direction(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}


# ------------------------------------------------------------------- derivatives, exactly
@pytest.mark.parametrize("variant", [*VARIANTS, "dora_embedding"])
def test_derivatives_match_finite_differences_of_the_exact_entropy(variant, monkeypatch):
    """The probe's per-token tangents (D l, D H; through the head's trained copy, the tied
    trainable rows, DoRA's norm) and the oracle's D_u H, along a random direction of every
    trainable tensor, against central differences of values, which depend on no detach and no
    backward: equal to ~1e-9. For DoRA (on linear layers, and on the embedding, whose norm peft
    takes of a fresh ``nn.Parameter``) 14% to 32% off with peft's forward as it is; the oracle's
    reverse mode on the embedding's padding row 15% off without ``exact_variant_derivatives``."""
    model, tokenizer = _policy(variant)
    params = probed_parameters(model)
    theta = {n: p.detach().clone() for n, p in params.items()}
    u = _direction(params, seed=3)
    eps = 1e-6  # float64: truncation ~eps^2, round-off ~1e-16 / eps (test_oracle.py)

    def shifted(s):
        return {n: theta[n] + s * u[n] for n in theta}

    kw = {"max_new_tokens": MAX_NEW}
    with torch.no_grad():
        h_plus = exact_entropy(model, tokenizer, PROMPTS, params=shifted(eps), **kw)
        h_minus = exact_entropy(model, tokenizer, PROMPTS, params=shifted(-eps), **kw)
    fd = float(h_plus - h_minus) / (2 * eps)
    D = exact_directional_derivative(model, tokenizer, PROMPTS, u, **kw)
    assert D == pytest.approx(fd, rel=1e-6)  # measured <= 4.8e-9

    probe = _probe(model, tokenizer, batch_size=64, microbatch_size=64)
    batch = probe._sample(0)
    scorer = probe.scorer
    (l_p, h_p), (l_m, h_m) = scorer.score(batch, shifted(eps)), scorer.score(batch, shifted(-eps))
    fd_l, fd_h = (l_p - l_m) / (2 * eps), (h_p - h_m) / (2 * eps)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    logp, ent, dl, dh = scorer.score_with_tangent(batch, theta, u)
    assert scorer.split is not None  # the chunked head path, not the full-forward fallback
    assert rel(dl, fd_l) < 1e-6 and rel(dh, fd_h) < 1e-6  # measured <= 3.8e-9
    if "dora" not in variant:
        return
    monkeypatch.setattr(scoring, "exact_variant_derivatives", lambda m: nullcontext())
    logp0, ent0, dl0, dh0 = scorer.score_with_tangent(batch, theta, u)
    assert rel(dl0, fd_l) > 0.05 and rel(dh0, fd_h) > 0.05  # peft's detach: 14% to 32%
    # the values of the pass are bitwise the same with and without the context
    assert torch.equal(logp, logp0) and torch.equal(ent, ent0)


def test_exact_variant_derivatives_changes_no_value_and_leaves_nothing_behind():
    """Inside the context the model's logits are bitwise those outside it; the mode is gone
    afterwards, an exception included; nothing of the DoRA layers is patched; another thread's
    derivative inside the block keeps peft's detach (the mode is per thread); nested use is
    fine."""
    model, tokenizer = _policy("dora")
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    dora = [m for m in model.modules() if type(m).__name__ == "DoraLinearLayer"]
    assert dora and not any("forward" in vars(m) for m in dora)
    with torch.no_grad():
        outside = model(input_ids=ids).logits
        with exact_variant_derivatives(model), exact_variant_derivatives(model):
            inside = model(input_ids=ids).logits
    assert torch.equal(outside, inside)
    depth = torch._C._len_torch_function_stack()
    with pytest.raises(RuntimeError, match="boom"), exact_variant_derivatives(model):
        raise RuntimeError("boom")
    assert torch._C._len_torch_function_stack() == depth
    assert not any("forward" in vars(m) for m in dora)

    params = probed_parameters(model)
    u = _direction(params, seed=4)

    def tangent() -> torch.Tensor:
        with fwAD.dual_level(), no_flash_attention():
            duals = {n: fwAD.make_dual(p.detach(), u[n]) for n, p in params.items()}
            out = call_substituted(model, duals, (), {"input_ids": ids}).logits
            return fwAD.unpack_dual(out).tangent.clone()

    detached = tangent()
    with exact_variant_derivatives(model):
        exact = tangent()
        other: list[torch.Tensor] = []
        worker = threading.Thread(target=lambda: other.append(tangent()))
        worker.start()
        worker.join(timeout=120)  # a hang guard only
    assert float((exact - detached).norm() / exact.norm()) > 0.05
    assert torch.equal(other[0], detached)
    assert torch.equal(tangent(), detached)


# ---------------------------------------------------------------------------------- attribution
@pytest.mark.parametrize("variant", ["modules_to_save", "dora", "dora_embedding"])
def test_attribution_gradient_covers_every_tensor_and_the_dora_norm(variant):
    """g_E (reverse mode, attribution) dotted with the step, and with a random direction,
    equals δH₁ along it (forward mode) on the same E: both see the lm_head copy, DoRA's norm
    and the embedding's padding row (``<pad>`` is sampled as an ordinary token)."""
    model, tokenizer = _policy(variant)
    probe = _probe(model, tokenizer, batch_size=64, microbatch_size=64)
    _, step = _probed_step(model, tokenizer, probe)
    batch = probe._sample(1)
    assert bool((batch.response_ids[batch.response_mask] == tokenizer.pad_token_id).any())
    theta = {n: p.detach().clone() for n, p in probe.params.items()}
    for direction in (step, _direction(probe.params, seed=5)):
        logp, ent, dl, dh = probe.scorer.score_with_tangent(batch, theta, direction)
        t = sequence_terms(logp, ent, batch.response_mask, dl, dh)
        reference = delta_h1(t["A"], t["Bsum"], t["C"], t["h"], t["T"]).deltaH1
        g_E = surrogate_gradient(probe.scorer, [batch], theta,
                                 float(t["h"].sum() / t["T"].sum()), float(t["T"].sum()))
        total = sum(float((g_E[n] * direction[n]).sum()) for n in direction)
        assert total == pytest.approx(reference, rel=1e-9)


# ------------------------------------------------------------------------- shared containers
def test_tied_trainable_tokens_leave_the_live_parameters_in_place():
    """trainable_token_indices on a tied embedding: the embedding and the head share one
    ParameterDict. After the probe's passes and the oracle the model still holds the very
    parameter the optimizer steps (torch.func.functional_call alone left a detached copy of
    the substituted tensor in it)."""
    model, tokenizer = _policy("tied_tokens")
    (name, param), = [(n, p) for n, p in _trainable(model).items() if "lora_" not in n]
    probe = _probe(model, tokenizer, batch_size=64, microbatch_size=64)
    _probed_step(model, tokenizer, probe)
    exact_delta(model, tokenizer, PROMPTS, {name: torch.ones_like(param)}, max_new_tokens=2)
    assert dict(model.named_parameters())[name] is param
    assert model.base_model.model.lm_head.token_adapter.trainable_tokens_delta["default"] is param


def test_rollout_split_is_exact_with_a_trained_padding_row():
    """LoRA on the embedding, whose padding row torch's backward leaves without gradient while
    the forward reads it: a response holding ``<pad>`` as a token. The attribution's parts still
    sum to g_E . Δθ and the rollouts' forward-mode derivatives reproduce the consumed gradient
    (protocol_error ~ 0): u is taken only where that gradient is non-zero."""
    model, tokenizer = _policy("dora_embedding")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = torch.tensor([[3, 4, pad, 5], [6, pad, 7, eos]])  # prompt token 3 / 6, 3 responses
    rollouts = {"input_ids": ids, "response_mask": torch.ones(2, 3, dtype=torch.bool),
                "advantages": torch.tensor([1.0, -0.5], dtype=torch.float64),
                "token_logp": torch.zeros(2, 3, dtype=torch.float64)}

    def per_token_loss(r):  # -A log pi(y_k) of the three response tokens of each row
        logp = torch.log_softmax(model(input_ids=r["input_ids"]).logits[:, :-1], dim=-1)
        token = logp.gather(-1, r["input_ids"][:, 1:, None]).squeeze(-1)
        return -r["advantages"][:, None] * token

    params = probed_parameters(model)
    theta = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=0.01)
    per_token_loss(rollouts).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    pad_rows = grads["base_model.model.model.embed_tokens.lora_embedding_A.default"][:, pad]
    assert bool((pad_rows == 0).all())  # torch's backward: no gradient for the padding row
    replay = adam_replay(optimizer, params, theta, optimizer_state(optimizer, params), grads,
                         split=True)
    probe = _probe(model, tokenizer, batch_size=64, microbatch_size=64)
    batch = probe._sample(0)
    t = sequence_terms(*probe.scorer.score(batch, theta), batch.response_mask)
    g_E = surrogate_gradient(probe.scorer, [batch], theta, float(t["h"].sum() / t["T"].sum()),
                             float(t["T"].sum()))
    att = attribute_step(model=model, per_token_loss=per_token_loss, rollouts=[rollouts],
                         theta=theta, replay=replay, raw_grads=grads, consumed_grads=grads,
                         g_E=g_E)
    for p in params.values():
        p.grad = None
    # float64 round-off only (measured 1.5e-14); with u left at the padding row (where Adam's
    # denominator is eps) the rollouts' derivatives counted a gradient the step never had
    # (protocol_error 2.6e9)
    assert att.protocol_error < 1e-9, att.protocol_error
    assert att.parts_sum == pytest.approx(att.total, rel=1e-9)
