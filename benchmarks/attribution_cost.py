"""The probe with attribution against without, side by side in one run (issue #13's cost).

Alternate Dr-GRPO steps of the demo module go through a probe with ``attribution=True`` or one
without; "with" counts before_step + measure + finish with the rollouts (the reverse pass over
E and the forward-mode pass over the update rollouts). Reported: medians over ``--repeats`` and
the ratio.

    python benchmarks/attribution_cost.py
    python benchmarks/probe_cost.py --attribution      # the same, through probe_cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from entropy_callback import EntropyProbe, ProbeConfig
from entropy_callback.demos import build_policy
from entropy_callback.testing import randomize_lora_b


def attribution_cost(args) -> dict:
    """The probe with ``attribution=True`` against without, on the demo's Dr-GRPO steps (32
    rollouts of <= 6 tokens per step): alternate steps go through one probe or the other;
    "with" counts before_step + measure + finish with the rollouts (the reverse pass over E and
    the forward-mode pass over the rollouts)."""
    import warnings

    from entropy_callback.demos.grpo import GRPOModule, make_prompts

    torch.manual_seed(0)
    model, tok = build_policy(seed=0, hidden_size=args.hidden, num_layers=args.layers,
                              intermediate_size=2 * args.hidden)
    randomize_lora_b(model, std=0.05, seed=1)
    module = GRPOModule(model, tok, make_prompts(256, seed=0), weight_decay=0.01)
    prompts = make_prompts(64, seed=123)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            weight_decay=0.01)
    probes = {flag: EntropyProbe(model, tok, prompts, ProbeConfig(
        batch_size=args.batch_size, microbatch_size=args.microbatch_size,
        max_new_tokens=args.max_new_tokens, log_level="minimal", attribution=flag))
        for flag in (False, True)}
    batches = iter(module.train_dataloader())
    rows: dict[str, list[float]] = {"without": [], "with": [], "attribute": []}
    for rep in range(2 * (args.repeats + 1)):
        flag = bool(rep % 2)
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer
            out = module.training_step(next(batches), rep)
        out["loss"].backward()
        start = time.perf_counter()
        probes[flag].before_step(opt, step=rep)
        opt.step()
        measurement = probes[flag].measure()
        middle = time.perf_counter()
        facts = dict(rollouts=[out["rollouts"]], per_token_loss=module.per_token_loss) if flag \
            else {}
        result = probes[flag].finish(measurement, **facts)
        if flag:
            assert "parts" in result.attribution, result.attribution
        end = time.perf_counter()
        if rep >= 2:  # the first pair warms up
            rows["with" if flag else "without"].append(end - start)
            if flag:
                rows["attribute"].append(end - middle)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "model": f"tiny llama hidden={args.hidden} layers={args.layers} vocab={len(tok)}",
        "B_E": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "update_rollouts": module.prompts_per_step * module.group_size,
        "repeats": args.repeats, "median_seconds": med,
        "ratio_with_over_without": med["with"] / med["without"],
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--microbatch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (the tiny model is fastest on one)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = attribution_cost(args)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()
