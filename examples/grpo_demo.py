"""Offline demo: watch a GRPO run collapse its entropy, step by step, predicted and measured.

A tiny character-level Llama with LoRA learns "a+b=" -> (a+b) mod 10 by Dr-GRPO on CPU.
Every ``every`` optimizer steps, EntropyProbeCallback predicts the step's entropy change
(delta H_1, from the live AdamW state) and measures it (Delta H_true, importance sampling on a
held-out batch). At the end: a table of the probes, the correlation of predicted vs true, where
each predicted change comes from (momentum, weight decay, rollouts with positive and negative
advantage; off with ``--no-attribution``), and the TensorBoard and CLI commands.

    python examples/grpo_demo.py                       # configs/demo.yaml, about 3 minutes
    python examples/grpo_demo.py --steps 400 --every 40 --out runs/longer
    python examples/grpo_demo.py --devices 2 --fsdp2    # FSDP2 (fully_shard), 2 CPU processes
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from entropy_callback import EntropyProbeCallback, ProbeConfig, load_run
from entropy_callback.cli import pearson
from entropy_callback.demos import GRPOModule, build_policy, make_prompts
from entropy_callback.demos.grpo import prompt_dataloader
from entropy_callback.runlog import load_step

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, help="optimizer steps (default: from the config)")
    parser.add_argument("--every", type=int, help="probe every N steps (default: config)")
    parser.add_argument("--seed", type=int, help="seed (default: config)")
    parser.add_argument("--out", default="runs/demo", help="TensorBoard/JSON root directory")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (2 = DDP)")
    parser.add_argument("--fsdp2", action="store_true", help="shard the policy with FSDP2 "
                        "(ModelParallelStrategy, fully_shard per decoder layer and at the "
                        "policy); attribution is off (the probe refuses it on sharded models)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads; the "
                        "tiny model runs fastest on one (more threads only add overhead)")
    parser.add_argument("--checkpoint", help="a local transformers checkpoint instead of the "
                        "tiny model (its tokenizer must handle the 'a+b=' prompts)")
    parser.add_argument("--no-attribution", action="store_true", help="skip the attribution of "
                        "delta H_1 (on by default, at log_level 'detailed')")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    steps = args.steps or cfg["steps"]
    every = args.every or cfg["every"]
    seed = cfg["seed"] if args.seed is None else args.seed
    train = dict(cfg["training"])
    clip = train.pop("gradient_clip_val", None)

    torch.set_num_threads(args.threads)
    L.seed_everything(seed, verbose=False)
    model, tokenizer = build_policy(args.checkpoint, seed=seed)
    heldout = make_prompts(100, seed=seed + 1)  # drawn independently of the training stream
    module = (ShardedGRPOModule if args.fsdp2 else GRPOModule)(
        model, tokenizer, make_prompts(4096, seed=seed), total_steps=steps, seed=seed,
        probe_prompts=heldout, **train)
    attribution = not (args.no_attribution or args.fsdp2)
    probe = EntropyProbeCallback(every=every, config=probe_config(cfg["probe"], attribution))
    logger = TensorBoardLogger(args.out, name="grpo_demo")
    log_dir = logger.log_dir  # fixes the version before ddp_spawn's processes copy the logger
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy(args),
        logger=logger,
        callbacks=[probe],
        gradient_clip_val=clip,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(module)
    if os.environ.get("LOCAL_RANK", "0") != "0" or not trainer.is_global_zero:
        return []
    records = load_run(log_dir)
    report(records, log_dir, logger.save_dir, time.perf_counter() - start)
    return records


def strategy(args: argparse.Namespace):
    """FSDP2 through Lightning's ModelParallelStrategy (Lightning >= 2.3), DDP on several CPU
    processes, else Lightning's default."""
    if args.fsdp2:
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    return "ddp_spawn" if args.devices > 1 else "auto"


class ShardedGRPOModule(GRPOModule):
    """The GRPO module with its policy sharded by FSDP2 in ``configure_model`` (Lightning's
    ModelParallelStrategy recipe): each decoder layer, then the policy itself. Each rank draws
    its own prompts (data parallel), so the ranks' responses stop at different steps: the
    sampler decodes in lockstep (``demos.grpo.sample_responses``)."""

    def train_dataloader(self):
        return prompt_dataloader(self.prompts, self.prompts_per_step,
                                 seed=self.seed + self.global_rank)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):  # configure_model may be called again
            return
        for layer in self.model.get_base_model().model.layers:  # Llama/Qwen-style models
            fully_shard(layer)
        fully_shard(self.model)


def probe_config(options: dict, attribution: bool) -> ProbeConfig:
    """The config's probe section; with attribution, at least log_level "detailed" (the top
    rollouts and tokens that ``entropy-probe attribution`` shades)."""
    cfg = ProbeConfig.from_dict(options)
    if not attribution:
        return cfg
    level = cfg.log_level if cfg.log_level in ("detailed", "debug") else "detailed"
    return dataclasses.replace(cfg, attribution=True, log_level=level)


def report(records: list[dict], log_dir: str, save_dir: str, seconds: float) -> None:
    def fmt(x, se):
        return "      n/a" if x is None else f"{x:+.5f} ± {se or 0:.5f}"

    print(f"\n{len(records)} probes in {seconds:.0f} s (training + probes)")
    print(f"{'step':>6}  {'δH₁ (pred) ± SE':>22}  {'ΔH_true ± SE':>22}  {'ESS/B':>6}  {'H':>7}")
    for r in records:
        ess = r.get("ess_fraction")
        print(f"{r['step']:>6}  {fmt(r.get('deltaH1'), r.get('deltaH1_se')):>22}  "
              f"{fmt(r.get('deltaH_true'), r.get('deltaH_true_se')):>22}  "
              f"{'n/a' if ess is None else f'{ess:.3f}':>6}  "
              f"{'n/a' if r.get('H_orig') is None else format(r['H_orig'], '.4f'):>7}")
    pairs = [(r["deltaH1"], r["deltaH_true"]) for r in records
             if r.get("deltaH1") is not None and r.get("deltaH_true") is not None]
    r, n = pearson([p[0] for p in pairs], [p[1] for p in pairs])
    corr = "n/a" if r is None or (isinstance(r, float) and math.isnan(r)) else f"{r:.3f}"
    print(f"\nPearson correlation, predicted vs true ΔH over {n} probes: {corr}")
    print(f"Entropy per token: {records[0].get('H_orig'):.3f} -> {records[-1].get('H_upd'):.3f}"
          if records and records[0].get("H_orig") is not None
          and records[-1].get("H_upd") is not None else "")
    print(f"JSON records: {Path(log_dir) / 'entropy_probe'}")
    print(f"TensorBoard:  tensorboard --logdir {save_dir}")
    attribution_table(records, log_dir)


def attribution_table(records: list[dict], log_dir: str) -> None:
    """Where each δH₁ comes from (docs/attribution.md), when the probe ran with attribution."""
    rows = []
    for r in records:
        try:
            parts = load_step(log_dir, r["step"]).get("attribution", {}).get("parts")
        except (OSError, ValueError):
            parts = None
        if parts:
            rows.append((r, parts))
    if not rows:
        return

    def num(x):
        return f"{x:+.2e}" if isinstance(x, (int, float)) else "n/a"

    heads = ("δH₁", "momentum", "decay", "A > 0", "A < 0", "residual", "Cui·lr")
    keys = ("momentum", "weight_decay", "rollouts_pos_adv", "rollouts_neg_adv", "residual",
            "cui_proxy_lr")
    print("\nWhere δH₁ comes from (nats per token; parts + residual = δH₁):")
    print(f"{'step':>6}  " + "  ".join(f"{h:>9}" for h in heads))
    for r, parts in rows:
        cells = [num(r.get("deltaH1"))] + [num(parts.get(k)) for k in keys]
        print(f"{r['step']:>6}  " + "  ".join(f"{c:>9}" for c in cells))
    print(f"Tokens of one step:  entropy-probe attribution {log_dir} --step {rows[-1][0]['step']}")


if __name__ == "__main__":
    main()
