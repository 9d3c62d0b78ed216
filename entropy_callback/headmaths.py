"""The float64 head maths of teacher forcing: log-prob and entropy per row of logits (and
their derivatives along a logit tangent), in chunks whose size the device decides. The
``Scorer`` (``scoring.py``) and the reverse passes call them a chunk or a head block at a time;
``compiled_head.py`` is the same formula compiled."""

from __future__ import annotations

import torch

CHUNK_BYTES = {"cpu": 10_000_000, "accelerator": 256 << 20}
"""Bytes per chunk x vocab float64 buffer when ``chunk_size`` is None: small enough to stay in a
CPU's cache, large enough to keep an accelerator busy."""

MATHS_CHUNK_BYTES = {"cpu": 1 << 20, "accelerator": 256 << 20}
"""The same for ``head_maths`` in ``Scorer.head_rows`` (scoring and the forward-mode pass),
whose buffers are reused chunk after chunk: 1 MiB (4 positions at 32k, 1 at 150k) stays in a CPU
core's L2 cache. In the probe the derivative and rescoring phases took 0.63-0.87 and 0.55-0.84
of their time before ``head_maths`` with it, 0.86-0.88 and 0.87-0.94 with 10 MB chunks
(benchmarks/probe_cost.py, docs/performance.md)."""

HEAD_BLOCK_BYTES = {"cpu": 32_000_000, "accelerator": 1 << 30}
"""Bytes per block of logits (model dtype, counted at 4 bytes) when ``chunk_size`` is None: the
head's matmul reads the whole vocab x hidden weight once per block, so a block of a few rows
spends its time reading the weight (measured at 150k: 4.1 ms per row at 8 rows, 1.2 at 128)."""



def chunk_rows(
    vocab: int, chunk_size: int | None, device: torch.device, budgets: dict | None = None
) -> int:
    """Positions per chunk: ``chunk_size`` if given, else ``budgets`` (``CHUNK_BYTES`` by
    default) / (8 bytes * vocab)."""
    if chunk_size is not None:
        return int(chunk_size)
    budget = (budgets or CHUNK_BYTES)["cpu" if device.type == "cpu" else "accelerator"]
    return max(1, budget // (8 * vocab))


def head_block_rows(vocab: int, rows: int, chunk_size: int | None, device: torch.device) -> int:
    """Positions per head matmul: ``rows`` if ``chunk_size`` is given, else at least ``rows`` and
    about ``HEAD_BLOCK_BYTES`` of logits; the float64 work then runs over chunks of ``rows``."""
    if chunk_size is not None:
        return rows
    budget = HEAD_BLOCK_BYTES["cpu" if device.type == "cpu" else "accelerator"]
    return max(rows, budget // (4 * vocab))


def logp_and_entropy_rows(
    z: torch.Tensor, targets: torch.Tensor, temperature: float, dz: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Logits z [r, V] (any dtype), targets [r] -> (l, H) [r] float64 in nats; with the logit
    tangent dz [r, V] also (D l, D H) [r] float64, in closed form."""
    x = z.to(torch.float64)
    if temperature != 1.0:
        x = x / temperature
    logp = torch.log_softmax(x, dim=-1)
    del x
    idx = targets.unsqueeze(-1)
    logp_y = logp.gather(-1, idx).squeeze(-1)
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    if dz is None:
        return logp_y, ent
    dx = dz.to(torch.float64)
    if temperature != 1.0:
        dx = dx / temperature
    dx_y = dx.gather(-1, idx).squeeze(-1)
    dx.mul_(p)  # p dx
    dlogp_y = dx_y - dx.sum(-1)
    logp.add_(ent.unsqueeze(-1))  # log p + H
    dent = -torch.linalg.vecdot(dx, logp)
    return logp_y, ent, dlogp_y, dent


def _float64(t: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """t as float64, into ``out`` when given (else t itself when already float64)."""
    return t.detach().to(torch.float64) if out is None else out.copy_(t)


@torch.no_grad()
def head_maths(
    z: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    dz: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """What ``logp_and_entropy_rows`` gives, (l, H[, D l, D H]) [r] float64 in nats from logits
    z [r, V] (and their tangent dz [r, V]), in fewer passes over the chunk: one float64 copy of
    each, one exp, in-place products, no autograd. ``scratch`` [3, >= r, V] float64, if given,
    holds the copies and exp (a fresh buffer per chunk costs page faults); without it a float64
    z or dz is overwritten.

    With x' = (z - max z) / tau <= 0, e = exp(x'), s = sum e and E x' = sum e x' / s:
    l = x'_y - log s, H = log s - E x', D l = (dz_y - sum e dz / s) / tau,
    D H = -(sum e x' dz - E x' sum e dz) / (s tau).
    Float64 throughout: float32 elements with float64 sums moved Delta H_true at a tiny step by
    about 0.1 SE, float32 partial sums by 1-5 SE (docs/performance.md)."""
    r = z.shape[0]
    buf = [None] * 3 if scratch is None else [b[:r] for b in scratch]
    x = _float64(z, buf[0])
    idx = targets.unsqueeze(-1)
    x.sub_(x.amax(-1, keepdim=True))
    if temperature != 1.0:
        x.div_(temperature)
    e = torch.exp(x, out=buf[1])
    s = e.sum(-1)
    log_s = s.log()
    logp_y = x.gather(-1, idx).squeeze(-1) - log_s
    if dz is not None:
        d = _float64(dz, buf[2])
        dz_y = d.gather(-1, idx).squeeze(-1)
        e_dz = d.mul_(e).sum(-1)
        e_x_dz = d.mul_(x).sum(-1)
    mean_x = e.mul_(x).sum(-1) / s
    ent = log_s - mean_x
    if dz is None:
        return logp_y, ent
    dlogp_y = (dz_y - e_dz / s) / temperature
    dent = (mean_x * e_dz - e_x_dz) / (s * temperature)
    return logp_y, ent, dlogp_y, dent


def token_logp_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [b, L, V] (any dtype), targets [b, L] -> (l, H), each [b, L] float64 in nats."""
    b, L, V = logits.shape
    rows = logits.reshape(b * L, V)
    flat_targets = targets.reshape(b * L)
    logps, entropies = [], []
    for start in range(0, b * L, chunk_size):
        stop = start + chunk_size
        logp, ent = logp_and_entropy_rows(rows[start:stop], flat_targets[start:stop], temperature)
        logps.append(logp)
        entropies.append(ent)
    return torch.cat(logps).reshape(b, L), torch.cat(entropies).reshape(b, L)
