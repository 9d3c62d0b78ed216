"""How well δH₁ and Cui et al.'s covariance proxy predict ΔH_true, across a run's probes.

Reads runs logged with ``attribution=True`` (e.g. ``python examples/grpo_demo.py --seed 0
--every 10 --out runs/val_s0``) and reports, for each predictor x (δH₁, ``cui_proxy_lr``,
``cui_proxy``, and ``rollouts``: the part of δH₁ due to this step's own rollouts, the only part
Cui's proxy looks at) against y = ΔH_true over the probes of all the runs given: the Pearson
correlation, the least-squares slope of y on x (1 for a calibrated predictor in the units of
ΔH), the Spearman rank correlation and the fraction of probes where the signs agree.

    python benchmarks/cui_vs_delta_h1.py runs/val_s0/grpo_demo/version_0 runs/val_s1/...
"""

from __future__ import annotations

import argparse
import json
import math

from entropy_callback.runlog import load_run, load_step

PREDICTORS = ("deltaH1", "rollouts", "cui_proxy_lr", "cui_proxy")


def _pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def _slope(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - mx) ** 2 for a in x)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sxx if sxx else math.nan


def _ranks(v: list[float]) -> list[float]:
    order = sorted(range(len(v)), key=v.__getitem__)
    ranks = [0.0] * len(v)
    for rank, i in enumerate(order):
        ranks[i] = float(rank)
    return ranks


def rows(run_dirs: list[str]) -> list[dict]:
    out = []
    for run in run_dirs:
        for r in load_run(run):
            parts = (load_step(run, r["step"]).get("attribution") or {}).get("parts")
            if parts and r.get("deltaH1") is not None and r.get("deltaH_true") is not None:
                out.append({"run": run, "step": r["step"], "deltaH_true": r["deltaH_true"],
                            "deltaH1": r["deltaH1"], "cui_proxy": parts["cui_proxy"],
                            "cui_proxy_lr": parts["cui_proxy_lr"],
                            "rollouts": parts["rollouts"]})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--skip-first", action="store_true",
                        help="also report without each run's step 0 (the untrained policy)")
    args = parser.parse_args(argv)
    data = rows(args.run_dirs)
    report = {"probes": len(data), "runs": len(args.run_dirs)}
    subsets = {"all": data}
    if args.skip_first:
        subsets["without step 0"] = [d for d in data if d["step"] != 0]
    for name, subset in subsets.items():
        y = [d["deltaH_true"] for d in subset]
        report[name] = {
            x: {"pearson": _pearson([d[x] for d in subset], y),
                "slope": _slope([d[x] for d in subset], y),
                "spearman": _pearson(_ranks([d[x] for d in subset]), _ranks(y)),
                "sign_agreement": sum((d[x] > 0) == (d["deltaH_true"] > 0) for d in subset)
                / len(subset)}
            for x in PREDICTORS
        }
        report[name]["pearson_cui_proxy_vs_rollouts_part"] = _pearson(
            [d["cui_proxy"] for d in subset], [d["rollouts"] for d in subset])
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
