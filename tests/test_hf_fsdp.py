"""The HF Trainer adapter on a model sharded with FSDP2, 2 gloo ranks on CPU, spawned.

accelerate's own FSDP path (``TrainingArguments(fsdp=True, fsdp_config={'version': 2})``)
cannot run on a CPU: accelerate selects ``DistributedType.FSDP`` only for accelerator types
(``accelerate/state.py``), so with ``use_cpu=True`` the FSDP arguments are ignored and the model
is DDP-wrapped; without it the Trainer refuses ("Using fsdp only works in distributed
training"); and a model the user shards with ``fully_shard`` is DDP-wrapped by accelerate,
which fails on its DTensors (docs/distributed.md). What runs here, unmodified:

- a real ``transformers.Trainer`` on transformers' own FSDP2, the base model sharded at load
  (``from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))``) and LoRA added after
  (replicated, its gradients averaged by the Trainer), the callback attached as usual;
- TRL's GRPOTrainer on that model, LoRA from ``peft_config``;
- the callback's hooks driven around real AdamW steps of a model sharded with ``fully_shard``
  with LoRA inside the shards (DTensors): what accelerate's FSDP2 path hands the callback.

Each must equal one unsharded process on the same seed (GRPO: the ranks sample their own
rollouts, so the ranks agree with each other); training must be bitwise what it is without the
probe; a failure on one rank is skipped by both.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import time
import traceback
import warnings
from pathlib import Path

import peft
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from test_distributed import FAILURES, PROMPTS, _free_port, inject

pytest.importorskip("trl")  # TRL's extra brings datasets and GRPOTrainer
from datasets import Dataset  # noqa: E402

from entropy_callback import EntropyProbeWarning, ProbeConfigError  # noqa: E402
from entropy_callback.demos.tiny import build_char_tokenizer, build_tiny_llama  # noqa: E402
from entropy_callback.hf import EntropyProbeTrainerCallback  # noqa: E402
from entropy_callback.sharded import local  # noqa: E402
from entropy_callback.testing import randomize_lora_b  # noqa: E402

WORLD = 2
TINY = dict(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
CONFIG = dict(batch_size=8, microbatch_size=3, max_new_tokens=4, eta_multipliers=(0.5, 1.0),
              log_level="detailed")
KEYS = ("deltaH1", "deltaH1_se", "deltaH_true", "deltaH_true_se", "H_orig", "H_upd", "ESS",
        "bars_dot", "update_cosine")
STEPS = 3
# the steps of the failure run: one phase failing on rank 1 per step, then a clean step
PHASES = [*FAILURES, None]


def _model(ckpt: str, sharded: bool):
    """The float64 tiny Llama from ``ckpt`` (sharded at load by transformers' FSDP2 when
    ``sharded``) with LoRA (dropout on, B randomised: every LoRA tensor moves at step 0)."""
    transformers.set_seed(0)
    config = dict(distributed_config=transformers.DistributedConfig(fsdp_size=WORLD)) \
        if sharded else {}
    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64, **config)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"]))
    randomize_lora_b(model, std=0.05, seed=1)
    return model


class Recorder(transformers.TrainerCallback):
    """After the probe: per step, the record every rank holds; with ``phases``, the probe's
    phase ``phases[t]`` raises on this rank during step t (``test_distributed.inject``)."""

    def __init__(self, probe: EntropyProbeTrainerCallback, phases=()):
        self.probe, self.phases, self.records = probe, list(phases), []
        self.stack = contextlib.ExitStack()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step < len(self.phases):
            self.stack.enter_context(inject(self.probe.probe, self.phases[state.global_step]))

    def on_step_end(self, args, state, control, **kwargs):
        self.stack.close()
        result = self.probe.last_result
        self.records.append({"core": result.core(), "error": result.error,
                             "sequences": result.sequences})


def _train(ckpt: str, out: Path, *, sharded: bool, probed: bool = True, steps: int = STEPS,
           phases=(), **probe_options):
    """A real Trainer run of ``steps`` optimizer steps, probed at every step when ``probed``
    (``phases``: ``Recorder``'s injected failures on this rank); the records, the probe's
    warnings, and this rank's trained state. Every sequence is the same, so every rank's
    gradient is the single process's, and the run stays in one epoch (with 8 sequences, 2
    ranks began a second epoch at step 2, whose random draws made that step differ from one
    process's)."""
    tok = build_char_tokenizer()
    model = _model(ckpt, sharded)
    enc = tok(["3+4=7"] * 2 * WORLD * len(PHASES), padding=True)
    data = Dataset.from_dict({**enc, "labels": enc["input_ids"]})
    args = transformers.TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to=[], max_steps=steps, seed=0,
        per_device_train_batch_size=2, learning_rate=1e-2, save_strategy="no",
        logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   processing_class=tok)
    recorder = None
    if probed:
        probe = EntropyProbeTrainerCallback.attach(trainer, PROMPTS, every=1,
                                                   log_dir=str(out / "probe"),
                                                   **{**CONFIG, **probe_options})
        recorder = Recorder(probe, phases)
        trainer.add_callback(recorder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return {"records": [] if recorder is None else recorder.records,
            "warnings": [str(w.message) for w in caught
                         if issubclass(w.category, EntropyProbeWarning)],
            "state": _local_state(trainer.model, trainer.optimizer)}


def _local_state(model, optimizer) -> dict[str, torch.Tensor]:
    """This rank's local values of every parameter and of the AdamW state, and the RNG state
    (the Trainer has zeroed the gradients)."""
    out = {"rng": torch.get_rng_state()}
    inner = getattr(optimizer, "optimizer", optimizer)
    for name, p in model.named_parameters():
        out[f"param:{name}"] = local(p.detach()).clone()
        if p.requires_grad:
            for key, value in inner.state[p].items():
                out[f"state:{key}:{name}"] = local(value).clone()
    return out


def _hooks(ckpt: str, out: Path, *, sharded: bool, steps: int = 2):
    """The callback's hooks around real AdamW steps of the model sharded with ``fully_shard``
    (each decoder layer and the root; LoRA inside the shards), as accelerate's FSDP2 path
    prepares it; the records."""
    tok = build_char_tokenizer()
    model = _model(ckpt, False)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    enc = tok(["3+4=7", "1+1=2"], return_tensors="pt", padding=True)
    args = transformers.TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[])
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    probe = EntropyProbeTrainerCallback(PROMPTS, every=1, log_dir=str(out / "probe"), **CONFIG)
    probe.on_train_begin(args, state, control, model=model, processing_class=tok,
                         optimizer=opt)
    records = []
    for _ in range(steps):
        model(**enc, labels=enc["input_ids"]).loss.backward()
        probe.on_pre_optimizer_step(args, state, control, optimizer=opt)
        opt.step()
        probe.on_optimizer_step(args, state, control)
        opt.zero_grad()
        state.global_step += 1
        records.append({"core": probe.last_result.core(), "error": probe.last_result.error})
    probe.on_train_end(args, state, control)
    return {"records": records, "sharded": probe.probe.sharded,
            "dtensors": [type(p).__name__ for p in probe.probe.params.values()]}


def _grpo(ckpt: str, out: Path, *, probed: bool, steps: int = 2):
    """TRL's GRPOTrainer on the base model sharded at load, LoRA from ``peft_config`` (TRL's
    usual path), probed at every step when ``probed``; the records and this rank's state.
    Each rank samples its own rollouts, so the step is not one process's: the ranks' records
    must agree with each other, and training must be bitwise the unprobed run's."""
    from trl import GRPOConfig, GRPOTrainer

    from entropy_callback.demos.grpo import make_prompts, reward

    transformers.set_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float64, distributed_config=transformers.DistributedConfig(
            fsdp_size=WORLD))
    args = GRPOConfig(output_dir=str(out), use_cpu=True, report_to=[], max_steps=steps, seed=0,
                      per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=3, learning_rate=1e-2, save_strategy="no",
                      logging_strategy="no", disable_tqdm=True)
    trainer = GRPOTrainer(
        model=base, args=args, train_dataset=Dataset.from_dict({"prompt": make_prompts(32)}),
        reward_funcs=lambda prompts, completions, **kw: [
            reward(p, c) for p, c in zip(prompts, completions, strict=True)],
        processing_class=build_char_tokenizer(),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                    task_type="CAUSAL_LM"))
    recorder = None
    if probed:
        probe = EntropyProbeTrainerCallback.attach(trainer, PROMPTS, every=1,
                                                   log_dir=str(out / "probe"), **CONFIG)
        recorder = Recorder(probe)
        trainer.add_callback(recorder)
    trainer.train()
    return {"records": [] if recorder is None else recorder.records,
            "state": _local_state(trainer.model, trainer.optimizer)}


def _refusals(ckpt: str, out: Path) -> list:
    """What the callback refuses at setup on a sharded model, raised out of train() on every
    rank (unequal E shards), and one step probed with the reverse pass, which runs on a sharded
    model (``sharded_reverse.py``; tests/test_fsdp.py checks its numbers)."""
    try:
        _train(ckpt, out / "bad", sharded=True, steps=1, batch_size=7)
    except ProbeConfigError as exc:
        message = str(exc)
    reverse = _train(ckpt, out / "reverse", sharded=True, steps=1, derivative="reverse")
    return [message, reverse["records"]]


JOBS = {
    "probed": lambda ckpt, out: _train(ckpt, out / "probed", sharded=True),
    "unprobed": lambda ckpt, out: _train(ckpt, out / "unprobed", sharded=True, probed=False),
    "failures": lambda ckpt, out: _train(ckpt, out / "failures", sharded=True,  # on rank 1
                                         steps=len(PHASES),
                                         phases=PHASES if dist.get_rank() == 1 else ()),
    "hooks": lambda ckpt, out: _hooks(ckpt, out / "hooks", sharded=True),
    "refusals": _refusals,
    "grpo": lambda ckpt, out: {"probed": _grpo(ckpt, out / "grpo", probed=True),
                               "unprobed": _grpo(ckpt, out / "grpo_unprobed", probed=False)},
}


def _worker(rank: int, port: int, ckpt: str, out: str, jobs: list[str]) -> None:
    """Runs ``jobs`` on this rank as torchrun would start it, saving each result as soon as it
    is there (a hang shows as the first missing file)."""
    faulthandler.enable()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for job in jobs:
            result = JOBS[job](ckpt, Path(out) / f"rank{rank}")
            torch.save(result, Path(out) / f"{job}_rank{rank}.pt")
    except BaseException:  # kept where the test can read it
        (Path(out) / f"traceback_rank{rank}").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _spawn(out: Path, ckpt: str, jobs: list[str], deadline_s: float = 300.0
           ) -> dict[str, list | None]:
    """``_worker`` on 2 ranks; per job, both ranks' results, or None where it did not finish
    before the deadline (a hang guard: the ranks are then killed). A rank dying after both
    saved every result is let be (an abort in gloo's teardown at exit, docs/distributed.md)."""
    ctx = mp.start_processes(_worker, args=(_free_port(), ckpt, str(out), jobs),
                             nprocs=WORLD, join=False, start_method="spawn")
    start = time.monotonic()
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() - start > deadline_s:
                break
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:
        if None in _results(out, jobs).values():
            tracebacks = [f.read_text() for f in sorted(out.glob("traceback_rank*"))]
            raise AssertionError(f"a rank died: {exc}\n" + "\n".join(tracebacks)) from exc
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return _results(out, jobs)


def _results(out: Path, jobs: list[str]) -> dict[str, list | None]:
    files = {job: [out / f"{job}_rank{r}.pt" for r in range(WORLD)] for job in jobs}
    return {job: [torch.load(f, weights_only=False) for f in fs]  # files this test wrote
            if all(f.exists() for f in fs) else None for job, fs in files.items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny") / "tiny"
    build_tiny_llama(build_char_tokenizer(), seed=0, dtype=torch.float64,
                     **TINY).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def runs(ckpt, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.delenv("MASTER_PORT", raising=False)
        return _spawn(tmp_path_factory.mktemp("hf_fsdp"), ckpt, list(JOBS))


def _same_as_single(got: dict, single: dict) -> None:
    assert got["error"] is None, got["error"]
    assert got["core"]["derivative"] == "forward"
    for key in KEYS:
        # float64 throughout; sharded forwards and the full (unsplit) head change only the
        # rounding (~1e-15 relative); 1e-8 is the tolerance
        assert got["core"][key] == pytest.approx(single["core"][key], rel=1e-8, abs=1e-12), key
    assert got["core"]["B_E"] == single["core"]["B_E"] == CONFIG["batch_size"]


def test_a_trainer_on_fsdp2_gives_the_single_process_result(runs, ckpt, tmp_path):
    ranks = runs["probed"]
    assert ranks is not None, "the sharded Trainer run did not finish (hang)"
    single = _train(ckpt, tmp_path, sharded=False)
    assert len(single["records"]) == STEPS and not single["warnings"]
    for got in ranks:
        assert not got["warnings"]
        assert [r["core"]["step"] for r in got["records"]] == list(range(STEPS))
        for mine, one in zip(got["records"], single["records"], strict=True):
            _same_as_single(mine, one)
            assert mine["sequences"]["prompt_id"] == one["sequences"]["prompt_id"]


def test_a_trainer_on_fsdp2_trains_bitwise_as_without_the_probe(runs):
    probed, unprobed = runs["probed"], runs["unprobed"]
    assert probed is not None and unprobed is not None
    for with_probe, without in zip(probed, unprobed, strict=True):
        a, b = with_probe["state"], without["state"]
        assert a.keys() == b.keys() and any(k.startswith("state:exp_avg:") for k in a)
        for key, value in b.items():
            assert torch.equal(a[key], value), key


def test_a_failure_on_one_rank_is_skipped_by_both_in_a_trainer_run(runs):
    ranks = runs["failures"]
    assert ranks is not None, "a failure on rank 1 left a rank waiting (hang)"
    rank0, rank1 = (got["records"] for got in ranks)
    assert len(rank0) == len(rank1) == len(PHASES)
    for t, phase in enumerate(PHASES[:-1]):
        assert rank1[t]["error"]["phase"] == FAILURES[phase][2], phase
        assert "injected failure" in rank1[t]["error"]["message"]
        assert rank0[t]["error"]["phase"] == "distributed", phase
    # the ranks stay in step: the clean probe after every failure agrees on both
    assert rank0[-1]["error"] is None and rank0[-1]["core"] == rank1[-1]["core"]
    for got in ranks:
        assert sum("entropy probe failed" in w for w in got["warnings"]) >= len(FAILURES)


def test_the_hooks_on_a_fully_sharded_model_give_the_single_process_result(runs, ckpt,
                                                                            tmp_path):
    ranks = runs["hooks"]
    assert ranks is not None
    single = _hooks(ckpt, tmp_path, sharded=False)
    for got in ranks:
        assert got["sharded"] and set(got["dtensors"]) == {"DTensor"}
        for mine, one in zip(got["records"], single["records"], strict=True):
            _same_as_single(mine, one)


def test_sharded_refusal_names_the_argument_and_the_reverse_pass_runs(runs):
    ranks = runs["refusals"]
    assert ranks is not None
    for uneven, reverse in ranks:
        assert "batch_size=7 is not divisible by world_size=2" in uneven
        (record,) = reverse
        assert record["error"] is None and record["core"]["derivative"] == "reverse"
    assert ranks[0][1][0]["core"] == ranks[1][1][0]["core"]


def test_trl_grpo_on_fsdp2_is_probed_on_both_ranks_and_trains_bitwise_as_without(runs):
    ranks = runs["grpo"]
    assert ranks is not None
    rank0, rank1 = (got["probed"]["records"] for got in ranks)
    assert len(rank0) == 2
    for mine, other in zip(rank0, rank1, strict=True):
        assert mine["error"] is None and mine["core"]["derivative"] == "forward"
        assert mine["core"] == other["core"]  # every statistic is gathered: one result
    for got in ranks:
        a, b = got["probed"]["state"], got["unprobed"]["state"]
        assert a.keys() == b.keys()
        for key, value in b.items():
            assert torch.equal(a[key], value), key
