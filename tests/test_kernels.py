"""A model whose layers run Hub kernels (the ``kernels`` library, transformers' use_kernels=True)
is probed on the reverse path.

No hub here: the kernel is a local kernel repository written by the test (the layout ``kernels``
loads: ``build/torch-universal/<package>`` with its metadata), whose ``RMSNorm`` layer computes
Llama's RMSNorm through a ``torch.autograd.Function`` with a backward and no forward-mode rule,
as compiled kernels are. ``kernels.kernelize`` replaces every ``LlamaRMSNorm`` forward of the
model by it (the same call transformers makes for ``use_kernels=True``). Forward-mode AD then
fails; ``derivative="auto"`` sees the replaced layers and takes the reverse pass, whose delta H_1
equals the forward-mode pass on the same model without the kernels.
"""

from __future__ import annotations

import json
import textwrap

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from entropy_callback import EntropyProbe
from entropy_callback.demos.tiny import build_char_tokenizer
from entropy_callback.reverse import choose_derivative
from entropy_callback.testing import exact_float64, randomize_lora_b
from entropy_callback.update import probed_parameters

kernels = pytest.importorskip("kernels")

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["1+2=", "33+44=", "5=", "7+8+9+0="]

LAYER = '''
import torch
from torch import nn


class _Norm(torch.autograd.Function):
    """x / rms(x) * w with a hand-written backward and no jvp: a fused kernel's contract."""

    @staticmethod
    def forward(ctx, x, w, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, w, r)
        return w * (x * r)

    @staticmethod
    def backward(ctx, g):
        x, w, r = ctx.saved_tensors
        n = x * r
        gn = g * w
        gx = r * (gn - n * (gn * n).mean(-1, keepdim=True))
        gw = (g * n).reshape(-1, n.shape[-1]).sum(0)
        return gx, gw, None


class RMSNorm(nn.Module):
    def forward(self, hidden_states):
        return _Norm.apply(hidden_states, self.weight, self.variance_epsilon)
'''


def _kernel_repo(root):
    """A local kernel repository with one universal (pure PyTorch) build."""
    variant = root / "build" / "torch-universal"
    package = variant / "rmsnorm_nojvp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from . import layers\n")
    (package / "layers.py").write_text(textwrap.dedent(LAYER))
    (variant / "metadata.json").write_text(json.dumps({
        "id": "rmsnorm_nojvp", "name": "rmsnorm-nojvp", "version": 1, "license": "apache-2.0",
        "python-depends": [], "backend": {"type": "universal"}}))
    return root


def _policy(tokenizer):
    """A tiny float64 LoRA Llama (SDPA, float64 RMSNorm: the kernel's own arithmetic)."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa")).double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules=["q_proj", "v_proj"]))
    return exact_float64(randomize_lora_b(model, std=0.05, seed=3))


def _probe_one_step(model, tokenizer, derivative):
    params = probed_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    sum((p * torch.randn(p.shape, generator=gen, dtype=p.dtype)).sum()
        for p in params.values()).backward()
    probe = EntropyProbe(model, tokenizer, PROMPTS, batch_size=12, microbatch_size=6,
                         max_new_tokens=6, derivative=derivative)
    probe.before_step(optimizer)
    optimizer.step()
    return probe.after_step()


def test_hub_kernel_layers_are_probed_on_the_reverse_path(tmp_path):
    tokenizer = build_char_tokenizer()
    reference = _probe_one_step(_policy(tokenizer), tokenizer, "forward")
    model = _policy(tokenizer)
    repo = kernels.LocalLayerRepository(_kernel_repo(tmp_path), layer_name="RMSNorm")
    with kernels.use_kernel_mapping({"RMSNorm": {"cpu": repo}}):
        kernels.kernelize(model, mode=kernels.Mode.TRAINING, device="cpu")
    replaced = [n for n, m in model.named_modules() if "_kernel_repo" in m.__dict__]
    assert len(replaced) == 5  # 2 layers x 2 norms + the final norm
    mode, why = choose_derivative(model, "auto")
    assert mode == "reverse" and "Hub kernels" in why

    with pytest.warns(Warning, match="derivative"):  # forward mode cannot go through them
        failed = _probe_one_step(model, tokenizer, "forward")
    assert failed.error is not None and failed.error["phase"] == "derivative"
    assert "jvp" in failed.error["message"], failed.error  # the Function has no forward rule

    model = _policy(tokenizer)
    with kernels.use_kernel_mapping({"RMSNorm": {"cpu": repo}}):
        kernels.kernelize(model, mode=kernels.Mode.TRAINING, device="cpu")
    result = _probe_one_step(model, tokenizer, "auto")
    assert result.error is None and result.derivative == "reverse"
    # the kernel's arithmetic is the float64 RMSNorm's: the same numbers as without it
    assert result.deltaH1 == pytest.approx(reference.deltaH1, rel=1e-10)
    assert result.deltaH1_se == pytest.approx(reference.deltaH1_se, rel=1e-10)
    assert result.H_orig == pytest.approx(reference.H_orig, rel=1e-12)
