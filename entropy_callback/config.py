"""Configuration of the probe: one dataclass, validated at construction."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass
from typing import Any

NORMALIZATIONS = ("per_token", "per_sequence")
LOG_LEVELS = ("minimal", "standard", "detailed", "debug")


class ProbeConfigError(ValueError):
    """A probe argument is invalid; the message names the argument and the fix."""


@dataclass
class ProbeConfig:
    """Everything that decides what one probe measures and how it is logged.

    Example::

        ProbeConfig(batch_size=64, microbatch_size=16, max_new_tokens=128,
                    temperature=1.0, normalize="per_token", eta_multipliers=(1.0,), seed=0)

    Attributes:
        batch_size: B_E, sequences in the evaluation batch (prompts drawn uniformly with
            replacement from the held-out pool).
        microbatch_size: sequences per forward pass when scoring (memory knob only).
        max_new_tokens: L, the longest response; a response stops at EOS or at L tokens.
        temperature: tau; pi_theta = softmax(logits / tau). No top-k, top-p or penalties.
        normalize: "per_token" (entropy in nats per token, the default) or "per_sequence"
            (nats per response).
        eta_multipliers: m values; Delta H_true is measured at theta + m * Delta theta for each.
            1.0 is always measured (at the live theta').
        seed: seed of the probe's own random generator (prompt draws and sampling).
        ess_threshold: an estimate whose ESS / B_E falls below this is flagged unreliable.
        chunk_size: sequence positions per float64 log-softmax chunk, or None (the default) to
            size chunks by bytes: about 10 MB per chunk x vocab float64 buffer on a CPU (8 rows
            at a 150k vocabulary), 256 MiB on an accelerator. Scoring memory is about
            chunk x vocab x 8 bytes x a few, whatever the microbatch, length or vocabulary.
        strict: re-raise failures inside the probe instead of turning them into warnings.
        log_dir: where the JSON records go (``<log_dir>/entropy_probe/``); None = the trainer
            logger's log_dir (Lightning) or no JSON (plain engine).
        log_level: "minimal" | "standard" | "detailed" | "debug": how much each step record holds.
        compress: gzip the per-step record (``step_<t>.json.gz``).
        max_files: keep at most this many per-step records (oldest pruned); None = keep all.
        log_sequences: include per-sequence records (on by default at level "detailed").
        log_tokens: include token-level data (on by default at level "debug").
        log_raw_tensors: include raw per-sequence tensors (on by default at level "debug").
    """

    batch_size: int = 64
    microbatch_size: int = 16
    max_new_tokens: int = 128
    temperature: float = 1.0
    normalize: str = "per_token"
    eta_multipliers: tuple[float, ...] = (1.0,)
    seed: int = 0
    ess_threshold: float = 0.5
    chunk_size: int | None = None
    strict: bool = False
    log_dir: str | None = None
    log_level: str = "standard"
    compress: bool = False
    max_files: int | None = None
    log_sequences: bool | None = None
    log_tokens: bool | None = None
    log_raw_tensors: bool | None = None

    def __post_init__(self) -> None:
        self.eta_multipliers = tuple(float(m) for m in self.eta_multipliers)
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ProbeConfigError(msg)

        for name in ("batch_size", "microbatch_size", "max_new_tokens", "chunk_size"):
            value = getattr(self, name)
            if name == "chunk_size" and value is None:  # sized by bytes
                continue
            need(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be an integer >= 1, got {value!r}.",
            )
        need(
            isinstance(self.temperature, (int, float)) and self.temperature > 0,
            f"temperature must be > 0, got {self.temperature!r}: the probe samples from "
            "softmax(logits / temperature); use 1.0 for the plain policy.",
        )
        need(
            self.normalize in NORMALIZATIONS,
            f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}.",
        )
        need(
            len(self.eta_multipliers) >= 1 and all(m != 0 for m in self.eta_multipliers),
            f"eta_multipliers must be non-empty and non-zero, got {self.eta_multipliers!r}; "
            "use (1.0,) to measure only the step taken.",
        )
        need(
            0.0 <= self.ess_threshold <= 1.0,
            f"ess_threshold is a fraction of B_E in [0, 1], got {self.ess_threshold!r}.",
        )
        need(
            self.log_level in LOG_LEVELS,
            f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}.",
        )
        need(
            self.max_files is None or (isinstance(self.max_files, int) and self.max_files >= 1),
            f"max_files must be None (keep all) or an integer >= 1, got {self.max_files!r}.",
        )
        need(
            isinstance(self.seed, int) and not isinstance(self.seed, bool),
            f"seed must be an integer, got {self.seed!r}.",
        )

    @property
    def multipliers(self) -> tuple[float, ...]:
        """The sweep's multipliers, 1.0 first (measured at the live theta')."""
        rest = tuple(m for m in self.eta_multipliers if m != 1.0)
        return (1.0, *rest)

    def wants(self, section: str) -> bool:
        """Whether a record section ("sequences", "token_data", "raw_tensors") is logged."""
        level = LOG_LEVELS.index(self.log_level)
        default = {"sequences": level >= 2, "token_data": level >= 3, "raw_tensors": level >= 3}
        flag = {
            "sequences": self.log_sequences,
            "token_data": self.log_tokens,
            "raw_tensors": self.log_raw_tensors,
        }[section]
        return default[section] if flag is None else bool(flag)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eta_multipliers"] = list(self.eta_multipliers)
        return out

    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def check_names(cls, names, owner: str) -> None:
        """Raise ProbeConfigError naming ``owner`` if ``names`` holds a non-option (typo hints)."""
        valid = cls.field_names()
        unknown = sorted(set(names) - set(valid))
        if unknown:
            hints = [
                f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
                for name in unknown
                for close in [difflib.get_close_matches(name, valid, n=1)]
            ]
            raise ProbeConfigError(
                f"{owner} got unknown option(s) {', '.join(hints)}; probe options are "
                f"{list(valid)}."
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeConfig:
        """Build from a flat dict, accepting seed 001's ``detailed_logging`` section as is."""
        data = dict(data)
        section = data.pop("detailed_logging", None) or {}
        renames = {"level": "log_level", "output_directory": "log_dir"}
        for key, value in section.items():
            if key in ("enabled", "filename_template"):
                continue
            data.setdefault(renames.get(key, key), value)
        cls.check_names(data, "the probe config")
        return cls(**data)
