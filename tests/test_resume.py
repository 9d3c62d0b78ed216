"""Run identity and resuming: every run has an id and a directory of its own; a second run in
the same log directory never touches the first one's records; a resume from a checkpoint (the
run id travels in the callback's state) continues its own run, the probe schedule goes on, and
only that run's records of the steps it runs again are replaced."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
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

from entropy_callback import EntropyProbeCallback, EntropyProbeWarning, ProbeConfig, ProbeResult
from entropy_callback.cli import main
from entropy_callback.jsonlog import JsonLogWriter
from entropy_callback.runlog import RunLogError, describe_run, load_run
from entropy_callback.runs import read_run_meta
from entropy_callback.sinks import RunLogger

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


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file of a run directory, by name."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def copy_of(first_run, tmp_path) -> Path:
    root = tmp_path / "run_copy"
    shutil.copytree(first_run.root, root)
    return root


def resume(first_run, tmp_path, ckpt_step: int, max_steps: int, root: Path | None = None):
    """Resume a copy of the first run (same log dir, same TensorBoardLogger version)."""
    root = root if root is not None else copy_of(first_run, tmp_path)
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
    run_dir = probe_dir(first_run.root)
    assert state["run"]["run_id"] == read_run_meta(run_dir)["run_id"]
    assert state["run"]["run_dir"] == str(run_dir)
    fresh = EntropyProbeCallback(first_run.callback.prompts, EVERY)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["probed_steps"] == [0, 2]


def test_resume_from_the_last_checkpoint_continues_the_schedule(first_run, tmp_path):
    run = resume(first_run, tmp_path, ckpt_step=4, max_steps=8)
    assert run.trainer.global_step == 8
    assert run.callback.probed_steps == [0, 2, 4, 6]
    assert [r["step"] for r in jsonl_records(run.root)] == [0, 2, 4, 6]
    assert run.warnings == []
    assert run.callback.run_logger.run_id == first_run.callback.run_logger.run_id
    assert read_run_meta(probe_dir(run.root))["resumed_at_step"] == 4
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


def test_resume_replaces_only_its_own_runs_rerun_steps(first_run, tmp_path):
    """Another run wrote into the same log dir (logger version 0) before the resume: its records
    stay byte for byte; the resumed run replaces its own records of step 2 only."""
    root = copy_of(first_run, tmp_path)
    other = probe_callback(every=1)
    assert fit(make_trainer(root, [other], 3), grpo_module(seed=1)) == []
    other_dir = other.json.root
    assert other_dir.name == f"entropy_probe-{other.run_logger.run_id}"
    other_files = snapshot(other_dir)
    own = probe_dir(root)
    step0 = step_record(root, 0)

    run = resume(first_run, tmp_path, ckpt_step=2, max_steps=6, root=root)
    assert run.callback.json.root == own
    assert snapshot(other_dir) == other_files
    assert [r["step"] for r in load_run(own)] == [0, 2, 4]
    assert step_record(root, 0) == step0  # before the resumed step: untouched
    assert [r["step"] for r in load_run(other_dir)] == [0, 1, 2]
    (message,) = run.warnings
    assert "dropped its own probe records of steps [2]" in message and str(own) in message


def test_a_checkpoint_without_a_run_id_starts_a_new_run(first_run, tmp_path):
    """Only the checkpointed run id makes a resume: without it the records are not replaced."""
    root = copy_of(first_run, tmp_path)
    ckpt = root / "ckpt" / "epoch=0-step=2.ckpt"
    data = torch.load(ckpt, weights_only=False)
    state = data["callbacks"][first_run.callback.state_key]
    del state["run"]
    torch.save(data, ckpt)
    before = snapshot(probe_dir(root))
    run = resume(first_run, tmp_path, ckpt_step=2, max_steps=4, root=root)
    assert run.warnings == []
    assert snapshot(probe_dir(root)) == before
    assert run.callback.json.root.name == f"entropy_probe-{run.callback.run_logger.run_id}"
    assert [r["step"] for r in load_run(run.callback.json.root)] == [2]


TWO_RUNS = ("logger_false", "shared_log_dir", "reused_callback")


@pytest.mark.parametrize("case", TWO_RUNS)
def test_a_second_run_in_one_directory_keeps_the_first_runs_records(case, tmp_path, capsys):
    """logger=False twice in one working directory, an explicit shared log_dir, one callback
    reused for a second fit: the second run gets its own directory and id, no warning, and
    the first run's files stay byte for byte; reading the parent lists both runs."""
    first, second = probe_callback(every=1), probe_callback(every=1)
    roots, options = (tmp_path, tmp_path), {}
    if case == "logger_false":
        options = dict(logger=False, default_root_dir=str(tmp_path))
    elif case == "shared_log_dir":
        shared = str(tmp_path / "shared")
        first, second = (probe_callback(every=1, log_dir=shared) for _ in range(2))
        roots = (tmp_path / "a", tmp_path / "b")
    else:
        second = first
    trainers = [make_trainer(root, [cb], n, **options)
                for root, cb, n in zip(roots, (first, second), (2, 3), strict=True)]
    module = grpo_module()
    assert fit(trainers[0], module) == []
    first_dir, first_id = first.json.root, first.run_logger.run_id
    files = snapshot(first_dir)

    # the reused callback's engine is bound to the model it was set up with: fit it again
    assert fit(trainers[1], module if case == "reused_callback" else grpo_module(seed=1)) == []
    second_dir, second_id = second.json.root, second.run_logger.run_id
    assert second_id != first_id
    assert (first_dir.name, second_dir.name) == ("entropy_probe", f"entropy_probe-{second_id}")
    assert second_dir.parent == first_dir.parent
    assert snapshot(first_dir) == files
    assert [r["step"] for r in load_run(first_dir)] == [0, 1]
    assert [r["step"] for r in load_run(second_dir)] == [0, 1, 2]
    assert second.probed_steps == [0, 1, 2]
    for directory, run_id in ((first_dir, first_id), (second_dir, second_id)):
        meta = read_run_meta(directory)
        assert meta["run_id"] == run_id and meta["start_time"].endswith("Z")
        assert meta["config_hash"] == first.config.config_hash()
        assert meta["framework"] == "lightning" and meta["every"] == 1
        assert meta["logger_version"] == (None if case == "logger_false" else 0)
        assert run_id in describe_run(directory)
    with pytest.raises(RunLogError, match="holds 2 probe runs") as info:
        load_run(first_dir.parent)
    assert first_id in str(info.value) and second_id in str(info.value)
    # the CLI reads one run and says which; given both, it lists them and exits 2
    capsys.readouterr()
    assert main(["summary", str(second_dir)]) == 0
    assert capsys.readouterr().out.startswith(f"{second_dir} (run {second_id}, started ")
    assert main(["summary", str(first_dir.parent)]) == 2
    err = capsys.readouterr().err
    assert "holds 2 probe runs" in err and first_id in err and second_id in err


def probe_result(step: int) -> ProbeResult:
    return ProbeResult(step=step, B_E=4, learning_rate=1e-5, deltaH1=-2.5e-4, bars_dot=-25.0)


def test_two_live_runs_on_one_log_dir_never_share_files(tmp_path):
    """Two runs open at once get two directories; the same run resumed twice at once (both
    processes holding its checkpoint) splits: the second, finding the run's lock held, logs as
    a new run and says so."""
    config = ProbeConfig()
    a = RunLogger(config, tmp_path, tensorboard=False).open()
    b = RunLogger(config, tmp_path, tensorboard=False).open()
    assert a.run_dir != b.run_dir and a.run_id != b.run_id
    state = a.state_dict()
    a.close()
    resumed = RunLogger(config, tmp_path, tensorboard=False).open(state, start_step=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twin = RunLogger(config, tmp_path, tensorboard=False).open(state, start_step=0)
    (message,) = [str(w.message) for w in caught if w.category is EntropyProbeWarning]
    assert resumed.run_id == state["run_id"] and resumed.run_dir == a.run_dir
    assert twin.run_id != state["run_id"] and twin.run_dir not in (a.run_dir, b.run_dir)
    assert "locked" in message and twin.run_id in message and str(twin.run_dir) in message
    assert read_run_meta(resumed.run_dir)["resumed_at_step"] == 0
    assert "resumed_at_step" not in read_run_meta(twin.run_dir)  # a new run, not a resume
    for step in range(3):
        for logger in (resumed, twin, b):
            logger.emit(probe_result(step))
    for logger in (resumed, twin, b):
        assert [r["step"] for r in load_run(logger.run_dir)] == [0, 1, 2]
        logger.close()


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
