"""Progress and logs: INFO lines per phase and per probe, a rank-0 progress hook, silence by
default, and the Lightning progress bar's postfix."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from probe_harness import grpo_module, make_trainer, probe_callback, probe_prompts, tiny_policy

from entropy_callback import EntropyProbe, ProbeConfig
from entropy_callback.testing import randomize_lora_b


def _probe_once(probe, model, tok):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    enc = tok(probe_prompts(4), return_tensors="pt", padding=True)
    model(**enc, labels=enc["input_ids"]).loss.backward()
    probe.before_step(opt, step=3)
    opt.step()
    return probe.after_step()


def _engine(**options):
    model, tok = tiny_policy()
    randomize_lora_b(model, std=0.05, seed=1)
    config = ProbeConfig(batch_size=6, microbatch_size=4, max_new_tokens=3, **options)
    return EntropyProbe(model, tok, probe_prompts(), config), model, tok


def test_each_phase_and_each_probe_log_one_info_line(caplog):
    probe, model, tok = _engine()
    with caplog.at_level(logging.INFO, logger="entropy_callback"):
        result = _probe_once(probe, model, tok)
    assert result.error is None
    lines = [r.getMessage() for r in caplog.records if r.name == "entropy_callback"]
    for phase in ("sampling", "derivative", "rescoring"):
        assert sum(f"probe step 3: {phase}, 6 sequences" in line for line in lines) == 1, lines
    assert sum("deltaH1" in line and "deltaH_true" in line for line in lines) == 1, lines


def test_the_progress_hook_sees_every_microbatch_on_rank_0_only():
    probe, model, tok = _engine()
    seen = []
    probe.on_progress = lambda phase, done, total: seen.append((phase, done, total))
    _probe_once(probe, model, tok)
    assert ("sampling", 0, 6) in seen
    for phase in ("derivative", "rescoring"):
        assert [(d, t) for p, d, t in seen if p == phase] == [(4, 6), (6, 6)]
    seen.clear()
    probe.rank = 1  # another rank: never told (its sampling shard is the same here)
    _probe_once(probe, model, tok)
    assert seen == []


def test_a_failing_progress_hook_is_dropped_and_the_probe_goes_on():
    probe, model, tok = _engine()

    def broken(phase, done, total):
        raise RuntimeError("display gone")

    probe.on_progress = broken
    result = _probe_once(probe, model, tok)
    assert result.error is None and result.deltaH1 is not None
    assert probe.on_progress is None


def test_nothing_is_printed_unless_logging_is_configured(capfd):
    probe, model, tok = _engine()
    _probe_once(probe, model, tok)
    out, err = capfd.readouterr()
    assert "probe step" not in out + err


def test_the_lightning_tqdm_bar_shows_the_probe_phase(tmp_path):
    shown = []

    class Recording(TQDMProgressBar):
        def init_train_tqdm(self):
            bar = super().init_train_tqdm()
            set_postfix_str = bar.set_postfix_str

            def record(text="", refresh=True):
                shown.append(text)
                set_postfix_str(text, refresh=refresh)

            bar.set_postfix_str = record
            return bar

    callback = probe_callback(every=2)
    trainer = make_trainer(tmp_path, [callback, Recording()], max_steps=3,
                           enable_progress_bar=True)
    trainer.fit(grpo_module())
    assert any(text.startswith("probe derivative") for text in shown), shown
    assert any(text.startswith("probe rescoring 8/8") for text in shown), shown


def test_another_progress_bar_shows_nothing_and_the_run_goes_on(tmp_path):
    callback = probe_callback(every=2)
    trainer = make_trainer(tmp_path, [callback, RichProgressBar()], max_steps=3,
                           enable_progress_bar=True)
    trainer.fit(grpo_module())
    assert callback.probe.on_progress is None
    assert trainer.global_step == 3
