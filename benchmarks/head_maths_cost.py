"""CPU time of the LM head per chunk: the head's matmuls alone, and with the float64 maths.

Scoring and the derivative pass apply the head to the response positions' hidden states in
blocks (``scoring.head_block_rows``) and run the float64 log-softmax, entropy and their
closed-form derivatives over chunks (``scoring.chunk_rows``). This times, on random float32
weights [V, d] and N hidden states (and their tangents):

- ``matmuls``: the head's matmuls alone, 128 rows at a time (logits; with ``tangent`` also
  their tangent), the floor ``probe_cost.py`` counts for the head;
- ``reference``: the chunk loop with ``scoring.logp_and_entropy_rows`` (the float64
  ``log_softmax`` formulation, which the chunk loop used before ``head_maths``);
- ``head_maths``: the chunk loop with ``scoring.head_maths`` (what it uses by default);
- ``compiled``: ``compiled_head.CompiledHeadMaths`` (``compile_head=True``), one call per head
  block; its one-off compile (both variants, at the first call) is timed apart
  (``compile_seconds``, wall time), before the rounds.

Process CPU time (``time.process_time``), minimum over rounds: unlike wall time it hardly moves
when other jobs share the machine. One intra-op thread.

    python benchmarks/head_maths_cost.py --vocab 150000 --hidden 128 [--chunk-bytes 10000000]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from entropy_callback import scoring
from entropy_callback.compiled_head import CompiledHeadMaths
from entropy_callback.scoring import (
    chunk_rows,
    head_block_rows,
    head_maths,
    logp_and_entropy_rows,
)


def _chunk_loop(maths, W, h, dh, targets, budgets):
    """The loop of ``Scorer.head_rows`` for a plain linear head (closed-form tangent)."""
    n, vocab = h.shape[0], W.shape[0]
    rows = chunk_rows(vocab, None, h.device, budgets)
    block = head_block_rows(vocab, rows, None, h.device)
    out = torch.empty((2 if dh is None else 4, n), dtype=torch.float64)
    scratch = torch.empty((3, min(rows, n), vocab), dtype=torch.float64)
    for first in range(0, n, block):
        z = F.linear(h[first : first + block], W)
        dz = None if dh is None else F.linear(dh[first : first + block], W)
        for start in range(0, z.shape[0], rows):
            stop = min(start + rows, z.shape[0])
            args = (z[start:stop], targets[first + start : first + stop], 1.0,
                    None if dz is None else dz[start:stop])
            cols = maths(*args, scratch) if maths is head_maths else maths(*args)
            for row, col in zip(out, cols, strict=True):
                row[first + start : first + stop] = col


def _block_loop(compiled, W, h, dh, targets):
    """The loop of ``Scorer.head_rows`` with ``compile_head=True``: the head maths of a whole
    head block in one compiled call."""
    n, vocab = h.shape[0], W.shape[0]
    block = head_block_rows(vocab, chunk_rows(vocab, None, h.device), None, h.device)
    out = torch.empty((2 if dh is None else 4, n), dtype=torch.float64)
    for first in range(0, n, block):
        z = F.linear(h[first : first + block], W)
        dz = None if dh is None else F.linear(dh[first : first + block], W)
        cols = compiled(z, targets[first : first + block], dz)
        for row, col in zip(out, cols, strict=True):
            row[first : first + block] = col


def _matmuls(W, h, dh):
    for r in range(0, h.shape[0], 128):
        F.linear(h[r : r + 128], W)
        if dh is not None:
            F.linear(dh[r : r + 128], W)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--positions", type=int, default=512, help="N (16 sequences x 32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk-bytes", type=int, default=scoring.MATHS_CHUNK_BYTES["cpu"],
                        help="the chunk of the float64 maths on a CPU (MATHS_CHUNK_BYTES)")
    args = parser.parse_args(argv)
    budgets = {"cpu": args.chunk_bytes}
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden**0.5
    h = torch.randn(args.positions, args.hidden, generator=gen)
    dh = 1e-3 * torch.randn(args.positions, args.hidden, generator=gen)
    targets = torch.randint(args.vocab, (args.positions,), generator=gen)
    jobs = {"matmuls": lambda t: _matmuls(W, h, t),
            "reference": lambda t: _chunk_loop(logp_and_entropy_rows, W, h, t, targets, budgets),
            "head_maths": lambda t: _chunk_loop(head_maths, W, h, t, targets, budgets)}
    compiled = CompiledHeadMaths(1.0)
    start = time.perf_counter()
    compiled(F.linear(h[:2], W), targets[:2], F.linear(dh[:2], W))  # compiles both variants
    compile_seconds = time.perf_counter() - start
    jobs["compiled"] = lambda t: _block_loop(compiled, W, h, t, targets)
    best: dict[str, float] = {}
    for _ in range(args.rounds):  # interleaved, so a busy moment hits every job alike
        for tangent in (False, True):
            for name, job in jobs.items():
                start = time.process_time()
                job(dh if tangent else None)
                key = f"{'derivative' if tangent else 'scoring'}.{name}"
                best[key] = min(best.get(key, float("inf")), time.process_time() - start)
    report = {"setup": vars(args), "compile_seconds": round(compile_seconds, 2),
              "cpu_seconds": {k: round(v, 4) for k, v in best.items()},
              "over_matmuls": {k: round(v / best[k.split(".")[0] + ".matmuls"], 3)
                               for k, v in best.items() if not k.endswith("matmuls")}}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
