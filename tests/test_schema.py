"""docs/log-schema.json is generated from the declarations (``result.QUANTITIES``) by
``python -m entropy_callback.schema``: the checked-in file is that output, and every declared
quantity is in the sections its declaration names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from entropy_callback.result import QUANTITIES
from entropy_callback.schema import render, schema

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = ROOT / "docs" / "log-schema.json"


def test_the_checked_in_schema_is_the_generated_one():
    """Fails when a quantity was declared (or the generator changed) without regenerating:
    ``python -m entropy_callback.schema > docs/log-schema.json``."""
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render(), (
        "docs/log-schema.json is stale: run `python -m entropy_callback.schema > "
        "docs/log-schema.json`")


def test_the_module_writes_the_schema_to_stdout():
    out = subprocess.run([sys.executable, "-m", "entropy_callback.schema"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode("utf-8")
    assert out == render()


def test_every_declared_quantity_is_where_its_declaration_says():
    defs = schema()["$defs"]
    core, line = defs["core_results"], defs["probes_line"]
    diagnostics = defs["ground_truth"]["properties"]["diagnostics"]["properties"]
    parts = defs["attribution"]["properties"]["parts"]
    for q in QUANTITIES:
        assert (q.name in core["properties"]) == q.core, q.name
        assert (q.name in core["required"]) == q.core, q.name
        assert (q.name in line["required"]) == q.core, q.name
        if q.section == "diagnostics":  # (ESS and ess_fraction are repeated there too)
            assert q.name in diagnostics, q.name
        assert (q.name in parts["required"]) == (q.section == "attribution"), q.name
    assert not parts["additionalProperties"] and not core["additionalProperties"]
