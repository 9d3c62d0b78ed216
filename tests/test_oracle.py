"""Tests of the exact oracle (entropy_callback.testing, estimators.md §7).

The oracle is the ground truth for every other estimator test, so it is checked here against
independent computations only: teacher forcing of every enumerated response, plain Monte Carlo
sampling, central finite differences and the first-order limit of the true change.

The policy is a tiny character Llama in float64 with a vocabulary of 8 ids
(``<pad>``, ``<eos>``, ``<unk>``, a…e), L = 4 new tokens, three prompts of different lengths and
LoRA adapters whose B matrices are random (so the adapter changes the policy).

A note on float64: transformers' Llama is *not* float64-precise as shipped. ``LlamaRMSNorm``
casts its input to float32 and the "eager" attention takes its softmax in float32, so a
float64 model carries ~1e-8 nats of noise in H(θ), which swamps a float64 finite difference:
on this fixture, central differences of D_u H (per_token) were off by 5e-4 relative at
ε = 1e-5 and 1.3e-2 at ε = 1e-6, against 7e-9 and 2e-11 with the fix. The fixture therefore
uses "sdpa" attention (float64 throughout on CPU) and replaces the RMSNorm forward of *these
model instances* by a float64 one (``entropy_callback.testing.exact_float64``); nothing global is
patched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from entropy_callback.demos.tiny import add_lora, build_char_tokenizer, build_tiny_llama
from entropy_callback.testing import (
    exact_delta,
    exact_directional_derivative,
    exact_entropy,
    exact_float64,
    exact_response_distribution,
    randomize_lora_b,
)

ALPHABET = "abcde"  # + <pad>, <eos>, <unk> = 8 ids
PROMPTS = ("a", "bca", "ddeab")  # 1, 3 and 5 tokens
MAX_NEW = 4  # L
VOCAB = 8

# One intra-op thread (conftest's fixture): the models are tiny and on a loaded 2-core machine
# OpenMP's busy-waiting made this module ~15x slower (275 s against 18 s).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def policy() -> Iterator[tuple[nn.Module, object]]:
    """(peft LoRA model in float64, char tokenizer); LoRA B ~ N(0, 0.05²), seeded."""
    tokenizer = build_char_tokenizer(alphabet=ALPHABET)
    assert len(tokenizer) == VOCAB
    base = build_tiny_llama(tokenizer, dtype=torch.float64, attn_implementation="sdpa", seed=0)
    model = exact_float64(add_lora(base, r=4, alpha=8, seed=0))
    randomize_lora_b(model, std=0.05, seed=1234)
    model.eval()
    yield model, tokenizer


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _direction(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """A random direction over the LoRA parameters, one N(0, 1) entry per element."""
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in _trainable(model).items()
    }


def _shift(base: dict[str, Tensor], u: dict[str, Tensor], eps: float) -> dict[str, Tensor]:
    return {k: base[k] + eps * u[k] for k in u}


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------
# (a) enumeration: distribution vs teacher forcing vs the prefix formula
# --------------------------------------------------------------------------------------------


def _teacher_force(
    model: nn.Module, prompt: list[int], responses: list[tuple[int, ...]], temperature: float
) -> tuple[Tensor, Tensor]:
    """Score responses of one length: (Σ_k ℓ_k [n], Σ_k H_k [n]) in float64 nats.

    Unpadded, default position ids (the model's own arange), no attention mask: independent
    of the oracle's explicit position_ids / mask.
    """
    p = len(prompt)
    ids = torch.tensor([list(prompt) + list(r) for r in responses], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.to(torch.float64) / temperature
    logp = torch.log_softmax(logits[:, p - 1 : -1, :], dim=-1)  # [n, T, V]
    ell = logp.gather(-1, ids[:, p:, None]).squeeze(-1)  # [n, T]
    ent = -(logp.exp() * logp).sum(-1)  # [n, T]
    return ell.sum(-1), ent.sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_distribution_matches_teacher_forcing_and_prefix_formula(policy, temperature):
    model, tokenizer = policy
    eos = tokenizer.eos_token_id
    n_cont = VOCAB - 1
    # responses ending in EOS after a live prefix of length 0..L-1, plus every length-L
    # response without a stop (L-1 non-EOS tokens, then any token).
    expected_count = sum(n_cont**k for k in range(MAX_NEW)) + n_cont ** (MAX_NEW - 1) * n_cont
    sum_h, exp_t, seq_ent = [], [], []
    for prompt in PROMPTS:
        dist = exact_response_distribution(
            model, tokenizer, prompt, max_new_tokens=MAX_NEW, temperature=temperature
        )
        assert len(dist) == expected_count
        assert math.fsum(dist.values()) == pytest.approx(1.0, abs=1e-12)
        for y in dist:
            assert 1 <= len(y) <= MAX_NEW
            assert eos not in y[:-1]
            assert len(y) == MAX_NEW or y[-1] == eos
        by_len: dict[int, list[tuple[int, ...]]] = {}
        for y in dist:
            by_len.setdefault(len(y), []).append(y)
        h_acc = t_acc = s_acc = 0.0
        for t, ys in by_len.items():
            ell, h = _teacher_force(model, _prompt_ids(tokenizer, prompt), ys, temperature)
            p = torch.tensor([dist[y] for y in ys], dtype=torch.float64)
            # the enumeration's probabilities are the teacher-forced ones
            torch.testing.assert_close(p, ell.exp(), rtol=1e-10, atol=1e-15)
            h_acc += float((p * h).sum())
            t_acc += float(p.sum()) * t
            s_acc += float(-(p * p.log()).sum())
        sum_h.append(h_acc)
        exp_t.append(t_acc)
        seq_ent.append(s_acc)
    # E[Σ_k H_k] = E[-S] (chain rule of entropy; the stop is a function of the prefix)
    for a, b in zip(sum_h, seq_ent, strict=True):
        assert a == pytest.approx(b, rel=1e-10)
    # the per-prompt values differ, so a non-uniform prompt average could not pass below
    assert max(sum_h) - min(sum_h) > 1e-2
    per_seq = sum(sum_h) / len(PROMPTS)
    per_tok = per_seq / (sum(exp_t) / len(PROMPTS))  # ratio of means over uniform prompts
    kw = {"max_new_tokens": MAX_NEW, "temperature": temperature}
    with torch.no_grad():
        h_tok = exact_entropy(model, tokenizer, PROMPTS, normalize="per_token", **kw)
        h_seq = exact_entropy(model, tokenizer, PROMPTS, normalize="per_sequence", **kw)
    assert h_tok.dtype == torch.float64 and h_tok.dim() == 0
    assert float(h_tok) == pytest.approx(per_tok, rel=1e-10)
    assert float(h_seq) == pytest.approx(per_seq, rel=1e-10)


def test_adapter_is_nontrivial(policy):
    """The random LoRA B matrices move H measurably away from the base model's."""
    model, tokenizer = policy
    with torch.no_grad():
        h = float(exact_entropy(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW))
        with model.disable_adapter():
            h_base = float(exact_entropy(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW))
    assert abs(h - h_base) > 1e-3


# --------------------------------------------------------------------------------------------
# (b) plain Monte Carlo
# --------------------------------------------------------------------------------------------


def _sample(
    model: nn.Module,
    prompt: list[int],
    n: int,
    eos: int,
    gen: torch.Generator,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """n responses to one prompt, token by token from softmax(logits/τ) over all ids.

    Unpadded and without KV cache: every row has the same length at every step, and rows that
    already stopped keep being extended but are masked out. Rows with the same tokens so far
    share one forward pass (``torch.unique``; at most 7³ distinct rows here), which makes
    20000 samples cheap without changing what is sampled.

    Returns:
        (h [n] = Σ_k H_k in nats, T [n] response lengths, S [n] = Σ_k ℓ_k in nats), float64.
    """
    ids = torch.tensor(prompt, dtype=torch.long).expand(n, -1)
    alive = torch.ones(n, dtype=torch.bool)
    h = torch.zeros(n, dtype=torch.float64)
    s = torch.zeros(n, dtype=torch.float64)
    length = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(MAX_NEW):
            rows, inverse = torch.unique(ids, dim=0, return_inverse=True)
            logits = model(input_ids=rows).logits[:, -1, :].to(torch.float64) / temperature
            logp = torch.log_softmax(logits, dim=-1)[inverse]  # [n, V]
            tok = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(-1)
            live = alive.to(torch.float64)
            h += live * -(logp.exp() * logp).sum(-1)
            s += live * logp.gather(-1, tok[:, None]).squeeze(-1)
            length += live
            alive = alive & (tok != eos)
            ids = torch.cat([ids, tok[:, None]], dim=1)
    return h, length, s


def test_monte_carlo_agrees_with_exact(policy):
    model, tokenizer = policy
    n = 20_000
    gen = torch.Generator().manual_seed(2024)
    which = torch.randint(len(PROMPTS), (n,), generator=gen)  # uniform prompts
    hs, ts, ss = [], [], []
    for i, prompt in enumerate(PROMPTS):
        count = int((which == i).sum())
        h, t, s = _sample(model, _prompt_ids(tokenizer, prompt), count, tokenizer.eos_token_id, gen)
        hs.append(h)
        ts.append(t)
        ss.append(s)
    h, t, s = torch.cat(hs), torch.cat(ts), torch.cat(ss)

    with torch.no_grad():
        exact_tok = float(exact_entropy(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW))
        exact_seq = float(
            exact_entropy(
                model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW, normalize="per_sequence"
            )
        )
    exact_len = exact_seq / exact_tok  # E[T]

    # Estimates and their standard errors. per_sequence and E[T] are plain means (SE = sd/√n);
    # per_token is a ratio of means Σh/ΣT, whose delta-method influence function is
    # (h_i − Ĥ T_i) / mean(T). With n = 20000 the estimates are Gaussian to a very good
    # approximation, so |estimate − exact| ≤ 4 SE fails with probability ≈ 6e-5 per check for
    # a correct oracle; the seed makes the test deterministic anyway. A wrong convention (EOS
    # not scored, the wrong prompt weights, a wrong temperature) moves H by many SE.
    def mean_se(x: Tensor) -> tuple[float, float]:
        return float(x.mean()), float(x.std() / math.sqrt(x.numel()))

    est_tok = float(h.sum() / t.sum())
    se_tok = float(((h - est_tok * t) / t.mean()).std() / math.sqrt(n))
    est_seq, se_seq = mean_se(h)
    est_neg_s, se_neg_s = mean_se(-s)  # E[-S] = E[Σ H_k]: a second, noisier estimator
    est_len, se_len = mean_se(t)

    # the test has power: the SEs are well below 1% of the values
    assert se_tok < 0.01 * exact_tok and se_seq < 0.01 * exact_seq
    assert abs(est_tok - exact_tok) < 4 * se_tok, (est_tok, exact_tok, se_tok)
    assert abs(est_seq - exact_seq) < 4 * se_seq, (est_seq, exact_seq, se_seq)
    assert abs(est_neg_s - exact_seq) < 4 * se_neg_s, (est_neg_s, exact_seq, se_neg_s)
    assert abs(est_len - exact_len) < 4 * se_len, (est_len, exact_len, se_len)


# --------------------------------------------------------------------------------------------
# (c) directional derivative vs central finite differences
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["per_token", "per_sequence"])
def test_directional_derivative_matches_finite_difference(policy, normalize):
    model, tokenizer = policy
    kw = {"max_new_tokens": MAX_NEW, "normalize": normalize}
    theta = _trainable(model)
    u = _direction(model, seed=7)
    d = exact_directional_derivative(model, tokenizer, PROMPTS, u, **kw)
    # Central difference: truncation ≈ ε²·|D³H|/6 and round-off ≈ 1e-16·|H|/ε. With N(0,1)
    # entries (‖u‖ ≈ 93) the FD error measured 7e-7 (per_token) and 5e-6 (per_sequence)
    # relative at ε = 1e-4, falling as ε², so at ε = 1e-6 truncation is ~1e-10 and round-off
    # ~1e-10 (measured 2e-11 and 5e-10). rel=1e-6 leaves a wide margin, while a missing term in
    # the derivative is an O(1%) or larger error (dropping the score term: 5% to 85%).
    eps = 1e-6
    with torch.no_grad():
        h_plus = exact_entropy(model, tokenizer, PROMPTS, params=_shift(theta, u, eps), **kw)
        h_minus = exact_entropy(model, tokenizer, PROMPTS, params=_shift(theta, u, -eps), **kw)
    fd = float(h_plus - h_minus) / (2 * eps)
    assert abs(d) > 1e-2  # a non-degenerate direction
    assert d == pytest.approx(fd, rel=1e-6)

    # exact_entropy is differentiable w.r.t. params: ∇H·u is the same derivative
    params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    h = exact_entropy(model, tokenizer, PROMPTS, params=params, **kw)
    grads = torch.autograd.grad(h, list(params.values()))
    dot = sum(float((g * u[k]).sum()) for g, k in zip(grads, params, strict=True))
    assert d == pytest.approx(dot, rel=1e-10)


def test_directional_derivative_at_given_params_and_temperature(policy):
    """D_u H at θ₁ = θ + 0.03·w passed as ``params`` (the live weights stay at θ), τ = 0.7."""
    model, tokenizer = policy
    kw = {"max_new_tokens": MAX_NEW, "temperature": 0.7}
    theta = _trainable(model)
    theta1 = _shift(theta, _direction(model, seed=11), 0.03)
    u = _direction(model, seed=12)
    d1 = exact_directional_derivative(model, tokenizer, PROMPTS, u, params=theta1, **kw)
    d0 = exact_directional_derivative(model, tokenizer, PROMPTS, u, **kw)
    eps = 1e-6
    with torch.no_grad():
        h_plus = exact_entropy(model, tokenizer, PROMPTS, params=_shift(theta1, u, eps), **kw)
        h_minus = exact_entropy(model, tokenizer, PROMPTS, params=_shift(theta1, u, -eps), **kw)
    assert d1 == pytest.approx(float(h_plus - h_minus) / (2 * eps), rel=1e-6)
    assert abs(d1 - d0) > 1e-3 * abs(d0)  # params really moved the evaluation point


# --------------------------------------------------------------------------------------------
# (d) exact_delta: small, and first order in the step
# --------------------------------------------------------------------------------------------


def test_exact_delta_first_order_limit(policy):
    model, tokenizer = policy
    kw = {"max_new_tokens": MAX_NEW}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # the oracle evaluates in eval mode and restores the modes
    u = _direction(model, seed=7)
    d = exact_directional_derivative(model, tokenizer, PROMPTS, u, **kw)
    zero = {k: torch.zeros_like(v) for k, v in u.items()}
    assert exact_delta(model, tokenizer, PROMPTS, zero, **kw) == 0.0

    # ΔH(ε) = ε·D + ε²·D²H/2 + …, so ratio − 1 = ε·D²H/(2D) + O(ε²): it must shrink tenfold
    # per decade of ε (we accept 5× to 20×) and be ≤ 1e-3 at the smallest step (measured
    # 1.8e-2, 1.8e-3, 1.8e-4 for this direction). At ε = 1e-6 round-off (~1e-15 / |ΔH| ≈ 2e-9)
    # is still far below the curvature term.
    errors = []
    for eps in (1e-4, 1e-5, 1e-6):
        delta = {k: eps * v for k, v in u.items()}
        dh = exact_delta(model, tokenizer, PROMPTS, delta, **kw)
        assert abs(dh) < 2 * eps * abs(d)  # small: of the size of the first-order prediction
        errors.append(abs(dh / (eps * d) - 1.0))
    assert errors[-1] < 1e-3, errors
    for big, small in zip(errors, errors[1:], strict=False):
        assert 5.0 < big / small < 20.0, errors

    # the live model is untouched: same weights bit for bit, modes restored
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())
    model.eval()


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------


def test_argument_errors(policy):
    model, tokenizer = policy
    with pytest.raises(ValueError, match="normalize"):
        exact_entropy(model, tokenizer, PROMPTS, max_new_tokens=2, normalize="per_word")
    with pytest.raises(ValueError, match="max_new_tokens"):
        exact_entropy(model, tokenizer, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="prefixes"):
        exact_entropy(model, tokenizer, PROMPTS, max_new_tokens=9)  # 7^8 > 1e6 prefixes
    with pytest.raises(KeyError, match="not parameters"):
        exact_delta(model, tokenizer, PROMPTS, {"nope": torch.zeros(1)}, max_new_tokens=2)
