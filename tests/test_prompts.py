"""The held-out prompt pool: token-id prompts, special tokens, the model's context, and where
``EntropyProbeCallback(every=20)`` finds its prompts. Real models and a real Trainer."""

from __future__ import annotations

import warnings

import lightning
import pytest
import torch
from probe_harness import (
    SMALL_PROBE,
    backward_on,
    fit,
    grpo_module,
    make_trainer,
    probe_prompts,
    probe_warnings,
    tiny_policy,
)
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from entropy_callback import EntropyProbe, EntropyProbeCallback, ProbeConfigError
from entropy_callback.demos import make_prompts, prompt_dataloader
from entropy_callback.demos.tiny import (
    DEFAULT_ALPHABET,
    add_lora,
    build_char_tokenizer,
    build_tiny_llama,
)


def probe_once(probe: EntropyProbe, model: torch.nn.Module, tokenizer, step: int = 0):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    backward_on(model, tokenizer)
    probe.before_step(optimizer, step=step)
    optimizer.step()
    return probe.after_step()


def constructed(make):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        made = make()
    return made, probe_warnings(caught)


# ------------------------------------------------------------------ the model's context
@pytest.fixture(scope="module")
def gpt2():
    """A one-layer GPT-2 with 16 learned positions: an index past them is an IndexError."""
    tokenizer = build_char_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2,
                        n_positions=16, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    return model, tokenizer


def test_prompt_beyond_the_models_positions_is_an_error_naming_index_and_lengths(gpt2):
    model, tokenizer = gpt2
    prompts = ["1+2=", "1234567890123", "3+4=", "123456789012345"]
    with pytest.raises(ProbeConfigError) as info:
        EntropyProbe(model, tokenizer, prompts, **{**SMALL_PROBE, "max_new_tokens": 4})
    message = str(info.value)
    for words in ("prompt 1 (13 tokens)", "prompt 3 (15 tokens)", "max_new_tokens=4",
                  "max_position_embeddings=16", "at most 12 prompt tokens fit"):
        assert words in message, (words, message)
    assert "prompt 0" not in message and "prompt 2" not in message


def test_max_new_tokens_alone_past_the_context_is_an_error(gpt2):
    model, tokenizer = gpt2
    # the fix it names works: 4 prompt tokens + 12 new tokens fill the 16 positions exactly
    with pytest.raises(ProbeConfigError, match=r"Lower max_new_tokens to at most 12 \(the "
                       r"longest prompt has 4 tokens\)"):
        EntropyProbe(model, tokenizer, ["1+2="], batch_size=4, max_new_tokens=16)
    EntropyProbe(model, tokenizer, ["1+2="], batch_size=4, max_new_tokens=12)


def test_prompt_that_exactly_fills_the_context_probes(gpt2):
    # 12 prompt tokens + 4 new tokens = the 16 positions: accepted, and the probe (sampling,
    # derivative pass, rescoring) runs at every one of them without an index error.
    model, tokenizer = gpt2
    model = GPT2LMHeadModel(model.config)  # a fresh copy: this test takes an optimizer step
    probe = EntropyProbe(model, tokenizer, ["123456789012"], **SMALL_PROBE)
    result = probe_once(probe, model, tokenizer)
    assert result.ok, result.error
    assert int(result.T_E) > 0


# ------------------------------------------------------------------ token-id prompts
def test_token_id_prompts_are_used_as_given():
    model, tokenizer = tiny_policy()
    texts = probe_prompts(4)
    ids = [tokenizer(t)["input_ids"] for t in texts]
    pool = [ids[0], tuple(ids[1]), torch.tensor(ids[2]), texts[3]]
    probe = EntropyProbe(model, tokenizer, pool, **SMALL_PROBE)
    assert probe.prompt_token_ids == ids
    assert probe.prompts == texts  # decoded for the per-sequence records
    result = probe_once(probe, model, tokenizer)
    assert result.ok, result.error


def test_token_ids_outside_the_vocabulary_are_an_error():
    model, tokenizer = tiny_policy()
    with pytest.raises(ProbeConfigError, match=r"prompts \[1\] hold token ids >= .*vocabulary"):
        EntropyProbe(model, tokenizer, [[5, 6], [5, len(tokenizer)]], **SMALL_PROBE)


# ------------------------------------------------------------------ special tokens, BOS
BOS = "<bos>"


def bos_policy():
    """A character tokenizer that prepends BOS to every text (like Llama's), and a LoRA Llama
    over its vocabulary."""
    specials = ["<pad>", "<eos>", "<unk>", BOS]
    vocab = {tok: i for i, tok in enumerate([*specials, *DEFAULT_ALPHABET])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        bos_token=BOS, padding_side="left")
    model = add_lora(build_tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2,
                                      intermediate_size=32))
    return model, tokenizer


def test_chat_templated_prompt_with_a_bos_adding_tokenizer_warns_once_about_the_double_bos():
    model, tokenizer = bos_policy()
    bos = tokenizer.bos_token_id
    templated = [f"{BOS}2+3=", f"{BOS}4+4=", "5+1="]
    probe, messages = constructed(lambda: EntropyProbe(model, tokenizer, templated, **SMALL_PROBE))
    assert [ids[:2] for ids in probe.prompt_token_ids[:2]] == [[bos, bos], [bos, bos]]
    assert len(messages) == 1, messages
    assert "prompts [0, 1] start with a doubled BOS" in messages[0]
    assert "add_special_tokens=False" in messages[0]

    probe, messages = constructed(lambda: EntropyProbe(
        model, tokenizer, templated, add_special_tokens=False, **SMALL_PROBE))
    assert messages == []
    assert [ids[0] for ids in probe.prompt_token_ids] == [bos, bos, tokenizer("5")["input_ids"][1]]
    assert probe.prompt_token_ids[0][1] != bos


# ------------------------------------------------------------------ where the prompts come from
class HeldOut(lightning.LightningDataModule):
    def __init__(self, probe_prompts=None, **attrs):
        super().__init__()
        self.probe_prompts = probe_prompts
        for name, value in attrs.items():
            setattr(self, name, value)

    def train_dataloader(self):
        return prompt_dataloader(make_prompts(32), 4)


def run(tmp_path, callback, module, datamodule=None) -> list[str]:
    trainer = make_trainer(tmp_path, [callback], 1)
    return fit(trainer, module, datamodule=datamodule)


def test_callback_without_prompts_reads_the_modules_probe_prompts(tmp_path):
    callback = EntropyProbeCallback(every=1, **SMALL_PROBE)
    module = grpo_module(probe_prompts=probe_prompts(6))
    run(tmp_path, callback, module, HeldOut(probe_prompts(3)))  # the module's come first
    assert callback.probe.prompts == probe_prompts(6)
    assert callback.probed_steps == [0] and callback.last_result.ok


def test_callback_without_prompts_reads_the_datamodules_probe_prompts(tmp_path):
    callback = EntropyProbeCallback(every=1, **SMALL_PROBE)
    run(tmp_path, callback, grpo_module(), HeldOut(probe_prompts(3)))
    assert callback.probe.prompts == probe_prompts(3)
    assert callback.probed_steps == [0] and callback.last_result.ok


def test_prompts_attr_names_another_attribute(tmp_path):
    callback = EntropyProbeCallback(every=1, prompts_attr="heldout", **SMALL_PROBE)
    run(tmp_path, callback, grpo_module(), HeldOut(heldout=probe_prompts(5)))
    assert callback.probe.prompts == probe_prompts(5)


def test_no_prompts_anywhere_is_an_error_at_setup_naming_every_option(tmp_path):
    trainer = make_trainer(tmp_path, [EntropyProbeCallback(every=1, **SMALL_PROBE)], 1)
    with pytest.raises(ProbeConfigError) as info:
        fit(trainer, grpo_module(), datamodule=HeldOut())
    message = str(info.value)
    for words in ("prompts=[...]", "pl_module.probe_prompts", "trainer.datamodule.probe_prompts",
                  "GRPOModule.probe_prompts", "prompts_attr="):
        assert words in message, (words, message)
    assert trainer.global_step == 0


def test_bad_attached_prompts_are_an_error_naming_where_they_came_from(tmp_path):
    trainer = make_trainer(tmp_path, [EntropyProbeCallback(every=1, **SMALL_PROBE)], 1)
    with pytest.raises(ProbeConfigError, match=r"^pl_module\.probe_prompts: prompts must be .*"
                       r"wrap a single prompt in a list"):
        fit(trainer, grpo_module(probe_prompts="2+3="))
