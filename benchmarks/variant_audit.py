"""The probe's forward-mode derivative in peft's adapter types, against finite differences.

For each adapter config: the tiny float64 character Llama (hidden 32, one layer, vocabulary of
8 ids, made float64-exact), the adapter on q_proj and v_proj (IA3: k_proj, v_proj, down_proj),
every trainable tensor moved off its initial value by N(0, 0.05^2) (so no zero-initialised
factor hides a term), an E batch of 64 sequences of <= 4 tokens. It prints how many tensors the
probe holds, the relative error of the per-token tangents (D l, D H) from the probe's pass
against central differences of the probe's own float64 scoring (eps 1e-6, ``--eps`` to change),
and whether the live parameters are untouched. docs/usage.md, "LoRA variants", quotes it.

    python benchmarks/variant_audit.py            # every config, ~20 s on one thread
    python benchmarks/variant_audit.py dora loha  # some
"""

from __future__ import annotations

import argparse
import warnings

import peft
import torch

from entropy_callback import EntropyProbe
from entropy_callback.demos.tiny import build_char_tokenizer, build_tiny_llama
from entropy_callback.testing import exact_float64
from entropy_callback.update import probed_parameters

PROMPTS = ["a", "bca", "ddeab"]
T = ["q_proj", "v_proj"]
CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=T),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=T, use_rslora=True),
    "lora_bias": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=T, lora_bias=True),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=T, use_dora=True),
    "dora_embedding": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                              target_modules=[*T, "embed_tokens"]),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=T),
    "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=T),
    "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=T),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                  feedforward_modules=["down_proj"]),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=T),
    "oft_coft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=T, coft=True),
    "boft": lambda: peft.BOFTConfig(boft_block_size=8, target_modules=T),
    "hra": lambda: peft.HRAConfig(r=4, target_modules=T),
    "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, target_modules=T, total_step=10),
    "fourierft": lambda: peft.FourierFTConfig(n_frequency=16, target_modules=T),
    "vblora": lambda: peft.VBLoRAConfig(r=4, num_vectors=8, vector_length=8, target_modules=T),
}


def audit(name: str, eps: float) -> str:
    tokenizer = build_char_tokenizer(alphabet="abcde")
    base = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                            intermediate_size=64, dtype=torch.float64,
                            attn_implementation="sdpa", seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = peft.get_peft_model(base, CONFIGS[name]())
    model = exact_float64(model.double())
    gen = torch.Generator().manual_seed(1)
    params = probed_parameters(model)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.eval()
    probe = EntropyProbe(model, tokenizer, PROMPTS, batch_size=64, microbatch_size=64,
                         max_new_tokens=4)
    batch = probe._sample(0)
    theta = {n: p.detach().clone() for n, p in params.items()}
    u = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}
    scorer = probe.scorer
    size = f"{len(params):2d} tensors ({sum(p.numel() for p in params.values())} values)"
    try:
        _, _, dl, dh = scorer.score_with_tangent(batch, theta, u)
    except Exception as exc:  # report what the forward-mode pass cannot do
        return f"{name:15s} {size}; forward mode fails: {type(exc).__name__}: {str(exc)[:90]}"
    lp, hp = scorer.score(batch, {n: theta[n] + eps * u[n] for n in theta})
    lm, hm = scorer.score(batch, {n: theta[n] - eps * u[n] for n in theta})
    fl, fh = (lp - lm) / (2 * eps), (hp - hm) / (2 * eps)
    untouched = all(torch.equal(p, theta[n]) for n, p in params.items())
    return (f"{name:15s} {size}; rel. error D l {float((dl - fl).norm() / fl.norm()):.1e}, "
            f"D H {float((dh - fh).norm() / fh.norm()):.1e}; parameters untouched {untouched}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", choices=[[], *CONFIGS], default=[])
    parser.add_argument("--eps", type=float, default=1e-6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in args.configs or CONFIGS:
        print(audit(name, args.eps), flush=True)


if __name__ == "__main__":
    main()
