"""A symlink planted at the run directory mid-run is never followed: no record lands outside,
nothing outside is deleted or rewritten, and training goes on (one warning per failed step).

A real Lightning fit whose run directory is moved away at step 3 and replaced by a link to a
directory outside the log dir (holding files named like records, to see that nothing touches
them); and the JSON writer's pruning, rewinding and clean-up pointed at such a link."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
from probe_harness import fit, grpo_module, make_trainer, probe_callback

from entropy_callback.config import ProbeConfig
from entropy_callback.jsonlog import (
    JsonLogWriter,
    StepWriteError,
    step_filename,
    summary_filename,
)
from entropy_callback.result import ProbeResult
from entropy_callback.runlog import load_run

LINKED_AT = 3
MAX_STEPS = 5
DECOYS = {step_filename(0): b"decoy 0", summary_filename(0): b"decoy s0",
          "probes.jsonl": b'{"step": 0}\n', ".tmp-x": b"tmp", "config.yaml": b"decoy: 1\n"}


def outside_dir(root: Path) -> Path:
    outside = root / "outside"
    outside.mkdir()
    for name, data in DECOYS.items():
        (outside / name).write_bytes(data)
    return outside


def untouched(outside: Path) -> bool:
    return {p.name: p.read_bytes() for p in outside.iterdir()} == DECOYS


class PlantLink(lightning.Callback):
    """At step LINKED_AT, moves the probe's run directory away and links its name outside."""

    def __init__(self, probe, outside: Path) -> None:
        self.probe, self.outside = probe, outside
        self.moved: Path | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == LINKED_AT:
            root = self.probe.json.root
            self.moved = root.with_name("moved_away")
            root.rename(self.moved)
            root.symlink_to(self.outside, target_is_directory=True)


def test_a_link_planted_at_the_run_directory_mid_run_is_not_followed(tmp_path):
    outside = outside_dir(tmp_path)
    probe = probe_callback(every=1, max_files=2)
    planter = PlantLink(probe, outside)
    messages = fit(make_trainer(tmp_path, [planter, probe], MAX_STEPS), grpo_module())
    root = probe.json.root
    assert root.is_symlink() and untouched(outside)
    # the steps before the link are in the moved directory, nothing after it anywhere
    assert [r["step"] for r in load_run(planter.moved)] == [0, 1, 2]
    failed = [m for m in messages if "phase 'json'" in m]
    assert len(failed) == MAX_STEPS - LINKED_AT == len(messages)
    for step, message in zip(range(LINKED_AT, MAX_STEPS), failed, strict=True):
        assert f"at step {step}" in message and "is a symbolic link" in message
        assert f"nothing of step {step} is on disk" in message
    assert probe.probed_steps == list(range(MAX_STEPS))  # training and probing went on


def result(step: int) -> ProbeResult:
    return ProbeResult(step=step, learning_rate=1e-3, deltaH1=-1e-4, deltaH_true=-1e-4,
                       ess_fraction=0.9, reliable=True)


def test_pruning_rewinding_and_cleanup_never_act_through_a_link(tmp_path):
    outside = outside_dir(tmp_path)
    real = tmp_path / "log" / "entropy_probe"
    writer = JsonLogWriter(real, ProbeConfig(max_files=1))
    writer.write_config()
    writer.write(result(5))
    link = tmp_path / "log" / "linked"
    link.symlink_to(outside, target_is_directory=True)
    linked = JsonLogWriter(link, ProbeConfig(max_files=1))
    assert linked.prune(keep=7) == []
    assert linked.drop_from(0) == []
    with pytest.raises(OSError, match="is a symbolic link"):
        linked.ensure_root()
    with pytest.raises(StepWriteError, match="is a symbolic link"):
        linked.write(result(7))
    assert untouched(outside)
    assert [r["step"] for r in load_run(real)] == [5]
