"""The light core: ``import entropy_callback``, the sink layer and the ``entropy-probe`` reader
load no torch and no framework; no sink module imports an engine module; a DeprecationWarning
from our own code fails the suite."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "pytorch_lightning", "transformers", "peft", "trl", "accelerate")
# the engine: what runs the probe's passes (each imports torch)
ENGINE = ("probe", "scoring", "sampling", "forward_mode", "attribution", "attribution_report",
          "estimators", "update", "head", "observer", "records", "prompts", "distributed",
          "lightning", "hf", "testing", "demos", "governor", "governor_lightning",
          "governor_hf", "reverse", "injection", "variants")
# the sink layer, the declarations and the reader
LIGHT = ("entropy_callback", "entropy_callback.sinks", "entropy_callback.jsonsink",
         "entropy_callback.tensorboard", "entropy_callback.tags", "entropy_callback.jsonlog",
         "entropy_callback.result", "entropy_callback.schema", "entropy_callback.runlog",
         "entropy_callback.cli", "entropy_callback.attribution_view",
         "entropy_callback.governor_log")


def _python(*args: str) -> subprocess.CompletedProcess:
    # a generous hang guard only; nothing here is timed
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_light_modules_load_no_torch_no_framework_and_no_engine_module():
    code = (f"import importlib, sys\nfor m in {LIGHT!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{HEAVY!r} or m.split('.')[:2] in [['entropy_callback', e] for e in {ENGINE!r}]))")
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_the_cli_starts_without_torch_lightning_or_transformers():
    """``python -X importtime -m entropy_callback.cli --help`` (the issue's check)."""
    done = _python("-X", "importtime", "-m", "entropy_callback.cli", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "entropy_callback" in imported and imported.isdisjoint(HEAVY), imported & set(HEAVY)


def test_the_engine_is_imported_on_first_use():
    import entropy_callback
    from entropy_callback.probe import EntropyProbe

    assert entropy_callback.EntropyProbe is EntropyProbe
    assert "EntropyProbe" in entropy_callback.__all__


def test_a_deprecation_warning_from_our_code_fails_and_a_third_party_one_does_not():
    """pyproject's filterwarnings: errors for entropy_callback's modules only."""
    with pytest.raises(DeprecationWarning):
        warnings.warn_explicit("old API", DeprecationWarning, "sinks.py", 1,
                               module="entropy_callback.sinks")
    with warnings.catch_warnings(record=True) as caught:  # keeps pytest's filters
        warnings.warn_explicit("old API", DeprecationWarning, "x.py", 1,
                               module="transformers.modeling_utils")
    assert caught == []


def test_no_test_asserts_a_wall_clock_duration():
    """Tests hold on a loaded machine: a clock may only feed a hang guard, never an assert."""
    clock = re.compile(r"^\s*assert\b.*(perf_counter|monotonic|time\.time|elapsed|seconds|"
                       r"wall_s|duration)")
    offending = [f"{path.name}:{i}: {line.strip()}"
                 for path in sorted((ROOT / "tests").glob("*.py"))
                 for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if clock.search(line)]
    assert offending == []
