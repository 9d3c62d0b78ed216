"""The estimators of estimators.md, one function per formula, on per-sequence float64 vectors.

Inputs are [B] vectors over the whole E batch (every rank's shard, in DDP): T (tokens), h (sum of
H_k), S (sum of l_k) and, for delta H_1, the sufficient statistics A, Bsum, C of
``scoring.sequence_terms``. Per-sequence contributions returned here *sum* to the totals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def _sd(x: torch.Tensor) -> float:
    """Sample standard deviation (ddof = 1); 0 for a single sequence."""
    return float(x.std(unbiased=True)) if x.numel() > 1 else 0.0


def entropy_level(h: torch.Tensor, T: torch.Tensor, normalize: str) -> float:
    """H_hat = sum_ik H_ik / T_E (per_token) or mean_i h_i (per_sequence)."""
    return float(h.sum() / T.sum()) if normalize == "per_token" else float(h.mean())


@dataclass
class DeltaH1:
    deltaH1: float
    deltaH1_se: float
    contributions: torch.Tensor  # [B], sums to deltaH1
    H_hat: float


def delta_h1(
    A: torch.Tensor,
    Bsum: torch.Tensor,
    C: torch.Tensor,
    h: torch.Tensor,
    T: torch.Tensor,
    normalize: str = "per_token",
) -> DeltaH1:
    """delta H_1 = g_hat . Delta theta, causal and centred (estimators.md section 3).

    per_token:    n_i = A_i + Bsum_i - H_hat C_i,  delta H_1 = sum_i n_i / T_E
                  (Bsum - H_hat C = sum_k D l_k R_k with R_k = sum_{j>k} (H_j - H_hat))
    per_sequence: n_i = A_i + Bsum_i,  delta H_1 = mean_i n_i
    SE by the delta method: IF_i = (n_i - delta H_1 T_i) / T_bar
    - (sum_i C_i / T_E) (h_i - H_hat T_i) / T_bar, SE = sd(IF) / sqrt(B).
    """
    B = h.numel()
    H_hat = entropy_level(h, T, normalize)
    if normalize == "per_token":
        T_E = T.sum()
        n = A + Bsum - H_hat * C
        value = float(n.sum() / T_E)
        T_bar = T_E / B
        IF = (n - value * T) / T_bar - (C.sum() / T_E) * (h - H_hat * T) / T_bar
        contributions = n / T_E
    else:
        n = A + Bsum
        value = float(n.mean())
        IF = n
        contributions = n / B
    return DeltaH1(value, _sd(IF) / math.sqrt(B), contributions, H_hat)


@dataclass
class SNIS:
    deltaH_true: float
    deltaH_true_se: float
    H_orig: float
    H_upd: float
    log_w: torch.Tensor  # [B], S' - S
    w: torch.Tensor  # [B], exp(log_w - max log_w)
    contributions: torch.Tensor  # [B], sums to deltaH_true
    ess: float
    diagnostics: dict = field(default_factory=dict)


def ess(w: torch.Tensor) -> float:
    """Effective sample size (sum w)^2 / sum w^2."""
    return float(w.sum() ** 2 / (w * w).sum())


def snis(
    S: torch.Tensor,
    S_upd: torch.Tensor,
    h: torch.Tensor,
    h_upd: torch.Tensor,
    T: torch.Tensor,
    normalize: str = "per_token",
) -> SNIS:
    """Delta H_true by self-normalised importance sampling on the same E tokens (section 4).

    log w_i = S'_i - S_i;  H_upd = sum_i w_i h'_i / sum_i w_i T_i  (per_token)
    Paired SE: IF_i = (w~_i h'_i - H_upd w~_i T_i) / mean(w~ T) - (h_i - H_orig T_i) / mean(T).
    """
    B = h.numel()
    log_w = S_upd - S
    w = torch.exp(log_w - log_w.max())
    w_tilde = w / w.mean()
    if normalize == "per_token":
        T_E = T.sum()
        H_orig = float(h.sum() / T_E)
        H_upd = float((w * h_upd).sum() / (w * T).sum())
        IF = (w_tilde * h_upd - H_upd * w_tilde * T) / (w_tilde * T).mean() - (
            h - H_orig * T
        ) / T.mean()
        contributions = w * h_upd / (w * T).sum() - (T / T_E) * H_orig
    else:
        H_orig = float(h.mean())
        H_upd = float((w * h_upd).sum() / w.sum())
        IF = w_tilde * (h_upd - H_upd) - (h - H_orig)
        contributions = w * h_upd / w.sum() - h / B
    diagnostics = {
        "w_max": float(w.max()),
        "w_min": float(w.min()),
        "w_sum": float(w.sum()),
        "logw_min": float(log_w.min()),
        "logw_median": float(log_w.median()),
        "logw_max": float(log_w.max()),
        "logw_mean": float(log_w.mean()),
    }
    return SNIS(
        deltaH_true=H_upd - H_orig,
        deltaH_true_se=_sd(IF) / math.sqrt(B),
        H_orig=H_orig,
        H_upd=H_upd,
        log_w=log_w,
        w=w,
        contributions=contributions,
        ess=ess(w),
        diagnostics=diagnostics,
    )


def loglog_slope(multipliers, deltas) -> float:
    """Least-squares slope of log|Delta H_true| against log m (1 in the linear regime)."""
    pairs = zip(multipliers, deltas, strict=True)
    pts = [(math.log(abs(m)), math.log(abs(d))) for m, d in pairs if d and m]
    if len(pts) < 2:
        return float("nan")
    x = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    y = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())
