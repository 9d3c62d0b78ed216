"""Offline example: TRL's own GRPOTrainer, unmodified, with the entropy probe attached.

A tiny character-level Llama learns "a+b=" -> (a+b) mod 10 with TRL's GRPOTrainer (LoRA through
``peft_config``, an in-memory dataset, a Python reward function; nothing is downloaded). Every
``--every`` optimizer steps, EntropyProbeTrainerCallback predicts the step's entropy change
(delta H_1) and measures it (Delta H_true) on E drawn from the held-out ``eval_dataset`` at
GRPOConfig's temperature. At the end: a table of the probes beside TRL's own logged ``entropy``
(the token-mean entropy of the step's rollouts), and the paired difference H_orig - entropy
with its standard error over the probed steps.

    python examples/trl_grpo.py                                   # about 30 s on one core
    python examples/trl_grpo.py --steps 60 --every 2 --temperature 0.7 --out runs/trl
    python examples/trl_grpo.py --governor 2.0      # + EntropyGovernorTrainerCallback(floor=2.0)

With ``--governor H_MIN`` the entropy governor also runs inside the same, unmodified
GRPOTrainer: it scales each step's learning rate by alpha <= 1 so that the predicted entropy
never goes below H_MIN (it changes training; the probe does not), and a table of its records
follows the probe's.

Then: tensorboard --logdir <out> (scalars under entropy_probe/, the Custom Scalars tab).
"""

from __future__ import annotations

import argparse
import math
import time

import peft
import torch
import transformers
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from entropy_callback import load_run
from entropy_callback.demos.grpo import make_prompts, reward
from entropy_callback.demos.tiny import (
    EOS_TOKEN,
    LORA_TARGET_MODULES,
    build_char_tokenizer,
    build_tiny_llama,
)
from entropy_callback.governor_hf import EntropyGovernorTrainerCallback
from entropy_callback.hf import EntropyProbeTrainerCallback


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--every", type=int, default=3, help="probe every N steps")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="GRPOConfig.temperature; the probe follows it")
    parser.add_argument("--probe-temperature", type=float,
                        help="sample E at this temperature instead of GRPOConfig's (to see the "
                        "comparison with TRL's entropy fail)")
    parser.add_argument("--batch-size", type=int, default=128, help="B_E of the probe")
    parser.add_argument("--completions", type=int, default=64,
                        help="completions per optimizer step (4 per prompt)")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/trl_grpo", help="GRPOConfig.output_dir")
    parser.add_argument("--governor", type=float, metavar="H_MIN",
                        help="also attach EntropyGovernorTrainerCallback(floor=H_MIN)")
    return parser.parse_args(argv)


TOKENIZER = build_char_tokenizer()
EOS_ID = TOKENIZER.eos_token_id


def rollout_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """The demo task's reward; TRL decodes without special tokens, so an EOS stop is marked
    the way ``demos.grpo.reward`` expects it."""
    return [reward(p, c + (EOS_TOKEN if ids and ids[-1] == EOS_ID else ""))
            for p, c, ids in zip(prompts, completions, completion_ids, strict=True)]


def build(args: argparse.Namespace) -> tuple[GRPOTrainer, EntropyProbeTrainerCallback]:
    """TRL's GRPOTrainer on the tiny policy, with the probe attached."""
    transformers.set_seed(args.seed)  # the LoRA init TRL draws when it wraps the model
    model = build_tiny_llama(TOKENIZER, seed=args.seed)
    config = GRPOConfig(
        output_dir=args.out,
        use_cpu=True,
        report_to=[],
        max_steps=args.steps,
        per_device_train_batch_size=args.completions,
        num_generations=4,
        max_completion_length=4,
        temperature=args.temperature,
        learning_rate=args.lr,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rollout_reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": make_prompts(4096, seed=args.seed)}),
        eval_dataset=Dataset.from_dict({"prompt": make_prompts(256, seed=args.seed + 1)}),
        processing_class=TOKENIZER,
        peft_config=peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(LORA_TARGET_MODULES),
                                    task_type="CAUSAL_LM"),
    )
    # prompts: the eval_dataset's "prompt" column; temperature and max_new_tokens: GRPOConfig's
    options = {} if args.probe_temperature is None else {"temperature": args.probe_temperature}
    probe = EntropyProbeTrainerCallback.attach(trainer, every=args.every,
                                               batch_size=args.batch_size, microbatch_size=64,
                                               **options)
    if args.governor is not None:
        trainer.add_callback(EntropyGovernorTrainerCallback(
            trainer.eval_dataset, floor=args.governor, batch_size=args.batch_size,
            microbatch_size=64, **options))
    return trainer, probe


def print_governor(trainer: GRPOTrainer) -> None:
    """The governor's records: alpha, its prediction at that alpha and the realized change."""
    governor = next(cb for cb in trainer.callback_handler.callbacks
                    if isinstance(cb, EntropyGovernorTrainerCallback))
    print(f"\n{'step':>5} {'H':>8} {'target':>8} {'deltaH1':>10} {'alpha':>7} {'predicted':>10} "
          f"{'realized':>10} binding")
    for r in governor.records:
        print(f"{r.step:>5} {r.H:8.4f} {r.target:8.4f} {r.deltaH1:+10.2e} {r.alpha:7.3f} "
              f"{r.predicted:+10.2e} {r.realized:+10.2e} {r.binding}")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    trainer, probe = build(args)
    trainer.train()
    # TRL logs the metrics of optimizer step t (0-based) at global_step t + 1.
    trl_entropy = {h["step"] - 1: h["entropy"] for h in trainer.state.log_history
                   if "entropy" in h}
    rows = [dict(r, trl_entropy=trl_entropy[r["step"]]) for r in load_run(probe.run_dir)]
    print(f"\n{'step':>5} {'H_orig':>8} {'TRL H':>8} {'diff':>8} {'deltaH1':>10} "
          f"{'deltaH_true':>11} {'cos':>10}")
    for r in rows:
        diff = r["H_orig"] - r["trl_entropy"]
        print(f"{r['step']:>5} {r['H_orig']:8.4f} {r['trl_entropy']:8.4f} {diff:+8.4f} "
              f"{r['deltaH1']:+10.2e} {r['deltaH_true']:+11.2e} {r['update_cosine']:10.7f}")
    diffs = [r["H_orig"] - r["trl_entropy"] for r in rows]
    if len(diffs) > 1:
        mean = sum(diffs) / len(diffs)
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
        print(f"\nH_orig - TRL entropy over {len(diffs)} probed steps: {mean:+.4f} +- {se:.4f} "
              f"(SE; z = {mean / se:+.2f}) nats/token; E sampled at temperature "
              f"{probe.config.temperature}, TRL's rollouts at {args.temperature}")
    if args.governor is not None:
        print_governor(trainer)
    print(f"{time.perf_counter() - start:.0f} s; tensorboard --logdir {args.out}")
    return rows


if __name__ == "__main__":
    main()
