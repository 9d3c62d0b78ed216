"""Peak memory of the reverse derivative pass at long responses, with and without the user's
gradient checkpointing, against one training step.

A Llama built from a config (float32, SDPA attention, random weights, LoRA r = 8 on every
projection) and a synthetic E batch of ``--batch-size`` responses of exactly ``--length`` tokens
(random ids, no stop; a 4-token prompt). Each measurement runs in a fresh process after the
model, its gradients and the batch exist; the peak is the resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident set before:

- ``reverse``: the probe's derivative phase as ``after_step`` runs it
  (``EntropyProbe._derivative_pass`` with ``derivative="reverse"`` inside
  ``observer.preserved_state``), microbatches of ``--microbatch-size``;
- ``train``: one training step's forward + backward (the sum of the response log-probabilities,
  float32 logits, the model in train mode) over the same microbatches.

Both with the model's checkpointing off and on (``activation_checkpointing_enable()`` on the
base model, as ``TrainingArguments(gradient_checkpointing=True)`` does), side by side.

The resident set counts what glibc's heap keeps after a free, which depends on the order of
allocations (a recomputed layer allocates and frees its activations once per backward).
``--mmap-threshold BYTES`` sets ``MALLOC_MMAP_THRESHOLD_`` in the measuring processes: every
allocation from that size up is its own mapping, returned to the system when freed, so the peak
is close to the peak of live tensors (and the runs slower):

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_memory.py --length 1024
    OMP_NUM_THREADS=1 python benchmarks/checkpoint_memory.py --length 1024 --mmap-threshold 131072
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_cost import _reset_peak, _status  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 4


def _build(args):
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from entropy_callback import EntropyProbe
    from entropy_callback.demos.tiny import build_char_tokenizer
    from entropy_callback.sampling import EBatch
    from entropy_callback.testing import randomize_lora_b

    tok = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=PROMPT + args.length, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    torch.nn.init.normal_(base.lm_head.weight, std=1.0 / math.sqrt(args.hidden))
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                             "up_proj", "down_proj"]))
    randomize_lora_b(model, std=0.05, seed=1)
    if args.checkpointing == "on":
        model.get_base_model().activation_checkpointing_enable()
    probe = EntropyProbe(model, tok, ["1+2="], batch_size=args.batch_size,
                         microbatch_size=args.microbatch_size, max_new_tokens=args.length,
                         derivative="reverse", log_level="minimal")
    b, width = args.batch_size, PROMPT + args.length
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (b, width), generator=gen)
    batch = EBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                   position_ids=torch.arange(width).expand(b, width).clone(),
                   response_mask=torch.ones(b, args.length, dtype=torch.bool),
                   lengths=torch.full((b,), args.length), prompt_index=torch.zeros(b, dtype=int),
                   prompt_lengths=torch.full((b,), PROMPT), stopped=torch.zeros(b, dtype=bool),
                   prompt_width=PROMPT)
    return model, probe, batch


def worker(args) -> dict:
    import torch

    from entropy_callback.observer import preserved_state
    from entropy_callback.update import snapshot

    torch.set_num_threads(1)
    model, probe, batch = _build(args)
    theta = snapshot(probe.params)
    gen = torch.Generator().manual_seed(1)
    direction = {n: 1e-3 * torch.randn(t.shape, generator=gen) for n, t in theta.items()}
    for p in probe.params.values():  # the training's gradients exist, as at a probed step
        p.grad = torch.zeros_like(p)
    before = _reset_peak()
    start = time.perf_counter()
    if args.worker == "reverse":
        model.eval()
        with preserved_state(model):
            pending = types.SimpleNamespace(batch=batch, tokens=[])
            probe._derivative_pass(pending, theta, direction, "reverse", {})
    else:
        model.train()
        for s in range(0, batch.size, args.microbatch_size):
            mb = batch.slice(s, min(s + args.microbatch_size, batch.size))
            logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                           position_ids=mb.position_ids).logits[:, PROMPT - 1 : -1]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, mb.response_ids[..., None])
            logp.sum().backward()
            del logits, logp
    return {"peak_increment_mib": round((_status("VmHWM") - before) / 2**20, 1),
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024, help="response tokens")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--microbatch-size", type=int, default=4)
    parser.add_argument("--mmap-threshold", type=int,
                        help="MALLOC_MMAP_THRESHOLD_ for the measuring processes (bytes)")
    parser.add_argument("--worker", choices=("reverse", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    sizes = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in (
        "length", "vocab", "hidden", "layers", "batch-size", "microbatch-size")]
    report: dict = {"setup": {k: getattr(args, k) for k in (
        "length", "vocab", "hidden", "layers", "batch_size", "microbatch_size",
        "mmap_threshold")}}
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    for what in ("reverse", "train"):
        for checkpointing in ("off", "on"):
            done = subprocess.run([sys.executable, __file__, *sizes, f"--worker={what}",
                                   f"--checkpointing={checkpointing}"], env=env,
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{what}, checkpointing {checkpointing}:\n"
                                   f"{done.stderr[-3000:]}")
            report[f"{what}, checkpointing {checkpointing}"] = json.loads(
                done.stdout.strip().splitlines()[-1])
    peak = {k: v["peak_increment_mib"] for k, v in report.items() if k != "setup"}
    report["reverse_on_over_off"] = round(peak["reverse, checkpointing on"]
                                          / peak["reverse, checkpointing off"], 3)
    report["reverse_on_over_train_step_on"] = round(peak["reverse, checkpointing on"]
                                                    / peak["train, checkpointing on"], 3)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
