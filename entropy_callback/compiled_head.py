"""``head_maths`` compiled into one fused pass over the logits (``ProbeConfig(compile_head=True)``).

The same float64 formula as ``scoring.head_maths`` (x' = (z - max z) / tau, e = exp x',
s = sum e; l = x'_y - log s, H = log s - sum e x' / s, D l = (dz_y - sum e dz / s) / tau,
D H = (E x' sum e dz - sum e x' dz) / (s tau)), written once for ``torch.compile``: inductor
fuses it into two passes over each row of z (its max, then one exp and the four float64 sums),
reading the model-dtype logits directly, with no float64 copy of a chunk in memory. Each call
takes a whole block of head rows, so ``MATHS_CHUNK_BYTES`` does not apply.

One graph per variant (with and without the tangent dz) serves every block: rows and vocabulary
are marked dynamic, the temperature is a tensor, and a one-row block is padded to two rows
(dynamo specialises a dimension of size 1). Both variants are compiled at the first call, so
either both run compiled or, if compiling fails (no C++ compiler, an unsupported backend),
both run the eager ``head_maths``, with one EntropyProbeWarning: θ's terms and θ''s always come
from the same code. The first call pays the compile (seconds, once per process, dtype and
device); later processes reuse inductor's on-disk cache.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import overrides

from .errors import EntropyProbeWarning


def _primal(z: torch.Tensor, targets: torch.Tensor, tau: torch.Tensor):
    x = (z.to(torch.float64) - z.amax(-1, keepdim=True).to(torch.float64)) / tau
    e = torch.exp(x)
    s = e.sum(-1)
    log_s = s.log()
    logp_y = x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_s
    mean_x = (e * x).sum(-1) / s
    return logp_y, log_s - mean_x


def _tangent(z: torch.Tensor, targets: torch.Tensor, tau: torch.Tensor, dz: torch.Tensor):
    x = (z.to(torch.float64) - z.amax(-1, keepdim=True).to(torch.float64)) / tau
    e = torch.exp(x)
    s = e.sum(-1)
    log_s = s.log()
    idx = targets.unsqueeze(-1)
    logp_y = x.gather(-1, idx).squeeze(-1) - log_s
    d = dz.to(torch.float64)
    dz_y = d.gather(-1, idx).squeeze(-1)
    e_dz = (e * d).sum(-1)
    e_x_dz = (e * x * d).sum(-1)
    mean_x = (e * x).sum(-1) / s
    return (logp_y, log_s - mean_x, (dz_y - e_dz / s) / tau,
            (mean_x * e_dz - e_x_dz) / (s * tau))


@contextmanager
def _without_function_modes():
    """The torch-function modes the caller is inside (the derivative pass's
    ``variants.exact_variant_derivatives``) left for the call: the head maths need none, and
    dynamo would compile one graph per mode stack (the primal of the derivative pass and of
    rescoring would then come from different graphs)."""
    modes = [overrides._pop_mode() for _ in overrides._get_current_function_mode_stack()]
    try:
        yield
    finally:
        for mode in reversed(modes):
            overrides._push_mode(mode)


class CompiledHeadMaths:
    """``head_maths`` (l, H[, D l, D H]) [r] float64 from a block of logits z [r, V] (and their
    tangent dz [r, V]), compiled; returns None once compiling has failed (the caller then runs
    the eager ``head_maths``). One instance per scorer: its warning is said once."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.failed = False
        self._fns: tuple | None = None
        self._tau: dict[torch.device, torch.Tensor] = {}

    def _call(self, fn, z, targets, dz):
        tau = self._tau.get(z.device)
        if tau is None:
            tau = self._tau[z.device] = torch.tensor(
                self.temperature, dtype=torch.float64, device=z.device)
        one = z.shape[0] == 1
        args = [z, targets] if dz is None else [z, targets, dz]
        args = [a.repeat(2, *[1] * (a.dim() - 1)) if one else a.contiguous() for a in args]
        for a in args:
            for dim in range(a.dim()):
                torch._dynamo.maybe_mark_dynamic(a, dim)
        with _without_function_modes():
            out = fn(args[0], args[1], tau, *args[2:])
        return tuple(o[:1] for o in out) if one else out

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, targets: torch.Tensor,
                 dz: torch.Tensor | None = None) -> tuple[torch.Tensor, ...] | None:
        if self.failed:
            return None
        try:
            if self._fns is None:  # both variants at the first call: both compile, or neither runs
                # dynamic=False: only the dimensions marked in _call are symbolic
                fns = (torch.compile(_primal, dynamic=False, fullgraph=True),
                       torch.compile(_tangent, dynamic=False, fullgraph=True))
                primal = self._call(fns[0], z, targets, None)
                tangent = self._call(fns[1], z, targets, torch.zeros_like(z) if dz is None else dz)
                self._fns = fns
                return primal if dz is None else tangent
            return self._call(self._fns[dz is not None], z, targets, dz)
        except Exception as exc:  # any failure to compile or run: the eager maths from now on
            self.failed = True
            why = (str(exc).strip().splitlines() or [""])[0][:300]
            warnings.warn(
                f"compile_head=True: torch.compile of the head maths failed "
                f"({type(exc).__name__}: {why}); the probe runs the eager head maths instead "
                "(the same numbers, slower). Install a C++ compiler (CPU) or Triton (GPU), or "
                "leave compile_head=False.",
                EntropyProbeWarning,
                stacklevel=2,
            )
            return None
