"""Multi-process probes: each rank samples and scores its shard of E; the per-sequence vectors
are all-gathered so that every rank computes the single-process result on the union.

Two collectives per probe, both reached by every rank whatever failed: one ``all_gather`` of
every per-sequence vector at once, which carries each rank's failure flag too (so it is the
first agreement: a rank that failed, or has nothing to send, still enters it), then
``any_rank_failed`` after the pure estimators and records. Nothing that can fail on one rank
runs between a rank's arrival at a collective and the collective itself. A model sharded with
FSDP2 adds its lockstep checks before every forward (``sharded.py``).
"""

from __future__ import annotations

import torch


def shard(batch_size: int, world_size: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous block of the global E rows (sizes differ by at most one)."""
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _backend_device(model_device: torch.device) -> torch.device:
    import torch.distributed as dist

    return model_device if dist.get_backend() == "nccl" else torch.device("cpu")


def pad_shard(x: torch.Tensor, rows: int, width: int, device: torch.device) -> torch.Tensor:
    """[rows + 1, width] float64 on ``device``: ``x`` ([rows, n_rank]) padded to the widest
    shard, and a last row of zeros (the failure flag: this rank did not fail)."""
    buf = torch.zeros(rows + 1, width, dtype=torch.float64, device=device)
    buf[:rows, : x.shape[-1]] = x.to(device=device, dtype=torch.float64)
    return buf


def make_gather(batch_size: int, world_size: int, model_device: torch.device):
    """``gather(x, rows)``: x [rows, n_rank] (or None: this rank failed) -> [rows, batch_size],
    every rank's shard concatenated in rank order, or None when any rank sent None.

    Every rank enters the one ``all_gather`` whatever happened before: a rank whose own
    packing fails sends the failure flag instead, and raises its error after the collective.
    Shards may differ in size by one row; they are padded to the largest. Every rank must call
    it the same number of times in the same order (the engine: once per probe).
    """
    import torch.distributed as dist

    sizes = [shard(batch_size, world_size, r).stop - shard(batch_size, world_size, r).start
             for r in range(world_size)]
    width = max(sizes)
    device = _backend_device(model_device)

    def gather(x: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        error, buf = None, None
        if x is not None:
            try:
                buf = pad_shard(x, rows, width, device)
            except Exception as exc:  # raised after the collective, which every rank enters
                error = exc
        if buf is None:  # nothing to send: the failure flag alone
            buf = torch.zeros(rows + 1, width, dtype=torch.float64, device=device)
            buf[rows] = 1.0
        out = [torch.empty_like(buf) for _ in range(world_size)]
        dist.all_gather(out, buf)
        if error is not None:
            raise error
        if any(float(o[rows, 0]) != 0.0 for o in out):
            return None
        return torch.cat([o[:rows, :n] for o, n in zip(out, sizes, strict=True)], dim=-1).cpu()

    return gather


def any_rank_failed(failed: bool, model_device: torch.device) -> bool:
    """All ranks agree whether any of them failed (a MAX all-reduce of a flag)."""
    import torch.distributed as dist

    flag = torch.tensor([1 if failed else 0], dtype=torch.int32,
                        device=_backend_device(model_device))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def stack_vectors(vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    """[k, n] float64: the k per-sequence vectors of this rank, one row each (dict order).

    Float64 holds every integer vector (lengths, indices, flags) exactly."""
    return torch.stack([x.reshape(-1).to(torch.float64).cpu() for x in vectors.values()])
