"""Resuming from a checkpoint: the probe schedule goes on, each probed step is logged once,
and the callback's state round-trips through the checkpoint."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from probe_harness import (
    fit,
    grpo_module,
    jsonl_records,
    make_trainer,
    probe_callback,
    probe_dir,
    step_record,
)

from entropy_callback import EntropyProbeCallback, ProbeConfig
from entropy_callback.jsonlog import JsonLogWriter

EVERY = 2


def checkpointing(root) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=EVERY, save_top_k=-1)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """4 steps, probes at 0 and 2, checkpoints at global_step 2 and 4."""
    root = tmp_path_factory.mktemp("first")
    callback = probe_callback(every=EVERY)
    trainer = make_trainer(root, [callback, checkpointing(root)], 4, enable_checkpointing=True)
    messages = fit(trainer, grpo_module())
    assert messages == [] and callback.probed_steps == [0, 2]
    return SimpleNamespace(root=root, callback=callback)


def resume(first_run, tmp_path, ckpt_step: int, max_steps: int):
    """Resume a copy of the first run (same log dir, same TensorBoardLogger version)."""
    root = tmp_path / "run_copy"
    shutil.copytree(first_run.root, root)
    callback = probe_callback(every=EVERY)
    trainer = make_trainer(root, [callback, checkpointing(root)], max_steps,
                           enable_checkpointing=True)
    ckpt = root / "ckpt" / f"epoch=0-step={ckpt_step}.ckpt"
    messages = fit(trainer, grpo_module(), ckpt_path=str(ckpt))
    return SimpleNamespace(root=root, callback=callback, trainer=trainer, warnings=messages,
                           ckpt=ckpt)


def test_checkpoint_holds_the_callback_state(first_run):
    ckpt = torch.load(first_run.root / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)
    state = ckpt["callbacks"][first_run.callback.state_key]
    assert state["probed_steps"] == [0, 2] and state["every"] == EVERY
    assert state["config_hash"] == first_run.callback.config.config_hash()
    fresh = EntropyProbeCallback(first_run.callback.prompts, EVERY)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["probed_steps"] == [0, 2]


def test_resume_from_the_last_checkpoint_continues_the_schedule(first_run, tmp_path):
    run = resume(first_run, tmp_path, ckpt_step=4, max_steps=8)
    assert run.trainer.global_step == 8
    assert run.callback.probed_steps == [0, 2, 4, 6]
    assert [r["step"] for r in jsonl_records(run.root)] == [0, 2, 4, 6]
    assert run.warnings == []
    for step in (4, 6):
        assert step_record(run.root, step)["run_metadata"]["global_step"] == step


def test_resume_from_an_older_checkpoint_logs_each_step_once(first_run, tmp_path):
    """The checkpoint at step 2 predates the probe of step 2: that step runs and is probed
    again, and its earlier record is dropped (with one warning saying so)."""
    run = resume(first_run, tmp_path, ckpt_step=2, max_steps=6)
    assert run.trainer.global_step == 6
    assert run.callback.probed_steps == [0, 2, 4]
    assert [r["step"] for r in jsonl_records(run.root)] == [0, 2, 4]
    (message,) = run.warnings
    assert "dropped its own probe records of steps [2]" in message
    summaries = sorted(p.name for p in probe_dir(run.root).glob("step_*_summary.json"))
    assert summaries == [f"step_{t:08d}_summary.json" for t in (0, 2, 4)]


def test_drop_from_rewrites_the_jsonl_and_deletes_later_records(tmp_path):
    writer = JsonLogWriter(tmp_path, ProbeConfig())
    lines = [json.dumps({"step": t}) for t in (0, 2, 4, 6)]
    (tmp_path / "probes.jsonl").write_text("\n".join(lines[:2]) + "\nnot json\n"
                                           + "\n".join(lines[2:]) + '\n{"step": 8, "del')
    for t in (0, 2, 4, 6):
        (tmp_path / f"step_{t:08d}.json").write_text("{}")
        (tmp_path / f"step_{t:08d}_summary.json").write_text("{}")
    (tmp_path / "step_00000006.json.gz").write_bytes(b"")

    assert writer.drop_from(4) == [4, 6]
    assert (tmp_path / "probes.jsonl").read_text() == f"{lines[0]}\n{lines[1]}\nnot json\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "probes.jsonl", "step_00000000.json", "step_00000000_summary.json",
        "step_00000002.json", "step_00000002_summary.json"]
    inode = (tmp_path / "probes.jsonl").stat().st_ino
    assert writer.drop_from(4) == []  # nothing to drop: the file is left alone
    assert (tmp_path / "probes.jsonl").stat().st_ino == inode
