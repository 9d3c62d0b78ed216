"""Device check of the engine on a GPU (not a test: CI has no GPU). Prints a line per check and
exits non-zero when one fails.

    python benchmarks/gpu_engine_check.py

On CUDA, torch's AdamW takes its foreach path (the tests on CPU exercise the single-tensor one
the replay mirrors), TF32 really changes float32 matmuls, and autocast really runs in bf16:

1. the rebuilt step against the optimizer's, float64 / float32 / bf16 LoRA, with clipping
   (1 - cos and relative error per step; round-off is expected from the foreach kernels);
2. the user's TF32 through ``torch.backends.fp32_precision`` and through the legacy
   ``set_float32_matmul_precision``: settings left as set, and H_orig at step 0 (same theta,
   same E) equal to the run at default settings, i.e. the probe's passes ran at full fp32;
3. the probe called inside ``torch.autocast("cuda", bfloat16)``: H_orig at step 0 as without.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch

from entropy_callback import EntropyProbe, ProbeConfig
from entropy_callback.demos.grpo import make_prompts, sample_responses, score_responses
from entropy_callback.demos.tiny import build_policy

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, lora_r=4)
KEYS = [("generic", "all")] + [(b, o) for b in ("cuda", "mkldnn") for o in ("all", "matmul",
                                                                            "conv", "rnn")]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def settings() -> dict[str, str]:
    return {f"{b}.{o}": torch._C._get_fp32_precision_getter(b, o) for b, o in KEYS}


def probed_run(dtype: torch.dtype, cast: torch.dtype | None = None, context=nullcontext):
    """Three REINFORCE steps of the tiny policy (norm clipping 0.05), each probed."""
    model, tok = build_policy(seed=0, dtype=dtype, **TINY)
    if cast is not None:
        model.to(cast)
    model.to(DEVICE).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3,
                            weight_decay=0.01)
    probe = EntropyProbe(model, tok, make_prompts(16, seed=123),
                         ProbeConfig(batch_size=16, microbatch_size=16, max_new_tokens=4))
    results = []
    for step in range(3):
        torch.manual_seed(step)
        prompts = [p for p in make_prompts(4, seed=step) for _ in range(2)]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(DEVICE)
        ids, lengths = sample_responses(model, enc["input_ids"], enc["attention_mask"],
                                        max_new_tokens=4, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id)
        logp, _, _ = score_responses(model, enc["input_ids"], enc["attention_mask"], ids, lengths)
        reward = (ids.sum(-1) % 7).to(logp.dtype)  # varied, so every step has a gradient
        opt.zero_grad(set_to_none=True)
        (-((reward - reward.mean()) * logp.sum(-1)).mean()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        with context():
            probe.before_step(opt, step=step)
            opt.step()
            results.append(probe.after_step())
    return results


def main() -> int:
    failures = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
        if not ok:
            failures.append(name)

    print(f"torch {torch.__version__} on {DEVICE}")
    bars = {"float64": 1e-12, "float32": 1e-5, "bf16": 1e-3}
    for name, kw in {"float64": dict(dtype=torch.float64), "float32": dict(dtype=torch.float32),
                     "bf16": dict(dtype=torch.float32, cast=torch.bfloat16)}.items():
        for r in probed_run(**kw):
            check(f"{name} step {r.step} rebuilt step", r.ok and r.update_rel_error <= bars[name],
                  f"1-cos {1 - r.update_cosine:.1e} rel {r.update_rel_error:.1e}")
    default = probed_run(torch.float32)[0].H_orig
    initial = settings()
    a = torch.randn(512, 512, device=DEVICE)
    exact = a.double() @ a.double()
    for name, user in {"fp32_precision='tf32'": lambda: setattr(torch.backends, "fp32_precision",
                                                                 "tf32"),
                       "set_float32_matmul_precision('high')":
                           lambda: torch.set_float32_matmul_precision("high")}.items():
        user()
        as_set = settings()
        tf32_error = float(((a @ a).double() - exact).abs().max())
        h_orig = probed_run(torch.float32)[0].H_orig
        check(f"{name}: settings left as set", settings() == as_set, str(as_set))
        check(f"{name}: probe at full fp32", h_orig == default,
              f"H_orig {h_orig!r} vs {default!r}; user's matmul error {tf32_error:.1e}")
        for key, value in initial.items():
            torch._C._set_fp32_precision_setter(*key.split("."), value)
    h_orig = probed_run(torch.float32, context=lambda: torch.autocast(DEVICE.type,
                                                                      dtype=torch.bfloat16))
    check("outer autocast: probe at full fp32", h_orig[0].H_orig == default,
          f"H_orig {h_orig[0].H_orig!r} vs {default!r}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
