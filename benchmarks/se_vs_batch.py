"""Standard errors of delta H_1 and Delta H_true against the E batch size, on the demo's model.

The demo's run (configs/demo.yaml, reproduced by benchmarks/_demo.py) after 20 optimizer steps;
the step probed is the next one (AdamW, lr ≈ 1e-3, clipped gradients). For each B_E the same
step is probed ``--repeats`` times on independent E batches; reported per B_E: the mean of each
estimate, the mean reported SE, the spread (sd) of the estimates over the repeats, and the
relative SE (mean SE / |mean|).

    python benchmarks/se_vs_batch.py                       # about 3 minutes on one thread
    python benchmarks/se_vs_batch.py --sizes 16 64 256 --repeats 32
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from _demo import HELDOUT, RepeatedStep, demo_state

from entropy_callback import EntropyProbe


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer, optimizer = demo_state(args.train_steps)
    repeated = RepeatedStep(model, optimizer)
    print(f"demo run after {args.train_steps} steps; probed step: AdamW at lr {repeated.lr:.3g}, "
          f"L = {args.max_new_tokens}, {args.repeats} independent E batches per B_E")
    print("\n| B_E | mean δH₁ | mean SE(δH₁) | sd(δH₁) | rel. SE(δH₁) | mean ΔH_true | "
          "mean SE(ΔH_true) | sd(ΔH_true) | rel. SE(ΔH_true) | mean ESS/B | s / probe |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for size in args.sizes:
        probe = EntropyProbe(model, tokenizer, HELDOUT, batch_size=size,
                             microbatch_size=min(size, 64), max_new_tokens=args.max_new_tokens,
                             seed=0)
        start = time.perf_counter()
        results = [repeated.probe(probe, step=r) for r in range(args.repeats)]
        seconds = (time.perf_counter() - start) / args.repeats
        row = {"B_E": size, "seconds_per_probe": seconds,
               "ess_fraction": statistics.fmean(r.ess_fraction for r in results)}
        for name in ("deltaH1", "deltaH_true"):
            values = [getattr(r, name) for r in results]
            ses = [getattr(r, name + "_se") for r in results]
            row[name] = statistics.fmean(values)
            row[name + "_se"] = statistics.fmean(ses)
            row[name + "_sd"] = statistics.stdev(values)
            row[name + "_rel_se"] = row[name + "_se"] / abs(row[name])
        rows.append(row)
        print(f"| {size} | {row['deltaH1']:.3e} | {row['deltaH1_se']:.2e} | "
              f"{row['deltaH1_sd']:.2e} | {row['deltaH1_rel_se']:.1%} | "
              f"{row['deltaH_true']:.3e} | {row['deltaH_true_se']:.2e} | "
              f"{row['deltaH_true_sd']:.2e} | {row['deltaH_true_rel_se']:.1%} | "
              f"{row['ess_fraction']:.4f} | {seconds:.2f} |", flush=True)
    # SE ∝ 1/√B_E: the constant, so that B_E for a target relative SE can be read off
    for name in ("deltaH1", "deltaH_true"):
        c = statistics.fmean(r[name + "_se"] * math.sqrt(r["B_E"]) for r in rows)
        # the best estimate of the mean: the B_E-weighted average (variance ∝ 1/B_E)
        mean = sum(r[name] * r["B_E"] for r in rows) / sum(r["B_E"] for r in rows)
        need = {target: math.ceil((c / (target * abs(mean))) ** 2) for target in (0.2, 0.1, 0.05)}
        print(f"\n{name}: SE ≈ {c:.3g} / √B_E (mean over B_E of SE·√B_E); "
              f"|{name}| ≈ {abs(mean):.3g}; B_E for a relative SE of 20% / 10% / 5%: "
              f"{need[0.2]} / {need[0.1]} / {need[0.05]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
