"""A fit that ends by an exception releases its run; a resume in the same process continues it
(one directory, each step once), with a new callback or the same one; Lightning's default
resume into a new logger version continues the run id there; changing only how the run is
logged continues the run; and nothing the callback calls raises into training (issue 17).

Real Lightning Trainers on the tiny LoRA policy, real checkpoints, records read back.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from probe_harness import (
    fit,
    grpo_module,
    jsonl_records,
    make_trainer,
    probe_callback,
    probe_dir,
    step_record,
)

from entropy_callback import EntropyProbeWarning, load_run
from entropy_callback.demos import GRPOModule
from entropy_callback.result import ResultDraft
from entropy_callback.runs import read_run_meta

CRASH = 4  # training_step raises at this global step, in the first fit only


class CrashOnce(GRPOModule):
    """Raises in training_step at global step CRASH while ``crash`` is set."""

    crash = True

    def training_step(self, batch, batch_idx):
        if self.crash and self.trainer.global_step == CRASH:
            raise RuntimeError("the run died")
        return super().training_step(batch, batch_idx)


def _checkpoints(root) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1)


@pytest.mark.parametrize("reuse", [False, True], ids=["new-callback", "same-callback"])
def test_crash_then_resume_in_one_process_continues_the_run(tmp_path, reuse):
    """fit raises at step 4; a second fit in the same process resumes from the step-4
    checkpoint: one run directory, steps 0..5 once each, no lock left behind."""
    first = probe_callback(every=1)
    module = grpo_module(cls=CrashOnce)
    trainer = make_trainer(tmp_path, [first, _checkpoints(tmp_path)], 6,
                           enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="the run died"):
        fit(trainer, module)
    assert first.probed_steps == [0, 1, 2, 3]
    module.crash = False
    second = first if reuse else probe_callback(every=1)
    trainer = make_trainer(tmp_path, [second, _checkpoints(tmp_path)], 6,
                           enable_checkpointing=True)
    messages = fit(trainer, module, ckpt_path=str(tmp_path / "ckpt" / f"epoch=0-step={CRASH}.ckpt"))
    assert not [m for m in messages if "locked" in m or "new run" in m], messages
    assert second.probe.model is module.model
    runs = sorted(p.name for p in probe_dir(tmp_path).parent.glob("entropy_probe*")
                  if p.name != "entropy_probe_layout")
    assert runs == ["entropy_probe"]
    assert [r["step"] for r in jsonl_records(tmp_path)] == list(range(6))  # once each
    assert second.probed_steps == list(range(6))
    assert read_run_meta(probe_dir(tmp_path))["resumed_at_step"] == CRASH


def test_resume_into_a_new_logger_version_continues_the_run_id(tmp_path):
    """Lightning's default resume: fit(ckpt_path=...) with a new TensorBoardLogger, which
    writes version_1. The new version's run directory carries the checkpoint's run id and the
    step it resumed at; together the two segments hold every step once, the later segment's
    record of a step run again superseding the earlier one's."""
    first = probe_callback(every=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path, [first, ckpt], 6, enable_checkpointing=True,
                           logger=TensorBoardLogger(str(tmp_path), name="run"))
    fit(trainer, grpo_module())
    second = probe_callback(every=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt2", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path, [second, ckpt], 8, enable_checkpointing=True,
                           logger=TensorBoardLogger(str(tmp_path), name="run"))
    fit(trainer, grpo_module(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    v0, v1 = (tmp_path / "run" / f"version_{v}" / "entropy_probe" for v in (0, 1))
    meta0, meta1 = read_run_meta(v0), read_run_meta(v1)
    assert meta1["run_id"] == meta0["run_id"] == first.run_logger.run_id
    assert meta1["resumed_at_step"] == 4 and meta1["resumed_from_dir"] == str(v0)
    assert [r["step"] for r in load_run(v0)] == [0, 2, 4]  # its 4 superseded by version_1's
    assert [r["step"] for r in load_run(v1)] == [4, 6]
    assert second.probed_steps == [0, 2, 4, 6]


def test_changing_only_how_the_run_is_logged_continues_it(tmp_path):
    """log_level, compress, max_files, strict and the memory knobs are not the measurement:
    a resume that changes them continues the same run, in the same directory."""
    first = probe_callback(every=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit(make_trainer(tmp_path, [first, ckpt], 4, enable_checkpointing=True), grpo_module())
    second = probe_callback(every=2, log_level="detailed", compress=True, max_files=10,
                            strict=True, microbatch_size=4, chunk_size=3)
    messages = fit(make_trainer(tmp_path, [second], 6), grpo_module(),
                   ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert messages == [] or not [m for m in messages if "new run" in m], messages
    assert second.run_logger.run_id == first.run_logger.run_id
    assert second.json.root == first.json.root
    assert [r["step"] for r in load_run(second.json.root)] == [0, 2, 4]
    # measuring something else is a new run
    third = probe_callback(every=2, batch_size=4)
    messages = fit(make_trainer(tmp_path, [third], 6), grpo_module(),
                   ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert any("another every or probe config" in m for m in messages)
    assert third.run_logger.run_id != first.run_logger.run_id


# ------------------------------------------------------------------ one barrier
class OddRewards(GRPOModule):
    """training_step's ``rewards`` as a sparse tensor (fine: densified) or on the meta device
    (cannot be read: the U-batch statistics fail)."""

    layout = "sparse"

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        rewards = out["rewards"].detach()
        out["rewards"] = (rewards.to_sparse() if self.layout == "sparse"
                          else torch.empty_like(rewards, device="meta"))
        return out


def test_sparse_rewards_are_summarised_like_dense_ones(tmp_path):
    module = grpo_module(cls=OddRewards)
    callback = probe_callback(every=1)
    fit(make_trainer(tmp_path, [callback], 2), module)
    u = step_record(tmp_path, 1)["batch_statistics"]["U_batch"]
    assert u["num_sequences"] == 8 and u["avg_reward"] is not None


def _break(monkeypatch, where: str) -> None:
    """Make one piece the engine or session calls outside its phases raise."""
    import entropy_callback.probe as probe_module

    def boom(*args, **kwargs):
        raise RuntimeError(f"injected into {where}")

    if where == "u_batch":
        monkeypatch.setattr(OddRewards, "layout", "meta")
    elif where == "freeze":
        monkeypatch.setattr(ResultDraft, "freeze", boom)
    else:  # "log_probe", "preserved_state"
        monkeypatch.setattr(probe_module, where, boom)


@pytest.mark.parametrize("where", ["u_batch", "log_probe", "preserved_state", "freeze"])
def test_nothing_outside_a_phase_raises_into_training(tmp_path, monkeypatch, where):
    """e619d40 ran these outside the containment: each crashed fit. Now each is a warning;
    training runs to the end and a record is written for every step."""
    _break(monkeypatch, where)
    callback = probe_callback(every=1)
    messages = fit(make_trainer(tmp_path, [callback], 3), grpo_module(cls=OddRewards))
    assert any("entropy probe failed" in m for m in messages), messages
    assert [r["step"] for r in jsonl_records(tmp_path)] == [0, 1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EntropyProbeWarning)
        strict = probe_callback(every=1, strict=True)
        with pytest.raises(Exception, match="injected|meta|Cannot copy"):
            fit(make_trainer(tmp_path / "strict", [strict], 3), grpo_module(cls=OddRewards))


class SkippedThenTaken(GRPOModule):
    """Manual optimisation, two optimizer steps per batch under GradScaler; the first step of
    the second batch (global step 2) has an infinite loss, so the scaler skips it: its
    ``optimizer.step()`` never runs and the probe is still pending when step 3 begins."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for _ in range(2):
            out = super().training_step(batch, batch_idx)
            loss = out["loss"] * (float("inf") if self.trainer.global_step == 2 else 1.0)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return out


def test_a_probe_pending_at_the_next_step_is_a_skipped_record_and_rearms(tmp_path):
    """The same behaviour as under HF and the plain loop (test_session.py): the probe of
    step 2, pending when step 3 begins, is recorded as skipped, and step 3 is probed."""
    from lightning.pytorch.plugins import MixedPrecision

    callback = probe_callback(every=2)
    scaler = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    messages = fit(make_trainer(tmp_path, [callback], 6, plugins=[scaler]),
                   grpo_module(cls=SkippedThenTaken))
    records = {r["step"]: r for r in jsonl_records(tmp_path)}
    assert sorted(records) == [0, 2, 3, 4]
    assert records[2]["update_source"] == "skipped"
    assert "step count did not advance" in records[2]["null_reasons"]["deltaH1"]
    assert records[3]["update_source"] == "adam_reconstruction"
    assert records[3]["deltaH1"] is not None
    assert len([m for m in messages if "did not take step 2" in m]) == 1


def test_a_setup_fault_that_is_not_bad_input_disables_the_probe_not_the_fit(tmp_path,
                                                                            monkeypatch):
    """Bad input is a ProbeConfigError at setup; anything else failing while the engine is
    built is a warning, and the fit trains without the probe."""
    from entropy_callback.probe import EntropyProbe

    def broken(self, *args, **kwargs):
        raise RuntimeError("injected at engine construction")

    monkeypatch.setattr(EntropyProbe, "__init__", broken)
    callback = probe_callback(every=1)
    trainer = make_trainer(tmp_path, [callback], 2)
    messages = fit(trainer, grpo_module())
    assert trainer.global_step == 2 and callback.probe is None
    assert any("phase 'setup'" in m and "injected" in m for m in messages), messages
    assert not probe_dir(tmp_path).exists()


def test_a_run_left_open_is_released_when_its_logger_is_collected(tmp_path):
    """The last resort for a training that raised past every hook: the run's lock goes with its
    RunLogger, so resuming the run in this process continues it in its own directory."""
    import gc

    from entropy_callback import ProbeConfig, RunLogger

    first = RunLogger(ProbeConfig(), tmp_path, tensorboard=False).open()
    state, root = first.state_dict(), first.run_dir
    del first  # never closed
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = RunLogger(ProbeConfig(), tmp_path, tensorboard=False).open(state, start_step=0)
    assert again.run_id == state["run_id"] and again.run_dir == root
    assert not [w for w in caught if "locked" in str(w.message)]
    again.close()
