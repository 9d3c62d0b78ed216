"""Per-rank probe time with 1 and with 2 processes (gloo on CPU), side by side in one run.

Each process runs the engine on the same step of the demo's tiny model, with one intra-op thread
(so that 2 processes on 2 cores do not oversubscribe them), and times ``repeats`` probes of a
global E batch of ``--batch-size`` sequences. With 2 ranks each samples and scores half of E; the
per-sequence statistics are all-gathered. Reported: the median per-rank probe time for each world
size and the ratio (ideal: 0.5).

    python benchmarks/ddp_scaling.py --batch-size 128 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from entropy_callback import EntropyProbe, ProbeConfig
from entropy_callback.demos import build_policy, make_prompts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model, tok = build_policy(seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    cfg = ProbeConfig(batch_size=args["batch_size"], microbatch_size=args["microbatch_size"],
                      max_new_tokens=args["max_new_tokens"], log_level="minimal")
    probe = EntropyProbe(model, tok, make_prompts(100, seed=1), cfg)
    probe.set_distributed(rank, world)
    enc = tok(make_prompts(16, seed=2), return_tensors="pt", padding=True)
    times = []
    for rep in range(args["repeats"] + 1):
        opt.zero_grad()
        model(**enc, labels=enc["input_ids"]).loss.backward()
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        probe.before_step(opt, step=rep)
        opt.step()
        result = probe.after_step()
        elapsed = time.perf_counter() - start
        assert result.error is None, result.error
        if rep > 0:  # the first repetition warms up
            times.append(elapsed)
    Path(out, f"w{world}_r{rank}.json").write_text(json.dumps(times))
    if world > 1:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--microbatch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = vars(parser.parse_args(argv))
    medians = {}
    with tempfile.TemporaryDirectory() as out:
        for world in (1, 2):
            mp.start_processes(_worker, args=(world, _free_port(), args, out), nprocs=world,
                               join=True, start_method="spawn")
            per_rank = [json.loads(Path(out, f"w{world}_r{r}.json").read_text())
                        for r in range(world)]
            medians[world] = max(statistics.median(t) for t in per_rank)  # the slowest rank
    report = {
        "B_E": args["batch_size"],
        "max_new_tokens": args["max_new_tokens"],
        "per_rank_probe_seconds": {"1 process": medians[1], "2 processes": medians[2]},
        "ratio_2_over_1": medians[2] / medians[1],
        "threads_per_process": 1,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
