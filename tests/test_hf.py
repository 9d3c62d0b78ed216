"""The HF Trainer / TRL adapter inside TRL's own GRPOTrainer and a plain transformers.Trainer.

Everything is real: TRL's GRPOTrainer, unmodified (LoRA through ``peft_config``, an in-memory
``datasets.Dataset``, a Python reward function, its own seeding, its gradient clipping and its
fused LM head), the tiny character-level Llama of the demo factory, AdamW through accelerate,
TensorBoard event files read back. Nothing is downloaded.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from jsonschema import Draft202012Validator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tokenizers import processors

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.data_utils import maybe_apply_chat_template  # noqa: E402

from entropy_callback import EntropyProbeWarning, ProbeConfigError  # noqa: E402
from entropy_callback.demos.grpo import make_prompts, reward  # noqa: E402
from entropy_callback.demos.tiny import (  # noqa: E402
    build_char_tokenizer,
    build_policy,
    build_tiny_llama,
)
from entropy_callback.hf import EntropyProbeTrainerCallback, format_prompts  # noqa: E402
from entropy_callback.runlog import load_run  # noqa: E402
from entropy_callback.scoring import Scorer  # noqa: E402
from entropy_callback.tensorboard import PREFIX  # noqa: E402

TINY = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
PROBE = dict(batch_size=8, microbatch_size=8)
STEPS, EVERY = 5, 2
DUE = [t for t in range(STEPS) if t % EVERY == 0]
# Small enough that HF's clipping acts on every step of the tiny run (grad norms ~0.1-1).
MAX_GRAD_NORM = 0.01
TEMPERATURE = 0.9


def digit_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    return [reward(p, c) for p, c in zip(prompts, completions, strict=True)]


def grpo_trainer(out: Path, *, callback: bool = True, model=None, **probe_options: Any):
    """TRL's GRPOTrainer on the float64 tiny Llama (LoRA from peft_config; ``model``: that
    policy loaded otherwise), 8 completions of at most 3 tokens per step; with the probe
    attached unless ``callback=False``."""
    transformers.set_seed(0)  # TRL's LoRA init draws from the global RNG when it wraps
    tokenizer = build_char_tokenizer()
    if model is None:
        model = build_tiny_llama(tokenizer, seed=0, dtype=torch.float64, **TINY)
    args = GRPOConfig(
        output_dir=str(out), use_cpu=True, report_to=[], max_steps=STEPS, seed=0,
        per_device_train_batch_size=8, num_generations=4, max_completion_length=3,
        temperature=TEMPERATURE, learning_rate=1e-2, max_grad_norm=MAX_GRAD_NORM,
        logging_steps=1, save_strategy="no", disable_tqdm=True,
    )
    prompts = Dataset.from_dict({"prompt": make_prompts(32, seed=0)})
    trainer = GRPOTrainer(
        model=model, reward_funcs=digit_reward, args=args, train_dataset=prompts,
        eval_dataset=Dataset.from_dict({"prompt": make_prompts(16, seed=123)}),
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                    task_type="CAUSAL_LM"),
    )
    probe = None
    if callback:
        probe = EntropyProbeTrainerCallback.attach(trainer, every=EVERY,
                                                   **{**PROBE, **probe_options})
    return trainer, probe


def train(trainer) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return [w for w in caught if issubclass(w.category, EntropyProbeWarning)]


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def step_files(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:13]) for p in run_dir.glob("step_*.json") if "summary" not in
                  p.name)


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo")
    trainer, probe = grpo_trainer(out)
    warned = train(trainer)
    return trainer, probe, out, warned


@pytest.fixture(scope="module")
def grpo_records(grpo_run) -> dict[int, dict]:
    _, probe, _, _ = grpo_run
    return {t: json.loads((probe.run_dir / f"step_{t:08d}.json").read_text()) for t in DUE}


def test_grpo_trainer_probes_exactly_the_due_steps(grpo_run, grpo_records):
    trainer, probe, _, warned = grpo_run
    # TRL patched the policy's forward with its fused LM head (no forward-mode rule) and turned
    # on gradient checkpointing; the probes below are clean all the same.
    forward = trainer.model.get_base_model().forward
    assert getattr(forward, "__func__", forward).__code__.co_name == "_fused_forward"
    assert trainer.args.gradient_checkpointing
    assert trainer.state.global_step == STEPS
    assert probe.probed_steps == DUE
    assert step_files(probe.run_dir) == DUE
    assert not warned, [str(w.message) for w in warned]
    for t, record in grpo_records.items():
        core = record["core_results"]
        assert core["step"] == t and "error" not in core
        assert core["update_source"] == "adam_reconstruction"


def test_records_follow_the_documented_schema(grpo_records):
    schema = json.loads((Path(__file__).resolve().parents[1] / "docs" /
                         "log-schema.json").read_text(encoding="utf-8"))
    validator = Draft202012Validator(schema)
    for record in grpo_records.values():
        assert [e.message for e in validator.iter_errors(record)] == []
        assert record["run_metadata"]["framework"] == "hf"
        assert record["run_metadata"]["every"] == EVERY


def test_step_index_is_the_optimizer_step_being_taken(grpo_run, grpo_records):
    """HF logs the lr of optimizer step t (0-based) at global_step t + 1; the linear schedule
    gives every step its own lr, so equality pins the probe's index to the step it measured."""
    trainer, _, _, _ = grpo_run
    logged_lr = {h["step"] - 1: h["learning_rate"] for h in trainer.state.log_history
                 if "learning_rate" in h}
    assert len(set(logged_lr.values())) == STEPS
    for t, record in grpo_records.items():
        assert record["core_results"]["learning_rate"] == pytest.approx(logged_lr[t], rel=1e-12)


def test_rebuilt_update_matches_the_observed_one_under_hf_clipping(grpo_run, grpo_records):
    trainer, _, _, _ = grpo_run
    grad_norm = {h["step"] - 1: h["grad_norm"] for h in trainer.state.log_history
                 if "grad_norm" in h}
    for t, record in grpo_records.items():
        assert grad_norm[t] > MAX_GRAD_NORM  # clipping really acted on this step
        # float64 weights and AdamW: the rebuilt step differs from the taken one by rounding.
        assert record["core_results"]["update_cosine"] >= 1 - 1e-9


def test_probe_follows_the_grpo_config_and_takes_the_eval_dataset(grpo_run):
    _, probe, _, _ = grpo_run
    assert probe.config.temperature == TEMPERATURE
    assert probe.config.max_new_tokens == 3  # GRPOConfig.max_completion_length
    assert probe.probe.prompts == make_prompts(16, seed=123)


def test_explicit_probe_options_win_over_the_grpo_config(tmp_path):
    trainer, probe = grpo_trainer(tmp_path, temperature=1.0, max_new_tokens=2)
    trainer.args.max_steps, trainer.args.top_p = 1, 0.9
    warned = train(trainer)
    assert (probe.config.temperature, probe.config.max_new_tokens) == (1.0, 2)
    # a truncated rollout distribution is named once: H_orig describes the untruncated policy
    assert len(warned) == 1 and "top_p=0.9" in str(warned[0].message)


def test_training_is_bitwise_identical_with_and_without_the_callback(grpo_run, tmp_path):
    with_probe, _, _, _ = grpo_run
    without, _ = grpo_trainer(tmp_path, callback=False)
    train(without)
    a, b = lora_weights(with_probe), lora_weights(without)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[n], b[n]) for n in a)
    keys = ("loss", "grad_norm", "entropy", "reward")
    logged = [[{k: h[k] for k in keys} for h in t.state.log_history if "loss" in h]
              for t in (with_probe, without)]
    assert logged[0] == logged[1]


def test_tensorboard_event_files_hold_the_probe_tags(grpo_run, grpo_records):
    _, _, out, _ = grpo_run
    events = EventAccumulator(str(out / "runs")).Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("deltaH1", "deltaH_true", "H_orig", "update_cosine", "learning_rate"):
        assert f"{PREFIX}/{name}" in tags
    deltas = events.Scalars(f"{PREFIX}/deltaH1")
    assert [e.step for e in deltas] == DUE
    for e in deltas:
        assert e.value == pytest.approx(grpo_records[e.step]["core_results"]["deltaH1"],
                                        rel=1e-6)
    layout = EventAccumulator(str(out / "runs" / "entropy_probe_layout")).Reload()
    assert layout.Tags()["tensors"]  # the Custom Scalars layout


def test_failure_inside_the_probe_is_a_warning_and_an_error_record(grpo_run, tmp_path,
                                                                   monkeypatch):
    """The derivative pass raises at step 2 only; training and the other probes go on, and the
    run is bitwise the clean one."""
    real = Scorer.score_with_tangent
    calls = {"n": 0}

    def fail_on_second_probe(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "score_with_tangent", fail_on_second_probe)
    trainer, probe = grpo_trainer(tmp_path)
    warned = train(trainer)
    assert trainer.state.global_step == STEPS
    assert [str(w.message) for w in warned if "injected fault" in str(w.message)]
    assert probe.probed_steps == DUE
    records = {t: json.loads((probe.run_dir / f"step_{t:08d}.json").read_text()) for t in DUE}
    assert records[2]["core_results"]["error"]["phase"] == "derivative"
    assert records[2]["core_results"]["deltaH1"] is None
    assert all("error" not in records[t]["core_results"] for t in (0, 4))
    clean = lora_weights(grpo_run[0])
    assert all(torch.equal(w, clean[n]) for n, w in lora_weights(trainer).items())


def plain_trainer(out: Path, probe: EntropyProbeTrainerCallback, steps: int, **arg_options):
    """transformers.Trainer on a causal-LM loss with gradient accumulation; the policy is
    already a PeftModel."""
    model, tokenizer = build_policy(seed=0, lora_r=4, dtype=torch.float64, **TINY)
    texts = [p + str(sum(int(c) for c in p[::2]) % 10) for p in make_prompts(16, seed=0)]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    options = dict(output_dir=str(out), use_cpu=True, report_to=[], max_steps=steps, seed=0,
                   per_device_train_batch_size=2, gradient_accumulation_steps=2,
                   learning_rate=1e-2, max_grad_norm=MAX_GRAD_NORM, disable_tqdm=True,
                   logging_steps=1, save_strategy="no")
    args = transformers.TrainingArguments(**{**options, **arg_options})
    return transformers.Trainer(model=model, args=args, processing_class=tokenizer,
                                train_dataset=Dataset.from_dict({"input_ids": ids,
                                                                 "labels": ids}),
                                callbacks=[probe])


def test_plain_trainer_with_a_peft_model_is_probed(tmp_path):
    """Every optimizer step probed (once per accumulation window), prompts given as strings,
    AdamW recognised through accelerate's wrapper."""
    probe = EntropyProbeTrainerCallback(make_prompts(8, seed=123), every=1, max_new_tokens=3,
                                        **PROBE)
    trainer = plain_trainer(tmp_path, probe, steps=3)
    assert not train(trainer)
    assert probe.probed_steps == [0, 1, 2]
    assert probe.config.temperature == 1.0  # TrainingArguments have no temperature
    records = [json.loads((probe.run_dir / f"step_{t:08d}.json").read_text())["core_results"]
               for t in range(3)]
    assert all(r["update_source"] == "adam_reconstruction" for r in records)
    assert all(r["update_cosine"] >= 1 - 1e-9 for r in records)


def test_each_train_call_is_a_run_of_its_own(tmp_path):
    probe = EntropyProbeTrainerCallback(make_prompts(8, seed=123), every=1, max_new_tokens=3,
                                        **PROBE)
    trainer = plain_trainer(tmp_path, probe, steps=2)
    train(trainer)
    first = probe.run_dir
    train(trainer)
    assert probe.run_dir != first and probe.run_dir.parent == first.parent
    assert step_files(first) == step_files(probe.run_dir) == [0, 1]
    assert probe.probed_steps == [0, 1]  # this run's steps, not both runs'
    assert [r["step"] for r in load_run(probe.run_dir)] == [0, 1]


def test_a_resume_from_a_checkpoint_continues_the_probe_run(tmp_path):
    """train() saving checkpoints at steps 2 and 4, then a new Trainer and callback resuming
    from checkpoint-2: one run directory, the steps run again (2, 3) logged again once each,
    the probed steps continued; a resume with another probe config is a new run."""
    options = dict(save_strategy="steps", save_steps=2)
    probe = EntropyProbeTrainerCallback(make_prompts(8, seed=123), every=1, max_new_tokens=3,
                                        **PROBE)
    train(plain_trainer(tmp_path, probe, steps=4, **options))
    first = probe.run_dir
    assert (tmp_path / "checkpoint-2" / probe.state_file).is_file()
    before = {r["step"]: r for r in load_run(first)}
    assert sorted(before) == [0, 1, 2, 3]

    again = EntropyProbeTrainerCallback(make_prompts(8, seed=123), every=1, max_new_tokens=3,
                                        **PROBE)
    trainer = plain_trainer(tmp_path, again, steps=4, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert again.run_dir == first
    assert again.probed_steps == [0, 1, 2, 3]
    after = load_run(first)
    assert [r["step"] for r in after] == [0, 1, 2, 3]  # one record per step, none doubled
    assert {r["step"]: r["deltaH1"] for r in after if r["step"] < 2} == {
        t: before[t]["deltaH1"] for t in (0, 1)}  # the steps before the resume untouched
    assert any("resumes at step 2" in str(w.message) for w in caught)
    assert len(list(first.parent.glob("entropy_probe*"))) == 1

    changed = EntropyProbeTrainerCallback(make_prompts(8, seed=123), every=1, max_new_tokens=3,
                                          **{**PROBE, "batch_size": 4, "microbatch_size": 4})
    trainer = plain_trainer(tmp_path, changed, steps=4, **options)
    with pytest.warns(EntropyProbeWarning, match="another every or probe config"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert changed.run_dir != first and [r["step"] for r in load_run(changed.run_dir)] == [2, 3]
    assert changed.probed_steps == [2, 3]
    assert [r["step"] for r in load_run(first)] == [0, 1, 2, 3]


def test_a_resume_from_another_runs_checkpoint_is_a_new_run(tmp_path):
    """HF does not tell callbacks which checkpoint it resumed from. Resuming from another
    training's checkpoint-2 while output_dir holds this run's checkpoint-2 (with its probe
    state) must not continue, and rewind, this run: the trainer states differ."""
    options = dict(save_strategy="steps", save_steps=2)
    prompts = make_prompts(8, seed=123)
    mine = EntropyProbeTrainerCallback(prompts, every=1, max_new_tokens=3, **PROBE)
    train(plain_trainer(tmp_path / "mine", mine, steps=2, **options))
    other = EntropyProbeTrainerCallback(prompts, every=1, max_new_tokens=3, **PROBE)
    train(plain_trainer(tmp_path / "other", other, steps=2, learning_rate=3e-2, **options))
    assert (tmp_path / "mine" / "checkpoint-2" / mine.state_file).is_file()

    resumed = EntropyProbeTrainerCallback(prompts, every=1, max_new_tokens=3, **PROBE)
    trainer = plain_trainer(tmp_path / "mine", resumed, steps=3, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=str(tmp_path / "other" / "checkpoint-2"))
    assert resumed.run_dir != mine.run_dir
    assert [r["step"] for r in load_run(resumed.run_dir)] == [2]
    assert [r["step"] for r in load_run(mine.run_dir)] == [0, 1]  # untouched


def test_conversational_prompts_are_rendered_like_trl():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    conversations = [[{"role": "user", "content": p}] for p in make_prompts(4, seed=0)]
    ours = format_prompts(conversations, tokenizer, {})
    trl = [maybe_apply_chat_template({"prompt": c}, tokenizer)["prompt"] for c in conversations]
    assert ours == trl and ours[0].startswith("u:") and ours[0].endswith("a:")
    assert format_prompts(["2+3="], tokenizer, {}) == ["2+3="]
    with pytest.raises(ProbeConfigError, match="chat template"):
        format_prompts(conversations, build_char_tokenizer(), {})


def test_a_bos_written_by_the_chat_template_is_not_doubled():
    """The probe tokenizes the rendered text with special tokens; GRPOTrainer tokenizes the
    conversation inside apply_chat_template. Both must give the same ids."""
    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<bos>"})
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)])
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    conversation = [{"role": "user", "content": "1+2="}]
    (text,) = format_prompts([conversation], tokenizer, {})
    trl_ids = tokenizer.apply_chat_template(conversation, tokenize=True,
                                            add_generation_prompt=True)["input_ids"]
    assert tokenizer(text)["input_ids"] == list(trl_ids)
    assert list(trl_ids).count(tokenizer.bos_token_id) == 1


def test_a_bad_probe_name_is_refused():
    with pytest.raises(ProbeConfigError, match="name must be 1-64"):
        EntropyProbeTrainerCallback(["1+1="], name="two words")


def test_dataset_without_a_prompt_column_is_refused():
    with pytest.raises(ProbeConfigError, match="'prompt' column"):
        EntropyProbeTrainerCallback(Dataset.from_dict({"text": ["1+1="]}))


def _begin(probe, out: Path, tokenizer=None, **arg_options):
    """The Trainer's on_train_begin call, with real TrainingArguments, model and tokenizer."""
    model, tiny_tokenizer = build_policy(seed=0, lora_r=4, **TINY)
    args = transformers.TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[],
                                          **arg_options)
    state = transformers.TrainerState()
    probe.on_train_begin(args, state, transformers.TrainerControl(), model=model,
                         processing_class=tokenizer or tiny_tokenizer)
    return args, state


def test_a_conversational_eval_dataset_becomes_chat_formatted_prompts(tmp_path):
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}="
    heldout = Dataset.from_dict({"prompt": [[{"role": "user", "content": p[:-1]}]
                                            for p in make_prompts(4, seed=1)]})
    probe = EntropyProbeTrainerCallback(heldout, every=1, max_new_tokens=8, **PROBE)
    _begin(probe, tmp_path, tokenizer=tokenizer)
    probe.on_train_end(None, None, None)
    assert probe.probe.prompts == make_prompts(4, seed=1)


def test_fsdp1_and_deepspeed_are_refused_at_setup_naming_fsdp2(tmp_path):
    """FSDP1 (``fsdp_config={'version': 1}``) and DeepSpeed raise a ProbeConfigError from
    on_train_begin naming FSDP2; FSDP2 itself is probed (tests/test_hf_fsdp.py). DeepSpeed is
    not installed, so TrainingArguments cannot be built with it: the field the Trainer reads is
    set on real arguments afterwards."""
    probe = EntropyProbeTrainerCallback(make_prompts(4), every=1, **PROBE)
    with pytest.raises(ProbeConfigError, match=r"FSDP1 \(fsdp_version=1.*'version': 2"):
        _begin(probe, tmp_path, fsdp=True, fsdp_config={"version": 1})
    model, tokenizer = build_policy(seed=0, lora_r=4, **TINY)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    args.deepspeed = {"zero_optimization": {"stage": 2}}
    with pytest.raises(ProbeConfigError, match="DeepSpeed: its optimizer is not a torch "):
        probe.on_train_begin(args, transformers.TrainerState(), transformers.TrainerControl(),
                             model=model, processing_class=tokenizer)
    assert probe.probe is None and probe.run_dir is None


def test_tensor_parallelism_is_refused_at_setup_naming_fsdp_size(tmp_path):
    """A model split across ranks (transformers' ``DistributedConfig`` with tp_size > 1) is
    refused: its ranks hold parts of the same rows. A Trainer cannot run it on a CPU (accelerate
    accepts a ParallelismConfig only for FSDP2 or accelerator types), so the config is set on
    the model as ``from_pretrained(distributed_config=...)`` sets it."""
    model, tokenizer = build_policy(seed=0, lora_r=4, **TINY)
    model.config.distributed_config = transformers.DistributedConfig(tp_size=2, pp_size=1)
    probe = EntropyProbeTrainerCallback(make_prompts(4), every=1, model=model, **PROBE)
    with pytest.raises(ProbeConfigError, match=r"\(tp_size=2\).*fsdp_size=<processes>"):
        _begin(probe, tmp_path)


def test_fsdp2_arguments_on_a_cpu_probe_the_model_accelerate_hands_over(tmp_path):
    """On a CPU accelerate ignores ``fsdp`` (it selects FSDP only for accelerator devices, and
    DDP-wraps the model under several processes): the model handed to the callback is not
    sharded, and the probe runs on it as it would without the arguments."""
    probe = EntropyProbeTrainerCallback(make_prompts(4), every=1, **PROBE)
    _begin(probe, tmp_path, fsdp=True, fsdp_config={"version": 2})
    assert probe.probe is not None and not probe.probe.sharded
    probe.on_train_end(None, None, None)


def test_liger_kernels_take_the_reverse_pass_and_refuse_only_forward_mode(tmp_path):
    # Liger's Triton kernels define a backward only, and it patches module-level functions
    # (RoPE, cross-entropy) that no layer shows: under use_liger_kernel=True the probe takes
    # the reverse pass unless derivative= was given. (liger-kernel itself is not installable
    # here: a Trainer with the flag raises ImportError; the callback sees the real arguments.)
    probe = EntropyProbeTrainerCallback(make_prompts(4), every=1, **PROBE)
    _begin(probe, tmp_path / "auto", use_liger_kernel=True)
    assert probe.probe is not None and probe.session.config.derivative == "reverse"
    probe.on_train_end(None, None, None)
    forward = EntropyProbeTrainerCallback(make_prompts(4), every=1, derivative="forward",
                                          **PROBE)
    with pytest.raises(ProbeConfigError, match="use_liger_kernel=True"):
        _begin(forward, tmp_path / "forward", use_liger_kernel=True)


def test_the_use_kernels_flag_alone_is_not_refused(tmp_path):
    """transformers 5 sets ``use_kernels=True`` for every ``from_pretrained`` once ``kernels``
    is installed; on a CPU no layer is replaced, so the flag alone must not stop the probe."""
    model, tokenizer = build_policy(seed=0, lora_r=4, **TINY)
    model.get_base_model()._use_kernels = True
    probe = EntropyProbeTrainerCallback(make_prompts(4), every=1, model=model, **PROBE)
    _begin(probe, tmp_path)
    assert probe.probe is not None and probe.probe.model is model
    probe.on_train_end(None, None, None)


def test_a_layer_replaced_by_a_hub_kernel_is_refused_only_for_forward_mode(tmp_path):
    """A layer whose forward ``kernels.kernelize`` replaced (it leaves the kernel's forward
    bound on the instance and its ``_kernel_repo``) has no forward-mode rule: with
    derivative="forward" it is refused by name; "auto" takes the reverse pass for it. The Hub
    cannot be reached offline, so the replacement is made as kernelize makes it."""
    model, tokenizer = build_policy(seed=0, lora_r=4, **TINY)
    norm = model.get_base_model().model.norm
    assert hasattr(type(norm), "kernel_layer_name")  # transformers marks it for kernels

    class HubRMSNorm(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states

    norm.forward = HubRMSNorm.forward.__get__(norm)
    norm.__dict__["_kernel_repo"] = "kernels-community/liger_kernels"
    probe = EntropyProbeTrainerCallback(make_prompts(4), every=1, model=model,
                                        derivative="forward", **PROBE)
    with pytest.raises(ProbeConfigError, match=r"replaced by Hub or Liger kernels \(.*norm.*auto"):
        _begin(probe, tmp_path / "forward")
    auto = EntropyProbeTrainerCallback(make_prompts(4), every=1, model=model, **PROBE)
    _begin(auto, tmp_path / "auto")
    assert auto.probe is not None
    auto.on_train_end(None, None, None)


def test_grpo_on_a_from_pretrained_model_is_probed_and_unchanged(tmp_path):
    """The common TRL path: a checkpoint saved with save_pretrained and loaded back with
    from_pretrained (transformers sets use_kernels=True: ``kernels`` is installed). Every due
    step is probed, and training is bitwise the run without the probe."""
    import kernels  # noqa: F401  - the condition under which transformers sets use_kernels

    saved = tmp_path / "tiny"
    build_tiny_llama(build_char_tokenizer(), seed=0, dtype=torch.float64,
                     **TINY).save_pretrained(saved)

    def trainer_on_loaded(out: Path, callback: bool):
        transformers.set_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float64)
        assert model.use_kernels is True
        trainer, probe = grpo_trainer(out, callback=callback, model=model)
        return trainer, probe

    with_probe, probe = trainer_on_loaded(tmp_path / "with", True)
    assert not [w for w in train(with_probe) if "kernel" in str(w.message)]
    assert probe.probed_steps == DUE and step_files(probe.run_dir) == DUE
    for t in DUE:
        core = json.loads((probe.run_dir / f"step_{t:08d}.json").read_text())["core_results"]
        assert "error" not in core and core["update_cosine"] >= 1 - 1e-9
    without, _ = trainer_on_loaded(tmp_path / "without", False)
    train(without)
    a, b = lora_weights(with_probe), lora_weights(without)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[n], b[n]) for n in a)
