"""The entropy governor against three other arms on the demo's GRPO task (docs/governor.md).

The demo (configs/demo.yaml: tiny character Llama + LoRA, Dr-GRPO on "a+b=", AdamW lr 1e-3,
warmup-cosine over 200 steps, clipping at 1.0) in a plain loop, the same step budget per arm:

- none: no control (the entropy collapses from ~3.4 to ~0.35 nats/token);
- bonus: a fixed entropy bonus, loss - c H_bar (``GRPOModule(entropy_coef=c)``);
- adaptive: TRL's ``use_adaptive_entropy`` rule (Skywork-OR1): c += delta when the step's
  rollout entropy is <= target, else c -= delta (clamped to [0, 1]); c is applied only while
  the last entropy is <= target. target = the governor's floor;
- governor: ``EntropyGovernor(floor=1.0)`` on every step.

Tuning (fair: one budget each, on a seed not evaluated): c in ``--bonus-grid`` and delta in
``--delta-grid`` are each run on ``--tune-seed``; the value kept is the one with the highest
final reward among those whose minimum H_orig stays >= 0.9 (the governor's acceptance bar),
else the one with the highest minimum H_orig. The governor is not tuned (floor=1.0, defaults).

H_orig is measured the same way in every arm, before every step: the entropy of the same E
batch (64 sequences from the held-out pool, the engine's sampler, seed 0 and the step), in
nats/token; for the governor its own records hold it (same E). The measurement's time is not
counted in the arms' wall clock.

    OMP_NUM_THREADS=1 python benchmarks/governor_eval.py            # ~10 min on one core
    OMP_NUM_THREADS=1 python benchmarks/governor_eval.py --seeds 0 --steps 60 --bonus-grid 0.03
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import lightning
import numpy as np
import torch

from entropy_callback import EntropyProbe
from entropy_callback.demos import GRPOModule, build_policy, make_prompts
from entropy_callback.governor import EntropyGovernor
from entropy_callback.observer import preserved_state

ROOT = Path(__file__).resolve().parents[1]
DEMO = dict(group_size=4, prompts_per_step=8, max_new_tokens=6, lr=1e-3, warmup_steps=10)
CLIP, FLOOR, E_SIZE = 1.0, 1.0, 64
ARMS = ("none", "bonus", "adaptive", "governor")


def run(arm: str, seed: int, steps: int, value: float = 0.0, **policy) -> dict:
    """One training run; ``value`` is the bonus's c or the adaptive rule's delta; ``policy``:
    governor options beyond floor=1.0."""
    lightning.seed_everything(seed, verbose=False)
    model, tok = build_policy(seed=seed)
    heldout = make_prompts(100, seed=seed + 1)
    module = GRPOModule(model, tok, make_prompts(4096, seed=seed), seed=seed,
                        total_steps=steps, entropy_coef=value if arm == "bonus" else 0.0, **DEMO)
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    params = [p for p in model.parameters() if p.requires_grad]
    meter = EntropyProbe(model, tok, heldout, batch_size=E_SIZE, max_new_tokens=6)
    governor = None
    if arm == "governor":
        governor = EntropyGovernor(model, tok, heldout, floor=FLOOR, batch_size=E_SIZE,
                                   max_new_tokens=6, **policy).attach(opt)
    batches = iter(module.train_dataloader())
    out = {"arm": arm, "seed": seed, "value": value, "H": [], "reward": [], "coef": []}
    coef, last_entropy, measuring = 0.0, math.inf, 0.0
    start = time.perf_counter()
    for t in range(steps):
        if governor is None:  # H_orig on E at theta_t (the governor measures it itself)
            m0 = time.perf_counter()
            with preserved_state(model):
                terms = meter.e_terms(meter.sample_e(t))
            out["H"].append(float(terms["h"].sum() / terms["T"].sum()))
            measuring += time.perf_counter() - m0
        if arm == "adaptive":
            module.entropy_coef = coef if last_entropy <= FLOOR else 0.0
        opt.zero_grad()
        result = module.training_step(next(batches), t)
        result["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        sched.step()
        out["reward"].append(float(result["rewards"].mean()))
        rollout_entropy = float(result["entropy"])
        if arm == "adaptive":
            coef = min(coef + value, 1.0) if rollout_entropy <= FLOOR else max(coef - value, 0.0)
            last_entropy = rollout_entropy
        out["coef"].append(module.entropy_coef)
    out["seconds"] = time.perf_counter() - start - measuring
    if governor is not None:
        governor.detach()
        out["H"] = [r.H for r in governor.records]
        out["records"] = [r.to_dict() for r in governor.records]
    return out


def summary(r: dict, tail: int = 20) -> dict:
    return {"final_reward": float(np.mean(r["reward"][-tail:])),
            "mean_reward": float(np.mean(r["reward"])),
            "min_H": float(np.min(r["H"])), "final_H": float(np.mean(r["H"][-tail:])),
            "seconds": r["seconds"]}


def tune(arm: str, grid: list[float], seed: int, steps: int) -> tuple[float, list[dict]]:
    """The grid value kept (docstring), and each value's summary on the tuning seed."""
    rows = []
    for value in grid:
        s = summary(run(arm, seed, steps, value))
        rows.append({"value": value, **s})
        print(f"tune {arm:9s} {value:<6} final reward {s['final_reward']:.3f} "
              f"min H {s['min_H']:.3f}", flush=True)
    ok = [r for r in rows if r["min_H"] >= 0.9]
    best = max(ok, key=lambda r: r["final_reward"]) if ok else max(rows, key=lambda r: r["min_H"])
    return best["value"], rows


def prediction_check(runs: list[dict]) -> dict:
    """Pearson of realized Delta H_true against alpha * delta H_1 over every governed step, and
    the fraction outside 2 combined standard errors."""
    recs = [x for r in runs for x in r["records"] if x["governed"] and x["realized"] is not None]
    p = np.array([x["predicted"] for x in recs])
    q = np.array([x["realized"] for x in recs])
    se = np.array([math.hypot(x["realized_se"], x["alpha"] * x["deltaH1_se"]) for x in recs])
    return {"steps": len(recs), "pearson": float(np.corrcoef(p, q)[0, 1]),
            "outside_2se": float(np.mean(np.abs(q - p) > 2 * se)),
            "mean_alpha": float(np.mean([x["alpha"] for x in recs])),
            "braked_fraction": float(np.mean([x["alpha"] < 1 for x in recs])),
            "trust_cuts": sum(x["trust"] is not None for x in recs)}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_h, ax_r) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(ARMS, ("tab:gray", "tab:blue", "tab:orange", "tab:green"), strict=True))
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        H = np.mean([r["H"] for r in mine], axis=0)
        R = np.mean([r["reward"] for r in mine], axis=0)
        R = np.convolve(R, np.ones(10) / 10, mode="valid")
        ax_h.plot(H, color=colors[arm], label=f"{arm} (mean of {len(mine)} seeds)")
        for r in mine:
            ax_h.plot(r["H"], color=colors[arm], alpha=0.25, lw=0.7)
        ax_r.plot(np.arange(len(R)) + 9, R, color=colors[arm], label=arm)
    ax_h.axhline(FLOOR, color="k", ls=":", lw=1, label=f"floor {FLOOR}")
    ax_h.axhline(0.9, color="r", ls=":", lw=1, label="0.9")
    ax_h.set(xlabel="optimizer step", ylabel="H_orig on E (nats/token)", title="entropy")
    ax_r.set(xlabel="optimizer step", ylabel="rollout reward (10-step mean, mean of seeds)",
             title="reward")
    ax_h.legend(fontsize=8)
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tune-seed", type=int, default=100)
    parser.add_argument("--bonus-grid", type=float, nargs="+",
                        default=[0.01, 0.015, 0.02, 0.03, 0.1])
    parser.add_argument("--delta-grid", type=float, nargs="+",
                        default=[0.005, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--bonus", type=float, help="skip the bonus's tuning: use this c")
    parser.add_argument("--delta", type=float, help="skip the adaptive tuning: use this delta")
    parser.add_argument("--margin-se", type=float, help="the governor's margin_se (default: "
                        "the policy's)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "governor_eval"),
                        help="writes <out>.json and <out>.png")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    start = time.perf_counter()
    c, bonus_rows = (args.bonus, []) if args.bonus is not None or "bonus" not in args.arms \
        else tune("bonus", args.bonus_grid, args.tune_seed, args.steps)
    delta, adaptive_rows = (args.delta, []) if (args.delta is not None
                                                or "adaptive" not in args.arms) \
        else tune("adaptive", args.delta_grid, args.tune_seed, args.steps)
    values = {"none": 0.0, "bonus": c, "adaptive": delta, "governor": 0.0}
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            policy = {} if args.margin_se is None else {"margin_se": args.margin_se}
            runs.append(run(arm, seed, args.steps, values[arm], **policy))
            print(f"{arm:9s} seed {seed}: {summary(runs[-1])}", flush=True)
    table = {}
    base = {s: r["seconds"] for r in runs if r["arm"] == "none" for s in [r["seed"]]}
    for arm in args.arms:
        rows = [summary(r) for r in runs if r["arm"] == arm]
        overhead = [r["seconds"] / base[r["seed"]] - 1 for r in runs
                    if r["arm"] == arm and r["seed"] in base]
        table[arm] = {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}
        table[arm]["min_H_any_seed"] = float(min(row["min_H"] for row in rows))
        table[arm]["overhead"] = float(np.mean(overhead)) if overhead else None
        table[arm]["value"] = values[arm]
    governed = [r for r in runs if r["arm"] == "governor"]
    report = {"args": vars(args), "table": table,
              "prediction": prediction_check(governed) if governed else None,
              "tuning": {"bonus": bonus_rows, "adaptive": adaptive_rows},
              "runs": [{k: v for k, v in r.items() if k != "records"} for r in runs],
              "total_seconds": time.perf_counter() - start}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(runs, out.with_suffix(".png"))
    print(json.dumps({"table": table, "prediction": report["prediction"]}, indent=1))
    return report


if __name__ == "__main__":
    main()
