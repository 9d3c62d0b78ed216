"""Tiny offline policies and a toy GRPO task, for tests, examples and benchmarks."""

from entropy_callback.demos.grpo import (
    GRPOModule,
    PromptBatches,
    answer,
    make_prompts,
    prompt_dataloader,
    reward,
    sample_responses,
    score_responses,
    warmup_cosine,
)
from entropy_callback.demos.tiny import (
    DEFAULT_ALPHABET,
    EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    add_lora,
    build_char_tokenizer,
    build_policy,
    build_tiny_llama,
)

__all__ = [
    "DEFAULT_ALPHABET",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "GRPOModule",
    "PromptBatches",
    "add_lora",
    "answer",
    "build_char_tokenizer",
    "build_policy",
    "build_tiny_llama",
    "make_prompts",
    "prompt_dataloader",
    "reward",
    "sample_responses",
    "score_responses",
    "warmup_cosine",
]
