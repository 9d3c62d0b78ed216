"""One command for a machine with a GPU: the probe at a real model's shape, forward vs reverse.

    python benchmarks/gpu_check.py                 # Qwen2.5-0.5B-shaped, bf16, L = 1024 (GPU)
    python benchmarks/gpu_check.py --attn flash_attention_2
    python benchmarks/gpu_check.py --tiny          # the same steps on a CPU-sized model

A Qwen2-architecture model with Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV
heads, MLP 4864, vocabulary 151936, tied head) and random weights, in bf16, with LoRA r = 16 on
every linear layer of the blocks, SDPA (or flash) attention. E: ``--batch-size`` responses of
exactly ``--max-new-tokens`` tokens (random weights practically never emit EOS). Steps:

1. one training step (forward + backward of the response log-probs, microbatch by microbatch)
   on the E batch: seconds and peak memory;
2. one AdamW step (``fused=True`` on CUDA) probed twice on the same step, once with
   ``derivative="forward"`` and once with ``"reverse"``: each probe's seconds per phase and peak
   memory, delta H_1 and its SE from each (their agreement), and the fused AdamW rebuild's
   cosine with the observed step (``update_cosine``).

Prints a markdown table (for docs/performance.md) and a JSON line. Memory is the peak allocated
by torch on CUDA (``max_memory_allocated``, reset before each part), the peak resident-set
increment on a CPU. It should finish in under 5 minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2048)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Peak:
    """Peak memory of a block in MiB: torch's allocator on CUDA, VmHWM increment on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.start = self._rss("VmRSS")
        self.time = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = self._rss("VmHWM")
        self.seconds = time.perf_counter() - self.time
        self.mib = (peak - self.start) / 2**20

    @staticmethod
    def _rss(key: str) -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))


def build(args, device: torch.device):
    import peft
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from entropy_callback.demos.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    sizes = TINY if args.tiny else QWEN05
    config = Qwen2Config(**sizes, max_position_embeddings=4096, tie_word_embeddings=True,
                         rope_theta=1e6, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None,
                         attn_implementation=args.attn)
    torch.manual_seed(0)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    with torch.device(device):
        base = Qwen2ForCausalLM(config).to(dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32,
                                                      target_modules=LORA_TARGETS))
    with torch.no_grad():  # B != 0, so the adapter moves the policy from the start
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model, tok


def train_step(model, batch, microbatch_size: int, device) -> None:
    """Forward + backward of the response log-probs (float32 log-softmax), no optimizer step."""
    for start in range(0, batch.size, microbatch_size):
        mb = batch.slice(start, min(start + microbatch_size, batch.size))
        logits = model(input_ids=mb.input_ids.to(device),
                       attention_mask=mb.attention_mask.to(device),
                       position_ids=mb.position_ids.to(device)).logits[:, mb.prompt_width - 1:-1]
        logp = torch.log_softmax(logits.float(), -1).gather(
            -1, mb.response_ids.to(device).unsqueeze(-1)).squeeze(-1)
        (logp * mb.response_mask.to(device)).sum().backward()
        del logits, logp


def run(args) -> dict:
    from entropy_callback import EntropyProbe, ProbeConfig

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model, tok = build(args, device)
    prompts = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    probes = {d: EntropyProbe(model, tok, prompts, ProbeConfig(
        batch_size=args.batch_size, microbatch_size=args.microbatch_size,
        max_new_tokens=args.max_new_tokens, log_level="minimal", derivative=d))
        for d in ("forward", "reverse")}
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=fused)
    model.train()
    with torch.no_grad():
        batch = probes["forward"]._sample(10_000)
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "attention": args.attn, "L": args.max_new_tokens, "B_E": args.batch_size,
                 "microbatch": args.microbatch_size, "fused_adamw": fused,
                 "tokens": int(batch.lengths.sum())}
    for _ in range(2):  # the first step warms up kernels and the allocator
        optimizer.zero_grad(set_to_none=True)
        with Peak(device) as peak:
            train_step(model, batch, args.microbatch_size, device)
    out["train_step"] = {"seconds": peak.seconds, "peak_mib": peak.mib}
    optimizer.step()  # a first step: Adam's moments are non-zero when the probed step comes
    optimizer.zero_grad(set_to_none=True)
    train_step(model, batch, args.microbatch_size, device)
    peaks = {}
    for d, probe in probes.items():
        with Peak(device) as peaks[d]:
            probe.before_step(optimizer, step=1)
    optimizer.step()
    for d, probe in probes.items():
        with Peak(device) as after:
            result = probe.after_step()
        if result.error is not None:
            raise RuntimeError(f"{d} probe failed: {result.error}")
        out[d] = {"seconds": peaks[d].seconds + after.seconds,
                  "peak_mib": max(peaks[d].mib, after.mib),
                  "derivative_seconds": result.timing.get("derivative"),
                  "deltaH1": result.deltaH1, "deltaH1_se": result.deltaH1_se,
                  "update_cosine": result.update_cosine, "H_orig": result.H_orig}
    f, r = out["forward"], out["reverse"]
    out["agreement"] = {
        "deltaH1_rel": abs(r["deltaH1"] - f["deltaH1"]) / max(abs(f["deltaH1"]), 1e-300),
        "deltaH1_diff_over_se": abs(r["deltaH1"] - f["deltaH1"]) / max(f["deltaH1_se"], 1e-300),
        "se_rel": abs(r["deltaH1_se"] - f["deltaH1_se"]) / max(f["deltaH1_se"], 1e-300)}
    return out


def _ratio(a: float, b: float) -> str:
    """a / b as "1.23x"; "n/a" when b is not positive (a CPU's resident set may not grow)."""
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def table(out: dict) -> str:
    t, f, r = out["train_step"], out["forward"], out["reverse"]
    rows = [
        ("device / attention", f"{out['device']} / {out['attention']}"),
        ("E batch", f"{out['B_E']} x L {out['L']} ({out['tokens']} tokens), microbatch "
                    f"{out['microbatch']}"),
        ("training step (fwd + bwd)", f"{t['seconds']:.2f} s, {t['peak_mib']:.0f} MiB"),
        ("probe, forward derivative", f"{f['seconds']:.2f} s (derivative "
                                      f"{f['derivative_seconds']:.2f} s), {f['peak_mib']:.0f} MiB"),
        ("probe, reverse derivative", f"{r['seconds']:.2f} s (derivative "
                                      f"{r['derivative_seconds']:.2f} s), {r['peak_mib']:.0f} MiB"),
        ("probe memory / training step", f"forward {_ratio(f['peak_mib'], t['peak_mib'])}, "
                                         f"reverse {_ratio(r['peak_mib'], t['peak_mib'])}"),
        ("delta H_1 forward / reverse", f"{f['deltaH1']:.6g} / {r['deltaH1']:.6g} "
                                        f"(SE {f['deltaH1_se']:.3g} / {r['deltaH1_se']:.3g})"),
        ("forward vs reverse", f"rel {out['agreement']['deltaH1_rel']:.2g}, "
                               f"{out['agreement']['deltaH1_diff_over_se']:.2g} SE"),
        (f"AdamW rebuild cosine ({'fused' if out['fused_adamw'] else 'single-tensor'})",
         f"{f['update_cosine']:.8f}"),
    ]
    lines = ["| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized model (the test)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    parser.add_argument("--attn", default="sdpa", help="sdpa | flash_attention_2 | eager")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--microbatch-size", type=int, default=None)
    args = parser.parse_args(argv)
    args.max_new_tokens = args.max_new_tokens or (8 if args.tiny else 1024)
    args.batch_size = args.batch_size or (8 if args.tiny else 16)
    args.microbatch_size = args.microbatch_size or 4
    out = run(args)
    print(table(out))
    print(json.dumps(out, default=lambda x: None if isinstance(x, float) and math.isnan(x)
                     else x))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
