"""The held-out prompt pool: checked, tokenized and fitted to the model's context once.

A prompt is a string (formatted for the model, chat template included) or a list of token ids
used as given. Everything that can be wrong with the pool is found at construction:

    ids = prompt_token_ids(model, tokenizer, check_prompts(prompts), config)

- a prompt that tokenizes to nothing, or a token id outside the vocabulary: ProbeConfigError;
- a prompt whose tokens plus ``max_new_tokens`` exceed the model's positions
  (``config.max_position_embeddings``, e.g. 1024 for GPT-2): ProbeConfigError naming the
  prompt's index and lengths. Prompts are never truncated: the probe measures the pool it is
  given, so the user decides what to cut;
- prompts starting with a doubled BOS (a BOS-adding tokenizer given chat-templated text that
  already holds BOS): one EntropyProbeWarning naming the fix (``add_special_tokens=False``).
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .config import ProbeConfig, ProbeConfigError
from .observer import EntropyProbeWarning

Prompt = str | list[int]


def check_prompts(prompts: Any) -> list[Prompt]:
    """The pool as a list of non-empty strings and non-empty token-id lists.

    Raises:
        ProbeConfigError: not a non-empty list, or an entry that is neither kind.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        got = "an empty list" if isinstance(prompts, Sequence) and not isinstance(
            prompts, str) else f"a {type(prompts).__name__}"
        raise ProbeConfigError(
            f"prompts must be a non-empty list of strings or token-id lists (the held-out prompt "
            f"pool), got {got}. Pass e.g. prompts=[\"2+3=\", ...]; wrap a single prompt in a "
            "list."
        )
    pool: list[Prompt] = []
    bad = []
    for i, prompt in enumerate(prompts):
        entry = _entry(prompt)
        if entry is None:
            bad.append(i)
        else:
            pool.append(entry)
    if bad:
        raise ProbeConfigError(
            f"prompts must all be non-empty strings or non-empty lists of non-negative token "
            f"ids; entries {bad[:5]} are not. Format them (chat template included) before "
            "passing them, or pass tokenizer(...)['input_ids'] lists."
        )
    return pool


def _entry(prompt: Any) -> Prompt | None:
    if isinstance(prompt, str):
        return prompt or None
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()  # a 1-D tensor or array of ids
    if not isinstance(prompt, Sequence) or isinstance(prompt, bytes) or len(prompt) == 0:
        return None
    if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0
               for t in prompt):
        return None
    return [int(t) for t in prompt]


def prompt_texts(tokenizer: Any, pool: list[Prompt]) -> list[str]:
    """Each prompt as text (token-id prompts decoded), for the per-sequence records."""
    return [p if isinstance(p, str) else tokenizer.decode(p) for p in pool]


def prompt_token_ids(
    model: torch.nn.Module, tokenizer: Any, pool: list[Prompt], config: ProbeConfig
) -> list[list[int]]:
    """The token ids of each prompt, checked against the vocabulary and the model's context.

    String prompts are tokenized with ``add_special_tokens=config.add_special_tokens``.

    Raises:
        ProbeConfigError: an empty tokenization, an id outside the vocabulary, or a prompt that
            does not fit ``max_position_embeddings`` with ``max_new_tokens`` more tokens.
    """
    ids = [
        p if not isinstance(p, str)
        else list(tokenizer(p, add_special_tokens=config.add_special_tokens)["input_ids"])
        for p in pool
    ]
    empty = [i for i, t in enumerate(ids) if not t]
    if empty:
        raise ProbeConfigError(f"prompts {empty[:5]} tokenize to no tokens; drop or fix them.")
    _check_vocabulary(model, ids)
    _check_context(model, ids, config.max_new_tokens)
    _warn_doubled_bos(tokenizer, ids)
    return ids


def context_limit(model: torch.nn.Module) -> int | None:
    """The model's position limit (``config.max_position_embeddings``), or None."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(limit) if isinstance(limit, numbers.Integral) and limit > 0 else None


def _check_context(model: torch.nn.Module, ids: list[list[int]], max_new_tokens: int) -> None:
    limit = context_limit(model)
    if limit is None:
        return
    over = [(i, len(t)) for i, t in enumerate(ids) if len(t) + max_new_tokens > limit]
    if not over:
        return
    shown = ", ".join(f"prompt {i} ({n} tokens)" for i, n in over[:5])
    more = f" and {len(over) - 5} more" if len(over) > 5 else ""
    room, longest = limit - max_new_tokens, max(n for _, n in over)
    if room > 0:
        fix = f"Shorten or drop them (at most {room} prompt tokens fit), or lower max_new_tokens"
    elif longest < limit:  # here every prompt is over: max_new_tokens alone fills the context
        fix = (f"Lower max_new_tokens to at most {limit - longest} (the longest prompt has "
               f"{longest} tokens)")
    else:
        fix = f"Shorten the prompts (the longest has {longest} tokens) and lower max_new_tokens"
    raise ProbeConfigError(
        f"{shown}{more}: prompt tokens + max_new_tokens={max_new_tokens} exceed the model's "
        f"max_position_embeddings={limit}. {fix}; the probe does not truncate prompts."
    )


def _check_vocabulary(model: torch.nn.Module, ids: list[list[int]]) -> None:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    size = getattr(embeddings, "num_embeddings", None)
    if size is None:
        return
    bad = [i for i, t in enumerate(ids) if max(t) >= size]
    if bad:
        raise ProbeConfigError(
            f"prompts {bad[:5]} hold token ids >= the model's vocabulary size {size}; pass ids "
            "from this model's tokenizer."
        )


def _warn_doubled_bos(tokenizer: Any, ids: list[list[int]]) -> None:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return
    doubled = [i for i, t in enumerate(ids) if len(t) >= 2 and t[0] == t[1] == bos]
    if doubled:
        warnings.warn(
            f"prompts {doubled[:5]}{' ...' if len(doubled) > 5 else ''} start with a doubled BOS "
            f"token (id {bos}): the tokenizer adds BOS to text that already begins with it (a "
            "chat template?). Pass add_special_tokens=False, or token-id prompts.",
            EntropyProbeWarning,
            stacklevel=4,
        )


def check_model(model, name: str = "model") -> torch.nn.Module:
    """The policy: a causal LM module with ``.generate`` (transformers or peft). A string (a
    model id or path) is refused naming ``name``: the probe needs the trained object itself."""
    if isinstance(model, (str, bytes, os.PathLike)):
        raise ProbeConfigError(
            f"{name} must be the policy module itself, got the {type(model).__name__} "
            f"{str(model)[:80]!r}; pass the model object (the one being trained, e.g. "
            "AutoModelForCausalLM.from_pretrained(...) wrapped with peft.get_peft_model), not "
            "its name or path."
        )
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "generate", None)):
        raise ProbeConfigError(
            f"{name} must be a causal language model (a transformers PreTrainedModel or peft model "
            f"with .generate), got {type(model).__name__}. Pass the policy, e.g. "
            "AutoModelForCausalLM wrapped with peft.get_peft_model."
        )
    return model


def special_ids(model, tokenizer) -> tuple[tuple[int, ...], int]:
    """(the ids that stop a response: the tokenizer's EOS and the generation config's, the pad
    id: the tokenizer's, else EOS with one warning)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ProbeConfigError(
            "tokenizer has no EOS token (tokenizer.eos_token_id is None): responses stop at EOS. "
            "Set tokenizer.eos_token to the model's end-of-sequence token."
        )
    ids = {int(eos)}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(e) for e in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        warnings.warn(
            "tokenizer has no pad token; the probe pads with the EOS id (masks come from stop "
            "positions, so this is harmless). Set tokenizer.pad_token to silence this.",
            EntropyProbeWarning,
            stacklevel=3,
        )
        pad = eos
    return tuple(sorted(ids)), int(pad)
