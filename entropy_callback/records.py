"""Turning one probe's tensors into the ProbeResult's record sections (seed 001's names)."""

from __future__ import annotations

import math

import torch

from .estimators import SNIS, DeltaH1, loglog_slope
from .result import CORE_FIELDS, ProbeResult

MAX_TOKEN_RECORDS = 32  # debug level: token-level data for at most this many sequences


def sweep_points(points: dict[float, SNIS], eta: float | None, deltaH1: float) -> list[dict]:
    """One entry per eta multiplier m: Delta H_true at theta + m Delta theta beside m delta H_1."""
    out = []
    for m in sorted(points):
        p = points[m]
        out.append({
            "multiplier": m,
            "eta": m * eta if eta is not None else None,
            "deltaH_true": p.deltaH_true,
            "deltaH_true_se": p.deltaH_true_se,
            "H_upd": p.H_upd,
            "ess_fraction": p.ess / p.w.numel(),
            "deltaH1_linear": m * deltaH1,
        })
    return out


def fill(probe, result: ProbeResult, pending, d1: DeltaH1, gt: SNIS,
         at_theta: dict[str, torch.Tensor], at_theta_upd: dict[str, torch.Tensor]) -> None:
    """batch_statistics, and at higher levels sequences, token_data and raw_tensors.

    ``at_theta`` (T, S, h, ...) and ``at_theta_upd`` (S, h) are the per-sequence vectors already
    gathered over every rank.
    """
    cfg, batch = probe.config, pending.batch
    T, h, S = at_theta["T"], at_theta["h"], at_theta["S"]
    h_upd, S_upd = at_theta_upd["h"], at_theta_upd["S"]
    prompt_len = probe.gather(batch.prompt_lengths.to(torch.float64))
    if len(result.eta_sweep) > 1:
        ms = [p["multiplier"] for p in result.eta_sweep]
        deltas = [p["deltaH_true"] for p in result.eta_sweep]
        result.diagnostics["eta_loglog_slope"] = loglog_slope(ms, deltas)
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    result.batch_statistics["E_batch"] = {
        "num_prompts": int(torch.unique(batch.prompt_index).numel()),
        "num_sequences": int(T.numel()),
        "avg_prompt_length": float(prompt_len.mean()),
        "avg_generation_length": float(T.mean()),
        "max_generation_length": int(T.max()),
        "max_sequence_length": int((prompt_len + T).max()),
        "eos_fraction": float(probe.gather(batch.stopped.to(torch.float64)).mean()),
        "sequence_length_distribution": torch.quantile(T, qs).tolist(),
        "sequence_length_quantiles": qs.tolist(),
    }
    local = T.numel() == batch.size  # single process: the texts of every row are here
    if cfg.wants("sequences"):
        cols = {
            "prompt_id": batch.prompt_index.tolist() if local else None,
            "generation_length": T.long().tolist(),
            "prompt_length": prompt_len.long().tolist(),
            "sequence_logprob": S.tolist(),
            "rb_entropy": h.tolist(),
            "sequence_logprob_upd": S_upd.tolist(),
            "rb_entropy_upd": h_upd.tolist(),
            "log_weight": gt.log_w.tolist(),
            "normalized_weight": (gt.w / gt.w.sum()).tolist(),
            "deltaH1_contribution": d1.contributions.tolist(),
            "deltaH_true_contribution": gt.contributions.tolist(),
        }
        if local:
            cols["stopped_eos"] = batch.stopped.tolist()
            cols["prompt_text"] = [probe.prompts[i] for i in batch.prompt_index.tolist()]
            cols["response_text"] = _responses(probe.tokenizer, batch, skip_special=True)
        result.sequences = {k: v for k, v in cols.items() if v is not None}
    if cfg.wants("token_data") and local and pending.tokens:
        logp = [row for lp, _ in pending.tokens for row in lp]
        ent = [row for _, en in pending.tokens for row in en]
        rows = []
        for i in range(min(batch.size, MAX_TOKEN_RECORDS)):
            n = int(batch.lengths[i])
            ids = batch.response_ids[i, :n].tolist()
            rows.append({
                "sequence_id": i,
                "tokens": ids,
                "token_texts": probe.tokenizer.convert_ids_to_tokens(ids),
                "token_logprobs": logp[i][:n].tolist(),
                "rb_entropies": ent[i][:n].tolist(),
            })
        result.token_data = rows
    if cfg.wants("raw_tensors"):
        result.raw_tensors = {
            "E_batch_S_orig": S.tolist(),
            "E_batch_S_upd": S_upd.tolist(),
            "E_batch_RB_orig": h.tolist(),
            "E_batch_RB_upd": h_upd.tolist(),
            "token_counts": T.long().tolist(),
            "log_weights": gt.log_w.tolist(),
            "importance_weights": gt.w.tolist(),
        }


def _responses(tokenizer, batch, skip_special: bool) -> list[str]:
    ids = [batch.response_ids[i, : int(n)].tolist() for i, n in enumerate(batch.lengths)]
    return tokenizer.batch_decode(ids, skip_special_tokens=skip_special)


def sanitize(result: ProbeResult) -> None:
    """Non-finite numbers become None with a reason; a failed phase explains every None."""
    for name in (*CORE_FIELDS, "ESS"):
        value = getattr(result, name)
        if value is None:
            if result.error is not None:
                result.null_reasons.setdefault(
                    name, f"phase '{result.error['phase']}' failed: {result.error['type']}"
                )
            continue
        if isinstance(value, float) and not math.isfinite(value):
            setattr(result, name, None)
            result.null_reasons.setdefault(name, (
                "non-finite value (NaN/inf log-probs or entropies, or collapsed importance "
                "weights)"
            ))
    if result.ess_fraction is None and result.error is None and result.reliable is not None:
        result.reliable = False
