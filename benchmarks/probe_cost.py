"""What one probe costs, against its floor, measured side by side in one run.

The floor is what any implementation of the probe must spend: sampling the E batch, one
forward-mode pass at theta (the directional derivatives of l and H along Delta theta) and one
scoring pass at theta'. Each is timed alone, with the engine's own functions, on the same model
and batch; the probe is timed whole (before_step + after_step). Reported: the median of each over
``--repeats`` repetitions and the ratio probe / floor.

    python benchmarks/probe_cost.py                  # the demo's tiny model
    python benchmarks/probe_cost.py --hidden 256 --layers 4 --batch-size 128 --max-new-tokens 32
    python benchmarks/probe_cost.py --attribution     # probe with attribution against without
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager

import torch

from entropy_callback import EntropyProbe, ProbeConfig
from entropy_callback.demos import build_policy
from entropy_callback.observer import preserved_state
from entropy_callback.scoring import sequence_terms
from entropy_callback.testing import randomize_lora_b
from entropy_callback.update import probed_parameters, snapshot


class _Clock:
    """``with clock("name"):`` adds the block's wall time to ``clock.seconds["name"]``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def one_repetition(probe, model, params, opt, make_grads, rep: int) -> dict[str, float]:
    """The whole probe on one step, then each part of its floor alone on a fresh batch."""
    clock = _Clock()
    make_grads()
    with clock("probe"):
        probe.before_step(opt, step=rep)
    opt.step()
    with clock("probe"):
        result = probe.after_step()
    assert result.error is None, result.error
    theta = snapshot(params)
    tangents = {n: torch.randn_like(t) * 1e-3 for n, t in theta.items()}
    with preserved_state(model):
        with clock("sampling"):
            batch = probe._sample(rep)
        with clock("derivative_pass"):
            for mb in probe._microbatches(batch):
                logp, ent, dl, dh = probe.scorer.score_with_tangent(mb, theta, tangents)
                sequence_terms(logp, ent, mb.response_mask, dl, dh)
        with clock("scoring_pass"):
            for mb in probe._microbatches(batch):
                logp, ent = probe.scorer.score(mb)
                sequence_terms(logp, ent, mb.response_mask)
    return {**clock.seconds, **{f"probe.{k}": v for k, v in result.timing.items()}}


def attribution_cost(args) -> dict:
    """The probe with ``attribution=True`` against without, on the demo's Dr-GRPO steps (32
    rollouts of <= 6 tokens per step): alternate steps go through one probe or the other;
    "with" counts before_step + after_step + attribute (the reverse pass over E and the
    forward-mode pass over the rollouts)."""
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
        result = probes[flag].after_step()
        middle = time.perf_counter()
        if flag:
            probes[flag].attribute(result, [out["rollouts"]], module.per_token_loss)
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
    parser.add_argument("--attribution", action="store_true",
                        help="time the probe with attribution=True against without")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.attribution:
        report = attribution_cost(args)
        print(json.dumps(report, indent=2))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=2)
        return report

    model, tok = build_policy(seed=0, hidden_size=args.hidden, num_layers=args.layers,
                              intermediate_size=2 * args.hidden)
    randomize_lora_b(model, std=0.05, seed=1)  # a non-trivial adapter: the step moves the policy
    prompts = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    cfg = ProbeConfig(batch_size=args.batch_size, microbatch_size=args.microbatch_size,
                      max_new_tokens=args.max_new_tokens, log_level="minimal")
    probe = EntropyProbe(model, tok, prompts, cfg)
    params = probed_parameters(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-3)

    def make_grads():
        opt.zero_grad()
        enc = tok(prompts[:16], return_tensors="pt", padding=True)
        model(**enc, labels=enc["input_ids"]).loss.backward()

    rows: dict[str, list[float]] = {}
    for rep in range(args.repeats + 1):  # the first repetition warms up and is dropped
        seconds = one_repetition(probe, model, params, opt, make_grads, rep)
        if rep > 0:
            for k, v in seconds.items():
                rows.setdefault(k, []).append(v)

    med = {k: statistics.median(v) for k, v in rows.items()}
    floor = med["sampling"] + med["derivative_pass"] + med["scoring_pass"]
    report = {
        "model": f"tiny llama hidden={args.hidden} layers={args.layers} vocab={len(tok)}",
        "B_E": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "median_seconds": med,
        "floor_seconds": floor,
        "ratio_probe_over_floor": med["probe"] / floor,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()
