"""All or nothing per step, in a real run: a probed step's record, its summary and its
``probes.jsonl`` line are on disk together or not at all, and every warning says which.

One real tiny Lightning run (probe_harness: tiny Llama + LoRA, AdamW, TensorBoardLogger) probes
every step while its JSON directory is sabotaged, one thing per step: removed (step 1), no space
left for the summary (2) or the line (3), TensorBoard failing (4), ``probes.jsonl`` replaced by
a symlink to a file outside (5). The ENOSPC failures are injected by making the JSON sink's
write functions raise ``OSError(28)``; everything else is real.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import lightning
import pytest
from probe_harness import fit, grpo_module, make_trainer, probe_callback

from entropy_callback import jsonlog
from entropy_callback.jsonlog import JSONL_NAME, step_filename, summary_filename
from entropy_callback.runlog import load_run, read_record
from entropy_callback.runs import read_run_meta
from entropy_callback.tensorboard import TensorBoardSink

REMOVED, NO_SPACE_SUMMARY, NO_SPACE_LINE, TB_FAILS, SYMLINK = 1, 2, 3, 4, 5
MAX_STEPS = 6
OUTSIDE = b'{"step": 999, "note": "a file outside the run directory"}\n'


class Saboteur(lightning.Callback):
    """At the start of a chosen step, does something to the probe's JSON directory."""

    def __init__(self, probe, outside: Path) -> None:
        self.probe, self.outside = probe, outside
        self.saved_lines: bytes | None = None
        self.run_id: str | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        root = self.probe.json.root
        if trainer.global_step == REMOVED:
            self.run_id = read_run_meta(root)["run_id"]
            shutil.rmtree(root)
        elif trainer.global_step == SYMLINK:
            jsonl = root / JSONL_NAME
            self.saved_lines = jsonl.read_bytes()
            jsonl.unlink()
            jsonl.symlink_to(self.outside)


def no_space(path_or_name: str) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device (injected)", path_or_name)


@pytest.fixture(scope="module")
def sabotaged(tmp_path_factory):
    root = tmp_path_factory.mktemp("sabotaged")
    outside = root / "outside.jsonl"
    outside.write_bytes(OUTSIDE)
    probe = probe_callback(every=1)
    saboteur = Saboteur(probe, outside)
    trainer = make_trainer(root, [saboteur, probe], MAX_STEPS)
    write, append, tb_log = jsonlog.atomic_write, jsonlog.append_line, TensorBoardSink.log

    def failing_write(path, data):
        if path.name == summary_filename(NO_SPACE_SUMMARY):
            raise no_space(str(path))
        return write(path, data)

    def failing_append(path, line):
        if json.loads(line)["step"] == NO_SPACE_LINE:
            raise no_space(str(path))
        return append(path, line)

    def failing_tb(self, result):
        if result.step == TB_FAILS:
            raise RuntimeError("injected TensorBoard failure")
        return tb_log(self, result)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jsonlog, "atomic_write", failing_write)
        patch.setattr(jsonlog, "append_line", failing_append)
        patch.setattr(TensorBoardSink, "log", failing_tb)
        messages = fit(trainer, grpo_module())
    return SimpleNamespace(root=probe.json.root, probe=probe, saboteur=saboteur,
                           outside=outside, warnings=messages, trainer=trainer)


def files_of(root: Path, step: int) -> list[str]:
    return sorted(p.name for p in root.glob(f"step_{step:08d}*"))


def warning_about(run, text: str) -> str:
    (message,) = [m for m in run.warnings if text in m]
    return message


def test_training_went_on_and_every_step_was_probed(sabotaged):
    assert sabotaged.trainer.global_step == MAX_STEPS
    assert sabotaged.probe.probed_steps == list(range(MAX_STEPS))
    assert len(sabotaged.warnings) == 5, sabotaged.warnings


def test_a_removed_directory_is_recreated_with_the_same_run_id(sabotaged):
    root = sabotaged.root
    assert read_run_meta(root)["run_id"] == sabotaged.saboteur.run_id
    message = warning_about(sabotaged, "was removed")
    assert str(root) in message and sabotaged.saboteur.run_id in message
    assert "records written there before are gone" in message
    assert files_of(root, REMOVED) == [step_filename(REMOVED), summary_filename(REMOVED)]
    assert files_of(root, 0) == []  # went with the directory


@pytest.mark.parametrize("step", [NO_SPACE_SUMMARY, NO_SPACE_LINE, SYMLINK])
def test_a_failed_write_leaves_nothing_of_the_step_and_says_so(sabotaged, step):
    assert files_of(sabotaged.root, step) == []
    assert not list(sabotaged.root.glob(".tmp-*"))
    message = warning_about(sabotaged, f"phase 'json' at step {step}")
    assert f"nothing of step {step} is on disk" in message
    assert "error record" not in message  # none was written
    cause = "Errno 40" if step == SYMLINK else "Errno 28"
    assert cause in message


def test_the_lines_on_disk_are_those_of_the_complete_steps(sabotaged):
    lines = [json.loads(line) for line in sabotaged.saboteur.saved_lines.splitlines()]
    assert [line["step"] for line in lines] == [REMOVED, TB_FAILS]
    for line in lines:
        assert read_record(sabotaged.root / step_filename(line["step"]))["core_results"] == {
            k: v for k, v in line.items() if k != "timing_total"}


def test_a_planted_symlink_is_not_followed(sabotaged):
    link = sabotaged.root / JSONL_NAME
    assert link.is_symlink()
    assert sabotaged.outside.read_bytes() == OUTSIDE


def test_a_tensorboard_failure_is_in_the_record_and_the_warning_says_so(sabotaged):
    core = read_record(sabotaged.root / step_filename(TB_FAILS))["core_results"]
    assert core["error"]["phase"] == "tensorboard"
    assert core["deltaH_true"] is not None  # the probe itself succeeded
    message = warning_about(sabotaged, f"phase 'tensorboard' at step {TB_FAILS}")
    assert f"The JSON record of step {TB_FAILS} in {sabotaged.root}" in message
    assert "holds this error" in message


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_file_modes_follow_the_umask(umask, tmp_path):
    probe = probe_callback(every=1)
    old = os.umask(umask)
    try:
        assert fit(make_trainer(tmp_path, [probe], 1), grpo_module()) == []
    finally:
        os.umask(old)
    root = probe.json.root
    names = ["config.yaml", step_filename(0), summary_filename(0), JSONL_NAME, ".lock"]
    modes = {name: stat.S_IMODE((root / name).stat().st_mode) for name in names}
    assert modes == dict.fromkeys(names, 0o666 & ~umask)
    assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~umask
    assert [r["step"] for r in load_run(root)] == [0]
