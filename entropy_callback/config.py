"""Configuration of the probe: one dataclass, validated at construction."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .runs import RUN_DIR_NAME

NORMALIZATIONS = ("per_token", "per_sequence")
SEED_LIMIT = 2**32  # seed * 1_000_003 + step stays below 2**64 (torch's seed range) for any step
                    # below 1.8e19
LOG_LEVELS = ("minimal", "standard", "detailed", "debug")
# What one probe measures; every other field is how it is computed in memory (microbatch_size,
# chunk_size, compile_head: the same numbers to rounding) or how it is logged and reported.
MEASUREMENT_FIELDS = ("batch_size", "max_new_tokens", "temperature", "normalize",
                      "eta_multipliers", "seed", "add_special_tokens", "ess_threshold",
                      "attribution")
DERIVATIVES = ("auto", "forward", "reverse")


class ProbeConfigError(ValueError):
    """A probe argument is invalid; the message names the argument and the fix."""


@dataclass(frozen=True)
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
        eta_multipliers: m values, finite and non-zero; Delta H_true is measured at
            theta + m * Delta theta for each. 1.0 is always measured (at the live theta').
        seed: seed of the probe's own random generator (prompt draws and sampling), an integer
            in [0, 2**32); step t draws from ``seed * 1_000_003 + t``.
        add_special_tokens: passed to the tokenizer for string prompts (True: the tokenizer's
            own BOS/EOS rules, as ``tokenizer(prompt)``; False for prompts that already hold
            them, e.g. chat-templated text). Token-id prompts are used as given.
        ess_threshold: an estimate whose ESS / B_E falls below this is flagged unreliable.
        chunk_size: sequence positions per float64 log-softmax chunk, or None (the default) to
            size chunks by bytes: about 10 MB per chunk x vocab float64 buffer on a CPU (8 rows
            at a 150k vocabulary; 1 MiB for scoring's and the forward pass's head maths), 256 MiB
            on an accelerator. Scoring memory is about
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
        attribution: split delta H_1 into momentum, weight decay and the step's update rollouts
            and tokens, with Cui et al.'s covariance proxy beside it (docs/attribution.md;
            needs Adam/AdamW and a LightningModule following the protocol there).
        derivative: how delta H_1's derivatives are taken: "forward" (one forward-mode pass),
            "reverse" (backward passes of the estimator's surrogate: needs no forward-mode rule,
            so it runs through fused attention, Hub and Liger kernels and FSDP2-sharded
            parameters) or "auto" (forward for DoRA, whose shared weight norm the reverse pass
            cannot split per sequence; else reverse where layers run Hub or Liger kernels or
            SDPA/flash attention runs on an accelerator, sharded or not; forward otherwise, e.g.
            on CPU, where it is the faster pass; each record says which ran, ``derivative`` in
            core_results).
        compile_head: run the float64 head maths (log-softmax, entropy and their derivatives,
            scoring and the forward-mode pass) as one ``torch.compile``d pass over the logits:
            the same formula and numbers (to ~1e-13), faster, after a one-off compile of a few
            seconds per process; needs a C++ compiler on a CPU (Triton on a GPU), else one
            warning and the eager maths. Not part of ``config_hash`` (how, not what).

    Every field is checked at construction (a ProbeConfigError names the field and the fix).
    A ProbeConfig is frozen: derive a changed copy with ``dataclasses.replace(cfg, seed=1)``,
    which checks the new values too.
    """

    batch_size: int = 64
    microbatch_size: int = 16
    max_new_tokens: int = 128
    temperature: float = 1.0
    normalize: str = "per_token"
    eta_multipliers: tuple[float, ...] = (1.0,)
    seed: int = 0
    add_special_tokens: bool = True
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
    attribution: bool = False
    derivative: str = "auto"
    compile_head: bool = False

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            object.__setattr__(self, name, check(name, getattr(self, name)))

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
        """The measurement's identity: a hash of the fields that decide what is measured
        (``MEASUREMENT_FIELDS``), not of how it is computed in memory or logged. A resume whose
        hash differs is a new run; changing ``log_level``, ``compress``, ``log_dir``,
        ``max_files``, ``strict`` or the memory knobs continues the run."""
        measured = {k: v for k, v in self.to_dict().items() if k in MEASUREMENT_FIELDS}
        blob = json.dumps(measured, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def check_names(cls, names, owner: str) -> None:
        """Raise ProbeConfigError naming ``owner`` if ``names`` holds a non-option (typo hints)."""
        valid = cls.field_names()
        unknown = sorted((name for name in set(names) if name not in valid), key=repr)
        if unknown:
            hints = [
                f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
                for name in unknown
                for close in [difflib.get_close_matches(name, valid, n=1)
                              if isinstance(name, str) else []]
            ]
            raise ProbeConfigError(
                f"{owner} got unknown option(s) {', '.join(hints)}; probe options are "
                f"{list(valid)}."
            )

    @classmethod
    def resolve(cls, config: Any, overrides: Mapping[str, Any], owner: str) -> ProbeConfig:
        """``config`` (None, a ProbeConfig, a mapping of fields, or the path of a YAML file
        holding one, see :meth:`from_yaml`) with keyword ``overrides`` on top, checked; errors
        name ``owner``."""
        cls.check_names(overrides, owner)
        if config is None:
            return cls(**overrides)
        if isinstance(config, ProbeConfig):
            return dataclasses.replace(config, **overrides) if overrides else config
        if isinstance(config, Mapping):
            return cls.from_dict({**config, **overrides})
        if isinstance(config, (str, os.PathLike)):
            return dataclasses.replace(cls.from_yaml(config, owner), **overrides)
        raise ProbeConfigError(
            f"{owner} config= must be a ProbeConfig, a mapping of its fields or the path of a "
            f"YAML file of them, got {type(config).__name__}; e.g. "
            "config=ProbeConfig(batch_size=64) or config={'batch_size': 64}."
        )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, owner: str = "ProbeConfig.from_yaml"
                  ) -> ProbeConfig:
        """The config in a YAML file: a mapping of fields, or a run's ``config.yaml`` (its
        ``config`` section is used, so a run's probe can be repeated). Read with the checks of
        ``yamlsafe`` (a regular file, no anchors/aliases, bounded size and depth).

        Raises:
            ProbeConfigError: the file is missing, unreadable, refused, or not such a mapping.
        """
        from .yamlsafe import read_options

        return cls.from_dict(read_options(path, f"{owner} config={os.fspath(path)!r}"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeConfig:
        """Build from a flat dict, accepting seed 001's ``detailed_logging`` section as is."""
        data = dict(data)
        section = data.pop("detailed_logging", None) or {}
        if not isinstance(section, Mapping):
            raise ProbeConfigError(
                f"detailed_logging must be a mapping of log options, got {type(section).__name__}."
            )
        renames = {"level": "log_level", "output_directory": "log_dir"}
        for key, value in section.items():
            if key in ("enabled", "filename_template"):
                continue
            data.setdefault(renames.get(key, key), value)
        cls.check_names(data, "the probe config")
        return cls(**data)


def check_step(step: Any) -> int:
    """An engine step index: a non-negative integer (numpy integers accepted)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ProbeConfigError(
            f"step must be a non-negative integer (the optimizer step index), got {step!r}; "
            "pass step=trainer.global_step or leave it None to count calls."
        )
    return int(step)


def check_optimizer(optimizer: Any) -> Any:
    """The optimizer whose step is probed: an object with ``param_groups`` (a list) and
    ``state`` (a ``torch.optim.Optimizer``, or a wrapper around one such as Lightning's)."""
    if not isinstance(getattr(optimizer, "param_groups", None), list) or not hasattr(
            optimizer, "state"):
        raise ProbeConfigError(
            f"optimizer must be the torch.optim.Optimizer that takes the step (with "
            f"param_groups and state), got {_shown(optimizer)} ({type(optimizer).__name__}); "
            "pass the optimizer object, e.g. before_step(optimizer) with "
            "optimizer = torch.optim.AdamW(...), not its name."
        )
    return optimizer


def integer(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; numpy integers pass, bools and floats do not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ProbeConfigError(f"{name} must be an integer >= {minimum}, got {_shown(value)}.")
    return int(value)


def boolean(name: str, value: Any) -> bool:
    """``value`` as a bool: only True/False (numpy bools too); "false", 0, 1 are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise ProbeConfigError(
            f"{name} must be True or False, got {value!r} ({type(value).__name__}); a string "
            "or number is not read as a flag."
        )
    return bool(value)


def name_of_attribute(name: str, value: Any) -> str:
    """An attribute name: a non-empty identifier string."""
    if not isinstance(value, str) or not value.isidentifier():
        raise ProbeConfigError(
            f"{name} must be an attribute name (a non-empty identifier string), got {value!r}; "
            f"e.g. {name}='policy'."
        )
    return value


_PROBE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def probe_name(value: Any) -> str:
    """A probe's name (its TensorBoard tag prefix): 1-64 letters, digits, ``_ . -``, starting
    with a letter or digit."""
    if not isinstance(value, str) or not _PROBE_NAME.match(value):
        raise ProbeConfigError(
            f"name must be 1-64 letters, digits, '_', '.' or '-' starting with a letter or digit "
            f"(it prefixes the probe's TensorBoard tags), got {value!r}; e.g. name='ood_probe'."
        )
    if value.startswith(f"{RUN_DIR_NAME}-"):
        raise ProbeConfigError(
            f"name must not start with '{RUN_DIR_NAME}-' (that is how run directories are "
            f"named), got {value!r}; e.g. name='ood_probe'."
        )
    return value


def _shown(value: Any) -> str:
    """``repr(value)``, cut to 60 characters (a 400-digit integer stays readable)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:25]}...{text[-10:]} ({len(text)} characters)"


def finite_number(name: str, value: Any, fix: str) -> float:
    """``value`` as a finite float (numpy numbers pass); a bool, a non-number, NaN, ±inf or a
    number beyond the float range (``10**400``) is a ProbeConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ProbeConfigError(
            f"{name} must be a finite number, got {_shown(value)} ({type(value).__name__}); "
            f"{fix}."
        )
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):
        number = math.inf
    if not math.isfinite(number):
        raise ProbeConfigError(f"{name} must be a finite number, got {_shown(value)}; {fix}.")
    return number


MIN_TEMPERATURE = 1e-3  # below it the float64 softmax is one-hot for any logit gap over 0.75
                        # (exp(-750) is 0); near 1e-308, logits / tau overflows (1 / 1e-310: inf)


def _temperature(name: str, value: Any) -> float:
    number = finite_number(name, value, "use 1.0 for the plain policy")
    if number <= 0:
        raise ProbeConfigError(
            f"temperature must be > 0, got {_shown(value)}: the probe samples from "
            "softmax(logits / temperature); use 1.0 for the plain policy."
        )
    if number < MIN_TEMPERATURE:
        raise ProbeConfigError(
            f"temperature must be >= {MIN_TEMPERATURE}, got {_shown(value)}: below it "
            "softmax(logits / temperature) is one-hot to float64 precision (no entropy to "
            "measure), and near 1e-308 logits / temperature overflows, failing every probe; "
            "use the temperature the policy samples with, e.g. 1.0."
        )
    return number


def _ess_threshold(name: str, value: Any) -> float:
    number = finite_number(name, value, "e.g. 0.5 (the default)")
    if not 0.0 <= number <= 1.0:
        raise ProbeConfigError(
            f"ess_threshold is a fraction of B_E in [0, 1], got {_shown(value)}; 0.5 is the "
            "default."
        )
    return number


def _eta_multipliers(name: str, value: Any) -> tuple[float, ...]:
    fix = "use (1.0,) to measure only the step taken, or e.g. (0.5, 1.0, 2.0)"
    if (isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray))
            or np.ndim(value) != 1 or len(value) == 0):
        raise ProbeConfigError(
            f"eta_multipliers must be a non-empty sequence of numbers, got {_shown(value)}; {fix}."
        )
    out = []
    for m in value:
        try:
            number = finite_number(name, m, fix)
        except ProbeConfigError:
            number = 0.0
        if number == 0:
            raise ProbeConfigError(
                f"eta_multipliers must hold finite non-zero numbers, got {_shown(m)} in "
                f"{_shown(value)}; {fix}."
            )
        out.append(number)
    return tuple(out)


def _seed(name: str, value: Any) -> int:
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or not 0 <= value < SEED_LIMIT):
        raise ProbeConfigError(
            f"seed must be an integer in [0, 2**32), got {_shown(value)}: step t samples with "
            "torch.Generator().manual_seed(seed * 1_000_003 + t), which must fit in 64 bits."
        )
    return int(value)


def _choice(options: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise ProbeConfigError(f"{name} must be one of {options}, got {_shown(value)}.")
        return value
    return check


def _log_dir(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or isinstance(os.fspath(value), bytes):
        raise ProbeConfigError(
            f"log_dir must be None (the trainer logger's directory) or a path (str or "
            f"os.PathLike), got {value!r} ({type(value).__name__})."
        )
    path = os.fspath(value)
    if "\0" in path:
        raise ProbeConfigError(
            f"log_dir contains a NUL byte ({path!r}): no file system accepts one; pass a "
            "directory path without it."
        )
    try:
        os.fsencode(path)
    except UnicodeEncodeError as exc:
        raise ProbeConfigError(
            f"log_dir {path!r} cannot be encoded for the file system ({exc.reason}); pass a "
            "path of valid characters."
        ) from exc
    return path


def _chunk_size(name: str, value: Any) -> int | None:
    if value is None:  # sized by bytes
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ProbeConfigError(
            f"chunk_size must be None (chunks sized by bytes, the default) or an integer >= 1 "
            f"(sequence positions per chunk), got {_shown(value)}."
        )
    return int(value)


def _max_files(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ProbeConfigError(
            f"max_files must be None (keep all) or an integer >= 1, got {_shown(value)}."
        )
    return int(value)


def _optional_boolean(name: str, value: Any) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, (bool, np.bool_)):
        raise ProbeConfigError(
            f"{name} must be None (the log_level's default), True or False, got {value!r} "
            f"({type(value).__name__})."
        )
    return bool(value)


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "batch_size": integer,
    "microbatch_size": integer,
    "max_new_tokens": integer,
    "temperature": _temperature,
    "normalize": _choice(NORMALIZATIONS),
    "eta_multipliers": _eta_multipliers,
    "seed": _seed,
    "add_special_tokens": boolean,
    "ess_threshold": _ess_threshold,
    "chunk_size": _chunk_size,
    "strict": boolean,
    "log_dir": _log_dir,
    "log_level": _choice(LOG_LEVELS),
    "compress": boolean,
    "max_files": _max_files,
    "log_sequences": _optional_boolean,
    "log_tokens": _optional_boolean,
    "log_raw_tensors": _optional_boolean,
    "attribution": boolean,
    "derivative": _choice(DERIVATIVES),
    "compile_head": boolean,
}
