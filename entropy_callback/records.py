"""From the gathered per-sequence vectors to the ProbeResult: pure functions, no collectives.

Every rank calls these on the same gathered vectors (``distributed.make_gather``), so every
rank computes the single-process result; nothing here talks to another process, which is what
keeps a failure on one rank from leaving the others waiting.

The vectors, all [B_E] float64 over the whole E batch in rank order: ``T``, ``h``, ``S``, ``A``,
``Bsum``, ``C`` (``scoring.sequence_terms`` at theta), ``S_upd:<j>`` / ``h_upd:<j>`` (at
theta + m_j Delta theta, m_j = ``config.multipliers[j]``, j = 0 is the live theta'),
``prompt_length``, ``prompt_index`` and ``stopped`` (1.0 where the response ended with EOS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ProbeConfig
from .estimators import SNIS, DeltaH1, delta_h1, loglog_slope, snis
from .result import CORE_FIELDS, ResultDraft
from .update import flat_cosine_and_rel_error

MAX_TOKEN_RECORDS = 32  # debug level: token-level data for at most this many sequences


@dataclass
class Texts:
    """What only a single process has: the rows' texts and token-level data (empty in DDP)."""

    prompt_text: list[str] = field(default_factory=list)
    response_text: list[str] = field(default_factory=list)
    token_data: list[dict] = field(default_factory=list)


def estimate(result: ResultDraft, v: dict[str, torch.Tensor],
             config: ProbeConfig) -> tuple[DeltaH1, dict[float, SNIS]]:
    """delta H_1, Delta H_true at every sweep point, and the result's quantities from them."""
    T, h = v["T"], v["h"]
    d1 = delta_h1(v["A"], v["Bsum"], v["C"], h, T, config.normalize)
    points = {
        m: snis(v["S"], v[f"S_upd:{j}"], h, v[f"h_upd:{j}"], T, config.normalize)
        for j, m in enumerate(config.multipliers)
    }
    gt, eta = points[1.0], result.learning_rate
    result.B_E, result.T_E = int(T.numel()), int(T.sum())
    result.set(**d1.values(), **gt.values())
    result.bars_dot = d1.deltaH1 / eta if eta else None
    if not eta:
        result.null_reasons["bars_dot"] = (
            "the learning rate is 0 (e.g. the first step of a warmup): bars_dot = deltaH1 / lr "
            "is undefined" if eta == 0 else "no learning rate was read for the probed "
            "parameters: bars_dot = deltaH1 / lr is undefined")
    result.reliable = bool(result.ess_fraction >= config.ess_threshold)
    result.diagnostics.update(gt.diagnostics, ess_threshold=config.ess_threshold)
    result.eta_sweep = sweep_points(points, eta, d1.deltaH1)
    if len(result.eta_sweep) > 1:
        ms = [p["multiplier"] for p in result.eta_sweep]
        deltas = [p["deltaH_true"] for p in result.eta_sweep]
        result.diagnostics["eta_loglog_slope"] = loglog_slope(ms, deltas)
    return d1, points


def sweep_points(points: dict[float, SNIS], eta: float | None, deltaH1: float) -> list[dict]:
    """One entry per eta multiplier m: Delta H_true at theta + m Delta theta beside m delta H_1
    (bias-corrected, with the raw SNIS value and the bias beside it)."""
    out = []
    for m in sorted(points):
        p = points[m]
        out.append({
            "multiplier": m,
            "eta": m * eta if eta is not None else None,
            "deltaH_true": p.deltaH_true,
            "deltaH_true_se": p.deltaH_true_se,
            "deltaH_true_raw": p.deltaH_true_raw,
            "deltaH_true_bias": p.deltaH_true_bias,
            "H_upd": p.H_upd,
            "ess_fraction": p.ess / p.w.numel(),
            "deltaH1_linear": m * deltaH1,
        })
    return out


def texts(batch, prompts: list[str], tokenizer, tokens: list, config: ProbeConfig) -> Texts:
    """The local rows' prompt and response texts and, at ``debug``, their token-level data."""
    out = Texts()
    if config.wants("sequences"):
        out.prompt_text = [prompts[i] for i in batch.prompt_index.tolist()]
        ids = [batch.response_ids[i, : int(n)].tolist() for i, n in enumerate(batch.lengths)]
        out.response_text = tokenizer.batch_decode(ids, skip_special_tokens=True)
    if config.wants("token_data") and tokens:
        logp = [row for lp, _ in tokens for row in lp]
        ent = [row for _, en in tokens for row in en]
        for i in range(min(batch.size, MAX_TOKEN_RECORDS)):
            n = int(batch.lengths[i])
            ids = batch.response_ids[i, :n].tolist()
            out.token_data.append({
                "sequence_id": i,
                "tokens": ids,
                "token_texts": tokenizer.convert_ids_to_tokens(ids),
                "token_logprobs": logp[i][:n].tolist(),
                "rb_entropies": ent[i][:n].tolist(),
            })
    return out


def fill(result: ResultDraft, config: ProbeConfig, v: dict[str, torch.Tensor], d1: DeltaH1,
         gt: SNIS, local: Texts | None) -> None:
    """batch_statistics, and at higher levels sequences, token_data and raw_tensors.

    ``local`` holds the texts when one process has every row (None under DDP: texts are not
    gathered, only numbers).
    """
    T, h, S, prompt_len = v["T"], v["h"], v["S"], v["prompt_length"]
    h_upd, S_upd = v["h_upd:0"], v["S_upd:0"]
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    result.batch_statistics["E_batch"] = {
        "num_prompts": int(torch.unique(v["prompt_index"]).numel()),
        "num_sequences": int(T.numel()),
        "avg_prompt_length": float(prompt_len.mean()),
        "avg_generation_length": float(T.mean()),
        "max_generation_length": int(T.max()),
        "max_sequence_length": int((prompt_len + T).max()),
        "eos_fraction": float(v["stopped"].mean()),
        "sequence_length_distribution": torch.quantile(T, qs).tolist(),
        "sequence_length_quantiles": qs.tolist(),
    }
    if config.wants("sequences"):
        cols = {
            "prompt_id": v["prompt_index"].long().tolist(),
            "generation_length": T.long().tolist(),
            "prompt_length": prompt_len.long().tolist(),
            "stopped_eos": v["stopped"].bool().tolist(),
            "sequence_logprob": S.tolist(),
            "rb_entropy": h.tolist(),
            "sequence_logprob_upd": S_upd.tolist(),
            "rb_entropy_upd": h_upd.tolist(),
            "log_weight": gt.log_w.tolist(),
            "normalized_weight": (gt.w / gt.w.sum()).tolist(),
            "deltaH1_contribution": d1.contributions.tolist(),
            "deltaH_true_contribution": gt.contributions.tolist(),
        }
        if local is not None:
            cols["prompt_text"] = local.prompt_text
            cols["response_text"] = local.response_text
        result.sequences = cols
    if config.wants("token_data") and local is not None and local.token_data:
        result.token_data = local.token_data
    if config.wants("raw_tensors"):
        result.raw_tensors = {
            "E_batch_S_orig": S.tolist(),
            "E_batch_S_upd": S_upd.tolist(),
            "E_batch_RB_orig": h.tolist(),
            "E_batch_RB_upd": h_upd.tolist(),
            "token_counts": T.long().tolist(),
            "log_weights": gt.log_w.tolist(),
            "importance_weights": gt.w.tolist(),
        }


def update_check(result: ResultDraft, predicted: dict[str, torch.Tensor] | None,
                 observed: dict[str, torch.Tensor]) -> None:
    """update_cosine / update_rel_error of the rebuilt step against the observed one, and
    update_norm = ||theta' - theta|| (each with a reason when undefined)."""
    if predicted is not None:
        cos, rel, norm = flat_cosine_and_rel_error(predicted, observed)
        result.update_cosine, result.update_rel_error = cos, rel
        reason = None if norm != 0 else (
            "the observed step is zero because the learning rate is 0 (e.g. the first step of "
            "a warmup): the comparison is undefined" if result.learning_rate == 0 else
            "the observed step is zero (no gradient signal, e.g. all advantages zero): the "
            "comparison is undefined")
    else:
        reason = ("no predicted step to compare: the optimizer is not Adam/AdamW (update_source "
                  "'observed')")
    if reason is not None:
        for name in ("update_cosine", "update_rel_error"):
            result.null_reasons[name] = reason
    result.update_norm = float(torch.sqrt(sum((d ** 2).sum() for d in observed.values())))


def mark_skipped(result: ResultDraft, reason: str) -> None:
    """A step the optimizer did not take: update_source "skipped", null estimates, the reason."""
    result.update_source = "skipped"
    result.update_norm = None
    for name in CORE_FIELDS:
        if name != "learning_rate":
            result.null_reasons[name] = f"step not taken: {reason}"
    result.warnings.append(f"step {result.step} was not taken: {reason}")
