"""The JSON Schema of the logs (``docs/log-schema.json``), generated from ``result.QUANTITIES``.

Regenerate after declaring a quantity (a test compares the checked-in file with this output)::

    python -m entropy_callback.schema > docs/log-schema.json

The numbers of ``core_results`` and of a ``probes.jsonl`` line, the declared entries of
``ground_truth.diagnostics`` and the attribution parts come from the declarations; the rest of
the record's structure (run metadata, batch statistics, per-sequence records...) is written here.
Torch-free.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .config import LOG_LEVELS, NORMALIZATIONS
from .result import QUANTITIES, Quantity

__all__ = ["render", "schema"]

NUMBER = ["number", "null"]
UPDATE_SOURCES = ["adam_reconstruction", "observed", "skipped", None]
# core_results entries a record may lack (derivative: records written before it existed)
OPTIONAL_CORE = ("derivative", "error", "null_reasons")
PHASES = ("update, sampling, derivative, update_check, rescoring, sweep, estimators, "
          "distributed, tensorboard, logger, json")


def _ref(name: str, description: str | None = None) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{name}", **({"description": description} if description else {})}


def _num(description: str | None = None) -> dict[str, Any]:
    return {"type": NUMBER, **({"description": description} if description else {})}


def _int(description: str | None = None, minimum: int | None = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "integer"}
    if minimum is not None:
        out["minimum"] = minimum
    return {**out, **({"description": description} if description else {})}


def _typed(kind: Any, description: str | None = None) -> dict[str, Any]:
    return {"type": kind, **({"description": description} if description else {})}


def _array(items: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    return {"type": "array", "items": items, **({"description": description} if description
                                                else {})}


def _object(properties: dict[str, Any], required: list[str] | None = None, *,
            description: str | None = None, extra: bool = False) -> dict[str, Any]:
    """An object of ``properties``; ``required`` defaults to all of them."""
    out: dict[str, Any] = {"type": "object"}
    if description:
        out["description"] = description
    out["properties"] = properties
    out["required"] = list(properties) if required is None else required
    out["additionalProperties"] = extra
    return out


def _quantity(q: Quantity) -> dict[str, Any]:
    return _int(q.doc or q.unit) if q.integer else _num(q.doc or q.unit)


def _core_properties() -> dict[str, Any]:
    """core_results: the step, every declared core quantity, then the record's facts."""
    props: dict[str, Any] = {"step": _int("the probed optimizer step t (trainer.global_step "
                                          "before the step)")}
    props.update({q.name: _quantity(q) for q in QUANTITIES if q.core})
    props.update(
        B_E=_int("sequences in the evaluation batch E (0 when the probe failed before "
                 "estimating)"),
        T_E=_int("generated tokens in E, EOS included (0 when the probe failed before "
                 "estimating)"),
        normalize={"enum": list(NORMALIZATIONS), "description": "entropy units of every "
                   "entropy field"},
    )
    props.update(
        reliable=_typed(["boolean", "null"], "ess_fraction >= ess_threshold; null when not "
                        "measured"),
        update_source={"enum": UPDATE_SOURCES, "description": (
            "adam_reconstruction: Δθ rebuilt from the Adam/AdamW state before the step and the "
            "gradients it consumed; observed: θ' − θ after the step (not Adam); skipped: the "
            "optimizer did not take the step (every estimate null, the reason in null_reasons); "
            "null: the update phase failed")},
        derivative={"enum": ["forward", "reverse", None], "description": (
            "how delta H_1's derivatives were taken: forward (one forward-mode pass) or reverse "
            "(backward passes of the estimator's surrogate); config derivative='auto' resolved "
            "per probe; null if the update phase failed")},
        error=_ref("error"),
        null_reasons={"type": "object", "additionalProperties": {"type": "string"},
                      "description": "field name -> why it is null"},
    )
    return props


def _core_results() -> dict[str, Any]:
    props = _core_properties()
    return _object(props, [k for k in props if k not in OPTIONAL_CORE],
                   description="the core numbers of one probe (one probes.jsonl line holds the "
                   "same)")


def _probes_line() -> dict[str, Any]:
    props = {**_core_properties(),
             "timing_total": _num("total probe time in seconds (timing.total)")}
    return _object(props, [k for k in props if k not in OPTIONAL_CORE],
                   description="one line of probes.jsonl: core_results plus timing_total")


def _summary() -> dict[str, Any]:
    meta = _object({
        "timestamp": _ref("timestamp"),
        "probe_version": {"type": "string"},
        "git_commit": {"type": ["string", "null"]},
        "config_hash": _ref("config_hash"),
        "record": {"type": "string", "pattern": r"^step_\d{8}\.json(\.gz)?$",
                   "description": "file name of the full record"},
    })
    return _object({"run_metadata": meta, "core_results": _ref("core_results"),
                    "timing_total": _num("total probe time in seconds")},
                   description="step_<t:08d>_summary.json")


def _run_metadata() -> dict[str, Any]:
    versions = ("torch", "transformers", "peft", "lightning", "cuda")
    environment = _object({
        "python_version": {"type": "string"},
        **{f"{v}_version": {"type": ["string", "null"]} for v in versions},
        "device_name": _typed("string", '"cpu" or the CUDA device name'),
        "memory_gb": _num("GPU memory in GiB; null on CPU"),
        "platform": {"type": "string"},
    }, description="versions and hardware of the writing process")
    props = {
        "timestamp": _ref("timestamp"),
        "probe_version": _typed("string", "entropy-callback version"),
        "git_commit": _typed(["string", "null"], "HEAD of the git repository holding the "
                             "working directory, or null"),
        "config_hash": _ref("config_hash"),
        "log_level": {"enum": list(LOG_LEVELS)},
        "environment": environment,
        "global_step": _int("(callback) trainer.global_step of the probe = step"),
        "every": _int("(callback) probe every N optimizer steps", minimum=1),
        "epoch": _int("(callback) trainer.current_epoch"),
        "run_id": {"type": "string", "pattern": "^[0-9A-Za-z][0-9A-Za-z._-]*$",
                   "description": "(RunLogger) the run's id, <UTC start>-<6 hex>; the same in "
                   "config.yaml and kept across resumes"},
        "start_time": _ref("timestamp", "(RunLogger) when the run (its first process) started"),
        "framework": _typed("string", "(adapter) lightning, hf, ...; absent for a plain loop "
                            "unless given"),
        "logger_version": {"description": "(adapter) the version of the framework's logger "
                           "(Lightning's version_N), or null"},
        "probe_name": _typed("string", "the probe's name, the prefix of its TensorBoard tags "
                             "(entropy_probe unless the callback was given name=)"),
        "resumed_at_step": _int("(RunLogger) the step this process resumed the run at (its "
                                "last resume)"),
    }
    return _object(props, list(props)[:6], extra=True, description=(
        "who wrote the record; the callback adds global_step, every and epoch, and "
        "JsonLogWriter.write(result, extra) merges any extra keys"))


def _timing() -> dict[str, Any]:
    seconds = {"type": "number", "minimum": 0}
    phases = ("update", "sampling", "derivative", "update_check", "rescoring", "sweep",
              "estimators", "distributed", "total", "tensorboard", "logger")
    return {"type": "object", "additionalProperties": seconds,
            "properties": {p: dict(seconds) for p in phases},
            "description": "wall seconds per probe phase; total = before_step start to "
            "after_step end (the sinks, tensorboard and logger, come after it)"}


def _update() -> dict[str, Any]:
    return _object({
        "source": {"enum": UPDATE_SOURCES},
        "cosine": _num("= core_results.update_cosine"),
        "rel_error": _num("= core_results.update_rel_error"),
        "norm": _num("‖θ' − θ‖₂ of the probed parameters (observed step)"),
        "num_params": _int("number of probed (trainable / LoRA) parameters"),
    }, description="the parameter step Δθ")


def _eta_point() -> dict[str, Any]:
    return _object({
        "multiplier": _typed("number", "m: the point θ + m·Δθ_observed (m = 1 is the live θ')"),
        "eta": _num("m · learning_rate"),
        "deltaH_true": _num("ΔH_true at θ + mΔθ (jackknife bias-corrected), entropy units"),
        "deltaH_true_se": _num("its jackknife standard error"),
        "deltaH_true_raw": _num("the plain SNIS ratio H_upd − H_orig at θ + mΔθ"),
        "deltaH_true_bias": _num("jackknife estimate of the raw value's bias: deltaH_true = "
                                 "deltaH_true_raw − deltaH_true_bias"),
        "H_upd": _num("entropy at θ + mΔθ"),
        "ess_fraction": _num("ESS / B_E at θ + mΔθ"),
        "deltaH1_linear": _num("m · deltaH1, the first-order prediction at that point"),
    })


def _ground_truth() -> dict[str, Any]:
    declared = {q.name: _quantity(q) for q in QUANTITIES if q.section == "diagnostics"}
    diagnostics = _object({
        "w_max": _num("largest importance weight w_i = exp(log w_i − max log w)"),
        "w_min": _num("smallest importance weight (same scaling)"),
        "w_sum": _num("Σ w_i (same scaling)"),
        "logw_min": _num("min of log w_i = S'_i − S_i"),
        "logw_median": _num("median of log w_i"),
        "logw_max": _num("max of log w_i"),
        "logw_mean": _num("mean of log w_i"),
        **declared,
        "ess_threshold": _num("config.ess_threshold"),
        "eta_loglog_slope": _num("slope of log|ΔH_true| against log m over the η sweep (1 = "
                                 "linear regime); only with 2+ multipliers"),
        "ESS": _num("= core_results.ESS"),
        "ess_fraction": _num("= core_results.ess_fraction"),
        "reliable": {"type": ["boolean", "null"]},
        "is_mode": {"const": "snis_rb", "description": "self-normalised importance sampling of "
                    "the Rao–Blackwellised entropy"},
    }, ["ESS", "ess_fraction", "reliable", "is_mode"])
    same = {k: _num(f"= core_results.{k}") for k in ("H_orig", "H_upd", "deltaH_true",
                                                     "deltaH_true_se")}
    return _object({**same, "diagnostics": diagnostics, "eta_sweep": _array(
        _ref("eta_point"), "one entry per eta multiplier, by multiplier; empty when the probe "
        "failed")}, description="the measurement ΔH_true (levels standard and above)")


def _batch_statistics() -> dict[str, dict[str, Any]]:
    tokens = "tokens"
    e_batch = _object({
        "num_prompts": _int("distinct prompts drawn (with replacement) into E"),
        "num_sequences": _int("B_E"),
        "avg_prompt_length": _typed("number", tokens),
        "avg_generation_length": _typed("number", "tokens per response, EOS included"),
        "max_generation_length": _int(tokens),
        "max_sequence_length": _int("prompt + response tokens"),
        "eos_fraction": _typed("number", "fraction of responses that stopped at EOS (the rest "
                               "hit max_new_tokens)"),
        "sequence_length_distribution": _array({"type": "number"}, "response-length quantiles "
                                               "(tokens) at sequence_length_quantiles"),
        "sequence_length_quantiles": _array({"type": "number"}, "the quantile levels: 0.1, "
                                            "0.25, 0.5, 0.75, 0.9"),
    })
    of = "of outputs['{}']"
    u_batch = _object({
        "num_sequences": _int("values of the step's training_step outputs summarised"),
        "avg_reward": _num("mean " + of.format("rewards")),
        "reward_std": _num("sample std (ddof 1) " + of.format("rewards")),
        "avg_advantages": _num("mean " + of.format("advantages")),
        "advantages_std": _num("sample std (ddof 1) " + of.format("advantages")),
    }, [], description="the update batch of step t, from training_step's returned "
        "'rewards'/'advantages' tensors (Lightning only; empty when it returns neither)")
    both = _object({"E_batch": _ref("E_batch_statistics"), "U_batch": _ref("U_batch_statistics")},
                   [], description="levels standard and above; E_batch is missing when the "
                   "probe failed before estimating")
    return {"E_batch_statistics": e_batch, "U_batch_statistics": u_batch,
            "batch_statistics": both}


def _sequences() -> dict[str, dict[str, Any]]:
    props = {
        "prompt_id": _int("index of the prompt in the held-out pool"),
        "generation_length": _int("T_i, response tokens, EOS included"),
        "prompt_length": _int("prompt tokens"),
        "sequence_logprob": _num("S_i = Σ_k log π_θ(y_k | ·), nats"),
        "rb_entropy": _num("h_i = Σ_k H_k at θ, nats (sum over the response, not per token)"),
        "sequence_logprob_upd": _num("S'_i at θ', nats"),
        "rb_entropy_upd": _num("h'_i at θ', nats"),
        "log_weight": _num("log w_i = S'_i − S_i"),
        "normalized_weight": _num("w_i / Σ_j w_j (sums to 1 over E)"),
        "deltaH1_contribution": _num("this sequence's share of deltaH1; the shares sum to "
                                     "deltaH1"),
        "deltaH_true_contribution": _num(
            "this sequence's jackknife pseudo-value / B_E (B·raw − (B − 1)·raw without it, over "
            "B); the shares sum to deltaH_true"),
        "stopped_eos": _typed("boolean", "the response ended with EOS"),
        "prompt_text": _typed("string", "the prompt (single process only)"),
        "response_text": _typed("string", "the response, special tokens skipped (single "
                                "process only)"),
    }
    required = [k for k in props if k not in ("prompt_id", "stopped_eos", "prompt_text",
                                              "response_text")]
    token = _object({
        "sequence_id": _int("row of E (same order as sequences.E_batch)"),
        "tokens": _array({"type": "integer"}, "response token ids"),
        "token_texts": _array({"type": ["string", "null"]},
                              "tokenizer.convert_ids_to_tokens(tokens)"),
        "token_logprobs": _array({"type": NUMBER}, "log π_θ(y_k | x, y_<k), nats"),
        "rb_entropies": _array({"type": NUMBER}, "H_k, the full next-token entropy at the "
                               "prefix, nats"),
    })
    numbers = _ref("numbers")
    raw = _object({"E_batch_S_orig": numbers, "E_batch_S_upd": numbers,
                   "E_batch_RB_orig": numbers, "E_batch_RB_upd": numbers,
                   "token_counts": _array(_int(), "T_i per sequence"),
                   "log_weights": numbers, "importance_weights": numbers},
                  description="level debug (or log_raw_tensors=true): the per-sequence vectors "
                  "of the estimators")
    return {
        "sequence": _object(props, required),
        "sequences": _object({"E_batch": _array(_ref("sequence"), "one record per sequence of "
                                                "E")},
                             description="level detailed and above (or log_sequences=true)"),
        "token_record": token,
        "token_data": _object({"E_batch": _array(_ref("token_record"), "the first min(B_E, 32) "
                                                 "sequences of E")},
                              description="level debug (or log_tokens=true); single process "
                              "only"),
        "raw_tensors": raw,
    }


def _attribution() -> dict[str, Any]:
    parts = _object({q.name: _quantity(q) for q in QUANTITIES if q.section == "attribution"})
    token = _object({"text": {"type": ["string", "null"]}, "deltaH": {"type": "number"},
                     "prob": {"type": "number"}, "advantage": {"type": "number"}})
    rollout = _object({"index": {"type": "integer"}, "deltaH": {"type": "number"},
                       "advantage": {"type": "number"}, "prompt": {"type": ["string", "null"]},
                       "tokens": _array(token)})
    top_token = _object({"rollout": {"type": "integer"}, "position": {"type": "integer"},
                         **token["properties"]})
    error = {"type": "object", "properties": {k: {"type": "string"} for k in ("phase", "type",
                                                                             "message")},
             "required": ["phase", "type", "message"]}
    return {
        "description": "attribution=True only (docs/attribution.md): delta H_1 split into "
        "momentum, weight decay and the step's update rollouts and tokens, in the units of "
        "delta H_1; parts + residual = deltaH1. top_rollouts/top_tokens at detailed and above. "
        "On failure only 'error'.",
        "type": "object",
        "properties": {"parts": parts, "top_rollouts": _array(rollout),
                       "top_tokens": _array(top_token), "error": error},
        "oneOf": [{"required": ["parts"]}, {"required": ["error"]}],
        "additionalProperties": False,
    }


def _defs() -> dict[str, Any]:
    error = _object({
        "phase": _typed("string", f"the probe phase that failed ({PHASES})"),
        "type": _typed("string", "exception class name"),
        "message": _typed("string", "exception message (at most 2000 characters)"),
        "traceback": _typed("string", "the last 4000 characters of the traceback"),
    }, ["phase", "type", "message"], description="set when a phase of the probe failed; the "
        "fields it could not compute are null")
    return {
        "error": error,
        "core_results": _core_results(),
        "probes_line": _probes_line(),
        "summary": _summary(),
        "timestamp": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$",
                      "description": "ISO 8601, UTC, seconds"},
        "config_hash": {"type": "string", "pattern": "^[0-9a-f]{16}$", "description": (
            "first 16 hex digits of the SHA-256 of the sorted JSON of the ProbeConfig")},
        "numbers": _array({"type": NUMBER}, "one value per sequence of E, in E's order (null: "
                          "non-finite)"),
        "run_metadata": _run_metadata(),
        "timing": _timing(),
        "update": _update(),
        "eta_point": _eta_point(),
        "ground_truth": _ground_truth(),
        **_batch_statistics(),
        **_sequences(),
        "attribution": _attribution(),
    }


SECTIONS = ("run_metadata", "core_results", "timing", "update", "warnings", "ground_truth",
            "batch_statistics", "sequences", "token_data", "raw_tensors", "attribution")


def schema() -> dict[str, Any]:
    """The schema of a step record (draft 2020-12), with ``$defs.probes_line`` (one line of
    ``probes.jsonl``) and ``$defs.summary`` (a ``step_<t:08d>_summary.json``)."""
    props = {name: _ref(name) for name in SECTIONS}
    props["warnings"] = _array({"type": "string"}, "warnings about this probe")
    standard = ["ground_truth", "batch_statistics"]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:entropy-callback:log-schema:1",
        "title": "entropy-callback step record (step_<t:08d>.json[.gz])",
        "description": DESCRIPTION,
        "type": "object",
        "properties": props,
        "required": list(SECTIONS[:4]),
        "additionalProperties": False,
        "allOf": [{
            "if": {"properties": {"run_metadata": {"properties": {
                "log_level": {"const": "minimal"}}}}},
            "then": {"not": {"anyOf": [{"required": [k]} for k in standard]}},
            "else": {"required": standard},
        }],
        "$defs": _defs(),
    }


DESCRIPTION = (
    "One probed optimizer step, written by entropy_callback.jsonlog.JsonLogWriter. Sections by "
    "log_level: minimal = run_metadata, core_results, timing, update; standard adds "
    "ground_truth and batch_statistics; detailed adds sequences; debug adds token_data and "
    "raw_tensors (log_sequences / log_tokens / log_raw_tensors override the last three). "
    "Entropies are in nats per token (core_results.normalize = per_token) or nats per response "
    "(per_sequence); a positive change means the entropy rises; times in seconds. A number is "
    "null when it could not be computed or was not finite (core_results.null_reasons says why). "
    "$defs.probes_line is one line of probes.jsonl and $defs.summary a "
    "step_<t:08d>_summary.json. See docs/logs.md."
)


def render() -> str:
    """The file's text: ``schema()`` as indented JSON, UTF-8 characters as they are."""
    return json.dumps(schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
