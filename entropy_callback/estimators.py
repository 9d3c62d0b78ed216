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

    def values(self) -> dict[str, float]:
        """The declared quantities (``result.QUANTITIES``) this estimator reports."""
        return {"deltaH1": self.deltaH1, "deltaH1_se": self.deltaH1_se}


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
    deltaH_true: float  # bias-corrected: deltaH_true_raw - deltaH_true_bias
    deltaH_true_se: float
    deltaH_true_raw: float  # the plain SNIS ratio H_upd - H_orig
    deltaH_true_bias: float  # jackknife estimate of the raw value's O(1/B) bias
    H_orig: float
    H_upd: float
    log_w: torch.Tensor  # [B], S' - S
    w: torch.Tensor  # [B], exp(log_w - max log_w)
    contributions: torch.Tensor  # [B], jackknife pseudo-values / B: sum to deltaH_true
    ess: float
    diagnostics: dict = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        """The declared quantities (``result.QUANTITIES``) this estimator reports."""
        return {
            "deltaH_true": self.deltaH_true,
            "deltaH_true_se": self.deltaH_true_se,
            "deltaH_true_raw": self.deltaH_true_raw,
            "deltaH_true_bias": self.deltaH_true_bias,
            "H_orig": self.H_orig,
            "H_upd": self.H_upd,
            "ESS": self.ess,
            "ess_fraction": self.ess / self.w.numel(),
        }


def ess(w: torch.Tensor) -> float:
    """Effective sample size (sum w)^2 / sum w^2."""
    return float(w.sum() ** 2 / (w * w).sum())


def leave_one_out(
    w: torch.Tensor, h_upd: torch.Tensor, h: torch.Tensor, T: torch.Tensor, normalize: str
) -> torch.Tensor:
    """[B] the raw Delta H_true recomputed without sequence i, every i at once (O(B)).

    per_token:    sum_{j!=i} w_j h'_j / sum_{j!=i} w_j T_j - sum_{j!=i} h_j / sum_{j!=i} T_j
    per_sequence: sum_{j!=i} w_j h'_j / sum_{j!=i} w_j     - sum_{j!=i} h_j / (B - 1)
    """
    wh = w * h_upd
    if normalize == "per_token":
        wT = w * T
        return (wh.sum() - wh) / (wT.sum() - wT) - (h.sum() - h) / (T.sum() - T)
    return (wh.sum() - wh) / (w.sum() - w) - (h.sum() - h) / (h.numel() - 1)


def jackknife(raw: float, loo: torch.Tensor) -> tuple[float, float]:
    """(bias, SE) of an estimate ``raw`` from its leave-one-out values ``loo`` [B].

    bias = (B - 1) (mean_i loo_i - raw); the corrected estimate raw - bias = B raw -
    (B - 1) mean_i loo_i removes the O(1/B) term of a smooth function of means.
    SE = sqrt((B - 1)/B sum_i (loo_i - mean loo)^2).
    """
    B = loo.numel()
    mean = loo.mean()
    bias = float((B - 1) * (mean - raw))
    se = math.sqrt((B - 1) / B * float(((loo - mean) ** 2).sum()))
    return bias, se


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
    raw = H_upd - H_orig is a ratio of means, biased at O(1/B) (visible at large steps, where
    the weights spread); the reported Delta H_true is its jackknife correction
    raw - (B - 1)(mean_i raw_(-i) - raw), with the jackknife SE (closed-form leave-one-out).
    """
    B = h.numel()
    log_w = S_upd - S
    w = torch.exp(log_w - log_w.max())
    if normalize == "per_token":
        H_orig = float(h.sum() / T.sum())
        H_upd = float((w * h_upd).sum() / (w * T).sum())
    else:
        H_orig = float(h.mean())
        H_upd = float((w * h_upd).sum() / w.sum())
    raw = H_upd - H_orig
    if B > 1:
        loo = leave_one_out(w, h_upd, h, T, normalize)
        bias, se = jackknife(raw, loo)
        contributions = raw - (B - 1) / B * loo  # pseudo-values / B: they sum to raw - bias
    else:
        bias, se, contributions = 0.0, 0.0, torch.full_like(h, raw)
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
        deltaH_true=raw - bias,
        deltaH_true_se=se,
        deltaH_true_raw=raw,
        deltaH_true_bias=bias,
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
