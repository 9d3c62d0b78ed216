"""Bad input: a clear ProbeConfigError (naming the argument and the fix) at construction or
setup, or exactly one EntropyProbeWarning and a run that goes on. Real parts throughout."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
)
from probe_harness import (
    SMALL_PROBE,
    backward_on,
    fit,
    grpo_module,
    jsonl_records,
    make_trainer,
    probe_callback,
    probe_prompts,
    probe_warnings,
    tiny_policy,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from entropy_callback import EntropyProbe, EntropyProbeCallback, ProbeConfigError
from entropy_callback.demos import GRPOModule
from entropy_callback.lightning import unsupported_strategy


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


def build(maker: str, policy, **kwargs):
    """The callback or the engine, with the small probe settings and ``kwargs`` on top."""
    options = {**SMALL_PROBE, **kwargs}
    prompts = options.pop("prompts", probe_prompts())
    if maker == "callback":
        every = options.pop("every", 1)
        return EntropyProbeCallback(prompts, every, **options)
    model, tokenizer = policy
    return EntropyProbe(model, tokenizer, prompts, **options)


def record_warnings(make):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        made = make()
    return made, probe_warnings(caught)


def test_probe_config_error_is_a_value_error():
    assert issubclass(ProbeConfigError, ValueError)


# Each case: the bad keyword(s), and words the message must hold (the argument, the fix).
CONFIG_CASES = {
    "batch_size_0": (dict(batch_size=0), ["batch_size", ">= 1", "0"]),
    "max_new_tokens_0": (dict(max_new_tokens=0), ["max_new_tokens", ">= 1"]),
    "temperature_0": (dict(temperature=0.0), ["temperature", "> 0", "1.0"]),
    "temperature_negative": (dict(temperature=-1.0), ["temperature", "> 0"]),
    "normalize_unknown": (dict(normalize="per_word"), ["normalize", "per_token", "per_word"]),
    "log_level_unknown": (dict(log_level="verbose"), ["log_level", "minimal", "debug"]),
    "unknown_option": (dict(bach_size=8), ["bach_size", "did you mean 'batch_size'"]),
    "prompts_empty": (dict(prompts=[]), ["prompts", "non-empty list", "an empty list"]),
    "prompts_a_string": (dict(prompts="2+3="), ["prompts", "wrap a single prompt in a list"]),
    "prompts_not_strings": (dict(prompts=["2+3=", 7]), ["prompts", "non-empty strings", "[1]"]),
    "prompts_blank": (dict(prompts=["2+3=", ""]), ["prompts", "[1]"]),
}


@pytest.mark.parametrize("maker", ["callback", "engine"])
@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_option_is_a_clear_error_at_construction(maker, case, policy):
    kwargs, words = CONFIG_CASES[case]
    with pytest.raises(ProbeConfigError) as info:
        build(maker, policy, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("every", [0, -3, 2.5, True])
def test_every_below_one_is_a_clear_error(every):
    with pytest.raises(ProbeConfigError, match=r"every must be an integer >= 1"):
        EntropyProbeCallback(probe_prompts(), every)


def test_tokenizer_without_eos_is_an_error(policy):
    model, tokenizer = policy
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(ProbeConfigError, match=r"no EOS token.*Set tokenizer\.eos_token"):
        EntropyProbe(model, tokenizer, probe_prompts(), **SMALL_PROBE)


def test_tokenizer_without_pad_warns_once_and_pads_with_eos():
    model, tokenizer = tiny_policy()
    tokenizer.pad_token = None
    probe, messages = record_warnings(
        lambda: EntropyProbe(model, tokenizer, probe_prompts(), **SMALL_PROBE))
    assert len(messages) == 1 and "no pad token" in messages[0]
    assert probe.pad_id == tokenizer.eos_token_id
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    backward_on(model, tokenizer)
    probe.before_step(optimizer, step=0)
    optimizer.step()
    result = probe.after_step()
    assert result.ok and math.isfinite(result.deltaH1) and math.isfinite(result.deltaH_true)


def test_bf16_model_warns_about_the_precision_floor_and_probes():
    model, tokenizer = tiny_policy(dtype=torch.bfloat16)
    probe, messages = record_warnings(
        lambda: EntropyProbe(model, tokenizer, probe_prompts(), **SMALL_PROBE))
    assert len(messages) == 1 and "precision floor" in messages[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    backward_on(model, tokenizer)
    probe.before_step(optimizer, step=0)
    optimizer.step()
    result = probe.after_step()
    assert result.ok and math.isfinite(result.deltaH1) and math.isfinite(result.H_orig)


# ------------------------------------------------------------------ errors at setup (real fit)
def test_model_without_generate_is_an_error_at_setup(tmp_path):
    callback = probe_callback(model=torch.nn.Linear(4, 4))
    trainer = make_trainer(tmp_path, [callback], 2)
    with pytest.raises(ProbeConfigError, match=r"causal language model.*got Linear"):
        fit(trainer, grpo_module())
    assert trainer.global_step == 0


def test_missing_model_attribute_is_an_error_at_setup(tmp_path):
    trainer = make_trainer(tmp_path, [probe_callback(model_attr="policy")], 2)
    with pytest.raises(ProbeConfigError, match=r"no attribute 'policy'.*model_attr="):
        fit(trainer, grpo_module())


def test_model_without_trainable_parameters_is_an_error_at_setup(tmp_path):
    module = grpo_module()
    module.model.requires_grad_(False)
    trainer = make_trainer(tmp_path, [probe_callback()], 2)
    with pytest.raises(ProbeConfigError, match=r"no trainable parameters.*get_peft_model"):
        fit(trainer, module)


# ------------------------------------------------------------------ sharding strategies
class CPUShardedStrategy(FSDPStrategy):
    """Lightning's own FSDPStrategy. Lightning refuses the class itself with a CPU accelerator
    (an exact-type check), so the CPU-only test machine builds the Trainer with a subclass; the
    callback must recognise FSDP through the base class."""


@pytest.mark.parametrize("strategy", [CPUShardedStrategy, ModelParallelStrategy])
def test_sharding_strategy_disables_the_probe_with_one_warning(strategy, tmp_path):
    # A real Trainer and the callback's real setup hook. fit itself cannot run: FSDP and
    # ModelParallel need an accelerator device.
    trainer = make_trainer(tmp_path, [], 2, strategy=strategy())
    callback = probe_callback()
    module = grpo_module()
    _, messages = record_warnings(lambda: callback.setup(trainer, module, "fit"))
    assert len(messages) == 1
    assert f"disabled under {strategy.__name__}" in messages[0] and "DDP" in messages[0]
    assert callback.probe is None and callback.json is None
    callback.on_train_start(trainer, module)  # a disabled callback does nothing
    assert callback._hooks == []


def test_deepspeed_is_recognised_as_unsupported():
    # deepspeed is not installed here, so no Trainer can hold the strategy; an instance of
    # Lightning's class (made without its __init__, which imports deepspeed) is what setup sees.
    assert unsupported_strategy(DeepSpeedStrategy.__new__(DeepSpeedStrategy)) == (
        "DeepSpeedStrategy")
    assert unsupported_strategy(DDPStrategy()) is None


# ------------------------------------------------------------------ runs that go on
def test_unwritable_log_dir_warns_once_and_tensorboard_still_logs(tmp_path):
    not_a_dir = tmp_path / "probe_logs"
    not_a_dir.write_text("a regular file where the log directory should be\n")
    callback = probe_callback(log_dir=str(not_a_dir))
    trainer = make_trainer(tmp_path, [callback], 2)
    messages = fit(trainer, grpo_module())
    assert len(messages) == 1, messages
    assert str(not_a_dir) in messages[0] and "log_dir=" in messages[0]
    assert "TensorBoard scalars are still logged" in messages[0]
    assert trainer.global_step == 2 and callback.probed_steps == [0, 1]
    events = EventAccumulator(str(tmp_path / "run" / "version_0"))
    events.Reload()
    assert [e.step for e in events.Scalars("entropy_probe/deltaH1")] == [0, 1]
    assert not_a_dir.read_text().startswith("a regular file")


class TwoGroups(GRPOModule):
    """AdamW with lora_B at twice lora_A's learning rate, lora_B's group first."""

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return torch.optim.AdamW([
            {"params": [p for n, p in named if "lora_B" in n], "lr": 2e-2},
            {"params": [p for n, p in named if "lora_B" not in n], "lr": 1e-2},
        ])


class PlainSGD(GRPOModule):
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def test_param_groups_with_different_lrs_work_and_warn_once(tmp_path):
    trainer = make_trainer(tmp_path, [probe_callback()], 2)
    messages = fit(trainer, grpo_module(cls=TwoGroups))
    assert len(messages) == 1 and "different learning rates" in messages[0]
    for core in jsonl_records(tmp_path):
        assert "error" not in core
        assert core["learning_rate"] == 2e-2  # the first group's lr, documented
        assert core["bars_dot"] == pytest.approx(core["deltaH1"] / 2e-2, rel=1e-12)
        assert core["update_cosine"] > 0.9999  # the per-group AdamW step is reconstructed


def test_non_adam_optimizer_works_and_warns_once(tmp_path):
    trainer = make_trainer(tmp_path, [probe_callback()], 2)
    messages = fit(trainer, grpo_module(cls=PlainSGD))
    assert len(messages) == 1 and "SGD is not Adam/AdamW" in messages[0]
    records = jsonl_records(tmp_path)
    assert [r["step"] for r in records] == [0, 1]
    for core in records:
        assert "error" not in core and core["update_source"] == "observed"
        assert math.isfinite(core["deltaH1"]) and math.isfinite(core["deltaH_true"])
        assert core["update_cosine"] is None
        assert "not Adam/AdamW" in core["null_reasons"]["update_cosine"]
