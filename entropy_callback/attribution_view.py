"""Rendering of one step's attribution (``entropy-probe attribution DIR --step t``).

Reads the ``attribution`` section of a step record (docs/attribution.md): the parts table, then
the top rollouts with each token shaded by its delta H_{i,t}: red where the token's gradient
raises the entropy, blue where it lowers it, the depth proportional to |delta H_{i,t}| over the
largest one shown. In the terminal with 24-bit ANSI background colours (``color=False`` for
plain text, each token followed by its value); as a standalone HTML page.
"""

from __future__ import annotations

import html
from typing import Any, TextIO

from .result import ATTRIBUTION_PARTS, finite_float

# the table's rows: every attribution part declared with a label (result.QUANTITIES)
PART_ROWS = tuple((q.name, q.label) for q in ATTRIBUTION_PARTS if q.label)


def section(record: dict[str, Any], step: int) -> dict[str, Any]:
    """The record's attribution section, checked field by field before anything is rendered.

    Returns a cleaned copy: every number a finite float or None (an integer past the float
    range too), ``parts`` a mapping, ``top_rollouts`` a list of rollouts, each with its
    ``deltaH``, ``advantage``, ``prompt`` and ``tokens`` (``text``, ``deltaH``, ``prob``,
    ``advantage``).

    Raises:
        ValueError: no attribution (naming the fix), or a malformed one (naming the field).
    """
    att = record.get("attribution")
    if not isinstance(att, dict) or not isinstance(att.get("parts"), dict):
        raise ValueError(
            f"step {step} has no attribution: run the probe with attribution=True (and a "
            "LightningModule following the protocol of docs/attribution.md)."
        )
    rollouts = att.get("top_rollouts")
    if rollouts is not None and not isinstance(rollouts, list):
        raise _malformed(step, "top_rollouts", "a list of rollouts", rollouts)
    core = record.get("core_results")
    return {
        "parts": {str(k): finite_float(v) for k, v in att["parts"].items()},
        "top_rollouts": [_rollout(step, i, r) for i, r in enumerate(rollouts or [])],
        "deltaH1": finite_float(core.get("deltaH1")) if isinstance(core, dict) else None,
    }


def _malformed(step: int, where: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"step {step}: malformed attribution: {where} must be {expected}, got "
                      f"{type(got).__name__}; the record is not one the probe wrote.")


def _rollout(step: int, index: int, rollout: Any) -> dict[str, Any]:
    where = f"top_rollouts[{index}]"
    if not isinstance(rollout, dict):
        raise _malformed(step, where, "an object", rollout)
    tokens = rollout.get("tokens")
    if not isinstance(tokens, list):
        raise _malformed(step, f"{where}.tokens", "a list", tokens)
    prompt = rollout.get("prompt")
    out = {"deltaH": _number(step, where, rollout, "deltaH"),
           "advantage": _number(step, where, rollout, "advantage"),
           "prompt": prompt if isinstance(prompt, str) else "", "tokens": []}
    for j, token in enumerate(tokens):
        if not isinstance(token, dict):
            raise _malformed(step, f"{where}.tokens[{j}]", "an object", token)
        text = token.get("text")
        if text is not None and not isinstance(text, str):
            raise _malformed(step, f"{where}.tokens[{j}].text", "a string or null", text)
        out["tokens"].append({"text": text, **{
            key: _number(step, f"{where}.tokens[{j}]", token, key)
            for key in ("deltaH", "prob", "advantage")}})
    return out


def _number(step: int, where: str, holder: dict[str, Any], key: str) -> float | None:
    """``holder[key]`` as a finite float, or None for null / non-finite; a missing key or
    anything but a number is malformed."""
    if key not in holder:
        raise ValueError(f"step {step}: malformed attribution: {where} has no {key!r}; the "
                         "record is not one the probe wrote.")
    value = holder[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise _malformed(step, f"{where}.{key}", "a number or null", value)
    return finite_float(value)


def _num(value: Any, fmt: str = "+.3e") -> str:
    number = finite_float(value)
    return "-" if number is None else format(number, fmt)


def parts_lines(att: dict[str, Any], deltaH1: Any) -> list[str]:
    """The parts table as text lines (values in the units of δH₁)."""
    parts = att["parts"]
    rows = [("δH₁ (predicted)", _num(deltaH1))]
    rows += [(label, _num(parts.get(key))) for key, label in PART_ROWS]
    width = max(len(label) for label, _ in rows)
    return [f"{label.ljust(width)}  {value}" for label, value in rows]


def _scale(att: dict[str, Any]) -> float:
    values = [abs(t["deltaH"]) for r in att["top_rollouts"] for t in r["tokens"]
              if t["deltaH"] is not None]
    return max(values, default=0.0) or 1.0


def _rgb(value: float | None, scale: float) -> tuple[int, int, int]:
    if value is None:
        return (255, 255, 255)
    depth = min(1.0, abs(value) / scale)
    fade = int(round(255 * (1 - 0.75 * depth)))
    return (255, fade, fade) if value > 0 else (fade, fade, 255)


def _shown(text: str | None) -> str:
    return "?" if text is None else text.replace("\n", "⏎") or "∅"


def render_terminal(record: dict[str, Any], step: int, out: TextIO, color: bool = True) -> None:
    """Parts table, then each top rollout on one line with its tokens shaded."""
    att = section(record, step)
    out.write(f"step {step}: attribution of δH₁\n")
    for line in parts_lines(att, att["deltaH1"]):
        out.write(line + "\n")
    rollouts = att["top_rollouts"]
    if not rollouts:
        out.write("(no per-rollout detail: log_level='detailed' records the top rollouts)\n")
        return
    scale = _scale(att)
    out.write(f"\ntop rollouts by |δH_i| (red raises entropy, blue lowers; full shade = "
              f"{scale:.2e}):\n")
    for r in rollouts:
        head = f"{_num(r['deltaH'])}  A={_num(r['advantage'], '+.3f')}  {r['prompt']}"
        pieces = []
        for t in r["tokens"]:
            text = _shown(t["text"])
            if color:
                red, green, blue = _rgb(t["deltaH"], scale)
                pieces.append(f"\x1b[48;2;{red};{green};{blue}m\x1b[30m{text}\x1b[0m")
            else:
                pieces.append(f"{text}[{_num(t['deltaH'], '+.1e')}]")
        out.write(f"{head}  {''.join(pieces) if color else ' '.join(pieces)}\n")


def render_html(record: dict[str, Any], step: int) -> str:
    """A standalone HTML page: the parts table and the shaded top rollouts (hover: values)."""
    att = section(record, step)
    rows = "".join(f"<tr><td>{html.escape(line[: line.rfind('  ')].strip())}</td>"
                   f"<td>{html.escape(line.split()[-1])}</td></tr>"
                   for line in parts_lines(att, att["deltaH1"]))
    scale = _scale(att)
    body = []
    for r in att["top_rollouts"]:
        spans = "".join(
            '<span style="background:rgb({},{},{})" title="δH={} p={} A={}">{}</span>'.format(
                *_rgb(t["deltaH"], scale), _num(t["deltaH"]), _num(t["prob"], ".3f"),
                _num(t["advantage"], "+.3f"), html.escape(_shown(t["text"])))
            for t in r["tokens"])
        body.append(f"<tr><td>{html.escape(_num(r['deltaH']))}</td>"
                    f"<td>{_num(r['advantage'], '+.3f')}</td>"
                    f"<td>{html.escape(r['prompt'])}</td><td class=t>{spans}</td></tr>")
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
