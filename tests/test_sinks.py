"""The sinks (TensorBoard, JSON records) and the reading side (load_run, CLI).

Every ProbeResult here is built by hand with realistic magnitudes: entropies near 1.9 nats per
token, steps of a few 1e-4 nats per token, learning rate 1e-5.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from probe_harness import (
    SMALL_PROBE,
    backward_on,
    fit,
    grpo_module,
    make_trainer,
    probe_callback,
    probe_prompts,
    tiny_policy,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from entropy_callback import EntropyProbeWarning, ProbeConfigError, ProbeFailure, fileio, jsonlog
from entropy_callback.cli import main, pearson
from entropy_callback.config import ProbeConfig
from entropy_callback.jsonlog import (
    JsonLogWriter,
    StepWriteError,
    step_filename,
    summary_filename,
)
from entropy_callback.probe import EntropyProbe
from entropy_callback.result import ProbeResult
from entropy_callback.runlog import RunLogError, load_run, load_step
from entropy_callback.sinks import RunLogger
from entropy_callback.tensorboard import LAYOUT_SUBDIR, TensorBoardSink

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"sampling": 2.10, "score_orig": 0.84, "delta_h1": 0.31, "score_upd": 0.79}


def make_result(step: int, shift: float = 0.0, **overrides) -> ProbeResult:
    """A complete, healthy probe: deltaH1 = learning_rate * bars_dot."""
    lr, bars_dot = 1e-5, -32.0 + shift
    true = lr * bars_dot * 0.93 + 2e-5 * math.sin(step)  # the measurement scatters around δH₁
    values = dict(
        step=step,
        B_E=4,
        T_E=377,
        learning_rate=lr,
        bars_dot=bars_dot,
        deltaH1=lr * bars_dot,
        deltaH1_se=4.1e-5,
        deltaH_true=true,
        deltaH_true_se=5.2e-5,
        H_orig=1.8731,
        H_upd=1.8731 + true,
        ESS=3.64,
        ess_fraction=0.91,
        reliable=True,
        update_cosine=0.99998,
        update_rel_error=2.1e-4,
        update_source="adamw_reconstructed",
        update_norm=0.0137,
        num_params=1_572_864,
        diagnostics={"w_max": 1.21, "w_min": 0.83, "w_sum_global": 4.0},
        eta_sweep=[{"multiplier": 1.0, "deltaH_true": true, "ess_fraction": 0.91}],
        timing=dict(TIMING),
        batch_statistics={"E_batch": {"num_sequences": 4, "avg_generation_length": 94.25}},
        sequences={
            "prompt_id": [0, 1, 2, 3],
            "response_text": ["x = 4", "The answer is 7.", "12", "Let me think"],
            "sequence_logprob": [-11.2, -23.9, -4.1, -40.3],
            "rb_entropy": [150.2, 201.7, 31.0, 322.9],
        },
        token_data=[
            {"sequence_id": 0, "tokens": [87, 284, 19], "token_logprobs": [-2.3, -1.4, -3.7]}
        ],
        raw_tensors={"E_batch_S_orig": [-11.2, -23.9, -4.1, -40.3]},
    )
    values.update(overrides)
    return ProbeResult(**values)


def partial_result(step: int) -> ProbeResult:
    """ΔH_true unavailable (ESS collapsed); H_upd non-finite."""
    return make_result(
        step,
        shift=5.0,
        deltaH_true=None,
        deltaH_true_se=None,
        H_upd=float("nan"),
        reliable=False,
        ess_fraction=0.08,
        null_reasons={"deltaH_true": "ESS / B_E = 0.08 below ess_threshold 0.5"},
    )


def error_result(step: int) -> ProbeResult:
    """A probe whose after_step phase failed: only the prediction survived."""
    return ProbeResult(
        step=step,
        B_E=4,
        learning_rate=1e-5,
        deltaH1=-2.5e-4,
        bars_dot=-25.0,
        timing={"sampling": 1.9},
        error={"phase": "after_step", "type": "RuntimeError", "message": "CUDA out of memory"},
    )


def write_run(root: Path, steps=(20, 40, 60, 80), **config) -> JsonLogWriter:
    writer = JsonLogWriter(root / "entropy_probe", ProbeConfig(**config))
    for i, step in enumerate(steps):
        writer.write(make_result(step, shift=3.0 * i))
    return writer


def read_json(path: Path) -> dict:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


# TensorBoard ------------------------------------------------------------------------------


def accumulator(directory: Path) -> EventAccumulator:
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_read_back_at_probed_steps(tmp_path):
    sink = TensorBoardSink(log_dir=tmp_path / "tb")
    good, partial, failed = make_result(20), partial_result(40), error_result(60)
    for result in (good, partial, failed):
        sink.log(result)
    sink.close()

    acc = accumulator(tmp_path / "tb")
    tags = set(acc.Tags()["scalars"])
    expected = {
        f"entropy_probe/{name}"
        for name in (
            "deltaH1 deltaH_true deltaH1_se deltaH_true_se bars_dot H_orig H_upd ess_fraction "
            "learning_rate update_cosine update_rel_error deltaH_true_lo2se deltaH_true_hi2se"
        ).split()
    } | {f"entropy_probe/time/{phase}" for phase in TIMING}
    assert expected <= tags

    def series(tag):
        return {e.step: e.value for e in acc.Scalars(tag)}

    assert series("entropy_probe/deltaH1") == pytest.approx(
        {20: good.deltaH1, 40: partial.deltaH1, 60: failed.deltaH1}, rel=1e-6
    )
    # None (partial, failed) and NaN (partial H_upd) are skipped, not written as 0 or NaN.
    assert set(series("entropy_probe/deltaH_true")) == {20}
    assert set(series("entropy_probe/H_upd")) == {20}
    lo, hi = series("entropy_probe/deltaH_true_lo2se"), series("entropy_probe/deltaH_true_hi2se")
    assert lo[20] == pytest.approx(good.deltaH_true - 2 * good.deltaH_true_se, rel=1e-6)
    assert hi[20] == pytest.approx(good.deltaH_true + 2 * good.deltaH_true_se, rel=1e-6)
    assert series("entropy_probe/time/sampling") == pytest.approx({20: 2.10, 40: 2.10, 60: 1.9})


def test_tensorboard_layout_lives_in_its_own_subdirectory_with_two_charts(tmp_path):
    run = tmp_path / "version_0"
    sink = TensorBoardSink(log_dir=run)
    layout_dir = sink.write_layout()
    assert layout_dir == run / LAYOUT_SUBDIR
    assert sink.write_layout(run) is None  # once
    sink.log(make_result(20))
    sink.close()

    events = list(layout_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1
    assert "custom_scalars__config__" not in accumulator(run).Tags()["tensors"]

    acc = accumulator(layout_dir)
    proto = acc.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    (category,) = layout.category
    assert category.title == "entropy_probe"
    charts = {chart.title: chart for chart in category.chart}
    assert set(charts) == {"predicted vs true ΔH", "ΔH_true ± 2 SE"}
    assert list(charts["predicted vs true ΔH"].multiline.tag) == [
        r"entropy_probe/deltaH1$",
        r"entropy_probe/deltaH_true$",
    ]
    (series,) = charts["ΔH_true ± 2 SE"].margin.series
    assert (series.value, series.lower, series.upper) == (
        "entropy_probe/deltaH_true",
        "entropy_probe/deltaH_true_lo2se",
        "entropy_probe/deltaH_true_hi2se",
    )

    # A new sink on the same run (resume) does not write a second layout.
    assert TensorBoardSink(experiment=_FakeWriter()).write_layout(run) is None


class _FakeWriter:
    def __init__(self):
        self.calls, self.closed, self.flushed = [], False, False

    def add_scalar(self, tag, value, global_step=None):
        self.calls.append((tag, value, global_step))

    def flush(self):
        self.flushed = True

    def close(self):
        self.closed = True


def test_tensorboard_sink_never_closes_a_writer_it_was_given():
    writer = _FakeWriter()
    sink = TensorBoardSink(experiment=writer)
    sink.log(error_result(7))
    sink.close()
    assert writer.flushed and not writer.closed
    assert all(step == 7 and math.isfinite(value) for _, value, step in writer.calls)
    assert "entropy_probe/deltaH_true" not in {tag for tag, _, _ in writer.calls}


def test_tensorboard_sink_writes_through_lightning_logger(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="lightning_logs")
    sink = TensorBoardSink(experiment=logger.experiment)
    sink.write_layout(logger.log_dir)
    sink.log(make_result(20))
    sink.flush()
    logger.finalize("success")

    log_dir = Path(logger.log_dir)
    assert (log_dir / LAYOUT_SUBDIR).is_dir()
    assert "entropy_probe/deltaH1" in accumulator(log_dir).Tags()["scalars"]


# JSON records -----------------------------------------------------------------------------

LEVEL_SECTIONS = {
    "minimal": {"run_metadata", "core_results", "timing", "update"},
    "standard": {"run_metadata", "core_results", "timing", "update", "ground_truth",
                 "batch_statistics"},
    "detailed": {"run_metadata", "core_results", "timing", "update", "ground_truth",
                 "batch_statistics", "sequences"},
    "debug": {"run_metadata", "core_results", "timing", "update", "ground_truth",
              "batch_statistics", "sequences", "token_data", "raw_tensors"},
}  # fmt: skip


@pytest.mark.parametrize("level", list(LEVEL_SECTIONS))
def test_json_record_sections_follow_log_level(tmp_path, level):
    config = ProbeConfig(log_level=level)
    path = JsonLogWriter(tmp_path, config).write(make_result(20), {"epoch": 2})
    assert path == tmp_path / "step_00000020.json"
    record = read_json(path)
    assert set(record) == LEVEL_SECTIONS[level]
    meta = record["run_metadata"]
    assert meta["timestamp"].endswith("Z") and meta["epoch"] == 2
    assert meta["config_hash"] == config.config_hash()
    assert meta["probe_version"]
    assert {"python_version", "torch_version", "lightning_version", "cuda_version",
            "device_name", "platform"} <= set(meta["environment"])  # fmt: skip
    assert record["core_results"]["deltaH1"] == pytest.approx(-3.2e-4)
    if level == "detailed":
        assert record["sequences"]["E_batch"][1]["response_text"] == "The answer is 7."
    if level == "debug":
        assert record["token_data"]["E_batch"][0]["tokens"] == [87, 284, 19]


def test_section_flags_override_the_level(tmp_path):
    config = ProbeConfig(log_level="standard", log_sequences=True)
    record = read_json(JsonLogWriter(tmp_path, config).write(make_result(20)))
    assert "sequences" in record and "token_data" not in record


def test_summary_jsonl_and_config_are_written_beside_the_record(tmp_path):
    writer = write_run(tmp_path, steps=(20, 40))
    root = writer.root
    summary = read_json(root / summary_filename(40))
    assert summary["core_results"]["step"] == 40
    assert summary["run_metadata"]["record"] == step_filename(40)
    lines = (root / "probes.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [20, 40]
    assert json.loads(lines[0])["timing_total"] == pytest.approx(sum(TIMING.values()))
    config = yaml.safe_load((root / "config.yaml").read_text())
    assert config["config"]["log_level"] == "standard"
    assert config["run_metadata"]["config_hash"] == writer.config.config_hash()


def test_gzip_records_are_readable(tmp_path):
    writer = write_run(tmp_path, steps=(20, 40), log_level="debug", compress=True)
    path = writer.root / "step_00000020.json.gz"
    assert path.is_file() and not (writer.root / "step_00000020.json").exists()
    assert read_json(path)["raw_tensors"]["E_batch_S_orig"][0] == -11.2
    assert load_step(tmp_path, 20)["core_results"]["step"] == 20
    (writer.root / "probes.jsonl").unlink()  # fall back to the step files
    assert [r["step"] for r in load_run(tmp_path)] == [20, 40]


def test_max_files_prunes_oldest_records_but_keeps_every_jsonl_line(tmp_path):
    writer = write_run(tmp_path, steps=(10, 20, 30, 40), max_files=2)
    names = sorted(p.name for p in writer.root.glob("step_*"))
    assert names == [
        "step_00000030.json",
        "step_00000030_summary.json",
        "step_00000040.json",
        "step_00000040_summary.json",
    ]
    assert [r["step"] for r in load_run(tmp_path)] == [10, 20, 30, 40]
    writer.write(make_result(5))  # a resumed run re-probing an early step keeps its record
    assert sorted(p.name for p in writer.root.glob("step_*[0-9].json")) == [
        "step_00000005.json",
        "step_00000040.json",
    ]


def test_crash_before_rename_leaves_no_partial_or_temp_file(tmp_path, monkeypatch):
    writer = JsonLogWriter(tmp_path, ProbeConfig())
    writer.write(make_result(20))
    before = (tmp_path / "step_00000020.json").read_bytes()

    def crash(src, dst, **dir_fds):
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(fileio.os, "replace", crash)
    with pytest.raises(StepWriteError, match="simulated crash") as info:
        writer.write(make_result(40))
    assert info.value.on_disk.startswith("nothing of step 40 is on disk")
    with pytest.raises(StepWriteError, match="simulated crash") as info:
        writer.write(make_result(20, shift=9.0))
    assert info.value.on_disk == ("this write of step 20 left nothing on disk; the files of an "
                                  "earlier write of step 20 stay: step_00000020.json, "
                                  "step_00000020_summary.json")

    names = sorted(os.listdir(tmp_path))
    assert names == ["config.yaml", "probes.jsonl", "step_00000020.json",
                     "step_00000020_summary.json"]  # fmt: skip
    assert (tmp_path / "step_00000020.json").read_bytes() == before


def test_error_and_odd_values_are_written_not_raised(tmp_path):
    result = dataclasses.replace(
        error_result(60), timing={**error_result(60).timing, "score_upd": float("inf")},
        batch_statistics={"lengths": np.array([3, 5]), "mean": np.float32(4.0),
                          "S": torch.tensor([-1.5, float("nan")])})  # fmt: skip
    path = JsonLogWriter(tmp_path, ProbeConfig(log_level="debug")).write(result)
    record = json.loads(path.read_text())  # strict JSON: no NaN / Infinity tokens
    assert record["core_results"]["error"]["phase"] == "after_step"
    assert record["core_results"]["deltaH_true"] is None
    assert record["timing"]["score_upd"] is None
    assert record["batch_statistics"] == {"lengths": [3, 5], "mean": 4.0, "S": [-1.5, None]}
    (line,) = load_run(tmp_path)
    assert line["error"]["message"] == "CUDA out of memory"


def test_unwritable_root_raises_oserror(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        JsonLogWriter(blocker / "entropy_probe", ProbeConfig()).write(make_result(20))


# Reading ----------------------------------------------------------------------------------


def test_truncated_last_jsonl_line_is_skipped_and_repaired_on_next_append(tmp_path):
    writer = write_run(tmp_path, steps=(20, 40, 60))
    with open(writer.jsonl_path, "a") as handle:
        handle.write('{"step": 80, "deltaH1": -3.')  # crash mid-line
    assert [r["step"] for r in load_run(tmp_path)] == [20, 40, 60]
    writer.write(make_result(80))
    lines = writer.jsonl_path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [20, 40, 60, 80]


def test_load_run_accepts_log_dir_probe_dir_and_lightning_version_dir(tmp_path):
    version = tmp_path / "lightning_logs" / "version_0"
    write_run(version, steps=(40, 20))
    for where in (version, version / "entropy_probe", tmp_path / "lightning_logs"):
        assert [r["step"] for r in load_run(where)] == [20, 40]
    write_run(tmp_path / "lightning_logs" / "version_1", steps=(20,))
    with pytest.raises(ValueError, match="holds 2 probe runs"):
        load_run(tmp_path / "lightning_logs")


def test_load_run_keeps_the_last_record_of_a_repeated_step(tmp_path):
    writer = write_run(tmp_path, steps=(20,))
    writer.write(make_result(20, shift=10.0))
    (record,) = load_run(tmp_path)
    assert record["bars_dot"] == pytest.approx(-22.0)


def test_load_run_errors_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory.*probes.jsonl"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no probe log"):
        load_run(tmp_path / "empty")

    corrupt = tmp_path / "corrupt" / "entropy_probe"
    corrupt.mkdir(parents=True)
    (corrupt / "step_00000020.json").write_text('{"core_results": {"step": 2')
    with pytest.raises(RunLogError, match="step_00000020.json: corrupt"):
        load_run(tmp_path / "corrupt")
    (corrupt / "probes.jsonl").write_text('{"step": 20}\nnot json\n{"step": 40}\n')
    with pytest.raises(ValueError, match=r"probes.jsonl:2: corrupt"):
        load_run(corrupt)


def test_load_run_as_dataframe(tmp_path):
    write_run(tmp_path, steps=(20, 40))
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs pandas"):
            load_run(tmp_path, as_dataframe=True)
    else:
        frame = load_run(tmp_path, as_dataframe=True)
        assert list(frame["step"]) == [20, 40]


# CLI --------------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    root = tmp_path / "run"
    writer = write_run(root, steps=(20, 40, 60, 80))
    writer.write(partial_result(100))
    writer.write(error_result(120))
    return root


def test_cli_summary_prints_a_row_per_probe_and_the_correlation(run_dir, capsys):
    assert main(["summary", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "6 probes (nats per token)" in out
    for step in (20, 40, 60, 80, 100, 120):
        assert f"\n{step} " in out
    assert "error in after_step" in out and "unreliable" in out
    records = load_run(run_dir)
    both = [r for r in records if r["deltaH_true"] is not None]
    r = np.corrcoef([x["deltaH1"] for x in both], [x["deltaH_true"] for x in both])[0, 1]
    assert f"Pearson r(δH₁, ΔH_true) = {r:.3f} over 4 probes" in out


def test_cli_export_writes_csv_to_stdout_and_file(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(row["step"]) for row in rows] == [20, 40, 60, 80, 100, 120]
    assert float(rows[0]["deltaH1"]) == pytest.approx(-3.2e-4)
    assert rows[4]["deltaH_true"] == ""
    assert json.loads(rows[5]["error"])["type"] == "RuntimeError"

    target = tmp_path / "probes.csv"
    assert main(["export", str(run_dir), "--csv", "-o", str(target)]) == 0
    assert len(target.read_text().splitlines()) == 7


def test_cli_plot_writes_a_png(run_dir, tmp_path):
    target = tmp_path / "dh.png"
    assert main(["plot", str(run_dir), "-o", str(target)]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert target.stat().st_size > 10_000


def test_cli_plot_without_matplotlib_says_how_to_install(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    assert main(["plot", str(run_dir), "-o", str(tmp_path / "dh.png")]) == 2
    assert "pip install 'entropy-callback[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "dh.png").exists()


def test_cli_compare_prints_one_row_per_run(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    write_run(other, steps=(10, 20))
    assert main(["compare", str(run_dir), str(other)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[1].split()[:2] == [str(run_dir), "6"]
    assert lines[2].split()[:2] == [str(other), "2"]


def test_cli_compare_on_a_directory_of_several_runs_compares_them_all(tmp_path, capsys):
    """Two runs on one log_dir (e.g. two probes in one Trainer): summary asks which one,
    compare takes both."""
    for steps in ((0, 10, 20), (0, 10)):
        run = RunLogger(ProbeConfig(), tmp_path, tensorboard=False).open()
        for t in steps:
            run.emit(make_result(t))
        run.close()
    assert main(["summary", str(tmp_path)]) == 2
    assert "holds 2 probe runs" in capsys.readouterr().err
    assert main(["compare", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[1].split()[:2] == [str(tmp_path / "entropy_probe"), "3"]
    assert lines[2].split()[1] == "2" and "entropy_probe-" in lines[2].split()[0]


def test_cli_exits_2_with_one_line_for_unreadable_logs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "probes.jsonl").write_text("[1, 2]\n")
    for command in ("summary", "export", "plot"):
        for where in (tmp_path / "missing", tmp_path / "empty", corrupt):
            assert main([command, str(where)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "Traceback" not in err
            assert err.startswith(f"entropy-probe {command}: error: ")
    assert main(["compare", str(tmp_path / "empty"), str(corrupt)]) == 2


def test_pearson_handles_missing_values_and_degenerate_input():
    r, n = pearson([1.0, 2.0, None, 3.0, float("nan")], [2.0, 4.1, 5.0, 5.9, 1.0])
    assert n == 3 and r == pytest.approx(np.corrcoef([1, 2, 3], [2.0, 4.1, 5.9])[0, 1])
    assert pearson([1.0], [1.0]) == (None, 1)
    assert pearson([1.0, 1.0], [2.0, 3.0]) == (None, 2)


# The one sink layer -----------------------------------------------------------------------


def test_import_entropy_callback_does_not_import_lightning_or_the_hf_trainer():
    code = ("import sys, entropy_callback as e\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', "
            "'pytorch_lightning') or m.startswith('transformers.trainer'))\n"
            "assert not loaded, loaded\n"
            "assert 'EntropyProbeCallback' in dir(e) and 'EntropyProbeCallback' in e.__all__\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    # on first use the adapter is imported, and it is the lightning module's class
    import entropy_callback
    from entropy_callback import lightning as adapter

    assert entropy_callback.EntropyProbeCallback is adapter.EntropyProbeCallback


def test_a_plain_loop_writes_what_the_lightning_callback_writes(tmp_path):
    """The engine in a hand-written AdamW loop + one RunLogger: the same TensorBoard tags, the
    same JSON files and record sections as a real Lightning run, and the metric loggers get the
    TensorBoard scalars."""
    model, tokenizer = tiny_policy()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    config = ProbeConfig(**SMALL_PROBE)
    probe = EntropyProbe(model, tokenizer, probe_prompts(), config)
    seen: list[tuple[int, dict]] = []
    run = RunLogger(config, tmp_path / "plain", metric_loggers=[
        lambda scalars, step: seen.append((step, scalars))]).open()
    for step in range(2):
        optimizer.zero_grad()
        backward_on(model, tokenizer)
        probe.before_step(optimizer, step=step)
        optimizer.step()
        run.emit(probe.after_step())
    run.close()

    callback = probe_callback(every=1)
    fit(make_trainer(tmp_path / "lightning", [callback], 2), grpo_module())
    lightning_dir = tmp_path / "lightning" / "run" / "version_0"

    plain_dir = run.run_dir
    assert plain_dir == tmp_path / "plain" / "entropy_probe"
    assert sorted(p.name for p in plain_dir.iterdir()) == sorted(
        p.name for p in callback.json.root.iterdir())
    for step in (0, 1):
        mine, theirs = load_step(plain_dir, step), load_step(lightning_dir, step)
        assert set(mine) == set(theirs)
        assert set(mine["core_results"]) == set(theirs["core_results"])
        assert mine["run_metadata"]["run_id"] == run.run_id
    assert [r["step"] for r in load_run(tmp_path / "plain")] == [0, 1]

    def probe_tags(directory):
        return {t for t in accumulator(directory).Tags()["scalars"]
                if t.startswith("entropy_probe/") and "/time/" not in t}

    plain_tags = probe_tags(tmp_path / "plain")
    assert plain_tags == probe_tags(lightning_dir)
    assert (tmp_path / "plain" / LAYOUT_SUBDIR).is_dir()
    assert [step for step, _ in seen] == [0, 1]
    assert {t for t in seen[0][1] if "/time/" not in t} == plain_tags


def test_a_failing_metric_logger_is_the_records_error_and_the_result_is_untouched(tmp_path):
    def broken(scalars, step):
        raise ConnectionError("metrics server unreachable")

    run = RunLogger(ProbeConfig(), tmp_path, tensorboard=False, metric_loggers=[broken]).open()
    result = make_result(20)
    with pytest.warns(EntropyProbeWarning) as caught:
        run.emit(result, {"epoch": 1})
    run.close()
    (message,) = [str(w.message) for w in caught]
    assert "phase 'logger' at step 20 (ConnectionError: metrics server unreachable)" in message
    assert f"The JSON record of step 20 in {run.run_dir}" in message
    assert "holds this error" in message
    record = load_step(run.run_dir, 20)
    assert record["core_results"]["error"]["phase"] == "logger"
    assert record["timing"]["logger"] >= 0.0 and record["run_metadata"]["epoch"] == 1
    # one way: the sinks write nothing back into the engine's result
    assert result.error is None and "logger" not in result.timing


def test_strict_run_logger_raises_and_leaves_nothing_of_the_step(tmp_path, monkeypatch):
    run = RunLogger(ProbeConfig(strict=True), tmp_path, tensorboard=False).open()
    run.emit(make_result(20))

    def full(path, line):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(jsonlog, "append_line", full)
    with pytest.raises(ProbeFailure, match="phase 'json' at step 40"):
        run.emit(make_result(40))
    run.close()
    assert sorted(p.name for p in run.run_dir.glob("step_*")) == [
        step_filename(20), summary_filename(20)]
    assert [r["step"] for r in load_run(run.run_dir)] == [20]


def test_a_run_logger_without_log_dir_feeds_only_its_metric_loggers():
    seen = []
    run = RunLogger(ProbeConfig(), metric_loggers=[lambda s, t: seen.append((t, s))]).open()
    run.emit(error_result(7))
    run.close()
    assert run.run_dir is None and run.tensorboard is None
    assert run.state_dict()["run_id"] == run.run_id and run.state_dict()["run_dir"] is None
    ((step, scalars_),) = seen
    assert step == 7 and scalars_["entropy_probe/deltaH1"] == pytest.approx(-2.5e-4)


def test_a_removed_config_is_rewritten_and_an_unrecreatable_directory_costs_the_step(tmp_path):
    run = RunLogger(ProbeConfig(), tmp_path, tensorboard=False).open()
    run.emit(make_result(20))
    (run.run_dir / "config.yaml").unlink()
    with pytest.warns(EntropyProbeWarning, match="config.yaml was removed .* rewrote it; the "
                      "records beside it are untouched"):
        run.emit(make_result(40))
    assert yaml.safe_load((run.run_dir / "config.yaml").read_text())["run_metadata"][
        "run_id"] == run.run_id
    assert [r["step"] for r in load_run(run.run_dir)] == [20, 40]

    shutil.rmtree(run.run_dir)
    run.run_dir.write_text("a regular file where the run directory was\n")
    with pytest.warns(EntropyProbeWarning, match="phase 'json' at step 60 .* nothing of step 60 "
                      "is on disk .* cannot be recreated"):
        run.emit(make_result(60))
    run.close()
    assert run.run_dir.read_text().startswith("a regular file")


def test_tensorboard_may_go_to_its_own_directory(tmp_path):
    """HF's layout: scalars under args.logging_dir, JSON under args.output_dir."""
    run = RunLogger(ProbeConfig(), tmp_path / "out", tensorboard=tmp_path / "tb").open()
    run.emit(make_result(20))
    run.close()
    assert run.run_dir == tmp_path / "out" / "entropy_probe"
    assert "entropy_probe/deltaH1" in accumulator(tmp_path / "tb").Tags()["scalars"]
    assert (tmp_path / "tb" / LAYOUT_SUBDIR).is_dir()
    assert not (tmp_path / "out" / LAYOUT_SUBDIR).exists()
    assert not list((tmp_path / "out").glob("events.out.tfevents.*"))


def test_a_named_run_logger_prefixes_every_tag_and_its_layout(tmp_path):
    """RunLogger(name=...): TensorBoard, metric loggers and the layout all use the name, and
    ``run_metadata.probe_name`` records it."""
    seen = []
    run = RunLogger(ProbeConfig(), tmp_path / "out", tensorboard=tmp_path / "tb",
                    metric_loggers=[lambda s, t: seen.append(s)], name="ood").open()
    run.emit(make_result(20))
    run.close()
    tags = set(accumulator(tmp_path / "tb").Tags()["scalars"])
    assert "ood/deltaH1" in tags and not any(t.startswith("entropy_probe/") for t in tags)
    assert "ood/deltaH1" in seen[0] and all(t.startswith("ood/") for t in seen[0])
    assert (tmp_path / "tb" / "ood_layout").is_dir() and not (tmp_path / "tb" /
                                                              LAYOUT_SUBDIR).exists()
    meta = yaml.safe_load((run.run_dir / "config.yaml").read_text())["run_metadata"]
    assert meta["probe_name"] == "ood"
    with pytest.raises(ProbeConfigError, match="name must be 1-64"):
        RunLogger(ProbeConfig(), tmp_path, name="a b")
