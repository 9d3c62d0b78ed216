"""The reverse-mode derivative pass (``derivative="reverse"``, entropy_callback/reverse.py).

It must give what the forward-mode pass gives, per sequence, in float64, on every head the
probe handles: Llama (untied, tied, LoRA on the head, ``modules_to_save`` on the head, LoRA on
the embedding and trainable tokens (parameters in a ``ParameterDict`` their layer reads), every
weight trained: embeddings, norms and linear layers), Qwen2, Gemma2 (soft-capped logits) and
GPT-2 (tied head, Conv1D layers, every weight trained). DoRA, whose weight norm is one tensor
shared by every sequence, is refused by the reverse pass and left to the forward one. And it
must pass the exact oracle: over R independent E batches its delta H_1 is unbiased for the exact
D_Delta theta H.

The models are float64 with SDPA attention and their RMSNorms computed in float64
(``exact_float64``): as shipped, Llama's RMSNorm rounds through float32, which would limit the
agreement of any two differentiation orders to ~1e-7 (reverse mode through float64 eager
attention also gives NaN from fully masked left-padding rows: docs/attribution.md).
"""

from __future__ import annotations

import math
import types

import peft
import pytest
import torch
from test_validation import (  # noqa: F401  (module fixtures: the oracle's policy and step)
    NORMALIZATIONS,
    B,
    R,
    chunk_estimates,
    exact,
    grads,
    mean_and_se,
    policy,
    score_pool,
    step,
    z_score,
)
from transformers import (
    AttentionInterface,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from entropy_callback import EntropyProbe, ProbeConfig
from entropy_callback.config import ProbeConfigError
from entropy_callback.demos.tiny import build_char_tokenizer
from entropy_callback.observer import preserved_state
from entropy_callback.reverse import choose_derivative
from entropy_callback.testing import exact_float64, randomize_lora_b
from entropy_callback.update import probed_parameters, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")

SDPA = "sdpa_for_gemma2"
AttentionInterface.register(SDPA, sdpa_attention_forward)

PROMPTS = ["1+2=", "33+44=", "5=", "7+8+9+0="]  # left-padded E batches
RTOL = 1e-10  # the acceptance bound: two differentiation orders of the same float64 numbers


def _gemma_norm_float64(self, x):
    """Gemma2's RMSNorm, (1 + w) x / rms(x), in the input's dtype (no float32 round trip)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def _model(kind: str, tokenizer, vocab: int | None = None) -> torch.nn.Module:
    """A tiny float64 policy of the given kind, LoRA B random (the adapter moves the policy);
    ``vocab`` ids (default: the tokenizer's)."""
    sizes = dict(vocab_size=vocab or len(tokenizer), hidden_size=16, intermediate_size=32,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                 eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                 attn_implementation="sdpa")
    torch.manual_seed(0)
    family = kind.split("_")[0]
    if family == "gemma2":  # transformers refuses SDPA for Gemma2 by name, not by function
        sizes["attn_implementation"] = "eager"
        base = Gemma2ForCausalLM(Gemma2Config(**sizes, head_dim=8, final_logit_softcapping=2.0,
                                              attn_logit_softcapping=None))
        base.config._attn_implementation = SDPA
    elif family == "qwen2":
        base = Qwen2ForCausalLM(Qwen2Config(**sizes, tie_word_embeddings=False))
    elif family == "gpt2":
        base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2,
                                          n_head=2, n_positions=64, attn_implementation="sdpa",
                                          eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id))
    else:
        base = LlamaForCausalLM(LlamaConfig(**sizes, tie_word_embeddings=kind == "llama_tied"))
    base.to(torch.float64)
    make_exact = exact_float64
    if family == "gemma2":  # exact_float64's norm is Llama's: Gemma2's own formula instead

        def make_exact(model):
            for module in model.modules():
                if type(module).__name__ == "Gemma2RMSNorm":
                    module.forward = types.MethodType(_gemma_norm_float64, module)
            return model

    if kind.endswith("full"):  # every weight trained and probed
        return make_exact(base)
    targets = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    options = {}
    if kind == "llama_lora_head":
        targets = [*targets, "lm_head"]
    if kind == "llama_modules_to_save":
        options["modules_to_save"] = ["lm_head"]
    if kind == "llama_lora_embedding":  # peft keeps these in ParameterDicts its layer reads
        targets = [*targets, "embed_tokens"]
    if kind == "llama_trainable_tokens":
        options["trainable_token_indices"] = [3, 5, 7]
    if kind == "llama_dora":  # its weight norm: lora_B(lora_A(I)), shared by every sequence
        options["use_dora"] = True
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      **options))
    randomize_lora_b(model, std=0.05, seed=3)
    with torch.no_grad():  # the embedding's LoRA B too (randomize_lora_b covers lora_B)
        for name, p in model.named_parameters():
            if "lora_embedding_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(4))
    return make_exact(model)


KINDS = ["llama_untied", "llama_tied", "llama_lora_head", "llama_modules_to_save",
         "llama_lora_embedding", "llama_trainable_tokens", "llama_full", "qwen2", "gemma2", "gpt2",
         "gpt2_full"]


def _one_step(model, tokenizer, normalize: str, **options):
    """One AdamW step of a loss on the probed parameters, probed forward and reverse at once
    (same seed: the same E batch). Returns {derivative: ProbeResult}."""
    params = probed_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    loss = sum((p * torch.randn(p.shape, generator=gen, dtype=p.dtype)).sum()
               for p in params.values())
    loss.backward()
    probes = {d: EntropyProbe(model, tokenizer, PROMPTS, batch_size=12, microbatch_size=5,
                              max_new_tokens=6, temperature=0.9, normalize=normalize, strict=True,
                              derivative=d, **options) for d in ("forward", "reverse")}
    for probe in probes.values():
        probe.before_step(optimizer)
    optimizer.step()
    return {d: probe.after_step() for d, probe in probes.items()}


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_reverse_equals_forward_in_float64(kind, normalize):
    tokenizer = build_char_tokenizer()
    model = _model(kind, tokenizer)
    results = _one_step(model, tokenizer, normalize, log_level="debug")
    fwd, rev = results["forward"], results["reverse"]
    assert (fwd.derivative, rev.derivative) == ("forward", "reverse")
    assert fwd.deltaH1 != 0 and fwd.deltaH1_se > 0
    assert rev.diagnostics["reverse_check_gap"] < 1e-12
    for name in ("deltaH1", "deltaH1_se"):
        assert getattr(rev, name) == pytest.approx(getattr(fwd, name), rel=RTOL), name
    # the same E batch, the same l and H per token (to rounding: the primal runs through other
    # ops, e.g. the closed-form head tangent), the same per-sequence contributions
    assert rev.H_orig == pytest.approx(fwd.H_orig, rel=1e-13)
    assert rev.deltaH_true == pytest.approx(fwd.deltaH_true, rel=1e-8)  # H' - H: cancellation
    torch.testing.assert_close(torch.tensor(rev.sequences["deltaH1_contribution"]),
                               torch.tensor(fwd.sequences["deltaH1_contribution"]),
                               rtol=RTOL, atol=RTOL * abs(fwd.deltaH1))
    for a, b in zip(rev.token_data, fwd.token_data, strict=True):
        assert a["tokens"] == b["tokens"]
        for key in ("token_logprobs", "rb_entropies"):
            torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), rtol=1e-13,
                                       atol=1e-13)


def test_probed_head_and_embeddings_are_reached():
    """The full-weight models probe the embedding, the norms and the head: the reverse pass must
    see every one (a missed parameter use would show as a check gap and an error)."""
    tokenizer = build_char_tokenizer()
    model = _model("llama_full", tokenizer)
    names = set(probed_parameters(model))
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= names


def test_a_parameter_used_outside_its_module_fails_the_check():
    """A module that reads a probed weight of another module directly (here: a norm scaled by
    the head's bias-free weight norm) is invisible to the injection hooks: the pass must refuse
    with the check's message, not report a biased delta H_1."""
    tokenizer = build_char_tokenizer()
    model = _model("llama_full", tokenizer)
    norm, head = model.model.norm, model.lm_head
    original = norm.forward

    def leaky(x):
        return original(x) * head.weight.norm()

    norm.forward = leaky
    with pytest.raises(RuntimeError, match="used outside the module that owns it"):
        _one_step(model, tokenizer, "per_token")


def test_dora_is_refused_by_the_reverse_pass_and_auto_takes_forward():
    """DoRA's weight norm ||W + s B A|| is one tensor for every sequence (peft computes it from
    lora_B(lora_A(I))) and, with its detach undone (variants.exact_variant_derivatives), it
    moves the entropy: its per-sequence parts cannot be separated, so the reverse pass refuses
    with the reason (not a biased delta H_1), and "auto" takes the forward pass."""
    tokenizer = build_char_tokenizer()
    model = _model("llama_dora", tokenizer)
    mode, why = choose_derivative(model, "auto")
    assert mode == "forward" and "DoRA" in why
    with pytest.raises(RuntimeError, match="shared by every sequence"):
        _one_step(model, tokenizer, "per_token")


def test_a_use_shared_by_every_sequence_that_matters_is_refused():
    """A probed module called on a tensor common to all sequences, whose output reaches the
    objective (as DoRA's undetached norm does): the extra eps entry sees it and the pass refuses
    rather than drop or misattribute its per-sequence parts."""
    tokenizer = build_char_tokenizer()
    model = _model("llama_full", tokenizer)
    norm, head = model.model.norm, model.lm_head
    original = norm.forward

    def shared(x):
        return original(x) * head(torch.ones(1, x.shape[-1], dtype=x.dtype)).mean()

    norm.forward = shared
    with pytest.raises(RuntimeError, match="shared by every sequence"):
        _one_step(model, tokenizer, "per_token")


@pytest.fixture(scope="module")
def reverse_pool(policy, step):  # noqa: F811  (pytest fixtures by name)
    """The oracle policy's pool of R·B sequences, its derivative terms by the reverse pass."""
    model, tokenizer = policy
    forward, upd, batch = score_pool(model, tokenizer, step, R * B, step_index=0)
    probe = EntropyProbe(model, tokenizer, ["a", "bca", "ddeab"], batch_size=batch.size,
                         microbatch_size=1600, max_new_tokens=4)
    theta = snapshot(probe.params)
    diagnostics: dict = {}
    with preserved_state(model):
        pending = types.SimpleNamespace(batch=batch, tokens=[])
        reverse = probe._derivative_pass(pending, theta, step, "reverse", diagnostics)
    return forward, reverse, upd, diagnostics


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_reverse_pass_is_unbiased_for_the_exact_derivative(reverse_pool, exact,  # noqa: F811
                                                           normalize):
    """The exact-oracle test of test_validation, on the reverse pass: over R = 200 E batches of
    B = 32, mean delta H_1 is within 4 SE of the exact D_Delta theta H (a correct probe fails it
    with probability ~6e-5; seeded), and each batch's delta H_1 and SE are the forward pass's."""
    forward, reverse, upd, diagnostics = reverse_pool
    assert diagnostics["reverse_check_gap"] < 1e-12
    est = chunk_estimates(reverse, upd, B, normalize)
    ref = chunk_estimates(forward, upd, B, normalize)
    torch.testing.assert_close(est["d1"], ref["d1"], rtol=RTOL, atol=0)
    torch.testing.assert_close(est["d1_se"], ref["d1_se"], rtol=RTOL, atol=0)
    D = exact[normalize]["D"]
    assert abs(z_score(est["d1"], D)) < 4, (mean_and_se(est["d1"]), D)


def test_auto_picks_forward_on_a_cpu_model_and_the_config_checks_the_name(caplog):
    tokenizer = build_char_tokenizer()
    model = _model("llama_untied", tokenizer)
    assert choose_derivative(model, "auto")[0] == "forward"
    assert choose_derivative(model, "reverse") == ("reverse", "requested")
    # off the CPU (here the meta device: no GPU in CI), SDPA would be the fused kernels that
    # forward mode cannot enter: reverse; eager attention there: forward
    on_device = _model("llama_untied", tokenizer).to("meta")
    assert choose_derivative(on_device, "auto") == ("reverse", "auto: sdpa attention on meta")
    on_device.config._attn_implementation = "eager"
    assert choose_derivative(on_device, "auto")[0] == "forward"
    with pytest.raises(ProbeConfigError, match="derivative must be one of"):
        ProbeConfig(derivative="backward")
    with caplog.at_level("INFO", logger="entropy_callback"):
        results = _one_step(model, tokenizer, "per_token")
    assert math.isfinite(results["reverse"].deltaH1)
    said = [r.getMessage() for r in caplog.records if "probe: derivative" in r.getMessage()]
    assert said == ["entropy probe: derivative forward (requested)",
                    "entropy probe: derivative reverse (requested)"]


def test_gpu_check_runs_on_a_cpu_sized_model(capsys):
    """benchmarks/gpu_check.py (the one command for a GPU machine) runs end to end with --tiny:
    both probes succeed on one fused-or-not AdamW step, agree, and the rebuild is exact."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = gpu_check.main(["--tiny", "--cpu"])
    assert "| probe, reverse derivative |" in capsys.readouterr().out
    # float32 model: the two differentiation orders agree to float32 rounding, far inside 1 SE
    assert out["agreement"]["deltaH1_diff_over_se"] < 0.05
    assert out["forward"]["update_cosine"] > 1 - 1e-6


@pytest.mark.parametrize("kind", ["llama_untied", "llama_lora_head"])
def test_reverse_pass_builds_no_logits_for_the_whole_microbatch(kind):
    """The head runs per chunk of 4 positions (closed form for a plain head, autograd for LoRA
    on it): no tensor is larger than two chunks x the vocabulary, or the head's weight (vocab x
    hidden 16), while the full forward would build microbatch x (P + L) x V."""
    from probe_harness import LargestTensor

    from entropy_callback.injection import Injector
    from entropy_callback.reverse import estimator_weights, surrogate_backward
    from entropy_callback.scoring import Scorer

    tokenizer = build_char_tokenizer()
    vocab, chunk = 2000, 4  # a vocabulary far above the hidden size, so V-sized tensors show
    model = _model(kind, tokenizer, vocab)
    probe = EntropyProbe(model, tokenizer, PROMPTS, batch_size=32, microbatch_size=32,
                         max_new_tokens=8)
    theta = snapshot(probe.params)
    u = {n: torch.ones_like(t) for n, t in theta.items()}
    with preserved_state(model):
        batch = probe._sample(0)
        scorer = Scorer(model, 1.0, chunk)
        scorer.score(batch.slice(0, 1))  # the one-row check against the full forward, done once
        leaves = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
        with Injector(model, probe.params, u) as injector, LargestTensor() as sizes:
            surrogate_backward(scorer, batch, leaves, estimator_weights("per_token"), injector)
    b, L = batch.response_mask.shape
    assert b * (batch.prompt_width + L) * vocab > 10 * sizes.largest  # the bound means something
    assert sizes.largest <= 2 * max(chunk, 16) * vocab, sizes.largest


@pytest.mark.parametrize("kind", ["llama_lora_head", "gpt2_full"])
def test_reverse_pass_through_the_full_forward_equals_the_forward_pass(kind):
    """A model whose head the split cannot reproduce is scored through its full forward (the
    logits of a microbatch at once): the reverse pass injects per sequence there too."""
    from entropy_callback.reverse import reverse_pass
    from entropy_callback.scoring import Scorer, sequence_terms

    tokenizer = build_char_tokenizer()
    model = _model(kind, tokenizer)
    probe = EntropyProbe(model, tokenizer, PROMPTS, batch_size=12, max_new_tokens=6)
    theta = snapshot(probe.params)
    gen = torch.Generator().manual_seed(2)
    u = {n: torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in theta.items()}
    with preserved_state(model):
        batch = probe._sample(0)
        scorer = Scorer(model, 0.9, 5)
        scorer._split, scorer._verified = None, True  # the full forward
        mbs = [batch.slice(0, 7), batch.slice(7, 12)]
        diagnostics: dict = {}
        got = [terms for _, _, terms in reverse_pass(scorer, probe.params, iter(mbs), theta, u,
                                                     "per_token", diagnostics)]
        want = [sequence_terms(*scorer.score_with_tangent(mb, theta, u)[:2], mb.response_mask,
                               *scorer.score_with_tangent(mb, theta, u)[2:]) for mb in mbs]
    assert diagnostics["reverse_check_gap"] < 1e-12
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g["A"], w["A"] + w["Bsum"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g["C"], w["C"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g["h"], w["h"], rtol=1e-12, atol=1e-12)
