"""The derivative phase on an FSDP2-sharded model (2 gloo ranks on CPU): forward vs reverse pass.

Each rank shards the demo's tiny LoRA policy (float32, SDPA) per decoder layer and at the root,
takes one AdamW step and probes it ``--repeats`` times with each derivative, alternating
(forward, reverse, forward, ...) on the same E batch, one intra-op thread per process. Reported:
per derivative, the median over repeats of the slowest rank's derivative-phase time, and the
ratio reverse / forward (what ``derivative="auto"`` weighs on CPU, docs/distributed.md).

    python benchmarks/fsdp_derivative.py --batch-size 64 --max-new-tokens 32 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
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


def _worker(rank: int, port: int, args: dict, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, tok = build_policy(seed=0, attn_implementation="sdpa")
        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        enc = tok(["3+4=7", "1+1=2"], return_tensors="pt", padding=True)
        model(**enc, labels=enc["input_ids"]).loss.backward()
        opt.step()  # the Adam state exists from here on: each repeat puts it back
        probes = {d: EntropyProbe(model, tok, make_prompts(32, seed=0), ProbeConfig(
            batch_size=args["batch_size"], microbatch_size=args["microbatch_size"],
            max_new_tokens=args["max_new_tokens"], derivative=d)) for d in ("forward", "reverse")}
        times: dict[str, list[float]] = {d: [] for d in probes}
        for _ in range(args["repeats"]):
            for d, probe in probes.items():  # the same step each time: theta, Adam state back
                probe.before_step(opt, step=0)
                kept = {n: t.to_local().clone() for n, t in probe.params.items()}
                state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
                opt.step()
                result = probe.after_step()
                assert result.error is None, result.error
                times[d].append(result.timing["derivative"])
                with torch.no_grad():
                    for n, t in probe.params.items():
                        t.to_local().copy_(kept[n])
                for p, s in opt.state.items():
                    s.update(state[id(p)])
        Path(out, f"rank{rank}.json").write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--microbatch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = vars(parser.parse_args(argv))
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(_free_port(), args, out), nprocs=2,
                           start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    slowest = {d: [max(r[d][i] for r in ranks) for i in range(args["repeats"])]
               for d in ranks[0]}
    median = {d: statistics.median(v) for d, v in slowest.items()}
    print("| derivative | derivative phase, median of slowest rank |")
    print("|---|---|")
    for d, v in median.items():
        print(f"| {d} | {v:.3f} s |")
    print(f"ratio reverse / forward = {median['reverse'] / median['forward']:.2f}")
    return {"median": median, "all": slowest}


if __name__ == "__main__":
    main()
