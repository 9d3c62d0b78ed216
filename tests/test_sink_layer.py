"""The sink layer as a user plugs into it: ``RunLogger(sinks=[...])`` (any object with the Sink
protocol), the JSON records one sink among the others, the caller's result never written to, and
no exception of any kind from opening or writing a sink reaching the caller (unless strict)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from entropy_callback import (
    EntropyProbeWarning,
    ProbeConfig,
    ProbeConfigError,
    ProbeFailure,
    ProbeResult,
    Sink,
)
from entropy_callback.jsonsink import JsonSink
from entropy_callback.result import CORE_FIELDS
from entropy_callback.runlog import load_run, load_step
from entropy_callback.sinks import RunLogger
from entropy_callback.tensorboard import TensorBoardSink


def make_result(step: int) -> ProbeResult:
    return ProbeResult(step=step, B_E=8, T_E=20, learning_rate=1e-3, deltaH1=-0.01,
                       deltaH1_se=0.002, deltaH_true=-0.012, deltaH_true_se=0.003, H_orig=1.5,
                       H_upd=1.488, ESS=7.0, ess_fraction=0.875, reliable=True,
                       update_cosine=1.0, update_rel_error=0.0, update_source="observed",
                       timing={"total": 0.5})


class Recorder:
    """A user's sink: keeps what it was given."""

    def __init__(self, name: str = "recorder", fail: Exception | None = None) -> None:
        self.name = name
        self.fail = fail
        self.steps: list[int] = []
        self.flushed = self.closed = 0

    def log(self, result: ProbeResult) -> None:
        if self.fail is not None:
            raise self.fail
        self.steps.append(result.step)

    def flush(self) -> None:
        self.flushed += 1

    def close(self) -> None:
        self.closed += 1


def test_user_sinks_get_every_probe_before_the_json_record_and_are_closed(tmp_path):
    user = Recorder()
    run = RunLogger(ProbeConfig(), tmp_path, sinks=[user]).open()
    assert isinstance(user, Sink) and isinstance(run.json, JsonSink)
    assert isinstance(run.tensorboard, TensorBoardSink)
    assert [s.name for s in run.sinks] == ["tensorboard", "recorder", "json"]
    for step in (0, 4):
        run.emit(make_result(step))
    run.flush()
    run.close()
    assert user.steps == [0, 4] and user.flushed == 1 and user.closed == 1
    records = load_run(run.run_dir)
    assert [r["step"] for r in records] == [0, 4]
    assert load_step(run.run_dir, 4)["timing"]["recorder"] >= 0.0  # each sink's time
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("entropy_probe/deltaH1")] == [0, 4]


def test_a_failing_user_sink_is_the_records_error_and_strict_raises(tmp_path):
    run = RunLogger(ProbeConfig(), tmp_path, tensorboard=False,
                    sinks=[Recorder("wandb", KeyError("no such project"))]).open()
    with pytest.warns(EntropyProbeWarning, match="phase 'wandb' at step 2 .*KeyError.* The "
                      "JSON record of step 2 .* holds this error"):
        run.emit(make_result(2))
    run.close()
    assert load_step(run.run_dir, 2)["core_results"]["error"]["phase"] == "wandb"
    strict = RunLogger(ProbeConfig(strict=True), tmp_path / "strict", tensorboard=False,
                       sinks=[Recorder("wandb", KeyError("no such project"))]).open()
    with pytest.raises(ProbeFailure, match="phase 'wandb' at step 2"):
        strict.emit(make_result(2))
    strict.close()


def test_an_object_without_the_sink_protocol_is_refused():
    with pytest.raises(TypeError, match=r"sinks\[0\] \(function\) is not a Sink"):
        RunLogger(ProbeConfig(), sinks=[lambda result: None])


def test_a_failing_sink_writes_nothing_into_the_callers_result(tmp_path):
    """The record of a step whose metric logger failed holds the error and a null reason per
    missing number; the engine's result keeps none of it (e619d40 wrote those null_reasons,
    blaming the logger, into it, with its error still None)."""
    def broken(scalars, step):
        raise ConnectionError("metrics server unreachable")

    run = RunLogger(ProbeConfig(), tmp_path, tensorboard=False, metric_loggers=[broken]).open()
    result = ProbeResult(step=3)  # every estimate missing
    with pytest.warns(EntropyProbeWarning):
        run.emit(result)
    run.close()
    record = load_step(run.run_dir, 3)["core_results"]
    assert record["error"]["phase"] == "logger"
    assert set(record["null_reasons"]) == set(CORE_FIELDS)
    assert result.error is None and result.null_reasons == {} and result.timing == {}


@pytest.mark.parametrize("case", ["nul byte", "layout"])
def test_opening_catches_every_exception_not_only_os_errors(tmp_path, case):
    """A ValueError from the file system (a NUL byte in the directory) or from writing the
    layout (a name the file system cannot encode, UnicodeEncodeError) disables the JSON sink with
    one warning; TensorBoard still gets the scalars. e619d40 raised both at open()."""
    writer = SummaryWriter(str(tmp_path / "tb"))
    log_dir = str(tmp_path / "a\0b") if case == "nul byte" else tmp_path / "a\udcffb"
    run = RunLogger(ProbeConfig(), log_dir, tensorboard=writer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.open()
        run.emit(make_result(0))
    assert run.json is None and [s.name for s in run.sinks] == ["tensorboard"]
    run.close()
    messages = [str(w.message) for w in caught if w.category is EntropyProbeWarning]
    assert len(messages) == 1 and "no JSON records" in messages[0], messages
    assert "TensorBoard scalars are still logged" in messages[0]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("entropy_probe/deltaH1")] == [0]
    strict = RunLogger(ProbeConfig(strict=True), log_dir, tensorboard=writer)
    with pytest.raises(ProbeFailure, match="sink 'json' could not be opened"):
        strict.open()
    writer.close()


def test_every_write_catches_every_exception(tmp_path):
    """A record the file system cannot take (a metadata string that is not encodable, a
    UnicodeEncodeError at the write) costs that step's record with a warning, every step."""
    run = RunLogger(ProbeConfig(), tmp_path, tensorboard=False,
                    metadata={"host": "n\udcff1"}).open()
    for step in (0, 1):
        with pytest.warns(EntropyProbeWarning, match=f"phase 'json' at step {step} "
                          r"\(UnicodeEncodeError.*nothing of step"):
            run.emit(make_result(step))
    run.close()
    assert not list(Path(run.run_dir).glob("step_*"))


@pytest.mark.parametrize("log_dir", ["runs/a\0b", "runs/\ud800"])
def test_a_log_dir_no_file_system_takes_is_refused_at_construction(log_dir):
    with pytest.raises(ProbeConfigError, match="log_dir .*pass a"):
        ProbeConfig(log_dir=log_dir)
