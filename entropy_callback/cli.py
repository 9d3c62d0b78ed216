"""``entropy-probe``: read a run's probe log from the command line.

Example::

    entropy-probe summary lightning_logs/version_0
    entropy-probe plot lightning_logs/version_0 -o dh.png
    entropy-probe compare lightning_logs/version_0 lightning_logs/version_1
    entropy-probe export lightning_logs/version_0 --csv -o probes.csv
    entropy-probe attribution lightning_logs/version_0 --step 20 --html step20.html
    entropy-probe runs lightning_logs

Entropy changes are in nats per token (``normalize="per_token"``) or nats per response.
A missing, empty or corrupt log (wrong field types, a record or line over the size bounds of
``runlog``), or ``plot`` of a run with no finite value, exits with status 2 and a one-line
message on stderr, as does any other failure (one top-level handler: never a traceback). Only
regular files are read (a FIFO or ``/dev/zero`` is refused, never waited on). A run resumed into
another directory (a new Lightning logger version) is one run: pass the directory holding both
(``lightning_logs``) and every command joins its segments; ``runs`` lists them. No correlation
is shown over fewer than 3 probes with both values finite.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .result import CORE_FIELDS, finite_float
from .runlog import describe_run, find_run, find_runs, load_run, run_records, segment_views
from .runs import RUN_DIR_NAME, Run

PROG = "entropy-probe"
UNITS = {"per_token": "nats per token", "per_sequence": "nats per response"}
EXPORT_COLUMNS = (
    "step",
    *CORE_FIELDS,
    "B_E",
    "T_E",
    "normalize",
    "reliable",
    "update_source",
    "timing_total",
    "error",
)


class NothingToPlot(ValueError):
    """The run was read but holds no finite number to plot."""


MIN_PAIRS = 3  # fewer finite pairs give r = ±1 (two points) or nothing: no correlation shown


def pearson(xs: Sequence[Any], ys: Sequence[Any]) -> tuple[float | None, int]:
    """Pearson r over the pairs where both values are finite, and the number of such pairs.

    r is None with fewer than ``MIN_PAIRS`` (3) pairs or when either side has zero variance.
    """
    pairs: list[tuple[float, float]] = []
    for a, b in zip(xs, ys, strict=True):
        x, y = finite_float(a), finite_float(b)
        if x is not None and y is not None:
            pairs.append((x, y))
    n = len(pairs)
    if n < MIN_PAIRS:
        return None, n
    # r does not change when each side is scaled: dividing by its largest |value| keeps every
    # sum below n, so values near 1e300 cannot overflow (x ** 2 would raise OverflowError)
    sx = max(abs(x) for x, _ in pairs) or 1.0
    sy = max(abs(y) for _, y in pairs) or 1.0
    xs_, ys_ = [x / sx for x, _ in pairs], [y / sy for _, y in pairs]
    mx, my = sum(xs_) / n, sum(ys_) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs_, ys_, strict=True))
    sxx = sum((x - mx) * (x - mx) for x in xs_)
    syy = sum((y - my) * (y - my) for y in ys_)
    if sxx <= 0 or syy <= 0:
        return None, n
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx) / math.sqrt(syy))), n


def _mean(values: Sequence[Any]) -> float | None:
    finite = [v for v in map(finite_float, values) if v is not None]
    return sum(v / len(finite) for v in finite) if finite else None  # no overflow near 1e308


def _sci(value: Any, digits: int = 3) -> str:
    number = finite_float(value)
    return "-" if number is None else f"{number:.{digits}e}"


def _fixed(value: Any, digits: int = 3) -> str:
    number = finite_float(value)
    return "-" if number is None else f"{number:.{digits}f}"


def _pm(value: Any, se: Any) -> str:
    if finite_float(value) is None:
        return "-"
    return _sci(value) if finite_float(se) is None else f"{_sci(value)} ± {_sci(se, 1)}"


def _units(records: list[dict[str, Any]]) -> str:
    kinds = {r.get("normalize") for r in records if r.get("normalize")}
    return UNITS.get(kinds.pop(), "nats") if len(kinds) == 1 else "nats"


def _note(record: dict[str, Any]) -> str:
    error = record.get("error")
    if error:
        phase = error.get("phase", "?") if isinstance(error, dict) else "?"
        return f"error in {phase}"
    return "unreliable (low ESS)" if record.get("reliable") is False else ""


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        )


def _correlation_line(records: list[dict[str, Any]]) -> str:
    r, n = pearson([x.get("deltaH1") for x in records], [x.get("deltaH_true") for x in records])
    if r is None:
        why = f"needs {MIN_PAIRS} probes with both finite" if n < MIN_PAIRS else "no variance"
        return f"Pearson r(δH₁, ΔH_true) = n/a over {n} probes ({why})"
    return f"Pearson r(δH₁, ΔH_true) = {r:.3f} over {n} probes"


def cmd_summary(args: argparse.Namespace, out: TextIO) -> int:
    """One row per probe, then the correlation of predicted and true ΔH across probes."""
    records = load_run(args.run_dir)
    rows = [["step", "δH₁ ± SE", "ΔH_true ± SE", "ESS/B", "lr", "note"]]
    for r in records:
        rows.append(
            [
                str(r["step"]),
                _pm(r.get("deltaH1"), r.get("deltaH1_se")),
                _pm(r.get("deltaH_true"), r.get("deltaH_true_se")),
                _fixed(r.get("ess_fraction")),
                _sci(r.get("learning_rate"), 2),
                _note(r),
            ]
        )
    out.write(f"{describe_run(args.run_dir)}\n")
    out.write(f"{args.run_dir}: {len(records)} probes ({_units(records)})\n")
    _table(rows, out)
    out.write(_correlation_line(records) + "\n")
    return 0


def _each_run(paths: Sequence[str | Path]) -> list[tuple[str, Run]]:
    """The runs the arguments name, each with its label: a directory holding several runs
    (two fits on one log_dir, two probes in one Trainer) stands for all of them, in order; the
    directories of one run id (a resume into a new logger version) are one run."""
    out: list[tuple[str, Run]] = []
    for path in paths:
        runs = find_runs(Path(path)) if Path(path).is_dir() else []
        if len(runs) > 1:
            out += [(str(run.path), run) for run in runs]
        else:
            out.append((str(path), find_run(path)))
    return out


def cmd_compare(args: argparse.Namespace, out: TextIO) -> int:
    """One row per run: probes, mean δH₁, mean ΔH_true, correlation, mean ESS/B. A directory
    holding several runs gives a row for each."""
    rows = [["run", "probes", "mean δH₁", "mean ΔH_true", "r", "mean ESS/B"]]
    for label, run in _each_run(args.run_dirs):
        records = run_records(run)
        r, _ = pearson([x.get("deltaH1") for x in records], [x.get("deltaH_true") for x in records])
        if len(run.segments) > 1:
            label += f" ({len(run.segments)} segments)"
        rows.append(
            [
                label,
                str(len(records)),
                _sci(_mean([x.get("deltaH1") for x in records])),
                _sci(_mean([x.get("deltaH_true") for x in records])),
                _fixed(r),
                _fixed(_mean([x.get("ess_fraction") for x in records])),
            ]
        )
    _table(rows, out)
    return 0


def _cell(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else value


def cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    """The records as CSV (one row per probe), to ``-o FILE`` or stdout."""
    records = load_run(args.run_dir)
    extra = sorted({k for r in records for k in r} - set(EXPORT_COLUMNS))
    columns = [*EXPORT_COLUMNS, *extra]
    if args.output is None:
        _write_csv(records, columns, out)
    else:
        with open(args.output, "w", newline="", encoding="utf-8") as handle:
            _write_csv(records, columns, handle)
    return 0


def _write_csv(records: list[dict[str, Any]], columns: list[str], handle: TextIO) -> None:
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow([_cell(record.get(c)) for c in columns])


PLOT_LIMIT = 1e150  # |value| beyond this is not plotted: ±2 SE bands and axis spans overflow


def _series(records: list[dict[str, Any]], key: str) -> list[float]:
    """The finite values of ``key`` (NaN where missing, not finite or beyond PLOT_LIMIT)."""
    values = [finite_float(r.get(key)) for r in records]
    return [math.nan if v is None or abs(v) > PLOT_LIMIT else v for v in values]


def cmd_plot(args: argparse.Namespace, out: TextIO) -> int:
    """Predicted and true ΔH over steps with ±2 SE bands; scatter of predicted vs true."""
    records = load_run(args.run_dir)
    if all(math.isnan(v) for k in ("deltaH1", "deltaH_true") for v in _series(records, k)):
        errors = sum(1 for r in records if r.get("error"))
        raise NothingToPlot(
            f"{args.run_dir}: nothing to plot: none of its {len(records)} probes has a finite "
            f"δH₁ or ΔH_true within ±{PLOT_LIMIT:.0e} ({errors} ended in an error; `summary` "
            "shows them); no file written."
        )
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("`plot` needs matplotlib: pip install 'entropy-callback[plot]'") from exc
    steps = [r["step"] for r in records]
    units = _units(records)
    fig = Figure(figsize=(8, 9))  # no pyplot: no global backend or figure state is touched
    top, bottom = fig.subplots(2, 1)
    for key, label, color in (
        ("deltaH1", "δH₁ (predicted)", "C0"),
        ("deltaH_true", "ΔH_true (measured)", "C1"),
    ):
        value, se = _series(records, key), _series(records, f"{key}_se")
        top.plot(steps, value, "o-", color=color, label=label, markersize=3)
        lo = [v - 2 * s for v, s in zip(value, se, strict=True)]
        hi = [v + 2 * s for v, s in zip(value, se, strict=True)]
        top.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
    top.axhline(0.0, color="grey", linewidth=0.5)
    top.set_xlabel("optimizer step")
    top.set_ylabel(f"entropy change ({units})")
    top.set_title("entropy change per probed step (bands: ±2 SE)")
    top.legend()

    pred, true = _series(records, "deltaH1"), _series(records, "deltaH_true")
    two_se = [
        [0.0 if math.isnan(s) else 2 * s for s in _series(records, f"{k}_se")]
        for k in ("deltaH1", "deltaH_true")
    ]
    bottom.errorbar(
        pred,
        true,
        xerr=two_se[0],
        yerr=two_se[1],
        fmt="o",
        color="C2",
        markersize=4,
        elinewidth=0.8,
        alpha=0.8,
        label="probes (±2 SE)",
    )
    finite = [v for v in pred + true if math.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        pad = 0.05 * (high - low) or 1e-12
        line = [low - pad, high + pad]
        bottom.plot(line, line, "k--", linewidth=1, label="y = x")
        bottom.legend()
    r, n = pearson(pred, true)
    bottom.set_title(f"predicted vs true (r = {'n/a' if r is None else f'{r:.3f}'}, n = {n})")
    bottom.set_xlabel(f"δH₁ ({units})")
    bottom.set_ylabel(f"ΔH_true ({units})")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    out.write(f"wrote {args.output}\n")
    return 0


def cmd_attribution(args: argparse.Namespace, out: TextIO) -> int:
    """One step's attribution: the parts, and the top rollouts shaded token by token."""
    from .attribution_view import render_html, render_terminal
    from .runlog import load_step

    record = load_step(args.run_dir, args.step)
    if args.html is not None:
        args.html.write_text(render_html(record, args.step), encoding="utf-8")
        out.write(f"wrote {args.html}\n")
        return 0
    color = not args.no_color and getattr(out, "isatty", lambda: False)()
    render_terminal(record, args.step, out, color=color)
    return 0


def _steps(steps: list[int]) -> str:
    if not steps:
        return "-"
    shown = ", ".join(map(str, steps[:4])) + (", ..." if len(steps) > 5 else "")
    return shown + (f", {steps[-1]}" if len(steps) > 4 else "")


def cmd_runs(args: argparse.Namespace, out: TextIO) -> int:
    """Every run under a directory, each with its segments (the directories of one run id, in
    the order they were written) and the steps each contributes to the joined run."""
    runs = find_runs(Path(args.directory))
    if not runs:
        find_run(args.directory)  # the reason: no such directory, or no probe log in it
    for index, run in enumerate(runs):
        views, first = segment_views(run), run.segments[0]
        n = len(run.segments)
        out.write(("\n" if index else "") + f"run {run.run_id or 'without id'}"
                  + (f", probe {first.name!r}" if first.name not in (None, RUN_DIR_NAME) else "")
                  + (f", started {first.start_time}" if first.start_time else "")
                  + f": {sum(len(v.kept) for v in views)} probes in {n} segment{'s' * (n != 1)}\n")
        rows = [["segment", "logger version", "resumed at", "probes", "steps kept", "note"]]
        for v in views:
            dropped = len(v.steps) - len(v.kept)
            note = v.problem or (f"{dropped} superseded by a later segment" if dropped else "")
            rows.append([str(v.info.path), _or_dash(v.info.logger_version),
                         _or_dash(v.info.resumed_at_step), str(len(v.steps)), _steps(v.kept), note])
        _table(rows, out)
    return 0


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def build_parser() -> argparse.ArgumentParser:
    """The ``entropy-probe`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Read the entropy probe's logs (predicted vs true ΔH)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run_help = "a run's log_dir, its entropy_probe/ directory, or lightning_logs/version_N"

    summary = sub.add_parser("summary", help="table of probes and the δH₁ / ΔH_true correlation")
    summary.add_argument("run_dir", help=run_help)
    summary.set_defaults(func=cmd_summary)

    plot = sub.add_parser("plot", help="PNG: ΔH over steps, predicted vs true scatter")
    plot.add_argument("run_dir", help=run_help)
    plot.add_argument("-o", "--output", type=Path, default=Path("entropy_probe.png"))
    plot.set_defaults(func=cmd_plot)

    compare = sub.add_parser("compare", help="one row per run (every run of a directory "
                             "holding several)")
    compare.add_argument("run_dirs", nargs="+", metavar="run_dir", help=run_help)
    compare.set_defaults(func=cmd_compare)

    export = sub.add_parser("export", help="the probe records as CSV")
    export.add_argument("run_dir", help=run_help)
    export.add_argument(
        "--csv", action="store_true", help="CSV output (the default and only format)"
    )
    export.add_argument("-o", "--output", type=Path, default=None, help="file (default: stdout)")
    export.set_defaults(func=cmd_export)

    attribution = sub.add_parser(
        "attribution", help="one step's δH₁ by part, rollout and token (shaded)"
    )
    attribution.add_argument("run_dir", help=run_help)
    attribution.add_argument("--step", type=int, required=True, help="the probed step")
    attribution.add_argument("--html", type=Path, default=None, help="write an HTML page here")
    attribution.add_argument("--no-color", action="store_true", help="plain text, no shading")
    attribution.set_defaults(func=cmd_attribution)

    runs = sub.add_parser("runs", help="every run under a directory, with its segments "
                          "(one run resumed into several logger versions)")
    runs.add_argument("directory", help="e.g. lightning_logs, or a run's log_dir")
    runs.set_defaults(func=cmd_runs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``entropy-probe``; returns the exit status: 0, or 2 with one line on
    stderr and no traceback for anything that stops a command: an unreadable log (missing,
    corrupt, wrong field types, over a size bound, not a regular file), a run with nothing
    finite to plot, a malformed attribution, and any other exception (said as such)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, sys.stdout)
    except (OSError, ValueError, ImportError) as exc:
        message = " ".join(str(exc).split())
    except Exception as exc:  # the one handler (RecursionError, MemoryError...): no traceback
        message = f"unexpected {type(exc).__name__} ({' '.join(str(exc).split())})"
    sys.stderr.write(f"{PROG} {args.command}: error: {message[:2000]}\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
