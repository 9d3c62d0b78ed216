"""Where Delta H_true stops being linear in the step, on the demo's model.

The demo's run (configs/demo.yaml, reproduced by benchmarks/_demo.py) after 20 optimizer steps;
the probed step is the next one (AdamW, lr ≈ 1e-3, clipped gradients), measured at
theta + m * Delta theta for multipliers m from 1/256 to 32 (effective lr m * 1e-3) on the same
E batch (common random numbers), repeated on
``--repeats`` independent E batches. Reported per m: the mean of Delta H_true and of
Delta H_true / m (constant, and equal to delta H_1 in expectation, while the change is linear);
the departure from linearity, (Delta H_true / m) / (Delta H_true / m at the smallest m) - 1,
from paired differences on the same batches (much less noisy than either alone); the local
log-log slope of |mean Delta H_true| between neighbouring m; and ESS / B_E.

    python benchmarks/linearity.py                    # about 1 minute on one thread
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from _demo import HELDOUT, RepeatedStep, demo_state

from entropy_callback import EntropyProbe

MULTIPLIERS = tuple(2.0**k for k in range(-8, 6))  # 1/256 ... 32


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer, optimizer = demo_state(args.train_steps)
    repeated = RepeatedStep(model, optimizer)
    lr = repeated.lr
    probe = EntropyProbe(model, tokenizer, HELDOUT, batch_size=args.batch_size,
                         microbatch_size=64, max_new_tokens=6, eta_multipliers=MULTIPLIERS)
    results = [repeated.probe(probe, step=r) for r in range(args.repeats)]
    d1 = [r.deltaH1 for r in results]
    d1_mean = statistics.fmean(d1)
    d1_se = statistics.stdev(d1) / math.sqrt(len(d1))
    print(f"demo run after {args.train_steps} steps, AdamW step at lr {lr:.3g}; "
          f"B_E = {args.batch_size}, {args.repeats} E batches")
    print(f"mean δH₁ = {d1_mean:.4e} ± {d1_se:.1e} (per unit m)\n")
    print("| m | lr · m | mean ΔH_true | mean ΔH_true / m | ± SE | departure from linear "
          "(paired) | local slope | mean ESS/B | min ESS/B |")
    print("|---|---|---|---|---|---|---|---|---|")
    per_m = {m: [next(p for p in r.eta_sweep if p["multiplier"] == m) for r in results]
             for m in MULTIPLIERS}
    m0 = MULTIPLIERS[0]
    base = [p["deltaH_true"] / m0 for p in per_m[m0]]
    base_mean = statistics.fmean(base)
    previous = None
    for m in MULTIPLIERS:
        values = [p["deltaH_true"] for p in per_m[m]]
        scaled = [v / m for v in values]
        mean, mean_scaled = statistics.fmean(values), statistics.fmean(scaled)
        se = statistics.stdev(scaled) / math.sqrt(len(scaled))
        diffs = [a - b for a, b in zip(scaled, base, strict=True)]
        dep = statistics.fmean(diffs) / abs(base_mean)
        dep_se = statistics.stdev(diffs) / math.sqrt(len(diffs)) / abs(base_mean)
        slope = ""
        if previous is not None and mean * previous[1] > 0:
            slope = f"{math.log(abs(mean / previous[1])) / math.log(m / previous[0]):.2f}"
        previous = (m, mean)
        ess = [p["ess_fraction"] for p in per_m[m]]
        print(f"| {m:g} | {m * lr:.2e} | {mean:+.3e} | {mean_scaled:+.3e} | {se:.1e} | "
              f"{dep:+.1%} ± {dep_se:.1%} | {slope} | {statistics.fmean(ess):.3f} | "
              f"{min(ess):.3f} |")
    slopes = [r.diagnostics.get("eta_loglog_slope") for r in results]
    print(f"\nper-batch eta_loglog_slope over all m: median {statistics.median(slopes):.2f}")


if __name__ == "__main__":
    main()
