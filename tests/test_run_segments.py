"""One run, whatever the logger version: a run resumed into another directory (Lightning's
``fit(ckpt_path=...)`` with a new logger version) keeps its run id there, and ``load_run``,
``load_step`` and every CLI command join the directories of one run id found under the
directory they are given; ``entropy-probe runs`` lists each run with its segments.

The directories are written by the real ``RunLogger``: a run opened in ``version_0``, then
reopened from its ``state_dict()`` (what a checkpoint carries) under ``version_1``."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from probe_harness import fit, grpo_module, make_trainer, probe_callback

from entropy_callback.cli import main
from entropy_callback.config import ProbeConfig
from entropy_callback.result import ProbeResult
from entropy_callback.runlog import RunLogError, describe_run, find_runs, load_run, load_step
from entropy_callback.runs import read_run_meta
from entropy_callback.sinks import RunLogger


def result(step: int, segment: int) -> ProbeResult:
    """A probe of ``step``; its deltaH1 says which segment wrote it (step + segment / 10)."""
    return ProbeResult(step=step, learning_rate=1e-3, deltaH1=step + segment / 10,
                       deltaH1_se=1e-5, deltaH_true=step + segment / 10, deltaH_true_se=1e-5,
                       ess_fraction=0.9, reliable=True, B_E=8, T_E=20)


def segment(root: Path, version: int, steps: list[int], state: dict | None = None,
            start_step: int = 0, config: ProbeConfig | None = None) -> dict:
    """Log ``steps`` under ``root/version_<version>`` as one fit; returns the run's state."""
    run = RunLogger(config or ProbeConfig(), root / f"version_{version}", tensorboard=False,
                    metadata={"framework": "test", "logger_version": version})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.open(resume_state=state, start_step=start_step)
        for step in steps:
            run.emit(result(step, version))
    run.close()
    return run.state_dict()


def steps_and_segments(records: list[dict]) -> list[tuple[int, int]]:
    return [(r["step"], round((r["deltaH1"] - r["step"]) * 10)) for r in records]


@pytest.fixture
def resumed(tmp_path) -> Path:
    """version_0 probes 0, 2, 4; the fit resumes from a checkpoint at step 3 into version_1,
    which probes 4 (again) and 6: version_0's step 4 is stale."""
    root = tmp_path / "lightning_logs"
    state = segment(root, 0, [0, 2, 4])
    segment(root, 1, [4, 6], state=state, start_step=3)
    return root


def test_a_resume_into_a_new_version_keeps_the_run_id(resumed):
    first = read_run_meta(resumed / "version_0" / "entropy_probe")
    second = read_run_meta(resumed / "version_1" / "entropy_probe")
    assert first["run_id"] == second["run_id"] and second["resumed_at_step"] == 3
    assert "resumed_at_step" not in first


def test_load_run_joins_the_segments_the_later_superseding_rerun_steps(resumed):
    assert steps_and_segments(load_run(resumed)) == [(0, 0), (2, 0), (4, 1), (6, 1)]
    assert load_step(resumed, 4)["core_results"]["deltaH1"] == pytest.approx(4.1)
    assert load_step(resumed, 2)["core_results"]["deltaH1"] == pytest.approx(2.0)
    # one segment alone is what it holds
    assert steps_and_segments(load_run(resumed / "version_0")) == [(0, 0), (2, 0), (4, 0)]
    assert len(find_runs(resumed)) == 1 and len(find_runs(resumed)[0].segments) == 2


def test_steps_at_or_after_the_resume_point_are_superseded_even_if_not_probed_again(tmp_path):
    # version_1 resumes at step 3 and crashes before probing: version_0's step 4 belongs to
    # the abandoned trajectory, so the joined run ends at step 2
    root = tmp_path / "lightning_logs"
    state = segment(root, 0, [0, 2, 4])
    segment(root, 1, [], state=state, start_step=3)
    assert steps_and_segments(load_run(root)) == [(0, 0), (2, 0)]
    with pytest.raises(FileNotFoundError, match="no record for step 4"):
        load_step(root, 4)


def test_a_resume_from_an_older_checkpoint_supersedes_a_later_segment(tmp_path):
    # v0: 0, 2, 4; resume at 3 into v1: 4, 6; resume again from the checkpoint at step 1
    # into v2: 2, 4. The ordering follows the recorded facts (open time, then resumed after
    # original, then logger version): v2 is last, so v0's 2 and v1's 4, 6 are superseded.
    root = tmp_path / "lightning_logs"
    state = segment(root, 0, [0, 2, 4])
    state = segment(root, 1, [4, 6], state=state, start_step=3)
    segment(root, 2, [2, 4], state=state, start_step=1)
    assert steps_and_segments(load_run(root)) == [(0, 0), (2, 2), (4, 2)]


def test_another_run_under_the_same_root_stays_a_run_of_its_own(resumed, capsys):
    segment(resumed, 2, [0, 1])  # a new fit (no resume state): another run id
    runs = find_runs(resumed)
    assert [len(run.segments) for run in runs] == [2, 1]
    with pytest.raises(RunLogError, match="holds 2 probe runs"):
        load_run(resumed)
    assert main(["compare", str(resumed)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 3 and "(2 segments)" in rows[1] and rows[1].split()[3] == "4"


def test_summary_reads_the_joined_run_and_says_so(resumed, capsys):
    assert main(["summary", str(resumed)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "2 segments joined" in out[0] and "resumed at step 3" in out[0]
    assert out[1].endswith(": 4 probes (nats per token)")
    assert [line.split()[0] for line in out[3:7]] == ["0", "2", "4", "6"]
    assert "2 segments joined" in describe_run(resumed)


def test_export_and_plot_read_the_joined_run(resumed, tmp_path, capsys):
    assert main(["export", str(resumed)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "2", "4", "6"]
    assert main(["plot", str(resumed), "-o", str(tmp_path / "dh.png")]) == 0


def test_runs_lists_each_run_with_its_segments(resumed, capsys):
    segment(resumed, 2, [0, 1])
    assert main(["runs", str(resumed)]) == 0
    out = capsys.readouterr().out
    first, second = out.split("\n\n")
    head, _, v0, v1 = first.splitlines()
    assert head.endswith(": 4 probes in 2 segments")
    assert v0.split()[:5] == [str(resumed / "version_0" / "entropy_probe"), "0", "-", "3", "0,"]
    assert "1 superseded by a later segment" in v0
    assert v1.split()[:6] == [str(resumed / "version_1" / "entropy_probe"), "1", "3", "2", "4,",
                              "6"]
    assert second.splitlines()[0].endswith(": 2 probes in 1 segment")


def test_runs_of_a_directory_without_runs_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no probe log" in err


def test_lightning_resume_into_a_new_logger_version_reads_as_one_run(tmp_path, capsys):
    # A real fit: probes every 2 steps, a checkpoint at step 3; fit(ckpt_path=...) with a new
    # TensorBoardLogger version (Lightning's default on resume) writes the same run id into
    # version_1. Read from lightning_logs/ (here run/), the run is whole and each step once.
    first = probe_callback(every=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    assert fit(make_trainer(tmp_path, [first, ckpt], 5, enable_checkpointing=True),
               grpo_module()) == []
    second = probe_callback(every=2)
    trainer = make_trainer(tmp_path, [second], 7,
                           logger=TensorBoardLogger(str(tmp_path), name="run", version=1))
    fit(trainer, grpo_module(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    v0, v1 = (tmp_path / "run" / f"version_{v}" / "entropy_probe" for v in (0, 1))
    assert [r["step"] for r in load_run(v0)] == [0, 2, 4]
    assert [r["step"] for r in load_run(v1)] == [4, 6]
    records = load_run(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    assert load_step(tmp_path / "run", 4)["run_metadata"]["logger_version"] == 1
    assert main(["summary", str(tmp_path / "run")]) == 0
    assert "2 segments joined" in capsys.readouterr().out
