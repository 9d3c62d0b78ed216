"""A tiny character-level policy: tokenizer, Llama model and LoRA adapters.

Shared by the tests, the examples and the benchmarks. Everything here is built offline and
deterministically from a seed; nothing is downloaded. ``build_policy`` also accepts a local
checkpoint directory, so the same code paths run against a real model.

Example::

    model, tokenizer = build_policy(seed=0)          # tiny Llama + LoRA, about 100k parameters
    ids = tokenizer("3+4=")["input_ids"]             # one id per character
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Sequence

import peft
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
DEFAULT_ALPHABET = string.digits + string.ascii_lowercase + " +-*=?:."
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: one id per character, no automatic special tokens.

    Ids: ``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2, then the characters of ``alphabet`` in
    order (47 ids for the default alphabet). Characters outside the alphabet encode to ``<unk>``.
    Decoding joins the characters without inserting spaces, so ``decode(encode(s)) == s`` for
    any ``s`` over the alphabet. Padding is on the left, as generation needs.

    Args:
        alphabet: the characters of the vocabulary; must not repeat a character.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``pad_token`` and ``eos_token`` set (no BOS).
    """
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet repeats a character: {alphabet!r}; pass unique characters")
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    lm_head_std: float | None = None,
    attention_bias: bool = False,
    tie_word_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` sized for CPU tests (~90k parameters).

    The weights depend on ``seed`` only; the global torch RNG state is left exactly as it was.

    Args:
        tokenizer: gives the vocabulary size and the pad / eos / bos ids.
        hidden_size, num_layers, num_heads, intermediate_size, max_position_embeddings:
            the ``LlamaConfig`` sizes (``num_key_value_heads = num_heads``); 256 positions
            leave room for the probe's default ``max_new_tokens=128`` after a prompt (RoPE:
            no weights depend on it).
        seed: seed of the weight initialisation.
        dtype: parameter dtype.
        attn_implementation: "eager" or "sdpa".
        lm_head_std: init std of the output projection; None = ``1 / sqrt(hidden_size)``, so
            that the initial logits have unit scale. With the HF default (0.02) the logits,
            ``lm_head(rmsnorm(h))``, are capped near ``0.02 * hidden_size`` (about 1.3
            for 64), and LoRA on the frozen body could hardly sharpen the policy at all.
        attention_bias: biases on the attention projections (as Qwen2-style models have).
        tie_word_embeddings: share the input embedding with the output projection (then
            ``lm_head_std`` initialises the shared matrix).

    Returns:
        The model in train mode, on CPU, with ``generation_config`` pad / eos ids set.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        attention_bias=attention_bias,
        tie_word_embeddings=tie_word_embeddings,
    )
    config._attn_implementation = attn_implementation
    std = lm_head_std if lm_head_std is not None else 1.0 / math.sqrt(hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        torch.nn.init.normal_(model.lm_head.weight, mean=0.0, std=std)
    model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def add_lora(
    model: PreTrainedModel,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] = LORA_TARGET_MODULES,
    seed: int = 0,
) -> peft.PeftModel:
    """Wrap ``model`` in LoRA adapters; only the adapters stay trainable.

    ``lora_A`` is drawn from ``seed`` (the global torch RNG state is left untouched);
    ``lora_B`` starts at zero, so at step 0 the adapted model equals the base model.

    Args:
        model: a transformers causal LM (modified in place by peft).
        r: LoRA rank.
        alpha: LoRA scale numerator (the update is ``alpha / r * B @ A``).
        dropout: LoRA dropout probability.
        target_modules: names of the linear layers that get adapters.
        seed: seed of the ``lora_A`` initialisation.

    Returns:
        The ``peft.PeftModel`` wrapping ``model``.
    """
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def build_policy(
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    lora_r: int = 8,
    lora_dropout: float = 0.0,
    **model_kwargs: object,
) -> tuple[peft.PeftModel, PreTrainedTokenizerBase]:
    """A LoRA policy and its tokenizer: a local checkpoint, or the tiny character model.

    Args:
        checkpoint: a local directory holding a transformers causal LM and its tokenizer
            (loaded offline), or None for ``build_char_tokenizer`` + ``build_tiny_llama``.
            Hub names are refused: this function never downloads.
        seed: seed of the tiny model's weights and of the LoRA initialisation.
        dtype: parameter dtype.
        lora_r: LoRA rank (``alpha = 2 * lora_r``).
        lora_dropout: LoRA dropout probability.
        **model_kwargs: passed to ``build_tiny_llama`` (sizes), or to
            ``AutoModelForCausalLM.from_pretrained`` for a checkpoint.

    Returns:
        ``(model, tokenizer)``; the tokenizer pads on the left and has a pad token.
    """
    if checkpoint is None:
        tokenizer: PreTrainedTokenizerBase = build_char_tokenizer()
        base = build_tiny_llama(tokenizer, seed=seed, dtype=dtype, **model_kwargs)
    else:
        if not os.path.isdir(checkpoint):
            raise ValueError(
                f"checkpoint={str(checkpoint)!r} is not a local directory; pass a directory "
                "written by save_pretrained (build_policy never downloads), or None for the "
                "tiny model"
            )
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=dtype, local_files_only=True, **model_kwargs
        )
        if base.generation_config.pad_token_id is None:
            base.generation_config.pad_token_id = tokenizer.pad_token_id
    model = add_lora(base, r=lora_r, alpha=2 * lora_r, dropout=lora_dropout, seed=seed)
    return model, tokenizer
