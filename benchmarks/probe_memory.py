"""Does the probe leak? Resident memory over many probes in a row.

Runs ``--probes`` probed optimizer steps (real gradients, real AdamW, before_step + after_step)
with the engine on the demo's tiny LoRA model, and records the process's resident set size
(psutil, else ``VmRSS`` from ``/proc/self/status``) and the number of live tensors after each
probe. Reported: RSS after probe 5 and after the last, the growth between them in MiB, the
least-squares slope in MiB per probe over that range, and the live-tensor counts. The first
probes warm up the allocator and torch's caches, so growth is measured from probe 5.

    python benchmarks/probe_memory.py
    python benchmarks/probe_memory.py --probes 100 --batch-size 64 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import torch

from entropy_callback import EntropyProbe, ProbeConfig
from entropy_callback.demos import build_policy, make_prompts

MIB = 2**20
WARMUP = 5


def rss_bytes() -> int:
    """Resident set size of this process, in bytes."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no psutil and no /proc/self/status: cannot read RSS") from None
    return psutil.Process(os.getpid()).memory_info().rss


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def slope(ys: list[float]) -> float:
    """Least-squares slope of ys against 0, 1, 2, ..."""
    n = len(ys)
    xm, ym = (n - 1) / 2, sum(ys) / n
    den = sum((x - xm) ** 2 for x in range(n))
    return sum((x - xm) * (y - ym) for x, y in enumerate(ys)) / den if den else 0.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--log-level", default="debug",
                        help="debug collects every record section (the most the probe holds)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.probes <= WARMUP:
        parser.error(f"--probes must be > {WARMUP} (growth is measured from probe {WARMUP})")

    model, tok = build_policy(seed=0)
    cfg = ProbeConfig(batch_size=args.batch_size, microbatch_size=min(16, args.batch_size),
                      max_new_tokens=args.max_new_tokens, log_level=args.log_level)
    probe = EntropyProbe(model, tok, make_prompts(64, seed=123), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train = tok(make_prompts(16, seed=0), return_tensors="pt", padding=True)

    rss, tensors = [], []
    for step in range(args.probes):
        opt.zero_grad(set_to_none=True)
        model(**train, labels=train["input_ids"]).loss.backward()
        probe.before_step(opt, step=step)
        opt.step()
        result = probe.after_step()
        assert result is not None and result.error is None, result.error
        del result
        gc.collect()
        rss.append(rss_bytes() / MIB)
        tensors.append(live_tensors())

    first, last = WARMUP - 1, args.probes - 1  # probe 5 and the last, counted from 1
    report = {
        "model": f"tiny llama (build_policy defaults), vocab={len(tok)}",
        "probes": args.probes,
        "B_E": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "log_level": args.log_level,
        "rss_mib_after_probe": [round(r, 2) for r in rss],
        f"rss_mib_probe_{WARMUP}": round(rss[first], 2),
        f"rss_mib_probe_{args.probes}": round(rss[last], 2),
        f"growth_mib_probe_{WARMUP}_to_{args.probes}": round(rss[last] - rss[first], 2),
        "slope_mib_per_probe": round(slope(rss[first:]), 4),
        f"live_tensors_probe_{WARMUP}": tensors[first],
        f"live_tensors_probe_{args.probes}": tensors[last],
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()
