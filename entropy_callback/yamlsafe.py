"""Reading a YAML file that may be hostile: ``config.yaml`` of a run, a probe config file.

``read_yaml(path)`` reads a regular file only (never a FIFO or a device, see
``fileio.open_regular``), at most :data:`MAX_YAML_BYTES`, and refuses before building anything:

- aliases and anchors (``&a`` / ``*a``): a "billion laughs" document expands a few hundred bytes
  into 10⁹ list entries when walked; the probe never writes either;
- nesting deeper than :data:`MAX_YAML_DEPTH` collections: PyYAML builds nodes recursively, so a
  document nested 50 000 deep ends in ``RecursionError``; a probe's config.yaml is 3 deep.

The check walks PyYAML's event stream, which its parser produces without recursion; only a
document that passes is then built by ``yaml.safe_load`` (plain types, no Python objects).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .fileio import open_regular

MAX_YAML_BYTES = 1 << 20  # a probe's config.yaml is ~2 KiB
MAX_YAML_DEPTH = 32


class YamlRefused(ValueError):
    """A YAML file that is too large, not a regular file, malformed, or uses a refused form."""


def parse_yaml(text: str | bytes, where: str) -> Any:
    """The document in ``text`` as plain Python data, after the checks of this module.

    Raises:
        YamlRefused: malformed YAML, an alias or anchor, or nesting past ``MAX_YAML_DEPTH``;
            the message starts with ``where``.
    """
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise YamlRefused(f"{where}: YAML anchors and aliases are refused (a probe's "
                                  "files never use them; they can expand without bound)")
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise YamlRefused(f"{where}: nested deeper than {MAX_YAML_DEPTH} levels; "
                                      "refused as not a probe file")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        return yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, YamlRefused):
            raise
        detail = " ".join(str(exc).split())[:300]
        raise YamlRefused(f"{where}: not valid YAML ({type(exc).__name__}: {detail})") from exc


def read_yaml(path: str | Path, max_bytes: int | None = None) -> Any:
    """The document in the YAML file ``path`` (see :func:`parse_yaml`).

    Raises:
        OSError: it cannot be opened, or is not a regular file (``NotRegularFileError``).
        YamlRefused: larger than ``max_bytes`` (default :data:`MAX_YAML_BYTES`), or refused
            by :func:`parse_yaml`.
    """
    limit = MAX_YAML_BYTES if max_bytes is None else max_bytes
    with open_regular(path) as handle:
        raw = handle.read(limit + 1)
    if len(raw) > limit:
        raise YamlRefused(f"{path}: larger than {limit} bytes; refused as not a probe file")
    return parse_yaml(raw, str(path))


def read_options(path: str | os.PathLike, where: str) -> dict[str, Any]:
    """The probe options in a YAML file: a mapping of fields, or a run's ``config.yaml`` (its
    ``config`` section). Read with :func:`read_yaml`; errors name ``where``.

    Raises:
        ProbeConfigError: missing, unreadable, refused, or not such a mapping.
    """
    from .config import ProbeConfigError

    try:
        body = read_yaml(path)
    except (OSError, ValueError) as exc:
        raise ProbeConfigError(
            f"{where}: cannot read it as a YAML file of probe options "
            f"({' '.join(str(exc).split())[:300]}); config= takes a ProbeConfig, a mapping of "
            "its fields or the path of such a YAML file.") from exc
    if isinstance(body, dict) and isinstance(body.get("config"), dict):
        body = body["config"]  # a run's config.yaml: {config: ..., run_metadata: ...}
    if not isinstance(body, dict):
        raise ProbeConfigError(f"{where}: the file holds a {type(body).__name__}, not a mapping "
                               "of probe options (e.g. 'batch_size: 64').")
    return body
