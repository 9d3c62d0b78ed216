"""The ``entropy-probe`` CLI and ``load_run`` on hostile files: every unreadable log ends in
exit status 2 and one line on stderr (no traceback), with memory bounded by the size limits of
``runlog`` rather than by the file. The CLI runs in-process on files built in ``tmp_path``."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pytest

from entropy_callback import runlog
from entropy_callback.cli import main
from entropy_callback.runlog import RunLogError, load_run

MiB = 2**20
COMMANDS = ("summary", "export", "plot", "compare")


def record(t: int, d1: float | None = -3e-4, true: float | None = -2.9e-4, **extra) -> dict:
    """A probes.jsonl line of step ``t``; ``extra`` adds or replaces fields (``step`` too)."""
    return {"step": t, "deltaH1": d1, "deltaH1_se": 1e-5, "deltaH_true": true,
            "deltaH_true_se": 2e-5, "ess_fraction": 0.9, "learning_rate": 1e-3,
            "normalize": "per_token", "reliable": True, **extra}


def write_jsonl(run: Path, lines: list) -> Path:
    root = run / "entropy_probe"
    root.mkdir(parents=True, exist_ok=True)
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    (root / "probes.jsonl").write_text(text)
    return run


def cli(args: list[str], capsys, tmp_path: Path) -> tuple[int, str, str]:
    if args[0] == "plot":
        args = [*args, "-o", str(tmp_path / "dh.png")]
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status: int, err: str, command: str, *words: str) -> None:
    assert status == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"entropy-probe {command}: error: "), err
    for word in words:
        assert word in err, (word, err)


# ------------------------------------------------------------------ wrong types in a record
WRONG_TYPES = {
    "normalize_list": (dict(normalize=["per_token"]), "'normalize' must be a string"),
    "normalize_dict": (dict(normalize={"a": 1}), "'normalize' must be a string"),
    "deltaH1_string": (dict(deltaH1="-3e-4"), "'deltaH1' must be a number"),
    "deltaH_true_bool": (dict(deltaH_true=True), "'deltaH_true' must be a number"),
    "reliable_string": (dict(reliable="yes"), "'reliable' must be true/false"),
    "error_list": (dict(error=["sampling"]), "'error' must be an object"),
    "step_string": (dict(step="20"), "integer 'step' >= 0"),
    "step_negative": (dict(step=-3), "integer 'step' >= 0"),
    "step_float": (dict(step=20.0), "integer 'step' >= 0"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_wrong_field_type_in_probes_jsonl_exits_2_with_one_line(case, command, tmp_path, capsys):
    fields, words = WRONG_TYPES[case]
    run = write_jsonl(tmp_path / "run", [record(0), record(10, **fields)])
    status, _, err = cli([command, str(run)], capsys, tmp_path)
    assert_one_line_error(status, err, command, "probes.jsonl:2", words)


@pytest.mark.parametrize("case", ["normalize_list", "step_string", "deltaH1_string"])
def test_wrong_field_type_in_a_step_file_exits_2_with_one_line(case, tmp_path, capsys):
    fields, words = WRONG_TYPES[case]
    root = tmp_path / "run" / "entropy_probe"
    root.mkdir(parents=True)
    body = {"core_results": record(20, **fields), "timing": {"total": 0.1}}
    (root / "step_00000020.json").write_text(json.dumps(body))
    status, _, err = cli(["summary", str(tmp_path / "run")], capsys, tmp_path)
    assert_one_line_error(status, err, "summary", "step_00000020.json", words)


@pytest.mark.parametrize("line", [
    '{"step": 0, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",  # RecursionError in json
    '{"step": 1' + "0" * 5000 + "}",  # past Python's 4300-digit int limit: a plain ValueError
], ids=["nested_100000_deep", "integer_of_5000_digits"])
def test_pathological_json_line_is_a_run_log_error(line, tmp_path, capsys):
    run = write_jsonl(tmp_path / "run", [record(0), line])
    with pytest.raises(RunLogError, match="probes.jsonl:2: corrupt line"):
        load_run(run)
    status, _, err = cli(["summary", str(run)], capsys, tmp_path)
    assert_one_line_error(status, err, "summary", "probes.jsonl:2: corrupt line")


# ------------------------------------------------------------------ size bounds
def peak_bytes(read) -> int:
    """Peak Python heap allocation (bytes) while ``read()`` runs."""
    tracemalloc.start()
    try:
        read()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def write_bomb(path: Path, inflated: int) -> None:
    """A valid step record padded with whitespace to ``inflated`` bytes, gzipped (a few KiB)."""
    head = json.dumps({"core_results": record(20)}).encode()
    with gzip.open(path, "wb", compresslevel=9) as handle:
        handle.write(head)
        block = b" " * MiB
        for _ in range((inflated - len(head)) // MiB):
            handle.write(block)


def test_decompression_bomb_is_refused_within_the_inflate_bound(tmp_path, capsys, monkeypatch):
    # The default bound is 256 MiB; 1 MiB here keeps the test small. The record inflates to
    # 48 MiB (valid JSON: without the bound it would be read whole and parsed).
    monkeypatch.setattr(runlog, "MAX_RECORD_BYTES", MiB)
    root = tmp_path / "run" / "entropy_probe"
    root.mkdir(parents=True)
    bomb = root / "step_00000020.json.gz"
    write_bomb(bomb, 48 * MiB)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(RunLogError, match=r"step_00000020.json.gz: the record is larger than "
                       r"1048576 bytes once read \(inflated\); refused"):
        runlog.read_record(bomb)
    # what the reader holds is bounded by the limit (2 MiB for the read plus zlib's buffers),
    # not by the 48 MiB the file inflates to
    assert peak_bytes(lambda: pytest.raises(RunLogError, runlog.read_record, bomb)) < 4 * MiB
    for command in COMMANDS:
        status, _, err = cli([command, str(tmp_path / "run")], capsys, tmp_path)
        assert_one_line_error(status, err, command, "step_00000020.json.gz: the record is "
                              "larger than")
        assert "corrupt" not in err


def test_record_bound_admits_a_record_just_under_it(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog, "MAX_RECORD_BYTES", 2 * MiB)
    path = tmp_path / "step_00000020.json.gz"
    write_bomb(path, 2 * MiB)
    assert runlog.read_record(path)["core_results"]["step"] == 20


def test_overlong_jsonl_line_is_refused_within_the_line_bound(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runlog, "MAX_LINE_BYTES", 64 * 1024)
    run = write_jsonl(tmp_path / "run", [record(0), record(10, pad="x" * (8 * MiB))])
    jsonl = run / "entropy_probe" / "probes.jsonl"
    assert peak_bytes(lambda: pytest.raises(RunLogError, load_run, run)) < MiB
    status, _, err = cli(["summary", str(run)], capsys, tmp_path)
    assert_one_line_error(status, err, "summary", f"{jsonl}:2: line longer than 65536 bytes")


def test_huge_probes_jsonl_is_streamed_with_bounded_memory(tmp_path):
    # 40 MiB of lines re-logging a handful of steps (a resumed run appends; load_run keeps the
    # last line of each step): the reader holds one line and one record per step, not the file.
    line = json.dumps(record(0, pad="x" * 4000)) + "\n"
    root = tmp_path / "run" / "entropy_probe"
    root.mkdir(parents=True)
    with open(root / "probes.jsonl", "w") as handle:
        for i in range(10_000):
            handle.write(line.replace('"step": 0', f'"step": {i % 5}', 1))
    assert (root / "probes.jsonl").stat().st_size > 40 * MiB
    records: list = []
    peak = peak_bytes(lambda: records.extend(load_run(tmp_path / "run")))
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert peak < 2 * MiB, peak  # the whole file read at once would be over 40 MiB


# ------------------------------------------------------------------ nothing to show
def test_plot_of_a_run_with_nothing_finite_says_so_and_exits_2(tmp_path, capsys):
    error = {"phase": "sampling", "type": "RuntimeError", "message": "boom"}
    run = write_jsonl(tmp_path / "run", [record(t, None, None, error=error) for t in (0, 10, 20)])
    status, _, err = cli(["plot", str(run)], capsys, tmp_path)
    assert_one_line_error(status, err, "plot", "nothing to plot", "none of its 3 probes",
                          "3 ended in an error")
    assert not (tmp_path / "dh.png").exists()


def test_plot_with_one_finite_value_draws(tmp_path, capsys):
    run = write_jsonl(tmp_path / "run", [record(0, None, None), record(10, -1e-4, None)])
    status, out, _ = cli(["plot", str(run)], capsys, tmp_path)
    assert status == 0 and "wrote" in out and (tmp_path / "dh.png").stat().st_size > 0


def test_no_correlation_over_fewer_than_three_finite_pairs(tmp_path, capsys):
    run = write_jsonl(tmp_path / "run", [record(0, -1e-4, -2e-4), record(10, -3e-4, -1e-4),
                                         record(20, None, -1e-4)])
    status, out, _ = cli(["summary", str(run)], capsys, tmp_path)
    assert status == 0
    assert "Pearson r(δH₁, ΔH_true) = n/a over 2 probes (needs 3 probes with both finite)" in out
    assert "= 1.000" not in out and "= -1.000" not in out
    status, out, _ = cli(["compare", str(run)], capsys, tmp_path)
    assert status == 0 and out.splitlines()[1].split()[4] == "-"


def test_correlation_is_shown_from_three_finite_pairs(tmp_path, capsys):
    run = write_jsonl(tmp_path / "run", [record(0, -1e-4, -2e-4), record(10, -3e-4, -4e-4),
                                         record(20, -2e-4, -2.5e-4)])
    status, out, _ = cli(["summary", str(run)], capsys, tmp_path)
    assert status == 0 and "over 3 probes" in out and "n/a" not in out
