"""The HF adapter's lifecycle on a real transformers.Trainer: a train() that raised is released
and a resume in the same process continues its run (one directory, each step once), with a new
callback or the same one; a probe whose step hook never came is still recorded, as under
Lightning (issues 17 and 18)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import transformers
from test_hf import PROBE, plain_trainer, step_files, train

from entropy_callback import ProbeConfigError
from entropy_callback.demos.grpo import make_prompts
from entropy_callback.hf import EntropyProbeTrainerCallback
from entropy_callback.runlog import load_run

pytestmark = pytest.mark.usefixtures("single_thread")
CRASH = 3


class DiesAt(transformers.TrainerCallback):
    """The user's callback raising at the start of step CRASH while ``armed``."""

    armed = True

    def on_step_begin(self, args, state, control, **kwargs):
        if self.armed and state.global_step == CRASH:
            raise RuntimeError("the run died")


def _probe() -> EntropyProbeTrainerCallback:
    return EntropyProbeTrainerCallback(make_prompts(8, seed=123), every=1, max_new_tokens=3,
                                       **PROBE)


@pytest.mark.parametrize("reuse", [False, True], ids=["new-callback", "same-callback"])
def test_crash_then_resume_in_one_process_continues_the_run(tmp_path, reuse):
    """train() raises at step 3 (checkpoints every step); a new Trainer in the same process
    resumes from checkpoint-3: one run directory, steps 0..4 once each. e619d40 split the run
    (the dead train()'s lock still held) or, reusing the callback, probed the old model."""
    first, dies = _probe(), DiesAt()
    trainer = plain_trainer(tmp_path, first, steps=5, save_strategy="steps", save_steps=1)
    trainer.add_callback(dies)
    with pytest.raises(RuntimeError, match="the run died"):
        train(trainer)
    assert first.probed_steps == [0, 1, 2]
    dies.armed = False
    second = first if reuse else _probe()
    trainer = plain_trainer(tmp_path, second, steps=5, save_strategy="steps", save_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{CRASH}"))
    assert not [w for w in caught if "locked" in str(w.message)]
    assert second.probe.model is trainer.model
    assert sorted(p.name for p in tmp_path.glob("entropy_probe*")) == ["entropy_probe"]
    assert second.run_dir == tmp_path / "entropy_probe" and step_files(second.run_dir) == [
        0, 1, 2, 3, 4]
    lines = (second.run_dir / "probes.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3, 4]  # once each
    assert [r["step"] for r in load_run(second.run_dir)] == [0, 1, 2, 3, 4]
    assert all(r.get("error") is None for r in load_run(second.run_dir))


class DropsOneHook(transformers.trainer_callback.CallbackHandler):
    """A trainer that does not deliver ``on_optimizer_step`` at step 1 (a custom loop)."""

    def on_optimizer_step(self, args, state, control):
        if state.global_step == 1:
            return control
        return super().on_optimizer_step(args, state, control)


def test_a_step_whose_hook_never_came_is_recorded_not_dropped(tmp_path: Path):
    """The session reads each probed step in the optimizer's own post-hook, under HF as under
    Lightning: a missing trainer hook costs nothing (e619d40 dropped the probe at the next
    step). The record is the exact rebuild of that step."""
    probe = _probe()
    trainer = plain_trainer(tmp_path, probe, steps=3)
    trainer.callback_handler.__class__ = DropsOneHook
    assert not train(trainer)
    assert probe.probed_steps == [0, 1, 2] and step_files(probe.run_dir) == [0, 1, 2]
    for record in load_run(probe.run_dir):
        assert record["update_source"] == "adam_reconstruction"
        assert record["update_cosine"] >= 1 - 1e-9


def test_attribution_is_refused_at_construction_naming_the_option():
    """The Trainer hands callbacks no rollouts: attribution=True cannot be honoured (e619d40
    accepted it silently and kept every probe's snapshots)."""
    with pytest.raises(ProbeConfigError, match="attribution=True needs the step's rollouts"):
        EntropyProbeTrainerCallback(make_prompts(4), every=1, attribution=True)
