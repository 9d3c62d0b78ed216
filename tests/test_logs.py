"""The JSON logs of real runs against their documented schema (docs/log-schema.json).

Real tiny Lightning runs (the conftest's demo GRPOModule, tiny Llama + LoRA, AdamW) with the
callback at each log level; every step record, summary and probes.jsonl line they write is
validated with jsonschema, and the level-dependent sections, compression, pruning and the seed
001 ``detailed_logging:`` YAML section are checked on what the runs wrote.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from entropy_callback import ProbeConfig
from entropy_callback.cli import main
from entropy_callback.jsonlog import JSONL_NAME, step_filename, summary_filename
from entropy_callback.observer import EntropyProbeWarning
from entropy_callback.probe import EntropyProbe
from entropy_callback.runlog import load_run, load_step, read_jsonl, read_record

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing"),
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),
]

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "docs" / "log-schema.json"
SCHEMA = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
RECORD = Draft202012Validator(SCHEMA)
LINE = Draft202012Validator({"$defs": SCHEMA["$defs"], "$ref": "#/$defs/probes_line"})
SUMMARY = Draft202012Validator({"$defs": SCHEMA["$defs"], "$ref": "#/$defs/summary"})

# Seed 001's section, as the seed writes it (output_directory is replaced by the test's tmp dir).
SEED_001_SECTION = """
detailed_logging:
  enabled: true
  level: "standard"              # minimal, standard, detailed, debug
  log_sequences: true            # Include sequence text and individual scores
  log_tokens: false              # Include token-level data (debug only)
  log_raw_tensors: false         # Include raw tensor values (debug only)
  output_directory: "entropy_experiments/logs"
  filename_template: "entropy_probe_{timestamp}_{checkpoint_name}.json"
  compress: true                 # Gzip the output files
  max_files: 50                  # Auto-cleanup old log files
"""

# name -> (probe options, every, max_steps)
RUNS = {
    "minimal": (dict(log_level="minimal", max_files=2), 1, 4),
    "standard_yaml": (None, 1, 2),  # the seed 001 section: standard + sequences, gzip
    "detailed": (dict(log_level="detailed", eta_multipliers=(0.5, 1.0, 2.0)), 2, 3),
    "debug": (dict(log_level="debug"), 1, 2),
}


def yaml_config(log_dir: Path) -> ProbeConfig:
    data = yaml.safe_load(SEED_001_SECTION)
    data["detailed_logging"]["output_directory"] = str(log_dir)
    return ProbeConfig.from_dict(data)


@pytest.fixture(scope="module")
def runs(single_thread, make_grpo, make_probe, fit, tmp_path_factory):
    """name -> the run's entropy_probe directory, after a real tiny Lightning run."""
    out = {}
    for name, (options, every, max_steps) in RUNS.items():
        root = tmp_path_factory.mktemp(name)
        if options is None:
            options = {"config": yaml_config(root / "logs")}
        callback = make_probe(every, **options)
        fit(make_grpo(), root, max_steps=max_steps, callbacks=(callback,))
        out[name] = callback.json.root
    return out


@pytest.fixture(scope="module")
def failed_run(single_thread, make_grpo, make_probe, fit, tmp_path_factory):
    """A real run whose probe fails in its estimators phase (the record says so, with nulls)."""
    root = tmp_path_factory.mktemp("failed")

    def broken(self, pending, sweep):
        raise RuntimeError("injected failure")

    callback = make_probe(1, log_level="debug")
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore", EntropyProbeWarning)
        patch.setattr(EntropyProbe, "_estimate", broken)
        fit(make_grpo(), root, max_steps=1, callbacks=(callback,))
    return callback.json.root


def records(root: Path) -> dict[int, dict]:
    """step -> the full record of every step file in ``root`` (plain or gzip)."""
    found = {}
    for path in sorted(root.glob("step_*.json*")):
        if "_summary" not in path.name:
            found[int(path.name[5:13])] = read_record(path)
    return found


def errors(validator: Draft202012Validator, instance) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(instance)]


# ------------------------------------------------------------------ the schema
def test_the_schema_is_a_valid_draft_2020_12_schema():
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(SCHEMA["required"]) == {"run_metadata", "core_results", "timing", "update"}


@pytest.mark.parametrize("name", [*RUNS, "failed"])
def test_every_record_summary_and_jsonl_line_validates(name, runs, failed_run):
    root = failed_run if name == "failed" else runs[name]
    recs = records(root)
    assert recs
    for step, record in recs.items():
        assert errors(RECORD, record) == [], f"{name} step {step}"
        summary = json.loads((root / summary_filename(step)).read_text(encoding="utf-8"))
        assert errors(SUMMARY, summary) == [], f"{name} summary {step}"
        assert summary["core_results"] == record["core_results"]
    lines = read_jsonl(root / JSONL_NAME)
    assert lines
    for line in lines:
        assert errors(LINE, line) == [], f"{name} probes.jsonl step {line['step']}"


def test_the_schema_rejects_what_the_code_does_not_write(runs):
    record = records(runs["debug"])[0]
    bad = json.loads(json.dumps(record))
    bad["core_results"]["deltaH1"] = "0.1"
    assert errors(RECORD, bad)
    bad = json.loads(json.dumps(record))
    bad["sequences"]["E_batch"][0]["deltaH1_contributon"] = 0.0  # a typo'd field
    assert errors(RECORD, bad)
    bad = json.loads(json.dumps(record))
    del bad["ground_truth"]  # a standard-or-higher record needs it
    assert errors(RECORD, bad)
    minimal = records(runs["minimal"])
    bad = json.loads(json.dumps(next(iter(minimal.values()))))
    bad["ground_truth"] = record["ground_truth"]  # a minimal record must not have it
    assert errors(RECORD, bad)


# ------------------------------------------------------------------ the levels
def test_minimal_holds_only_core_timing_and_update(runs):
    for record in records(runs["minimal"]).values():
        assert set(record) == {"run_metadata", "core_results", "timing", "update"}
        assert record["run_metadata"]["log_level"] == "minimal"
        assert record["core_results"]["deltaH1"] is not None
        assert record["core_results"]["deltaH_true"] is not None


def test_detailed_holds_sequences_with_texts_and_no_token_data(runs):
    for record in records(runs["detailed"]).values():
        assert {"ground_truth", "batch_statistics", "sequences"} <= set(record)
        assert "token_data" not in record and "raw_tensors" not in record
        rows = record["sequences"]["E_batch"]
        assert len(rows) == record["core_results"]["B_E"] == 16
        for row in rows:
            assert isinstance(row["prompt_text"], str) and row["prompt_text"].endswith("=")
            assert isinstance(row["response_text"], str)
            assert row["generation_length"] >= 1
        assert sum(r["generation_length"] for r in rows) == record["core_results"]["T_E"]
        assert sum(r["normalized_weight"] for r in rows) == pytest.approx(1.0, rel=1e-12)
        # three eta multipliers: the sweep and its log-log slope
        sweep = record["ground_truth"]["eta_sweep"]
        assert [p["multiplier"] for p in sweep] == [0.5, 1.0, 2.0]
        assert record["ground_truth"]["diagnostics"]["eta_loglog_slope"] is not None


@pytest.mark.parametrize("name", ["detailed", "debug", "standard_yaml"])
def test_per_sequence_contributions_sum_to_the_core_totals(name, runs):
    for step, record in records(runs[name]).items():
        core, rows = record["core_results"], record["sequences"]["E_batch"]
        for key in ("deltaH1", "deltaH_true"):
            total = sum(row[f"{key}_contribution"] for row in rows)
            # 1e-9 relative; the absolute floor is a few ulps of H (ΔH_true = H_upd - H_orig)
            assert total == pytest.approx(core[key], rel=1e-9, abs=1e-14), (name, step, key)


def test_debug_holds_token_data_and_raw_tensors(runs):
    for record in records(runs["debug"]).values():
        assert {"ground_truth", "batch_statistics", "sequences", "token_data",
                "raw_tensors"} <= set(record)
        rows, tokens = record["sequences"]["E_batch"], record["token_data"]["E_batch"]
        assert [t["sequence_id"] for t in tokens] == list(range(len(rows)))
        for tok, row in zip(tokens, rows, strict=True):
            n = row["generation_length"]
            assert len(tok["tokens"]) == len(tok["token_logprobs"]) == n
            assert len(tok["rb_entropies"]) == len(tok["token_texts"]) == n
            assert sum(tok["token_logprobs"]) == pytest.approx(row["sequence_logprob"], rel=1e-9)
            assert sum(tok["rb_entropies"]) == pytest.approx(row["rb_entropy"], rel=1e-9)
        raw = record["raw_tensors"]
        assert raw["E_batch_S_orig"] == [r["sequence_logprob"] for r in rows]
        assert raw["token_counts"] == [r["generation_length"] for r in rows]
        assert raw["log_weights"] == pytest.approx(
            [u - s for u, s in zip(raw["E_batch_S_upd"], raw["E_batch_S_orig"], strict=True)],
            abs=1e-12)


def test_u_batch_statistics_come_from_the_training_step_outputs(runs):
    # The demo GRPOModule returns {"loss", "rewards", "advantages"}: 4 prompts x 2 responses.
    for name in ("standard_yaml", "detailed", "debug"):
        for record in records(runs[name]).values():
            stats = record["batch_statistics"]
            u = stats["U_batch"]
            assert u["num_sequences"] == 8
            assert 0.0 <= u["avg_reward"] <= 1.0 and u["reward_std"] >= 0.0
            assert u["avg_advantages"] == pytest.approx(0.0, abs=1e-6)  # group-centred
            assert u["advantages_std"] >= 0.0
            assert stats["E_batch"]["num_sequences"] == 16


def test_a_failed_probe_writes_an_error_record_with_reasons(failed_run):
    (record,) = records(failed_run).values()
    core = record["core_results"]
    assert core["error"]["phase"] == "estimators" and core["error"]["type"] == "RuntimeError"
    assert core["deltaH1"] is None and core["deltaH_true"] is None
    assert "deltaH1" in core["null_reasons"]
    assert record["ground_truth"]["eta_sweep"] == []
    assert "sequences" not in record


# ------------------------------------------------------------------ files, gzip, pruning, yaml
def test_the_seed_001_yaml_section_goes_through_from_dict(tmp_path):
    cfg = yaml_config(tmp_path)
    assert (cfg.log_level, cfg.compress, cfg.max_files) == ("standard", True, 50)
    assert cfg.log_dir == str(tmp_path)
    assert cfg.wants("sequences") and not cfg.wants("token_data")
    assert not cfg.wants("raw_tensors")
    # flat keys win over the section; an unknown key inside it is refused by name
    assert ProbeConfig.from_dict({"log_level": "debug", **yaml.safe_load(
        SEED_001_SECTION)}).log_level == "debug"
    with pytest.raises(ValueError, match="log_levle"):
        ProbeConfig.from_dict({"detailed_logging": {"log_levle": "debug"}})


def test_compressed_records_are_gzip_and_load_run_reads_them(runs, tmp_path):
    root = runs["standard_yaml"]
    assert root.parent.name == "logs"  # the section's output_directory is the log_dir
    steps = sorted(records(root))
    assert steps == [0, 1]
    for step in steps:
        path = root / step_filename(step, compress=True)
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        assert not (root / step_filename(step)).exists()
        record = json.loads(gzip.decompress(path.read_bytes()))
        assert record["run_metadata"]["log_level"] == "standard"
        assert "sequences" in record and "token_data" not in record  # log_sequences: true
        assert load_step(root.parent, step) == record
    expected = load_run(root.parent)
    # Without probes.jsonl, load_run rebuilds the same records from the .json.gz files.
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / JSONL_NAME).unlink()
    assert load_run(copy) == expected
    assert [r["step"] for r in expected] == [0, 1]


def test_max_files_prunes_old_records_but_keeps_every_jsonl_line(runs):
    root = runs["minimal"]
    assert sorted(p.name for p in root.glob("step_*")) == [
        step_filename(2), summary_filename(2), step_filename(3), summary_filename(3)]
    assert [r["step"] for r in load_run(root)] == [0, 1, 2, 3]


def test_cli_summary_reads_a_real_run(runs, capsys):
    assert main(["summary", str(runs["debug"])]) == 0
    out = capsys.readouterr().out
    assert "2 probes (nats per token)" in out and "Pearson r" in out
    finite = [r for r in load_run(runs["debug"]) if r["deltaH1"] is not None]
    assert all(math.isfinite(r["deltaH1"]) for r in finite)
