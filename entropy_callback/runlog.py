"""Reading a run's probe records back (pandas-free; a DataFrame on request).

Example::

    from entropy_callback.runlog import load_run
    records = load_run("lightning_logs/version_0")      # list of dicts, sorted by step
    # a log_dir holding several runs: pick one (the error lists them), or list_runs(...)
    [(r["step"], r["deltaH1"], r["deltaH_true"]) for r in records]

Each record holds the core results of one probe (``ProbeResult.core()``): entropies in nats
per token (``normalize="per_token"``) or nats per response, plus ``timing_total`` in seconds.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

from .jsonlog import JSONL_NAME, STEP_FILE_RE, step_filename, timing_total
from .runs import CONFIG_NAME, RUN_DIR_NAME, RunInfo, read_run_info, run_dirs

PROBE_SUBDIR = RUN_DIR_NAME
EXPECTED = (
    f"a run's log_dir holding {PROBE_SUBDIR}/ (or {PROBE_SUBDIR}-<run_id>/), one such run "
    f"directory itself, or a Lightning lightning_logs/version_N directory, with {JSONL_NAME} or "
    "step_*.json[.gz] files"
)


class RunLogError(ValueError):
    """A probe log exists but cannot be read (corrupt file, no complete record), or a
    directory holds several runs and the caller must pick one."""


def list_runs(directory: str | Path) -> list[RunInfo]:
    """The runs found in ``directory``: itself if it is a run directory, else its
    ``entropy_probe*/`` run directories, else those one level down (``lightning_logs/``).
    Each with its id, start time, logger version and number of probes."""
    path = Path(directory)
    if not path.is_dir():
        return []
    if _has_records(path) or (path / CONFIG_NAME).is_file():
        return [read_run_info(path)]
    found = run_dirs(path)
    if not found:
        found = [run for child in sorted(path.iterdir()) if child.is_dir()
                 for run in run_dirs(child)]
    return [read_run_info(run) for run in found]


def find_probe_dir(run_dir: str | Path) -> Path:
    """The directory of the one run that ``run_dir`` names.

    Accepts a run directory (``entropy_probe/`` or ``entropy_probe-<run_id>/``), the log_dir
    holding it, a Lightning ``lightning_logs/version_N`` directory, or a parent holding exactly
    one run.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds no probe log.
        RunLogError: ``run_dir`` holds several runs (the message lists them: directory, run
            id, start time, number of probes).
    """
    path = Path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory; expected {EXPECTED}.")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; expected {EXPECTED}.")
    runs = list_runs(path)
    if len(runs) == 1:
        return runs[0].path
    if len(runs) > 1:
        listing = "; ".join(run.describe() for run in runs)
        raise RunLogError(f"{path} holds {len(runs)} probe runs; pass one of them: {listing}.")
    raise FileNotFoundError(f"{path} holds no probe log; expected {EXPECTED}.")


def describe_run(run_dir: str | Path) -> str:
    """Which run ``run_dir`` names: ``<dir> (run <id>, started <time>, <n> probes)``."""
    return read_run_info(find_probe_dir(run_dir)).describe()


def _has_records(path: Path) -> bool:
    return (path / JSONL_NAME).is_file() or any(_step_files(path))


def _step_files(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.iterdir():
        match = STEP_FILE_RE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_record(path: str | Path) -> dict[str, Any]:
    """One step record (``step_<t>.json`` or ``.json.gz``) as a dict.

    Raises:
        RunLogError: the file is not valid (gzipped) JSON or not a JSON object.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        record = json.loads(raw)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as exc:
        raise RunLogError(f"{path}: corrupt probe record ({exc}).") from exc
    if not isinstance(record, dict):
        raise RunLogError(f"{path}: expected a JSON object, got {type(record).__name__}.")
    return record


def load_step(run_dir: str | Path, step: int) -> dict[str, Any]:
    """The full JSON record of probed step ``step`` (gz or not)."""
    root = find_probe_dir(run_dir)
    for compress in (False, True):
        path = root / step_filename(step, compress)
        if path.is_file():
            return read_record(path)
    raise FileNotFoundError(f"{root}: no record for step {step} ({step_filename(step)}[.gz]).")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``probes.jsonl``; a truncated final line (a crash mid-write) is skipped.

    Raises:
        RunLogError: a line other than the last is not a JSON object with a ``step``.
    """
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, ValueError) as exc:
            if number == len(lines):
                continue
            raise RunLogError(f"{path}:{number}: corrupt line ({exc}).") from exc
        records.append(_checked(record, f"{path}:{number}"))
    return records


def _checked(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise RunLogError(f"{where}: expected a JSON object with an integer 'step'.")
    return record


def _from_step_files(root: Path) -> list[dict[str, Any]]:
    records = []
    for _, path in _step_files(root):
        record = read_record(path)
        core = record.get("core_results")
        if not isinstance(core, dict):
            raise RunLogError(f"{path}: no 'core_results' section.")
        records.append(
            {**_checked(core, str(path)), "timing_total": timing_total(record.get("timing"))}
        )
    return records


def load_run(run_dir: str | Path, as_dataframe: bool = False) -> Any:
    """All probe records of a run, sorted by step (one per step; a repeated step keeps the last).

    Reads ``probes.jsonl`` or, when it is missing or holds no complete line, the step files.

    Args:
        run_dir: see :func:`find_probe_dir`.
        as_dataframe: return a ``pandas.DataFrame`` (needs pandas) instead of a list of dicts.

    Raises:
        FileNotFoundError: no such directory, or no probe log in it.
        RunLogError (a ValueError): a corrupt file, or no complete record.
    """
    root = find_probe_dir(run_dir)
    jsonl = root / JSONL_NAME
    records = read_jsonl(jsonl) if jsonl.is_file() else []
    if not records:
        records = _from_step_files(root)
    if not records:
        raise RunLogError(f"{root} holds no complete probe record; expected {EXPECTED}.")
    by_step = {record["step"]: record for record in records}
    ordered = [by_step[step] for step in sorted(by_step)]
    if not as_dataframe:
        return ordered
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError(
            "load_run(..., as_dataframe=True) needs pandas: pip install pandas"
        ) from exc
    return pd.DataFrame.from_records(ordered)
