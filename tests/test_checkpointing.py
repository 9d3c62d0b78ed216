"""The reverse derivative pass checkpoints the decoder layers the user's training checkpoints
(entropy_callback/checkpointing.py).

With gradient checkpointing enabled on the model (transformers' ``activation_checkpointing_enable``
on the base model of a peft LoRA model: decoder layers flagged, input-require-grads hook added),
the probe's reverse pass, which runs in eval mode with the flags off, must recompute each
flagged layer in its backward passes (counted: a layer's attention runs once in the forward and
once per backward, two per token), and give exactly the per-sequence terms, delta H_1 and SE
it gives without checkpointing, and the forward pass's. The user's flags, modes, hooks and
training stay bitwise as they were.

Models: the tiny float64 Llama, Qwen2 and GPT-2 of test_reverse.py (two layers, LoRA B random),
exact float64 arithmetic, so the two orders agree to rounding.
"""

from __future__ import annotations

import pytest
import torch
from test_reverse import PROMPTS, RTOL, _model

from entropy_callback import EntropyProbe
from entropy_callback.demos.tiny import build_char_tokenizer
from entropy_callback.observer import preserved_state
from entropy_callback.reverse import reverse_pass
from entropy_callback.scoring import Scorer, sequence_terms
from entropy_callback.update import probed_parameters, snapshot

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

LAYERS = 2  # test_reverse._model's models
# the same float64 numbers in the same order of operations (a recomputed layer repeats its
# forward's ops exactly): equal to the last bits; 1e-12 leaves room for nothing else
SAME = 1e-12


def _policy(kind: str, tokenizer, checkpointing: bool):
    model = _model(kind, tokenizer)
    if checkpointing:
        model.get_base_model().activation_checkpointing_enable()
    return model


def _attention_calls(model) -> list[int]:
    """A counter of calls of the decoder layers' attention modules (a pre-hook: it fires on a
    recomputation too, which may stop early after the layer's last saved tensor)."""
    calls = [0]
    for name, module in model.named_modules():
        if name.endswith(("self_attn", ".attn")):
            module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _layer_state(model) -> dict[str, tuple]:
    """What the probe must leave as it found it on every module: its mode, checkpointing flag,
    instance attributes (by identity) and forward hooks."""
    return {n: (m.training, getattr(m, "gradient_checkpointing", None),
                {k: id(v) for k, v in m.__dict__.items() if k != "_forward_hooks"},
                list(m._forward_hooks.items()))
            for n, m in model.named_modules()}


@pytest.mark.parametrize("kind", ["llama_untied", "qwen2", "gpt2"])
def test_reverse_pass_recomputes_the_checkpointed_layers_with_the_same_terms(kind):
    """Per microbatch the terms of the reverse pass with the user's checkpointing equal those
    without (to the last bits) and the forward pass's (1e-10), and each layer runs 3 times
    (forward + one recomputation per backward, P and C per token) instead of once."""
    tokenizer = build_char_tokenizer()
    got, calls = {}, {}
    for on in (True, False):
        model = _policy(kind, tokenizer, on)
        probe = EntropyProbe(model, tokenizer, PROMPTS, batch_size=12, max_new_tokens=6)
        theta = snapshot(probe.params)
        gen = torch.Generator().manual_seed(2)
        u = {n: torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in theta.items()}
        counter = _attention_calls(model)
        before = _layer_state(model)
        with preserved_state(model):
            batch = probe._sample(0)
            scorer = Scorer(model, 0.9, 5)
            scorer.score(batch.slice(0, 1))  # the split's one-row check, outside the count
            mbs = [batch.slice(0, 7), batch.slice(7, 12)]
            diagnostics: dict = {}
            counter[0] = 0
            got[on] = [t for _, _, t in reverse_pass(scorer, probe.params, iter(mbs), theta, u,
                                                      "per_token", diagnostics)]
            calls[on] = counter[0]
            want = [sequence_terms(*scorer.score_with_tangent(mb, theta, u)[:2],
                                   mb.response_mask, *scorer.score_with_tangent(mb, theta, u)[2:])
                    for mb in mbs]
        assert diagnostics["reverse_check_gap"] < 1e-12
        assert _layer_state(model) == before
        for g, w in zip(got[on], want, strict=True):
            torch.testing.assert_close(g["A"], w["A"] + w["Bsum"], rtol=RTOL, atol=1e-12)
            torch.testing.assert_close(g["C"], w["C"], rtol=RTOL, atol=1e-12)
    assert calls == {True: 3 * LAYERS * len(mbs), False: LAYERS * len(mbs)}
    for a, b in zip(got[True], got[False], strict=True):
        for key in ("A", "C", "h", "S", "T"):
            torch.testing.assert_close(a[key], b[key], rtol=SAME, atol=SAME * b[key].abs().max())


def _training_grads(model, tokenizer) -> tuple[dict[str, torch.Tensor], int]:
    """A training-mode forward + backward (the user's checkpointing on where it was): the
    gradients and the attention calls."""
    counter = _attention_calls(model)
    model.train()
    model.zero_grad()
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    model(**enc, labels=enc["input_ids"]).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, counter[0]


def _stepped(checkpointing: bool, tokenizer):
    """The policy after one AdamW step of a fixed loss on its probed parameters, and its
    optimizer (the gradients of that loss still in place)."""
    model = _policy("llama_untied", tokenizer, checkpointing)
    params = probed_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    sum((p * torch.randn(p.shape, generator=gen, dtype=p.dtype)).sum()
        for p in params.values()).backward()
    return model, optimizer


@pytest.mark.parametrize("normalize", ["per_token", "per_sequence"])
def test_a_probed_step_with_checkpointing_equals_one_without(normalize, observer):
    """End to end, through a real AdamW step (the live parameters are theta' when the reverse
    pass substitutes theta: a recomputation at the live parameters would be off): delta H_1, its
    SE and the per-sequence contributions with the user's checkpointing equal those without (to
    the last bits) and the forward pass's (1e-10); the observer's snapshot and every module's
    state are bitwise unchanged, and a training step after the probe is bitwise the unprobed
    twin's, its own checkpointing still on (each layer recomputed once)."""
    tokenizer = build_char_tokenizer()
    results, calls, models = {}, {}, {}
    for on in (True, False):
        model, optimizer = _stepped(on, tokenizer)
        probes = {d: EntropyProbe(model, tokenizer, PROMPTS, batch_size=12, microbatch_size=5,
                                  max_new_tokens=6, temperature=0.9, normalize=normalize,
                                  strict=True, derivative=d, log_level="debug")
                  for d in ("forward", "reverse")}
        for probe in probes.values():
            probe.before_step(optimizer)
        optimizer.step()
        state, modules = observer.capture(model, optimizer), _layer_state(model)
        counter = _attention_calls(model)
        results[on] = {"forward": probes["forward"].after_step()}
        counter[0] = 0
        results[on]["reverse"] = probes["reverse"].after_step()
        calls[on] = counter[0]
        assert observer.differences(state, observer.capture(model, optimizer)) == []
        assert _layer_state(model) == modules
        models[on] = model
    backwards = 2 if normalize == "per_token" else 1
    microbatches = 3  # 12 sequences in microbatches of 5
    # the probe's other passes (sampling, rescoring) run each layer as often in both
    assert calls[True] - calls[False] == backwards * LAYERS * microbatches
    on, off = results[True], results[False]
    for name in ("deltaH1", "deltaH1_se", "H_orig", "deltaH_true"):
        assert getattr(on["reverse"], name) == pytest.approx(getattr(off["reverse"], name),
                                                             rel=SAME), name
    assert on["reverse"].deltaH1 == pytest.approx(on["forward"].deltaH1, rel=RTOL)
    assert on["reverse"].deltaH1_se == pytest.approx(on["forward"].deltaH1_se, rel=RTOL)
    torch.testing.assert_close(torch.tensor(on["reverse"].sequences["deltaH1_contribution"]),
                               torch.tensor(off["reverse"].sequences["deltaH1_contribution"]),
                               rtol=SAME, atol=SAME * abs(off["reverse"].deltaH1))
    twin, twin_optimizer = _stepped(True, tokenizer)
    twin_optimizer.step()
    probed, probed_calls = _training_grads(models[True], tokenizer)
    unprobed, twin_calls = _training_grads(twin, tokenizer)
    assert probed_calls == twin_calls == 2 * LAYERS  # forward + the user's recomputation
    assert probed.keys() == unprobed.keys()
    assert all(torch.equal(probed[n], unprobed[n]) for n in probed)
