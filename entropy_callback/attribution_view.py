"""Rendering of one step's attribution (``entropy-probe attribution DIR --step t``).

Reads the ``attribution`` section of a step record (docs/attribution.md): the parts table, then
the top rollouts with each token shaded by its delta H_{i,t}: red where the token's gradient
raises the entropy, blue where it lowers it, the depth proportional to |delta H_{i,t}| over the
largest one shown. In the terminal with 24-bit ANSI background colours (``color=False`` for
plain text, each token followed by its value); as a standalone HTML page.
"""

from __future__ import annotations

import html
import math
from typing import Any, TextIO

from .result import ATTRIBUTION_PARTS

# the table's rows: every attribution part declared with a label (result.QUANTITIES)
PART_ROWS = tuple((q.name, q.label) for q in ATTRIBUTION_PARTS if q.label)


def section(record: dict[str, Any], step: int) -> dict[str, Any]:
    """The record's attribution section; ValueError naming the fix when there is none."""
    att = record.get("attribution")
    if not isinstance(att, dict) or not isinstance(att.get("parts"), dict):
        raise ValueError(
            f"step {step} has no attribution: run the probe with attribution=True (and a "
            "LightningModule following the protocol of docs/attribution.md)."
        )
    return att


def _num(value: Any) -> str:
    return f"{value:+.3e}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def parts_lines(att: dict[str, Any], deltaH1: Any) -> list[str]:
    """The parts table as text lines (values in the units of δH₁)."""
    parts = att["parts"]
    rows = [("δH₁ (predicted)", _num(deltaH1))]
    rows += [(label, _num(parts.get(key))) for key, label in PART_ROWS]
    width = max(len(label) for label, _ in rows)
    return [f"{label.ljust(width)}  {value}" for label, value in rows]


def _scale(att: dict[str, Any]) -> float:
    values = [abs(t["deltaH"]) for r in att.get("top_rollouts", []) for t in r["tokens"]]
    return max(values, default=0.0) or 1.0


def _rgb(value: float, scale: float) -> tuple[int, int, int]:
    depth = min(1.0, abs(value) / scale)
    fade = int(round(255 * (1 - 0.75 * depth)))
    return (255, fade, fade) if value > 0 else (fade, fade, 255)


def _shown(text: str | None) -> str:
    return "?" if text is None else text.replace("\n", "⏎") or "∅"


def render_terminal(record: dict[str, Any], step: int, out: TextIO, color: bool = True) -> None:
    """Parts table, then each top rollout on one line with its tokens shaded."""
    att = section(record, step)
    deltaH1 = record.get("core_results", {}).get("deltaH1")
    out.write(f"step {step}: attribution of δH₁\n")
    for line in parts_lines(att, deltaH1):
        out.write(line + "\n")
    rollouts = att.get("top_rollouts")
    if not rollouts:
        out.write("(no per-rollout detail: log_level='detailed' records the top rollouts)\n")
        return
    scale = _scale(att)
    out.write(f"\ntop rollouts by |δH_i| (red raises entropy, blue lowers; full shade = "
              f"{scale:.2e}):\n")
    for r in rollouts:
        head = f"{_num(r['deltaH'])}  A={r['advantage']:+.3f}  {r.get('prompt') or ''}"
        pieces = []
        for t in r["tokens"]:
            text = _shown(t["text"])
            if color:
                red, green, blue = _rgb(t["deltaH"], scale)
                pieces.append(f"\x1b[48;2;{red};{green};{blue}m\x1b[30m{text}\x1b[0m")
            else:
                pieces.append(f"{text}[{t['deltaH']:+.1e}]")
        out.write(f"{head}  {''.join(pieces) if color else ' '.join(pieces)}\n")


def render_html(record: dict[str, Any], step: int) -> str:
    """A standalone HTML page: the parts table and the shaded top rollouts (hover: values)."""
    att = section(record, step)
    deltaH1 = record.get("core_results", {}).get("deltaH1")
    rows = "".join(f"<tr><td>{html.escape(line[: line.rfind('  ')].strip())}</td>"
                   f"<td>{html.escape(line.split()[-1])}</td></tr>"
                   for line in parts_lines(att, deltaH1))
    scale = _scale(att)
    body = []
    for r in att.get("top_rollouts", []):
        spans = "".join(
            '<span style="background:rgb({},{},{})" title="δH={:+.3e} p={:.3f} A={:+.3f}">'
            "{}</span>".format(*_rgb(t["deltaH"], scale), t["deltaH"], t["prob"],
                               t["advantage"], html.escape(_shown(t["text"])))
            for t in r["tokens"])
        body.append(f"<tr><td>{html.escape(_num(r['deltaH']))}</td>"
                    f"<td>{r['advantage']:+.3f}</td>"
                    f"<td>{html.escape(r.get('prompt') or '')}</td><td class=t>{spans}</td></tr>")
    return (
        "<!doctype html><meta charset=utf-8>"
        f"<title>entropy probe: attribution of step {step}</title>"
        "<style>body{font-family:sans-serif}td{padding:2px 8px}"
        ".t{font-family:monospace;white-space:pre}</style>"
        f"<h1>Step {step}: where δH₁ comes from</h1><table>{rows}</table>"
        "<h2>Top rollouts by |δH<sub>i</sub>|</h2>"
        "<p>Red: the token's gradient raises the entropy; blue: lowers it; "
        f"full shade = {scale:.2e}.</p>"
        "<table><tr><th>δH<sub>i</sub></th><th>A</th><th>prompt</th><th>response</th></tr>"
        + "".join(body) + "</table>\n"
    )
