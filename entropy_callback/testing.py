"""Exact oracle for the probe (estimators.md §7): every response enumerated.

A declared API (``__all__``; docs/usage.md, "Install"): the project's tests and benchmarks use
it, and so can anyone validating the probe on a policy of their own small enough to enumerate.
It imports torch; ``exact_float64`` needs transformers.

With a tiny vocabulary and a short ``max_new_tokens`` every response can be listed, so the
policy entropy H(θ), its directional derivative D_u H and the true change
ΔH = H(θ + Δθ) − H(θ) can be computed *exactly* (up to float64 round-off). The probe's δH₁ must
be unbiased for D_Δθ H and its ΔH_true consistent for ΔH; this module supplies the targets.

Conventions (the same as the engine's, estimators.md "Notation" and §1):

- A prompt x is drawn uniformly from ``prompts``; each prompt is tokenized with
  ``add_special_tokens=False``.
- π_θ(·|x, y_<k) = softmax(logits / τ) over the *full* vocabulary (every id the model scores,
  ``<pad>`` and ``<unk>`` included: a sampled pad is an ordinary token), computed in float64.
- A response y = (y_1 … y_T) stops right after the first EOS (EOS is part of the response and
  is scored) or at T = L = ``max_new_tokens``.
- H_k = −Σ_v π(v|x, y_<k) log π(v|x, y_<k), in nats.
- per_token:    H(θ)     = E[Σ_k H_k] / E[T]   (nats per token)
- per_sequence: H_seq(θ) = E[Σ_k H_k]          (nats per response)

How it is computed. Let a *live prefix* be a prefix y_<k (k = 1 … L, so of length 0 … L−1)
that contains no EOS. Then

    E[Σ_k H_k | x] = Σ_{live prefixes p} P(p|x) · H(p),     E[T | x] = Σ_{live prefixes p} P(p|x),

and the expectations over prompts are plain averages over ``prompts``; the per-token value is
the ratio of those averages (not the average of per-prompt ratios). Every prompt is evaluated
*unpadded*: one forward pass per prefix length, a batch of all live prefixes of that length,
``position_ids = arange`` and an all-ones attention mask. This is deliberately independent of
the engine's left-padding logic so that it can check it.

Parameters are substituted with :func:`torch.func.functional_call` (through
``variants.call_substituted``, right for shared containers); the live weights are never
modified. The model is put in eval mode for the evaluation (dropout off) and its modes are
restored afterwards.

The cost is Σ_{k<L} (V − n_eos)^k prefixes per prompt; ``_MAX_PREFIXES`` guards against a
combinatorial explosion (e.g. V = 8, L = 4 gives 1 + 7 + 49 + 343 = 400).
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from entropy_callback.config import NORMALIZATIONS
from entropy_callback.variants import call_substituted, exact_variant_derivatives

__all__ = [
    "exact_delta",
    "exact_float64",
    "exact_directional_derivative",
    "exact_entropy",
    "exact_response_distribution",
    "randomize_lora_b",
]

# Largest number of live prefixes (per prompt) the oracle will enumerate.
_MAX_PREFIXES = 1_000_000
# Sequences per forward pass (memory knob only).
_FORWARD_BATCH = 1024


def _rmsnorm_float64(self: nn.Module, hidden_states: Tensor) -> Tensor:
    """LlamaRMSNorm without the float32 round trip (same formula, in the input's dtype)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def exact_float64(model: nn.Module) -> nn.Module:
    """Make a float64 transformers model (e.g. the tiny Llama, peft-wrapped) float64 throughout.

    As shipped, transformers' Llama is *not* float64-precise: ``LlamaRMSNorm`` casts its input
    to float32 and "eager" attention takes its softmax in float32, so a float64 model carries
    ~1e-8 nats of noise in H(θ), enough to swamp a float64 finite difference or to put a floor
    under a small ΔH. This helper

    - replaces the ``forward`` of every ``*RMSNorm`` module *of this model instance* by the same
      formula computed in the input's dtype (nothing global is patched), and
    - switches "eager" attention to "sdpa" (float64 throughout on CPU; it also avoids eager's
      float32 mask, which gives NaN logits for left-padded float64 inputs).

    Args:
        model: a model whose floating-point parameters are all float64.

    Returns:
        The same model, modified in place.

    Raises:
        ValueError: if a floating-point parameter is not float64.
    """
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes != {torch.float64}:
        raise ValueError(
            f"exact_float64 needs a float64 model, got parameter dtypes {sorted(map(str, dtypes))}"
            "; build it with dtype=torch.float64 (or call model.double()) first."
        )
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rmsnorm_float64, module)
    from transformers import PreTrainedModel

    for module in model.modules():  # pre-order: the outermost transformers model first
        if isinstance(module, PreTrainedModel):
            if module.config._attn_implementation == "eager":
                module.set_attn_implementation("sdpa")
            break
    return model


@dataclass
class _Level:
    """All live prefixes of one length k for one prompt.

    Attributes:
        prefixes: [N_k, k] int64 token ids of the prefixes (no EOS among them).
        log_prob: [N_k] float64, log P(prefix | x) in nats (0 for the empty prefix).
        next_log_probs: [N_k, V] float64, log π(· | x, prefix) over the full vocabulary.
    """

    prefixes: Tensor
    log_prob: Tensor
    next_log_probs: Tensor


def randomize_lora_b(model: nn.Module, *, std: float = 0.05, seed: int = 1234) -> nn.Module:
    """Draw every ``lora_B`` tensor from N(0, std^2) with its own seeded generator (in place).

    peft starts ``lora_B`` at zero, so a fresh adapter has no effect; tests and benchmarks that
    need a non-trivial policy call this. The global RNG is not touched. Returns ``model``.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


@contextmanager
def _oracle_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and "highest" float32 matmul precision for the duration; both restored."""
    modes = [(m, m.training) for m in model.modules()]
    precision = torch.get_float32_matmul_precision()
    model.eval()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        for m, training in modes:
            m.training = training


def _check_args(max_new_tokens: int, temperature: float, normalize: str | None = None) -> None:
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")


def _eos_ids(tokenizer, eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; pass eos_token_id explicitly")
    ids = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]
    if not ids:
        raise ValueError("eos_token_id must name at least one token id")
    return sorted(set(ids))


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to no tokens")
    return ids


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _next_token_log_probs(
    model: nn.Module,
    prompt: Tensor,
    prefixes: Tensor,
    params: Mapping[str, Tensor] | None,
    temperature: float,
) -> Tensor:
    """log π(· | x, prefix) for a batch of prefixes of one length.

    Args:
        prompt: [P] int64 prompt ids.
        prefixes: [N, k] int64 response prefixes (k may be 0).
        params: parameter overrides for ``functional_call`` (None: the live parameters).

    Returns:
        [N, V] float64 log-probabilities (nats) of the next token over the full vocabulary.
    """
    n, k = prefixes.shape
    seq_len = prompt.numel() + k
    position_ids = torch.arange(seq_len, device=prompt.device)
    out: list[Tensor] = []
    for start in range(0, n, _FORWARD_BATCH):
        chunk = prefixes[start : start + _FORWARD_BATCH]
        b = chunk.shape[0]
        input_ids = torch.cat([prompt.expand(b, -1), chunk], dim=1)
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "position_ids": position_ids.expand(b, -1),
            "use_cache": False,
        }
        if params is None:
            outputs = model(**kwargs)
        else:
            outputs = call_substituted(model, dict(params), (), kwargs)
        logits = outputs.logits[:, -1, :].to(torch.float64) / temperature
        out.append(torch.log_softmax(logits, dim=-1))
    return torch.cat(out, dim=0)


def _enumerate_levels(
    model: nn.Module,
    prompt_ids: Sequence[int],
    eos_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float,
    params: Mapping[str, Tensor] | None,
) -> list[_Level]:
    """Every live prefix of lengths 0 … L−1 for one prompt, with probabilities (differentiable)."""
    device = _model_device(model)
    prompt = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
    empty = torch.zeros((1, 0), dtype=torch.long, device=device)
    first = _next_token_log_probs(model, prompt, empty, params, temperature)
    vocab = first.shape[-1]
    eos_set = set(eos_ids)
    if any(e < 0 or e >= vocab for e in eos_set):
        raise ValueError(f"EOS ids {sorted(eos_set)} are outside the model's vocabulary {vocab}")
    cont = torch.tensor(
        [v for v in range(vocab) if v not in eos_set], dtype=torch.long, device=device
    )
    n_cont = cont.numel()
    total = sum(n_cont**k for k in range(max_new_tokens))
    if total > _MAX_PREFIXES:
        raise ValueError(
            f"exact enumeration needs {total} prefixes per prompt (vocabulary {vocab}, "
            f"max_new_tokens {max_new_tokens}); the limit is {_MAX_PREFIXES}. Use a smaller "
            "vocabulary or a shorter max_new_tokens."
        )
    levels = [_Level(empty, torch.zeros(1, dtype=torch.float64, device=device), first)]
    for _ in range(1, max_new_tokens):
        prev = levels[-1]
        n_prev = prev.prefixes.shape[0]
        if n_prev == 0 or n_cont == 0:
            break
        parent = torch.arange(n_prev, device=device).repeat_interleave(n_cont)
        token = cont.repeat(n_prev)
        prefixes = torch.cat([prev.prefixes[parent], token[:, None]], dim=1)
        log_prob = prev.log_prob[parent] + prev.next_log_probs[parent, token]
        nxt = _next_token_log_probs(model, prompt, prefixes, params, temperature)
        levels.append(_Level(prefixes, log_prob, nxt))
    return levels


def _entropy_of(log_probs: Tensor) -> Tensor:
    """[N, V] float64 log-probabilities -> [N] entropies in nats (0·log 0 taken as 0)."""
    p = log_probs.exp()
    safe = torch.where(p > 0, log_probs, torch.zeros_like(log_probs))
    return -(p * safe).sum(dim=-1)


def _prompt_moments(levels: Sequence[_Level]) -> tuple[Tensor, Tensor]:
    """(E[Σ_k H_k | x], E[T | x]) for one prompt: 0-dim float64 tensors (nats, tokens)."""
    sum_h = torch.zeros((), dtype=torch.float64, device=levels[0].log_prob.device)
    exp_t = torch.zeros_like(sum_h)
    for level in levels:
        p = level.log_prob.exp()
        sum_h = sum_h + (p * _entropy_of(level.next_log_probs)).sum()
        exp_t = exp_t + p.sum()
    return sum_h, exp_t


def exact_entropy(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    normalize: str = "per_token",
    params: Mapping[str, Tensor] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> Tensor:
    """Exact policy entropy H(θ) by enumerating every response.

    Args:
        model: a causal LM (transformers / peft) returning ``.logits`` [B, S, V]; any dtype.
        tokenizer: its tokenizer; prompts are tokenized with ``add_special_tokens=False``.
        prompts: the prompt pool, drawn uniformly (each prompt weighs 1/len(prompts)).
        max_new_tokens: L, the longest response in tokens.
        temperature: τ, π = softmax(logits / τ).
        normalize: "per_token" (E[Σ_k H_k] / E[T], nats per token) or "per_sequence"
            (E[Σ_k H_k], nats per response).
        params: overrides keyed by ``model.named_parameters()`` names (e.g. the LoRA weights),
            substituted with ``torch.func.functional_call``; None evaluates the live weights.
        eos_token_id: the stop token id(s); None means ``tokenizer.eos_token_id``.

    Returns:
        0-dim float64 tensor, differentiable w.r.t. ``params`` (or the live parameters when
        ``params`` is None) unless called under ``torch.no_grad()``.
    """
    _check_args(max_new_tokens, temperature, normalize)
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    eos = _eos_ids(tokenizer, eos_token_id)
    sums_h: list[Tensor] = []
    exps_t: list[Tensor] = []
    with _oracle_mode(model):
        for prompt in prompts:
            levels = _enumerate_levels(
                model, _prompt_ids(tokenizer, prompt), eos, max_new_tokens, temperature, params
            )
            sum_h, exp_t = _prompt_moments(levels)
            sums_h.append(sum_h)
            exps_t.append(exp_t)
    mean_h = torch.stack(sums_h).mean()
    if normalize == "per_sequence":
        return mean_h
    return mean_h / torch.stack(exps_t).mean()


def _base_params(
    model: nn.Module, params: Mapping[str, Tensor] | None, keys: Sequence[str]
) -> dict[str, Tensor]:
    """θ as a dict: ``params`` if given, else the live parameters named in ``keys`` (detached)."""
    named = dict(model.named_parameters())
    unknown = [k for k in keys if k not in named]
    if unknown:
        more = "…" if len(unknown) > 5 else ""
        raise KeyError(f"not parameters of the model: {unknown[:5]}{more}")
    base = {k: v.detach() for k, v in (params or {}).items()}
    for k in keys:
        if k not in base:
            base[k] = named[k].detach()
        if tuple(base[k].shape) != tuple(named[k].shape):
            raise ValueError(f"{k}: shape {tuple(base[k].shape)} != {tuple(named[k].shape)}")
    return base


def exact_directional_derivative(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    direction: Mapping[str, Tensor],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    normalize: str = "per_token",
    params: Mapping[str, Tensor] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> float:
    """Exact directional derivative D_u H at θ, by autograd through the enumeration.

    Computes d/ds H(θ + s·u) at s = 0 with one reverse-mode pass w.r.t. the scalar s, through
    what peft's LoRA variants detach in their forward (DoRA's weight norm:
    ``variants.exact_variant_derivatives``), so it is the derivative of H itself.

    Args:
        direction: u, keyed by ``model.named_parameters()`` names; each tensor has the shape
            of its parameter (cast to the parameter's dtype and device).
        params: θ (the other arguments as in :func:`exact_entropy`); None = live weights.

    Returns:
        D_u H in nats per token (per_token) or nats per response (per_sequence) per unit of s;
        D_Δθ H is the first-order prediction of H(θ + Δθ) − H(θ).
    """
    base = _base_params(model, params, list(direction))
    s = torch.zeros((), dtype=torch.float64, device=_model_device(model), requires_grad=True)
    with torch.enable_grad(), exact_variant_derivatives(model):
        shifted = dict(base)
        for k, u in direction.items():
            b = base[k]
            shifted[k] = b + s.to(b.dtype) * u.detach().to(dtype=b.dtype, device=b.device)
        h = exact_entropy(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            normalize=normalize,
            params=shifted,
            eos_token_id=eos_token_id,
        )
        (grad,) = torch.autograd.grad(h, s)
    return float(grad)


def exact_delta(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    delta: Mapping[str, Tensor],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    normalize: str = "per_token",
    eos_token_id: int | Sequence[int] | None = None,
) -> float:
    """Exact entropy change ΔH = H(θ + Δθ) − H(θ) at the live θ.

    Args:
        delta: Δθ, keyed by ``model.named_parameters()`` names, each of its parameter's shape.
            θ + Δθ is formed in the parameter's dtype (as the optimizer step would be).
        (the other arguments as in :func:`exact_entropy`)

    Returns:
        ΔH in nats per token (per_token) or nats per response (per_sequence).
    """
    base = _base_params(model, None, list(delta))
    moved = {
        k: base[k] + d.detach().to(dtype=base[k].dtype, device=base[k].device)
        for k, d in delta.items()
    }
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "normalize": normalize,
        "eos_token_id": eos_token_id,
    }
    with torch.no_grad():
        h0 = exact_entropy(model, tokenizer, prompts, **kwargs)
        h1 = exact_entropy(model, tokenizer, prompts, params=moved, **kwargs)
    return float(h1 - h0)


def exact_response_distribution(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    params: Mapping[str, Tensor] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> dict[tuple[int, ...], float]:
    """Every response to one prompt with its probability π_θ(y | x).

    Args:
        prompt: one prompt string (tokenized with ``add_special_tokens=False``).
        (the other arguments as in :func:`exact_entropy`)

    Returns:
        ``{response token ids: probability}``. A response that stopped at EOS ends with the
        EOS id; one that reached ``max_new_tokens`` without EOS has exactly that many tokens.
        The probabilities sum to 1 (up to float64 round-off).
    """
    _check_args(max_new_tokens, temperature)
    eos = _eos_ids(tokenizer, eos_token_id)
    with torch.no_grad(), _oracle_mode(model):
        levels = _enumerate_levels(
            model, _prompt_ids(tokenizer, prompt), eos, max_new_tokens, temperature, params
        )
    dist: dict[tuple[int, ...], float] = {}
    for k, level in enumerate(levels):
        joint = (level.log_prob[:, None] + level.next_log_probs).exp().cpu()  # [N_k, V]
        prefixes = [tuple(p) for p in level.prefixes.cpu().tolist()]
        last = k == max_new_tokens - 1
        tokens = range(joint.shape[1]) if last else eos
        rows = joint.tolist()
        for prefix, row in zip(prefixes, rows, strict=True):
            for v in tokens:
                dist[prefix + (v,)] = row[v]
    return dist
