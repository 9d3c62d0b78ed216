"""The demo factory and the toy GRPO task.

Tokenizer, tiny Llama, LoRA, the KV-cache sampler, the teacher-forced scorer, and real Lightning
training runs of GRPOModule.
"""

from __future__ import annotations

import lightning
import pytest
import torch

from entropy_callback.demos import (
    DEFAULT_ALPHABET,
    EOS_TOKEN,
    GRPOModule,
    add_lora,
    build_char_tokenizer,
    build_policy,
    build_tiny_llama,
    make_prompts,
    prompt_dataloader,
    reward,
    sample_responses,
    score_responses,
    warmup_cosine,
)


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


class MetricsRecorder(lightning.Callback):
    """Keeps the metrics that training_step logged, one dict per optimizer step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit_grpo(seed: int, steps: int, **overrides) -> tuple[GRPOModule, MetricsRecorder]:
    lightning.seed_everything(seed, verbose=False)
    model, tokenizer = build_policy(seed=seed)
    module = GRPOModule(model, tokenizer, make_prompts(256, seed=seed), seed=seed, **overrides)
    recorder = MetricsRecorder()
    trainer = lightning.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[recorder],
    )
    trainer.fit(module)
    assert trainer.global_step == steps
    return module, recorder


def test_char_tokenizer_round_trips_one_id_per_character():
    tok = build_char_tokenizer()
    assert len(tok) == 3 + len(DEFAULT_ALPHABET) < 50
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", 0)
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id is not None
    assert tok.padding_side == "left"
    text = "3+4= hello  world?:.*-"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one id per character, no special tokens added
    assert tok.decode(ids) == text  # no spaces inserted between characters
    assert tok.convert_ids_to_tokens(ids) == list(text)
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == text
    assert tok("A")["input_ids"] == [tok.unk_token_id]


def test_char_tokenizer_pads_on_the_left():
    tok = build_char_tokenizer()
    enc = tok(["1+2=", "a"], padding=True, return_tensors="pt")
    assert enc["input_ids"][1].tolist() == [0, 0, 0, tok.convert_tokens_to_ids("a")]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 0, 1]]


def test_char_tokenizer_refuses_a_repeated_character():
    with pytest.raises(ValueError, match="repeats"):
        build_char_tokenizer("abca")


def test_tiny_llama_depends_on_the_seed_only_and_leaves_the_global_rng_alone():
    tok = build_char_tokenizer()
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    a = build_tiny_llama(tok, seed=3).state_dict()
    b = build_tiny_llama(tok, seed=3).state_dict()
    c = build_tiny_llama(tok, seed=4).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    model = build_tiny_llama(tok)
    assert model.config.vocab_size == len(tok) and not model.config.tie_word_embeddings
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_tiny_llama_starts_near_uniform_but_can_sharpen():
    """The lm_head init gives unit-scale logits: high entropy, yet not capped near uniform."""
    tok = build_char_tokenizer()
    model = build_tiny_llama(tok)
    with torch.no_grad():
        logp = model(**tok(make_prompts(8), return_tensors="pt")).logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    uniform = torch.log(torch.tensor(float(len(tok))))
    assert ((entropy > uniform - 1.0) & (entropy < uniform)).all()
    row_norm = model.lm_head.weight.norm(dim=-1).mean()
    assert row_norm * model.config.hidden_size**0.5 > 5.0  # reachable logit, in nats


def test_lora_adapters_are_the_only_trainable_parameters_and_start_as_a_no_op():
    tok = build_char_tokenizer()
    enc = tok(make_prompts(4), return_tensors="pt")
    base = build_tiny_llama(tok)
    with torch.no_grad():
        expected = base(**enc).logits
    before = torch.get_rng_state()
    model = add_lora(base, r=4, alpha=8, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * base.config.num_hidden_layers  # A and B per target
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, expected)  # lora_B = 0
    again = add_lora(build_tiny_llama(tok), r=4, alpha=8, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(lora_state(model).values(),
                                                   lora_state(again).values(), strict=True))


def test_build_policy_loads_a_local_checkpoint_offline(tmp_path):
    tok = build_char_tokenizer()
    base = build_tiny_llama(tok, seed=7)
    base.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, loaded_tok = build_policy(str(tmp_path), seed=7, attn_implementation="eager")
    fresh, _ = build_policy(seed=7)
    assert loaded_tok.padding_side == "left" and loaded_tok.pad_token_id == tok.pad_token_id
    assert loaded_tok.decode(loaded_tok("9+9=")["input_ids"]) == "9+9="
    enc = tok(make_prompts(4), return_tensors="pt")
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, fresh(**enc).logits, atol=1e-6)
    assert any(p.requires_grad for p in model.parameters())


def test_build_policy_refuses_a_name_that_is_not_a_local_directory(tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        build_policy(str(tmp_path / "org/some-hub-model"))


def test_prompts_and_reward():
    assert make_prompts(20, seed=1) == make_prompts(20, seed=1) != make_prompts(20, seed=2)
    state = torch.get_rng_state()
    prompts = make_prompts(200, seed=0)
    assert torch.equal(state, torch.get_rng_state())
    assert all(len(p) == 4 and p[1] == "+" and p[3] == "=" for p in prompts)
    assert reward("3+4=", "7" + EOS_TOKEN) == 1.0
    assert reward("9+8=", "7" + EOS_TOKEN) == 1.0  # mod 10
    assert reward("3+4=", "8" + EOS_TOKEN) == 0.5
    assert reward("3+4=", "7x" + EOS_TOKEN) == pytest.approx(0.4)
    assert reward("3+4=", EOS_TOKEN) == pytest.approx(0.2)
    assert reward("3+4=", "777777") == pytest.approx(0.2)  # cut at max_new_tokens
    assert reward("3+4=", "abcdef") == 0.0
    with pytest.raises(ValueError):
        reward("34=", "7" + EOS_TOKEN)


def test_prompt_dataloader_is_deterministic_lists_of_prompts():
    prompts = make_prompts(10, seed=0)
    first = list(prompt_dataloader(prompts, 4, seed=3, num_batches=6))
    assert first == list(prompt_dataloader(prompts, 4, seed=3, num_batches=6))
    assert first != list(prompt_dataloader(prompts, 4, seed=4, num_batches=6))
    assert len(first) == 6 and all(isinstance(b, list) and len(b) == 4 for b in first)
    drawn = [p for b in first for p in b]
    assert sorted(drawn[:10]) == sorted(prompts)  # shuffled passes: each pass is a permutation


def test_warmup_cosine_schedule():
    factors = [warmup_cosine(s, warmup_steps=10, total_steps=200) for s in range(250)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[200] == pytest.approx(0.1) and factors[249] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


def reference_sample(model, ids, mask, max_new_tokens, eos, pad):
    """Cache-free sampler: full forward per token, same RNG draws as ``sample_responses``."""
    n = ids.shape[0]
    finished = torch.zeros(n, dtype=torch.bool)
    tokens = []
    for _ in range(max_new_tokens):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        y = torch.multinomial(torch.softmax(logits[:, -1].float(), -1), 1).squeeze(-1)
        y = torch.where(finished, torch.full_like(y, pad), y)
        tokens.append(y)
        ids = torch.cat([ids, y[:, None]], -1)
        mask = torch.cat([mask, (~finished).long()[:, None]], -1)
        finished |= y == eos
        if finished.all():
            break
    return torch.stack(tokens, 1)


def test_sampler_draws_from_the_teacher_forced_distribution():
    """Left padding, the KV cache and the stop rule agree with a plain full-forward sampler,
    and the scorer's log-probs at padded positions equal those of each sequence alone."""
    model, tok = build_policy(seed=0)
    with torch.no_grad():  # make the adapters non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    prompts = ["3+4=", "12+3=", "5=", "a", "9+9=", "0+0=:"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(11)
    ids, lengths = sample_responses(model, enc["input_ids"], enc["attention_mask"],
                                    max_new_tokens=8, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(11)
    expected = reference_sample(model, enc["input_ids"], enc["attention_mask"], 8, eos, pad)
    assert torch.equal(ids, expected)
    for row, n in zip(ids, lengths, strict=True):
        stop = (row == eos).nonzero()
        assert int(n) == (int(stop[0]) + 1 if len(stop) else ids.shape[1])
        assert (row[int(n):] == pad).all()

    token_logp, token_entropy, mask = score_responses(
        model, enc["input_ids"], enc["attention_mask"], ids, lengths)
    assert token_logp.requires_grad and not token_entropy.requires_grad
    assert torch.equal(mask.sum(-1).long(), lengths)
    assert (token_logp[mask == 0] == 0).all() and (token_entropy[mask == 0] == 0).all()
    for i, prompt in enumerate(prompts):
        alone = tok(prompt, return_tensors="pt")["input_ids"]
        n = int(lengths[i])
        full = torch.cat([alone, ids[i : i + 1, :n]], -1)
        with torch.no_grad():
            logp = model(input_ids=full).logits[0, alone.shape[1] - 1 : -1].log_softmax(-1)
        expected_logp = logp.gather(-1, ids[i, :n, None]).squeeze(-1)
        assert torch.allclose(token_logp[i, :n], expected_logp, atol=1e-5)
        assert torch.allclose(token_entropy[i, :n], -(logp.exp() * logp).sum(-1), atol=1e-5)


def test_training_step_returns_group_centred_advantages():
    lightning.seed_everything(0, verbose=False)
    model, tok = build_policy(seed=0)
    module = GRPOModule(model, tok, make_prompts(16), group_size=4, prompts_per_step=3)
    module.log = lambda *args, **kwargs: None  # no trainer attached
    out = module.training_step(make_prompts(3, seed=5), 0)
    assert out["loss"].requires_grad and out["loss"].ndim == 0
    assert out["rewards"].shape == out["advantages"].shape == (12,)
    assert torch.allclose(out["advantages"].view(3, 4).sum(-1), torch.zeros(3), atol=1e-6)
    assert ((out["rewards"] >= 0) & (out["rewards"] <= 1)).all()


def test_grpo_training_is_reproducible_and_collapses_entropy():
    """30 real Lightning steps at lr 3e-3: the policy learns the format and loses entropy.

    Thresholds: over seeds 0-9 (measured) the mean reward rose by 0.26-0.44 from the first
    10 steps to the last 10, the mean entropy fell by 1.1-3.1 nats per token, and it started
    at 2.7-3.4; the asserted 0.15, 0.75 and 2.5 leave a margin.
    """
    seed, steps = 0, 30
    module, recorder = fit_grpo(seed, steps, lr=3e-3)
    start = lora_state(build_policy(seed=seed)[0])
    end = lora_state(module.model)
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start)

    rows = recorder.rows
    assert len(rows) == steps
    first, last = rows[:10], rows[-10:]

    def mean(key, part):
        return sum(r[key] for r in part) / len(part)

    assert mean("train/reward", last) > mean("train/reward", first) + 0.15
    assert mean("train/entropy", last) < mean("train/entropy", first) - 0.75
    assert mean("train/entropy", first) > 2.5

    again, _ = fit_grpo(seed, steps, lr=3e-3)
    assert all(torch.equal(v, lora_state(again.model)[k]) for k, v in end.items())
