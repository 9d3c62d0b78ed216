"""Which layers of a model run kernels without a forward-mode derivative: layers replaced by
Hub kernels (the ``kernels`` library, ``use_kernels=True``) and layers patched by Liger
(``liger_kernel``: TRL's and HF's ``use_liger_kernel``, or ``apply_liger_kernel_to_*``). Their
Triton/CUDA kernels define a backward only, so ``derivative="auto"`` takes the reverse pass for
such a model (``reverse.choose_derivative``) and ``"forward"`` is refused where an adapter can
say so at setup (``hf_support.check_policy``)."""

from __future__ import annotations

import sys

from torch import nn

LIGER_PACKAGE = "liger_kernel"


def kernel_layers(model: nn.Module) -> list[str]:
    """The names of the modules the ``kernels`` library kernelized (a Hub kernel layer, or a
    kernel function attached to the module), in module order: those holding ``_kernel_repo``,
    as ``kernels``' own inspection finds them (``_replace_forward`` sets it with the kernel's
    forward and removes it when reverting). A model loaded with ``use_kernels=True`` on a
    device without kernels keeps every original forward: none. Another instance-level
    ``forward`` (e.g. ``testing.exact_float64``'s float64 RMSNorm) is not a kernel."""
    out = []
    for name, module in model.named_modules():
        parts = (module, *getattr(module, "_kernel_funcs", {}).values())
        if any(getattr(part, "__dict__", {}).get("_kernel_repo") is not None for part in parts):
            out.append(name or type(module).__name__)
    return out


def _from_liger(obj: object) -> bool:
    return str(getattr(obj, "__module__", "") or "").split(".")[0] == LIGER_PACKAGE


def liger_layers(model: nn.Module) -> list[str]:
    """The names of the modules Liger patched, in module order: an instance whose class comes
    from ``liger_kernel`` (``AutoLigerKernelForCausalLM``, class-level patches), or whose
    ``forward`` Liger bound on the instance (``_apply_liger_kernel_to_instance`` binds e.g.
    ``LigerRMSNorm.forward`` into the module's ``__dict__``)."""
    out = []
    for name, module in model.named_modules():
        forward = module.__dict__.get("forward")
        if _from_liger(type(module)) or (
                forward is not None and _from_liger(getattr(forward, "__func__", forward))):
            out.append(name or type(module).__name__)
    return out


def liger_functions(model: nn.Module) -> list[str]:
    """Module-level functions Liger swapped into the modeling modules ``model``'s layers come
    from (``apply_liger_kernel_to_llama(rope=True, rms_norm=False, ...)`` replaces e.g.
    ``modeling_llama.apply_rotary_pos_emb`` and patches no layer): "module.function" names."""
    out = []
    for name in sorted({type(m).__module__ for m in model.modules()}):
        module = sys.modules.get(name)
        if module is None or not name.startswith("transformers.models."):
            continue
        out += [f"{name.rsplit('.', 1)[-1]}.{attr}" for attr, value in vars(module).items()
                if callable(value) and _from_liger(value)]
    return out


def no_forward_rule_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(name, "Hub" | "Liger") for every layer (or Liger function) whose kernel has no
    forward-mode rule."""
    return ([(n, "Hub") for n in kernel_layers(model)]
            + [(n, "Liger") for n in liger_layers(model) + liger_functions(model)])
