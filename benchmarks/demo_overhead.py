"""The demo's training with and without EntropyProbeCallback: wall time of ``trainer.fit``.

Issue #11's acceptance line "training overhead <= 5 % at every=20 (median of 3, B_E equal to
the rollouts per step)". The run is configs/demo.yaml's (examples/grpo_demo.py): the tiny
policy from ``build_policy``, ``GRPOModule`` (Dr-GRPO, 8 prompts x 4 responses per step), 200
optimizer steps, one intra-op thread, a real Lightning ``Trainer`` (TensorBoardLogger into a
temporary directory, as the demo; no progress bar, no model summary, no checkpointing). The
fits alternate without / with the callback, ``--repeats`` times each; "with" adds
``EntropyProbeCallback(every=20, batch_size=<prompts_per_step x group_size>)`` with the other
probe options of configs/demo.yaml (attribution only with ``--attribution``).

Reported: the median wall time of ``trainer.fit`` for each, the overhead (with / without - 1),
the probe's own time from its records (``timing.total``, plus ``timing.attribution`` when on,
plus the TensorBoard write ``timing.tensorboard``)
and its phases, and whether every fit ends with bitwise the same LoRA weights (the probe is an
observer: it must not change the training).

    OMP_NUM_THREADS=1 nice python benchmarks/demo_overhead.py [--repeats 3] [--attribution]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from entropy_callback import EntropyProbeCallback, ProbeConfig
from entropy_callback.demos import GRPOModule, build_policy, make_prompts
from entropy_callback.runlog import load_run, load_step

ROOT = Path(__file__).resolve().parents[1]
# timings a record holds besides ``total`` (before_step start to after_step end): the
# attribution (run after it) and the TensorBoard sink's write; the JSON write is not timed
OUTSIDE_TOTAL = ("attribution", "tensorboard")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--repeats", type=int, default=3, help="fits of each kind (default 3)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the config's)")
    parser.add_argument("--every", type=int, help="probe every N steps (default: the config's)")
    parser.add_argument("--attribution", action="store_true", help="the probe with attribution "
                        "(log_level 'detailed', as the demo does by default)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def probe_config(cfg: dict, attribution: bool) -> ProbeConfig:
    """configs/demo.yaml's probe section with B_E = the rollouts per step (prompts_per_step x
    group_size); with attribution at log_level 'detailed' at least, as examples/grpo_demo.py."""
    train = cfg["training"]
    options = {**cfg["probe"], "batch_size": train["prompts_per_step"] * train["group_size"]}
    probe = ProbeConfig.from_dict(options)
    if not attribution:
        return probe
    level = probe.log_level if probe.log_level in ("detailed", "debug") else "detailed"
    return dataclasses.replace(probe, attribution=True, log_level=level)


def fit(cfg: dict, steps: int, every: int, probe: ProbeConfig | None, root: str) -> dict:
    """One seeded fit of the demo; its wall time, final LoRA weights and the probe's timings."""
    seed = cfg["seed"]
    train = dict(cfg["training"])
    clip = train.pop("gradient_clip_val", None)
    L.seed_everything(seed, verbose=False)
    model, tokenizer = build_policy(seed=seed)
    heldout = make_prompts(100, seed=seed + 1)  # as examples/grpo_demo.py
    module = GRPOModule(model, tokenizer, make_prompts(4096, seed=seed), total_steps=steps,
                        seed=seed, probe_prompts=heldout, **train)
    callback = None if probe is None else EntropyProbeCallback(every=every, config=probe)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(root, name="demo_overhead"),
        callbacks=[] if callback is None else [callback],
        gradient_clip_val=clip,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(module)
    seconds = time.perf_counter() - start
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = {"seconds": seconds, "weights": weights, "probes": 0, "probe_seconds": 0.0,
           "phases": defaultdict(float), "errors": 0, "per_probe": [],
           "timings": []}
    if callback is not None:
        for rec in load_run(callback.log_dir):
            timing = load_step(callback.log_dir, rec["step"]).get("timing") or {}
            out["probes"] += 1
            out["errors"] += rec.get("error") is not None
            own = timing.get("total", 0.0) + sum(timing.get(k, 0.0) for k in OUTSIDE_TOTAL)
            out["probe_seconds"] += own
            out["per_probe"].append(own)
            out["timings"].append(timing)
            for phase, value in timing.items():
                if phase != "total":
                    out["phases"][phase] += value
    return out


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    steps = args.steps or cfg["steps"]
    every = args.every or cfg["every"]
    probe = probe_config(cfg, args.attribution)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # Lightning's advice (num_workers, ...), the same for both
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "entropy_callback"):
        logging.getLogger(name).setLevel(logging.ERROR)

    runs: dict[str, list[dict]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory(prefix="demo_overhead_") as root:
        for rep in range(args.repeats):
            for kind in ("without", "with"):
                run = fit(cfg, steps, every, probe if kind == "with" else None, root)
                runs[kind].append(run)
                extra = (f", probe {run['probe_seconds']:.2f} s over {run['probes']} probes"
                         if kind == "with" else "")
                print(f"round {rep + 1} {kind:>7}: fit {run['seconds']:.2f} s{extra}",
                      flush=True)

    reference = runs["without"][0]["weights"]
    identical = all(same_weights(reference, r["weights"]) for rs in runs.values() for r in rs)
    without = statistics.median(r["seconds"] for r in runs["without"])
    with_ = statistics.median(r["seconds"] for r in runs["with"])
    own = statistics.median(r["probe_seconds"] for r in runs["with"])
    phases = {k: statistics.median(r["phases"][k] for r in runs["with"])
              for k in runs["with"][0]["phases"]}
    summary = {
        "steps": steps, "every": every, "batch_size": probe.batch_size,
        "attribution": probe.attribution, "repeats": args.repeats,
        "fit_without_s": [round(r["seconds"], 3) for r in runs["without"]],
        "fit_with_s": [round(r["seconds"], 3) for r in runs["with"]],
        "median_without_s": without, "median_with_s": with_,
        "overhead": with_ / without - 1,
        "probes_per_fit": runs["with"][0]["probes"],
        "probe_errors": sum(r["errors"] for r in runs["with"]),
        "median_probe_s": own, "probe_share_of_without": own / without,
        "median_phase_s": phases, "identical_lora_weights": identical,
        "first_probe_s": statistics.median(r["per_probe"][0] for r in runs["with"]),
        "later_probe_s": statistics.median(t for r in runs["with"] for t in r["per_probe"][1:]),
        "median_train_step_s": without / steps,
        "later_probe_phase_s": {k: statistics.median(t.get(k, 0.0) for r in runs["with"]
                                                    for t in r["timings"][1:])
                                for k in runs["with"][0]["phases"]},
    }
    print(f"\n{steps} steps, every={every}, B_E={probe.batch_size}, "
          f"attribution={probe.attribution}, {args.repeats} fits each (interleaved)")
    print(f"median fit without the probe: {without:.2f} s")
    print(f"median fit with the probe:    {with_:.2f} s")
    print(f"overhead (with / without - 1): {100 * summary['overhead']:+.1f} %")
    print(f"the probe's own time (records): median {own:.2f} s per fit over "
          f"{summary['probes_per_fit']} probes = {100 * own / without:.1f} % of the fit "
          f"without it; errors: {summary['probe_errors']}")
    print("its phases (median seconds per fit): "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])))
    print(f"one probe: {1e3 * summary['first_probe_s']:.0f} ms the first (one-time warm-up "
          f"included), {1e3 * summary['later_probe_s']:.0f} ms the later ones (median); one "
          f"training step: {1e3 * without / steps:.0f} ms (fit without the probe / steps)")
    print("a later probe's phases (median ms): " + ", ".join(
        f"{k} {1e3 * v:.1f}" for k, v in sorted(summary["later_probe_phase_s"].items(),
                                                 key=lambda kv: -kv[1]) if v >= 5e-4))
    print(f"final LoRA weights bitwise identical across all {2 * args.repeats} fits: {identical}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
