"""Memory of ``entropy-probe summary`` on a large ``probes.jsonl``.

Writes a ``probes.jsonl`` of ``--mib`` MiB made of realistic core-result lines (about 400 bytes
each), then runs the CLI's ``summary`` in this process and reports the peak resident set size
(``ru_maxrss``) against the same process's peak before the run (the imports: torch). Two
layouts: ``--steps repeated`` (the lines re-log 100 steps, as appends after resumes would:
load_run keeps one record per step, so memory should not grow with the file) and ``--steps
distinct`` (every line a new step: memory grows with the number of records kept).

    python benchmarks/cli_memory.py --mib 100 --steps repeated
    python benchmarks/cli_memory.py --mib 100 --steps distinct
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import tempfile
from pathlib import Path

from entropy_callback.cli import main

MIB = 2**20
LINE = {"step": 0, "deltaH1": -3.2e-4, "deltaH1_se": 1.1e-5, "deltaH_true": -3.1e-4,
        "deltaH_true_se": 2.2e-5, "bars_dot": -0.32, "learning_rate": 1e-3, "H_orig": 2.3456,
        "H_upd": 2.3453, "ess_fraction": 0.97, "update_cosine": 0.99999,
        "update_rel_error": 1e-6, "B_E": 64, "T_E": 4096, "normalize": "per_token", "ESS": 62.1,
        "reliable": True, "update_source": "adam_reconstruction", "timing_total": 1.23}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_jsonl(path: Path, mib: int, distinct: bool) -> int:
    lines = size = 0
    with open(path, "w") as handle:
        while size < mib * MIB:
            text = json.dumps({**LINE, "step": lines if distinct else lines % 100}) + "\n"
            handle.write(text)
            size += len(text)
            lines += 1
    return lines


def run(mib: int, distinct: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "entropy_probe"
        root.mkdir()
        lines = write_jsonl(root / "probes.jsonl", mib, distinct)
        before = peak_rss_mib()
        with contextlib.redirect_stdout(io.StringIO()):
            status = main(["summary", str(root)])
        return {"file_mib": mib, "lines": lines, "steps": "distinct" if distinct else "repeated",
                "status": status, "peak_rss_before_mib": round(before, 1),
                "peak_rss_after_mib": round(peak_rss_mib(), 1),
                "growth_mib": round(peak_rss_mib() - before, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100, help="size of probes.jsonl in MiB")
    parser.add_argument("--steps", choices=("repeated", "distinct"), default="repeated")
    args = parser.parse_args()
    print(json.dumps(run(args.mib, args.steps == "distinct")))
