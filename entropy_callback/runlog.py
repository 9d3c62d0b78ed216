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
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .jsonlog import JSONL_NAME, STEP_FILE_RE, step_filename, timing_total
from .result import CORE_FIELDS
from .runs import CONFIG_NAME, RUN_DIR_NAME, RunInfo, read_run_info, run_dirs

PROBE_SUBDIR = RUN_DIR_NAME
MAX_RECORD_BYTES = 256 * 2**20  # bytes of one step record once read / inflated
MAX_LINE_BYTES = 16 * 2**20  # bytes of one probes.jsonl line (a real line is ~1-2 KiB)
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


def read_record(path: str | Path, max_bytes: int | None = None) -> dict[str, Any]:
    """One step record (``step_<t>.json`` or ``.json.gz``) as a dict.

    At most ``max_bytes`` + 1 bytes (default :data:`MAX_RECORD_BYTES`) are read or inflated: a
    larger record (a decompression bomb) is refused there, never inflated whole.

    Raises:
        RunLogError: the file is larger than that, not valid (gzipped) JSON, or not an object.
    """
    path = Path(path)
    limit = MAX_RECORD_BYTES if max_bytes is None else max_bytes
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read(limit + 1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise RunLogError(f"{path}: corrupt probe record ({type(exc).__name__}: {exc}).") from exc
    if len(raw) > limit:
        raise RunLogError(
            f"{path}: the record is larger than {limit} bytes once read (inflated); refused "
            "as not a probe record (runlog.MAX_RECORD_BYTES sets the bound)."
        )
    try:
        record = json.loads(raw)
    except (RecursionError, ValueError) as exc:  # JSON syntax, UTF-8, 4300+-digit integers
        raise RunLogError(f"{path}: corrupt probe record ({type(exc).__name__}: {exc}).") from exc
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
    """The records of a ``probes.jsonl``, in file order; see :func:`iter_jsonl`."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Stream the records of a ``probes.jsonl`` line by line (memory bounded by one line).

    A truncated final line (a crash mid-write: no newline, not valid JSON) is skipped.

    Raises:
        RunLogError: a line longer than :data:`MAX_LINE_BYTES`, or a complete line that is not
            a JSON object holding an integer ``step`` and fields of the documented types.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        for number, line in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""),
                                      start=1):
            complete = line.endswith(b"\n")
            if len(line) > MAX_LINE_BYTES:
                raise RunLogError(
                    f"{path}:{number}: line longer than {MAX_LINE_BYTES} bytes; not a probe "
                    "record (runlog.MAX_LINE_BYTES sets the bound)."
                )
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (RecursionError, ValueError) as exc:  # as in read_record
                if not complete:
                    continue
                raise RunLogError(f"{path}:{number}: corrupt line ({exc}).") from exc
            # one shared copy of each key name: a record then takes about half the memory
            yield {sys.intern(k): v for k, v in _checked(record, f"{path}:{number}").items()}


def _checked(record: Any, where: str) -> dict[str, Any]:
    """``record`` if it is a probe record whose fields have the documented JSON types."""
    if not isinstance(record, dict):
        raise RunLogError(f"{where}: expected a JSON object with an integer 'step'.")
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise RunLogError(f"{where}: expected a JSON object with an integer 'step' >= 0, got "
                          f"{_shown(step)}.")
    for name, kinds, what in _FIELD_TYPES:
        value = record.get(name)
        if value is not None and (isinstance(value, bool) and bool not in kinds
                                  or not isinstance(value, kinds)):
            raise RunLogError(f"{where}: field {name!r} must be {what} or null, got "
                              f"{_shown(value)}.")
    return record


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


_NUMBER = (int, float)
_FIELD_TYPES: tuple[tuple[str, tuple[type, ...], str], ...] = (
    *((name, _NUMBER, "a number") for name in (*CORE_FIELDS, "B_E", "T_E",
                                               "timing_total")),
    ("normalize", (str,), "a string"),
    ("update_source", (str,), "a string"),
    ("reliable", (bool,), "true/false"),
    ("error", (dict,), "an object"),
    ("null_reasons", (dict,), "an object"),
)


def _from_step_files(root: Path) -> list[dict[str, Any]]:
    records = []
    for _, path in _step_files(root):
        record = read_record(path)
        core, timing = record.get("core_results"), record.get("timing")
        if not isinstance(core, dict):
            raise RunLogError(f"{path}: no 'core_results' section.")
        if timing is not None and not isinstance(timing, dict):
            raise RunLogError(f"{path}: field 'timing' must be an object or null.")
        records.append({**_checked(core, str(path)), "timing_total": timing_total(timing)})
    return records


def load_run(run_dir: str | Path, as_dataframe: bool = False) -> Any:
    """All probe records of a run, sorted by step (one per step; a repeated step keeps the last).

    Reads ``probes.jsonl`` (streamed line by line) or, when it is missing or holds no complete
    line, the step files. Each record's fields are type-checked (see :func:`iter_jsonl`).

    Args:
        run_dir: see :func:`find_probe_dir`.
        as_dataframe: return a ``pandas.DataFrame`` (needs pandas) instead of a list of dicts.

    Raises:
        FileNotFoundError: no such directory, or no probe log in it.
        RunLogError (a ValueError): a corrupt file, or no complete record.
    """
    root = find_probe_dir(run_dir)
    jsonl = root / JSONL_NAME
    # streamed: a repeated step replaces its earlier line, so memory holds one record per step
    by_step = {r["step"]: r for r in iter_jsonl(jsonl)} if jsonl.is_file() else {}
    if not by_step:
        by_step = {r["step"]: r for r in _from_step_files(root)}
    if not by_step:
        raise RunLogError(f"{root} holds no complete probe record; expected {EXPECTED}.")
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
