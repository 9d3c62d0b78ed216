"""Reading a run's probe records back (pandas-free; a DataFrame on request).

Example::

    from entropy_callback.runlog import load_run
    records = load_run("lightning_logs/version_0")      # list of dicts, sorted by step
    # a log_dir holding several runs: pick one (the error lists them), or find_runs(...)
    [(r["step"], r["deltaH1"], r["deltaH_true"]) for r in records]
    whole = load_run("lightning_logs")  # one run resumed into version_0 and version_1: joined

Only regular files are read (a FIFO or a device is refused, never waited on), each within a
size bound; a run's ``config.yaml`` is read with the checks of ``yamlsafe``.

Each record holds the core results of one probe (``ProbeResult.core()``): entropies in nats
per token (``normalize="per_token"``) or nats per response, plus ``timing_total`` in seconds.
"""

from __future__ import annotations

import gzip
import json
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fileio import is_regular, open_regular
from .jsonlog import JSONL_NAME, STEP_FILE_RE, step_filename, timing_total
from .result import CORE_FIELDS
from .runs import CONFIG_NAME, RUN_DIR_NAME, Run, RunInfo, group_runs, read_run_info, run_dirs

PROBE_SUBDIR = RUN_DIR_NAME
MAX_RECORD_BYTES = 256 * 2**20  # bytes of one step record once read / inflated
MAX_LINE_BYTES = 16 * 2**20  # bytes of one probes.jsonl line (a real line is ~1-2 KiB)
MAX_STEP = 2**63  # an optimizer step is an int64
EXPECTED = (
    f"a run's log_dir holding {PROBE_SUBDIR}/ (or {PROBE_SUBDIR}-<run_id>/), one such run "
    f"directory itself, or a Lightning lightning_logs/version_N directory, with {JSONL_NAME} or "
    "step_*.json[.gz] files"
)


class RunLogError(ValueError):
    """A probe log exists but cannot be read (corrupt file, no complete record), or a
    directory holds several runs and the caller must pick one."""


def list_runs(directory: str | Path) -> list[RunInfo]:
    """The run directories found in ``directory``: itself if it is a run directory, else its
    ``entropy_probe*/`` run directories, else those one level down (``lightning_logs/``).
    Each with its id, start time, logger version and number of probes. A run resumed into
    another directory has one entry per directory; :func:`find_runs` joins them."""
    path = Path(directory)
    if not path.is_dir():
        return []
    if _has_records(path) or (path / CONFIG_NAME).exists():
        return [read_run_info(path)]
    found = run_dirs(path)
    if not found:
        found = [run for child in sorted(path.iterdir()) if child.is_dir()
                 for run in run_dirs(child)]
    return [read_run_info(run) for run in found]


def find_runs(directory: str | Path) -> list[Run]:
    """The runs found in ``directory`` (see :func:`list_runs`), the directories of one run id
    joined as its segments (see ``runs.Run``), in the order their ids are first found."""
    return group_runs(list_runs(directory))


def find_run(run_dir: str | Path) -> Run:
    """The one run that ``run_dir`` names, with all its segments under ``run_dir``.

    Accepts a run directory (``entropy_probe/`` or ``entropy_probe-<run_id>/``), the log_dir
    holding it, a Lightning ``lightning_logs/version_N`` directory, or a parent holding exactly
    one run (``lightning_logs/`` holding one run resumed over several versions).

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
    runs = find_runs(path)
    if len(runs) == 1:
        return runs[0]
    if len(runs) > 1:
        listing = "; ".join(run.describe() for run in runs)
        raise RunLogError(f"{path} holds {len(runs)} probe runs; pass one of them: {listing}.")
    raise FileNotFoundError(f"{path} holds no probe log; expected {EXPECTED}.")


def find_probe_dir(run_dir: str | Path) -> Path:
    """The directory of the one run that ``run_dir`` names (see :func:`find_run`); for a run
    in several segments, its latest segment's."""
    return find_run(run_dir).segments[-1].path


def describe_run(run_dir: str | Path) -> str:
    """Which run ``run_dir`` names: ``<dir> (run <id>, started <time>, <n> probes)``, or the
    run and each of its segments."""
    return find_run(run_dir).describe()


def _has_records(path: Path) -> bool:
    return (path / JSONL_NAME).exists() or any(_step_files(path))


def _step_files(directory: Path) -> list[tuple[int, Path]]:
    """The step records (regular files only) of one directory, by step."""
    found = []
    for path in directory.iterdir():
        match = STEP_FILE_RE.match(path.name)
        if match and is_regular(path):
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
    try:
        with open_regular(path) as file:
            handle = gzip.GzipFile(fileobj=file, mode="rb") if path.name.endswith(".gz") else file
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
    """The full JSON record of probed step ``step`` (gz or not); in a run of several
    segments, from the segment whose record of that step is current (see ``runs.Run``)."""
    run = find_run(run_dir)
    owner: dict[int, Path] = {}
    for segment in run.segments:
        _supersede(owner, segment)
        owner.update(dict(reversed(_step_files(segment.path))))  # plain .json before .gz
    if step in owner:
        return read_record(owner[step])
    where = ", ".join(str(seg.path) for seg in run.segments)
    raise FileNotFoundError(f"{where}: no record for step {step} ({step_filename(step)}[.gz]).")


def _supersede(by_step: dict[int, Any], segment: RunInfo) -> None:
    """Drop the earlier segments' steps that ``segment`` ran again (>= its resume step)."""
    if segment.resumed_at_step is not None:
        for step in [t for t in by_step if t >= segment.resumed_at_step]:
            del by_step[step]


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
    with open_regular(path) as handle:
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
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < MAX_STEP:
        raise RunLogError(f"{where}: expected a JSON object with an integer 'step' >= 0 (and "
                          f"below 2**63), got {_shown(step)}.")
    for name, kinds, what in _FIELD_TYPES:
        value = record.get(name)
        if value is not None and (isinstance(value, bool) and bool not in kinds
                                  or not isinstance(value, kinds)):
            raise RunLogError(f"{where}: field {name!r} must be {what} or null, got "
                              f"{_shown(value)}.")
    return record


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"an integer of {len(str(abs(value)))} digits"
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


def segment_records(root: Path) -> list[dict[str, Any]]:
    """The records of one run directory, sorted by step, one per step (a repeated step keeps
    its last line): ``probes.jsonl`` (streamed) or, when it is missing or holds no complete
    line, the step files."""
    jsonl = root / JSONL_NAME
    # streamed: a repeated step replaces its earlier line, so memory holds one record per step
    by_step = {r["step"]: r for r in iter_jsonl(jsonl)} if jsonl.exists() else {}
    if not by_step:
        by_step = {r["step"]: r for r in _from_step_files(root)}
    return [by_step[step] for step in sorted(by_step)]


def run_records(run: Run) -> list[dict[str, Any]]:
    """The records of ``run``, its segments joined (a later segment supersedes the steps it
    ran again, see ``runs.Run``), sorted by step."""
    by_step: dict[int, dict[str, Any]] = {}
    for segment in run.segments:
        _supersede(by_step, segment)
        by_step.update((r["step"], r) for r in segment_records(segment.path))
    if not by_step:
        where = ", ".join(str(seg.path) for seg in run.segments)
        raise RunLogError(f"{where} holds no complete probe record; expected {EXPECTED}.")
    return [by_step[step] for step in sorted(by_step)]


@dataclass(frozen=True)
class SegmentView:
    """One segment of a run as ``entropy-probe runs`` lists it."""

    info: RunInfo
    steps: list[int]  # the steps its records hold
    kept: list[int]  # those whose record is the joined run's (not superseded)
    problem: str = ""  # why its records could not be read ("" when they could)


def segment_views(run: Run) -> list[SegmentView]:
    """Each segment of ``run`` with its steps and the steps it keeps in the joined run; a
    segment whose records cannot be read is listed with the reason (nothing raised)."""
    owner: dict[int, int] = {}  # step -> index of the segment whose record is current
    steps: list[list[int]] = []
    problems: list[str] = []
    for index, segment in enumerate(run.segments):
        try:
            held, problem = [r["step"] for r in segment_records(segment.path)], ""
        except (OSError, ValueError) as exc:
            held, problem = [], " ".join(str(exc).split())[:200]
        _supersede(owner, segment)
        owner.update((step, index) for step in held)
        steps.append(held)
        problems.append(problem or segment.problem or "")
    return [SegmentView(segment, steps[i], [t for t in steps[i] if owner.get(t) == i],
                        problems[i]) for i, segment in enumerate(run.segments)]


def load_run(run_dir: str | Path, as_dataframe: bool = False) -> Any:
    """All probe records of a run, sorted by step (one per step; a repeated step keeps the last).

    Reads each of the run's directories: ``probes.jsonl`` (streamed line by line) or, when it
    is missing or holds no complete line, the step files. A run resumed into another directory
    under ``run_dir`` (a new Lightning logger version: pass ``lightning_logs/``) is read whole,
    its segments joined (see ``runs.Run``). Each record's fields are type-checked (see
    :func:`iter_jsonl`); only regular files are read.

    Args:
        run_dir: see :func:`find_run`.
        as_dataframe: return a ``pandas.DataFrame`` (needs pandas) instead of a list of dicts.

    Raises:
        FileNotFoundError: no such directory, or no probe log in it.
        RunLogError (a ValueError): a corrupt file, or no complete record.
        OSError: a log file that is not a regular file (a FIFO, a device), or unreadable.
    """
    ordered = run_records(find_run(run_dir))
    if not as_dataframe:
        return ordered
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError(
            "load_run(..., as_dataframe=True) needs pandas: pip install pandas"
        ) from exc
    return pd.DataFrame.from_records(ordered)
