"""The ``entropy-probe`` CLI on hostile run directories: it never traces back, never hangs and
never blows up. Every case ends in exit status 0 with the damage said, or exit 2 with one line
on stderr. Cases that would hang a reader (a FIFO, ``/dev/zero``, a "billion laughs" YAML) run
the CLI in a subprocess under a generous timeout (a hang guard, not a speed assertion); the rest
run in-process on files built in ``tmp_path``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from entropy_callback import cli as cli_module
from entropy_callback.cli import main, pearson
from entropy_callback.config import ProbeConfig, ProbeConfigError
from entropy_callback.jsonlog import timing_total
from entropy_callback.result import finite_float
from entropy_callback.runlog import describe_run, load_run
from entropy_callback.yamlsafe import MAX_YAML_DEPTH

HANG_GUARD_S = 120  # a reader that blocks on a FIFO never returns; a working one takes ~2 s
HUGE_INT = 10**4000  # parses as a Python int (under the 4300-digit limit), past float range
REPO = Path(__file__).resolve().parents[1]


def record(t: int, d1=-3e-4, true=-2.9e-4, **extra) -> dict:
    """A probes.jsonl line of step ``t``; ``extra`` adds or replaces fields."""
    return {"step": t, "deltaH1": d1, "deltaH1_se": 1e-5, "deltaH_true": true,
            "deltaH_true_se": 2e-5, "ess_fraction": 0.9, "learning_rate": 1e-3,
            "normalize": "per_token", "reliable": True, **extra}


def run_dir(tmp_path: Path, lines: list[dict] | None = None) -> Path:
    root = tmp_path / "run" / "entropy_probe"
    root.mkdir(parents=True, exist_ok=True)
    if lines is not None:
        (root / "probes.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status: int, err: str, command: str, *words: str) -> None:
    assert status == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"entropy-probe {command}: error: "), err
    for word in words:
        assert word in err, (word, err)


def cli_subprocess(args: list[str]) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, killed (and the test failed) if it blocks."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "entropy_callback.cli", *args], env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S, check=False)


# ------------------------------------------------------------------ numbers without bounds
@pytest.mark.parametrize("scale", [1e200, 1e300], ids=["1e200", "1e300"])
def test_correlation_of_huge_values_does_not_overflow(scale):
    # (x - mean) ** 2 of 1e200 raised OverflowError; r is scale-free, so it must equal the
    # r of the same values at scale 1 (to rounding: 1e-12)
    xs, ys = [1.0, 2.0, 4.0, 3.0], [1.5, 2.0, 3.5, 3.9]
    r_small, _ = pearson(xs, ys)
    r_huge, n = pearson([x * scale for x in xs], [y * scale for y in ys])
    assert n == 4 and r_huge == pytest.approx(r_small, abs=1e-12)


def test_a_number_beyond_float_range_is_not_finite():
    assert finite_float(HUGE_INT) is None and finite_float(-HUGE_INT) is None
    assert finite_float(10**300) == 1e300
    assert timing_total({"sampling": HUGE_INT, "rescoring": 0.5}) == 0.5
    assert timing_total({"total": HUGE_INT}) is None
    assert timing_total({"a": 1e308, "b": 1e308}) is None  # the sum is inf: not a total


@pytest.mark.parametrize("command", ["summary", "compare", "export", "plot"])
@pytest.mark.parametrize("value", [1e200, HUGE_INT], ids=["1e200", "int_of_4000_digits"])
def test_huge_numbers_in_records_are_read_without_overflow(command, value, tmp_path, capsys):
    lines = [record(0, value, -value), record(1, value, 1e-4),
             record(2, -3e-4, -2e-4, deltaH1_se=value, learning_rate=value,
                    timing_total=value),
             record(3, -1e-4, -1e-4)]
    run_dir(tmp_path, lines)
    args = [command, str(tmp_path / "run")]
    if command == "plot":
        args += ["-o", str(tmp_path / "dh.png")]
    status, out, err = cli(args, capsys)
    assert status == 0, err
    assert "Traceback" not in err
    if command == "plot":
        assert (tmp_path / "dh.png").stat().st_size > 0
    if command == "summary":
        assert "over 4 probes" in out or "over 2 probes" in out  # 1e200 pairs count; ints don't


def test_plot_of_only_huge_values_says_nothing_to_plot(tmp_path, capsys):
    run_dir(tmp_path, [record(t, 1e300, -1e300) for t in range(3)])
    status, _, err = cli(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "dh.png")], capsys)
    assert_one_line_error(status, err, "plot", "nothing to plot", "1e+150")
    assert not (tmp_path / "dh.png").exists()


def test_a_step_beyond_int64_is_a_corrupt_record(tmp_path, capsys):
    run_dir(tmp_path, [record(0), record(HUGE_INT)])
    status, _, err = cli(["summary", str(tmp_path / "run")], capsys)
    assert_one_line_error(status, err, "summary", "probes.jsonl:2", "integer 'step'")


def test_huge_timing_in_a_step_file_is_no_total(tmp_path, capsys):
    root = run_dir(tmp_path)
    body = {"core_results": record(20), "timing": {"sampling": HUGE_INT, "total_time": 1e308}}
    (root / "step_00000020.json").write_text(json.dumps(body))
    assert load_run(tmp_path / "run")[0]["timing_total"] == 1e308
    body["timing"] = {"sampling": HUGE_INT, "scoring": HUGE_INT}
    (root / "step_00000020.json").write_text(json.dumps(body))
    assert load_run(tmp_path / "run")[0]["timing_total"] == 0
    status, _, err = cli(["export", str(tmp_path / "run")], capsys)
    assert status == 0, err


# ------------------------------------------------------------------ files that are not files
def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("case", ["jsonl_dev_zero", "jsonl_fifo", "config_fifo",
                                  "config_billion_laughs"])
@pytest.mark.parametrize("command", ["summary", "runs"])
def test_a_reader_never_blocks_on_what_is_not_a_regular_file(case, command, tmp_path):
    root = run_dir(tmp_path, [record(0), record(1)] if case.startswith("config") else None)
    if case == "jsonl_dev_zero":
        (root / "probes.jsonl").symlink_to("/dev/zero")
    elif case == "jsonl_fifo":
        fifo(root / "probes.jsonl")
    elif case == "config_fifo":
        fifo(root / "config.yaml")
    else:  # 9 levels of 9 aliases: 9**9 strings once expanded, 650 bytes on disk
        levels = ["a: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        levels += [f"b{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
        (root / "config.yaml").write_text("\n".join(levels) + "\nrun_metadata:\n"
                                          "  run_id: *a9\n  start_time: *a9\n"
                                          "  logger_version: *a9\n")
    done = cli_subprocess([command, str(tmp_path / "run")])
    assert "Traceback" not in done.stderr, done.stderr
    if case.startswith("jsonl"):  # no records can be read: the reason, in one line
        kind = "character device" if case == "jsonl_dev_zero" else "FIFO"
        if command == "summary":
            assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
            assert f"probes.jsonl is a {kind}, not a regular file" in done.stderr
        else:
            assert done.returncode == 0 and f"is a {kind}, not a regular file" in done.stdout
    else:  # the records are read; the run's config.yaml is said to be refused
        assert done.returncode == 0, done.stderr
        why = "is a FIFO" if case == "config_fifo" else "anchors and aliases are refused"
        assert "config.yaml not read" in done.stdout and why in done.stdout, done.stdout


def test_a_config_yaml_nested_50000_deep_is_refused_not_recursed(tmp_path, capsys):
    root = run_dir(tmp_path, [record(0), record(1)])
    (root / "config.yaml").write_text("run_metadata: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert f"nested deeper than {MAX_YAML_DEPTH} levels" in describe_run(tmp_path / "run")
    for command in ("summary", "runs"):
        status, out, err = cli([command, str(tmp_path / "run")], capsys)
        assert status == 0 and err == "", err
        assert "config.yaml not read" in out and "nested deeper than" in out
    (root / "config.yaml").write_text("run_metadata:\n" + "- " * 50_000 + "x\n")  # block style
    assert "nested deeper than" in describe_run(tmp_path / "run")


@pytest.mark.parametrize("case", ["deep", "aliases", "fifo", "missing", "a_list"])
def test_a_hostile_config_file_is_a_probe_config_error(case, tmp_path):
    path = tmp_path / "probe.yaml"
    if case == "deep":
        path.write_text("batch_size: " + "[" * 50_000 + "]" * 50_000)
    elif case == "aliases":
        path.write_text("x: &a 8\nbatch_size: *a\n")
    elif case == "fifo":
        fifo(path)
    elif case == "a_list":
        path.write_text("- batch_size\n")
    with pytest.raises(ProbeConfigError, match=r"config='.*probe.yaml'"):
        ProbeConfig.from_yaml(path)


def test_a_yaml_config_file_and_a_runs_config_yaml_are_read(tmp_path):
    path = tmp_path / "probe.yaml"
    path.write_text("batch_size: 8\nseed: 3\n")
    assert ProbeConfig.resolve(str(path), {"seed": 4}, "x") == ProbeConfig(batch_size=8, seed=4)
    run_config = tmp_path / "config.yaml"  # a run's config.yaml repeats its probe
    run_config.write_text("config:\n  batch_size: 16\n  log_level: debug\n"
                          "run_metadata:\n  run_id: abc\n")
    assert ProbeConfig.from_yaml(run_config) == ProbeConfig(batch_size=16, log_level="debug")


# ------------------------------------------------------------------ malformed attribution
def attribution_record(tmp_path: Path, **att) -> Path:
    root = run_dir(tmp_path, [record(20)])
    rollout = {"deltaH": 1e-4, "advantage": 0.5, "prompt": "2+3=",
               "tokens": [{"text": "5", "deltaH": 1e-4, "prob": 0.9, "advantage": 0.5}]}
    section = {"parts": {"momentum": 1e-5, "rollouts": -2e-4}, "top_rollouts": [rollout]}
    for key, value in att.items():
        if key.startswith("rollout_"):
            rollout[key[len("rollout_"):]] = value
        elif key == "drop":
            del rollout[value]
        else:
            section[key] = value
    body = {"core_results": record(20), "attribution": section}
    (root / "step_00000020.json").write_text(json.dumps(body))
    return tmp_path / "run"


MALFORMED = {
    "top_rollouts_ints": (dict(top_rollouts=[1, 2]), "top_rollouts[0] must be an object"),
    "top_rollouts_a_string": (dict(top_rollouts="x"), "top_rollouts must be a list"),
    "deltaH_a_string": (dict(rollout_deltaH="big"), "top_rollouts[0].deltaH must be a number"),
    "advantage_missing": (dict(drop="advantage"), "top_rollouts[0] has no 'advantage'"),
    "tokens_a_dict": (dict(rollout_tokens={"a": 1}), "top_rollouts[0].tokens must be a list"),
    "token_text_a_number": (dict(rollout_tokens=[{"text": 5, "deltaH": 0.0, "prob": 1.0,
                                                   "advantage": 0.0}]),
                            "tokens[0].text must be a string"),
}


@pytest.mark.parametrize("html", [False, True], ids=["terminal", "html"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_attribution_is_a_clean_error(case, html, tmp_path, capsys):
    fields, words = MALFORMED[case]
    run = attribution_record(tmp_path, **fields)
    args = ["attribution", str(run), "--step", "20", "--no-color"]
    if html:
        args += ["--html", str(tmp_path / "a.html")]
    status, _, err = cli(args, capsys)
    assert_one_line_error(status, err, "attribution", "step 20: malformed attribution", words)
    assert not (tmp_path / "a.html").exists()


def test_huge_and_null_numbers_in_an_attribution_render_as_dashes(tmp_path, capsys):
    run = attribution_record(tmp_path, parts={"momentum": HUGE_INT, "rollouts": 1e300},
                             rollout_advantage=None, rollout_deltaH=HUGE_INT)
    for extra in ([], ["--html", str(tmp_path / "a.html")]):
        status, out, err = cli(["attribution", str(run), "--step", "20", "--no-color", *extra],
                               capsys)
        assert status == 0, err
    assert "+1.000e+300" in (tmp_path / "a.html").read_text()


# ------------------------------------------------------------------ the one handler
def test_any_exception_in_a_command_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    run_dir(tmp_path, [record(0)])

    def broken(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded (injected)")

    monkeypatch.setattr(cli_module, "load_run", broken)
    status, _, err = cli(["summary", str(tmp_path / "run")], capsys)
    assert_one_line_error(status, err, "summary", "unexpected RecursionError", "(injected)")
