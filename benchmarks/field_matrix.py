"""Field matrix: the probe in the setups RL practitioners run, one verdict line per setup.

Each setup fits a real Lightning Trainer on the tiny LoRA policy with the demo GRPOModule twice,
with and without ``EntropyProbeCallback``, and checks: the run finishes; the final trainable
weights are bitwise those of the run without the probe; the JSON records and TensorBoard scalars
are there for the due steps; the numbers are sane (update_cosine ~ 1 under Adam, delta H_1 and
Delta H_true of the same sign and within a factor of 3 at this small learning rate on most
steps); the probe's warnings are listed for reading. Tiny and CPU-only (a few seconds a setup)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice python benchmarks/field_matrix.py [name ...]
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from entropy_callback import EntropyProbeCallback
from entropy_callback.demos.grpo import GRPOModule, make_prompts
from entropy_callback.demos.tiny import build_policy
from entropy_callback.observer import EntropyProbeWarning
from entropy_callback.runlog import load_run, load_step

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, lora_r=4)
GRPO = dict(group_size=4, prompts_per_step=2, max_new_tokens=4, lr=1e-3, warmup_steps=2,
            total_steps=20)
PROBE = dict(batch_size=16, microbatch_size=16, max_new_tokens=4)
HELDOUT = make_prompts(16, seed=123)


def length_reward(prompt: str, response: str) -> float:
    """Dense reward: every step has a gradient."""
    return float(len(response))


# ------------------------------------------------------------------ modules of the setups
class ClipOwn(GRPOModule):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=0.01, gradient_clip_algorithm="norm")


class ManualAccum(GRPOModule):
    """Manual optimisation, stepping every 2 batches."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        out = super().training_step(batch, batch_idx)
        self.manual_backward(out["loss"] / 2)
        if (batch_idx + 1) % 2 == 0:
            opt.step()
            opt.zero_grad()
            self.lr_schedulers().step()
        return out


class ManualPPO(GRPOModule):
    """Manual optimisation with 3 inner epochs on the same rollouts (3 optimizer steps/batch)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        out = None
        for _ in range(3):
            out = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(out["loss"])
            opt.step()
        self.lr_schedulers().step()
        return out


class ManualPPOReuse(GRPOModule):
    """PPO-style: one rollout batch, 3 inner optimizer steps on it (the later losses from
    ``per_token_loss``), so one training batch holds 3 optimizer steps and one ``rollouts``."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        out = super().training_step(batch, batch_idx)
        for epoch in range(3):
            loss = out["loss"] if epoch == 0 else self.per_token_loss(out["rollouts"]).sum()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        self.lr_schedulers().step()
        return out


class SGDMomentum(GRPOModule):
    """Plain SGD with momentum (not Adam): the probe predicts along the observed step."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad],
                               lr=0.5, momentum=0.9)


class ManualTwo(GRPOModule):
    """Two optimizers: lora_A params and lora_B params, each stepped by hand."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.automatic_optimization = False

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        a = torch.optim.AdamW([p for n, p in named if "lora_A" in n], lr=self.lr)
        b = torch.optim.AdamW([p for n, p in named if "lora_A" not in n], lr=self.lr)
        return [a, b]

    def training_step(self, batch, batch_idx):
        oa, ob = self.optimizers()
        out = super().training_step(batch, batch_idx)
        oa.zero_grad()
        ob.zero_grad()
        self.manual_backward(out["loss"])
        oa.step()
        ob.step()
        return out


# ------------------------------------------------------------------ one fit
def fit(root: Path, *, probe: EntropyProbeCallback | None | bool = True, module_cls=GRPOModule,
        steps: int = 6, every: int = 2, policy: dict | None = None, prepare=None,
        logger=True, module_kw: dict | None = None, probe_kw: dict | None = None,
        **trainer_kw) -> SimpleNamespace:
    lightning.seed_everything(0, verbose=False)
    model, tok = build_policy(seed=0, **{**TINY, **(policy or {})})
    if prepare is not None:
        model = prepare(model) or model
    module = module_cls(model, tok, make_prompts(32, seed=0), seed=0, reward_fn=length_reward,
                        **{**GRPO, **(module_kw or {})})
    if probe is True:
        probe = EntropyProbeCallback(HELDOUT, every=every, **{**PROBE, **(probe_kw or {})})
    cbs = ([probe] if probe else []) + list(trainer_kw.pop("callbacks", []))
    if logger is True:
        logger = TensorBoardLogger(save_dir=str(root), name="run", version=0)
    trainer_kw.setdefault("max_steps", steps)
    if callable(trainer_kw.get("plugins")):  # a fresh plugin (a GradScaler has state) per fit
        trainer_kw["plugins"] = [trainer_kw["plugins"]()]
    ckpt_path = trainer_kw.pop("ckpt_path", None)
    trainer = lightning.Trainer(accelerator="cpu", devices=trainer_kw.pop("devices", 1),
                                logger=logger, callbacks=cbs, enable_progress_bar=False,
                                enable_model_summary=False,
                                enable_checkpointing=trainer_kw.pop("enable_checkpointing", False),
                                log_every_n_steps=1, default_root_dir=str(root), **trainer_kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, ckpt_path=ckpt_path)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    moved = any(("lora_B" in n or "lora_" not in n) and bool(w.ne(0).any())
                for n, w in weights.items())
    msgs = [str(w.message) for w in caught if issubclass(w.category, EntropyProbeWarning)]
    return SimpleNamespace(trainer=trainer, probe=probe, weights=weights, warnings=msgs,
                           moved=moved,
                           model=model, module=module)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)


def tb_steps(log_dir: Path, tag: str = "entropy_probe/deltaH1") -> list[int]:
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return sorted(e.step for e in ea.Scalars(tag)) if tag in ea.Tags()["scalars"] else []


def judge_records(records: list[dict], due: list[int], *, adam: bool = True,
                  cos_bar: float = 1 - 1e-4) -> list[str]:
    """Problems with a run's records (empty = fine)."""
    issues = []
    steps = [r["step"] for r in records]
    if steps != due:
        issues.append(f"record steps {steps} != due {due}")
    errs = [(r["step"], r.get("error")) for r in records if r.get("error")]
    if errs:
        issues.append(f"errors {errs}")
    moved = [r for r in records if r.get("update_cosine") is not None]
    if adam:
        bad = [(r["step"], r["update_cosine"]) for r in moved if r["update_cosine"] < cos_bar]
        if bad:
            issues.append(f"update_cosine < {cos_bar}: {bad}")
    pairs = [(r["deltaH1"], r["deltaH_true"]) for r in records
             if r.get("deltaH1") is not None and r.get("deltaH_true") is not None
             and abs(r["deltaH_true"]) > 3 * (r.get("deltaH_true_se") or 0)]
    disagree = [(a, b) for a, b in pairs if a * b < 0 or not (1 / 3 < a / b < 3)]
    if pairs and len(disagree) > len(pairs) // 2:
        issues.append(f"dH1 vs dH_true disagree on {len(disagree)}/{len(pairs)}: {disagree[:3]}")
    return issues


def judge_schema(log_dir: Path, records: list[dict]) -> list[str]:
    """Every step file validates against docs/log-schema.json."""
    import json

    from jsonschema import Draft202012Validator
    schema = json.loads((Path(__file__).resolve().parents[1] / "docs" / "log-schema.json")
                        .read_text())
    validator = Draft202012Validator(schema)
    issues = []
    for r in records:
        errors = list(validator.iter_errors(load_step(log_dir, r["step"])))
        if errors:
            issues.append(f"step {r['step']} off the schema: {errors[0].message[:120]}")
    return issues


def judge_attribution(log_dir: Path, records: list[dict]) -> list[str]:
    """The split of delta H_1 into parts closes: residual <= 1e-3 |delta H_1| (float32
    round-off, docs/attribution.md) and the protocol reproduces the step's gradient."""
    issues = []
    for r in records:
        if r.get("update_source") == "skipped":
            continue
        att = load_step(log_dir, r["step"]).get("attribution")
        if not isinstance(att, dict) or "parts" not in att:
            issues.append(f"step {r['step']}: no attribution parts ({att})")
            continue
        parts, d = att["parts"], r.get("deltaH1")
        if d is None:
            continue
        res, perr = parts.get("residual"), parts.get("protocol_error")
        if res is None or abs(res) > 1e-3 * abs(d) + 1e-12:
            issues.append(f"step {r['step']}: residual {res} of deltaH1 {d}")
        if perr is not None and perr > 1e-3:
            issues.append(f"step {r['step']}: protocol_error {perr}")
    return issues


def standard(name: str, root: Path, *, every: int = 2, steps: int = 6, adam: bool = True,
             due: list[int] | None = None, cos_bar: float = 1 - 1e-4, **kw) -> str:
    """Probed vs unprobed fit; records, TB, numbers, weights."""
    probed = fit(root / "with", every=every, steps=steps, **kw)
    plain = fit(root / "without", probe=False, every=every, steps=steps, **kw)
    log_dir = Path(probed.trainer.logger.log_dir)
    records = load_run(log_dir)
    if due is None:
        due = list(range(0, steps, every))
    issues = judge_records(records, due, adam=adam, cos_bar=cos_bar)
    issues += judge_schema(log_dir, records)
    if (kw.get("probe_kw") or {}).get("attribution"):
        issues += judge_attribution(log_dir, records)
    if os.environ.get("FIELD_VERBOSE"):
        for r in records:
            print(f"   step {r['step']}: dH1={r['deltaH1']} dHtrue={r['deltaH_true']}"
                  f"+-{r['deltaH_true_se']} cos={r['update_cosine']} src={r['update_source']}")
    if not same_weights(probed.weights, plain.weights):
        issues.append("TRAJECTORY CHANGED (final weights differ)")
    if not probed.moved:
        issues.append("the LoRA weights never moved: the comparison is vacuous")
    tb = tb_steps(log_dir)
    if tb != [r["step"] for r in records if r.get("deltaH1") is not None]:
        issues.append(f"TB steps {tb} != JSON steps")
    if probed.warnings:
        issues.append(f"warnings: {sorted(set(w[:160] for w in probed.warnings))}")
    return "; ".join(issues) or "ok"


# ------------------------------------------------------------------ the setups
def gpt2_tied(_model):
    """A tiny GPT-2 from config with tied embeddings; LoRA on attention and on the lm head."""
    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    from entropy_callback.demos.tiny import build_char_tokenizer
    tok = build_char_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2,
                                          n_positions=64, tie_word_embeddings=True,
                                          pad_token_id=tok.pad_token_id,
                                          eos_token_id=tok.eos_token_id))
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "lm_head"],
                              task_type="CAUSAL_LM")
        return peft.get_peft_model(base, cfg)


def full_finetune(_model):
    """No LoRA: every weight of the tiny Llama trains."""
    from entropy_callback.demos.tiny import build_char_tokenizer, build_tiny_llama
    return build_tiny_llama(build_char_tokenizer(), seed=0, hidden_size=32, num_layers=1,
                            num_heads=2, intermediate_size=64)


def lora_modules_to_save(_model):
    """LoRA on attention plus a fully trained copy of the LM head (peft modules_to_save)."""
    import peft

    from entropy_callback.demos.tiny import build_char_tokenizer, build_tiny_llama
    base = build_tiny_llama(build_char_tokenizer(), seed=0, hidden_size=32, num_layers=1,
                            num_heads=2, intermediate_size=64)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return peft.get_peft_model(base, cfg)


def grad_ckpt(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def grad_ckpt_reentrant(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()


def setup_rerun_logger_false(root: Path) -> str:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        first = fit(root, logger=False)
        second = fit(root, logger=False)
    finally:
        os.chdir(cwd)
    dirs = sorted(p.relative_to(root) for p in root.rglob("entropy_probe*") if p.is_dir())
    issues = []
    roots = {str(first.probe.json.root) if first.probe.json else None,
             str(second.probe.json.root) if second.probe.json else None}
    if len(roots) != 2:
        issues.append(f"both runs wrote into one directory {roots}")
    for pr in (first, second):
        recs = load_run(pr.probe.json.root) if pr.probe.json else []
        if [r["step"] for r in recs] != [0, 2, 4]:
            issues.append(f"{pr.probe.json.root}: steps {[r['step'] for r in recs]}")
    warn = first.warnings + second.warnings
    if warn:
        issues.append(f"warnings: {warn}")
    return "; ".join(issues) or f"ok (dirs: {[str(d) for d in dirs]})"


def setup_shared_log_dir(root: Path) -> str:
    shared = str(root / "shared")
    a = fit(root / "a", probe_kw=dict(log_dir=shared))
    b = fit(root / "b", probe_kw=dict(log_dir=shared))
    issues = []
    ra, rb = a.probe.json.root, b.probe.json.root
    if ra == rb:
        issues.append("two runs share one JSON directory")
    for p in (ra, rb):
        steps = [r["step"] for r in load_run(p)]
        if steps != [0, 2, 4]:
            issues.append(f"{p}: {steps}")
    # TB: with log_dir set, where do scalars go? the trainer's logger (a/run/version_0)
    for pr in (a, b):
        steps = tb_steps(Path(pr.trainer.logger.log_dir))
        if steps != [0, 2, 4]:
            issues.append(f"TB of {pr.trainer.logger.log_dir}: {steps}")
    return "; ".join(issues) or f"ok ({ra.name}, {rb.name})"


def setup_reuse_callback(root: Path) -> str:
    cb = EntropyProbeCallback(HELDOUT, every=2, **PROBE)
    first = fit(root / "one", probe=cb)
    first_root = cb.json.root
    second = fit(root / "two", probe=cb)
    issues = []
    if cb.json.root == first_root:
        issues.append(f"second fit wrote to the first fit's dir {first_root}")
    for p in {first_root, cb.json.root}:
        steps = [r["step"] for r in load_run(p)]
        if steps != [0, 2, 4]:
            issues.append(f"{p}: steps {steps}")
    plain = fit(root / "plain", probe=False)
    if not same_weights(second.weights, plain.weights):
        issues.append("TRAJECTORY CHANGED in the second fit")
    if second.probe.probe.model is not second.model:
        issues.append("second fit probes the FIRST fit's model (stale EntropyProbe)")
    if tb_steps(Path(second.trainer.logger.log_dir)) != [0, 2, 4]:
        issues.append(f"second TB steps {tb_steps(Path(second.trainer.logger.log_dir))}")
    return "; ".join(issues + [f"warnings: {first.warnings + second.warnings}"]
                     if first.warnings + second.warnings else issues) or "ok"


def _fit_and_resume(root: Path, stop: int, probe: bool) -> SimpleNamespace | str:
    from lightning.pytorch.callbacks import ModelCheckpoint
    ck = ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=1, save_top_k=-1)
    fit(root, probe=probe, steps=6, enable_checkpointing=True, callbacks=[ck])
    path = sorted((root / "ckpt").glob(f"*step={stop}.ckpt"))
    if not path:
        return f"no checkpoint at step {stop}: {list((root / 'ckpt').glob('*'))}"
    return fit(root, probe=probe, steps=8, ckpt_path=str(path[0]))


def setup_resume(root: Path, stop: int) -> str:
    """Fit 6 steps with checkpoints, resume to 8 from the one at ``stop``; the same
    without the probe (a resumed run is not the straight run: the demo's sampling RNG and data
    order are not in Lightning's checkpoint, so the reference is the resumed run unprobed)."""
    resumed = _fit_and_resume(root / "with", stop, True)
    plain = _fit_and_resume(root / "without", stop, False)
    if isinstance(resumed, str) or isinstance(plain, str):
        return f"{resumed} {plain}"
    log_dir = Path(resumed.trainer.logger.log_dir)
    issues = judge_records(load_run(log_dir), [0, 2, 4, 6])
    if not same_weights(resumed.weights, plain.weights):
        issues.append("TRAJECTORY CHANGED (resumed weights differ from the unprobed resume)")
    tb, note = tb_steps(log_dir), ""
    if sorted(set(tb)) != [0, 2, 4, 6]:
        issues.append(f"TB steps {tb}")
    elif len(tb) != len(set(tb)):
        own = tb_steps(log_dir, "train/reward")
        if len(own) == len(set(own)):
            issues.append(f"TB steps repeated {tb} (rewound steps written twice)")
        note = f" (TB holds rewound probe steps twice {tb}, as Lightning's own train/reward {own})"
    if resumed.warnings:
        issues.append(f"warnings: {resumed.warnings}")
    return ("; ".join(issues) or "ok") + note


def setup_module_prompts(root: Path) -> str:
    cb = EntropyProbeCallback(every=20, **PROBE)
    res = fit(root, probe=cb, steps=3, module_kw=dict(probe_prompts=HELDOUT))
    recs = load_run(Path(res.trainer.logger.log_dir))
    return "ok" if [r["step"] for r in recs] == [0] else f"steps {[r['step'] for r in recs]}"


def setup_levels(root: Path, level: str) -> str:
    kw = dict(log_level=level, compress=True, max_files=2)
    res = fit(root, probe_kw=kw)
    log_dir = Path(res.trainer.logger.log_dir)
    recs = load_run(log_dir)
    files = sorted(str(p.relative_to(log_dir)) for p in log_dir.rglob("*") if p.is_file()
                   and "events" not in p.name)
    issues = judge_records(recs, [0, 2, 4])
    if res.warnings:
        issues.append(f"warnings: {res.warnings}")
    return "; ".join(issues) or f"ok files={files}"


def setup_ddp(root: Path, **kw) -> str:
    """ddp_spawn copies rank 0's trained weights back into the main process's model."""
    os.environ.pop("MASTER_PORT", None)
    probed = fit(root / "with", strategy="ddp_spawn", devices=2, **kw)
    os.environ.pop("MASTER_PORT", None)
    plain = fit(root / "without", probe=False, strategy="ddp_spawn", devices=2, **kw)
    os.environ.pop("MASTER_PORT", None)
    log_dir = root / "with" / "run" / "version_0"
    recs = load_run(log_dir)
    issues = judge_records(recs, [0, 2, 4])
    if not same_weights(probed.weights, plain.weights):
        issues.append("TRAJECTORY CHANGED (final weights differ)")
    if not probed.moved:
        issues.append("the LoRA weights never moved: the comparison is vacuous")
    if tb_steps(log_dir) != [0, 2, 4]:
        issues.append(f"TB steps {tb_steps(log_dir)}")
    if probed.warnings:
        issues.append(f"warnings (main process only): {probed.warnings}")
    return "; ".join(issues) or "ok"


def same_records_as_baseline(root: Path, **kw) -> str:
    """A variant that must not change what the probe measures: its records equal the plain
    run's (same seeds, same E batch, same numbers)."""
    base = load_run(Path(fit(root / "base").trainer.logger.log_dir))
    var = fit(root / "var", **kw)
    other = load_run(Path(var.trainer.logger.log_dir))
    keys = ("step", "deltaH1", "deltaH_true", "H_orig", "update_cosine")
    diff = [(a["step"], k, a[k], b[k]) for a, b in zip(base, other, strict=False) for k in keys
            if a[k] != b[k]]
    issues = [f"records differ from the baseline: {diff[:3]}"] if diff else []
    if len(base) != len(other):
        issues.append(f"{len(other)} records vs {len(base)}")
    if var.warnings:
        issues.append(f"warnings: {var.warnings}")
    return "; ".join(issues) or "ok"


def setup_right_padding(root: Path) -> str:
    from entropy_callback.demos.tiny import build_char_tokenizer
    tok = build_char_tokenizer()
    tok.padding_side = "right"
    cb = EntropyProbeCallback(HELDOUT, every=2, tokenizer=tok, **PROBE)
    return same_records_as_baseline(root, probe=cb)


def setup_generation_config(root: Path) -> str:
    def sampling_defaults(model):
        gc = model.generation_config
        gc.do_sample, gc.top_k, gc.top_p, gc.temperature = True, 3, 0.5, 0.7
        gc.repetition_penalty = 1.3
    return same_records_as_baseline(root, prepare=sampling_defaults)


def setup_csv_loggers(root: Path) -> str:
    """CSVLogger first, TensorBoardLogger second: JSON under the CSV logger's log_dir, scalars
    in both."""
    import csv

    from lightning.pytorch.loggers import CSVLogger
    loggers = [CSVLogger(str(root), name="csv", version=0),
               TensorBoardLogger(str(root), name="tb", version=0)]
    res = fit(root, logger=loggers)
    issues = []
    recs = load_run(root / "csv" / "version_0")
    issues += judge_records(recs, [0, 2, 4])
    if tb_steps(root / "tb" / "version_0") != [0, 2, 4]:
        issues.append(f"TB steps {tb_steps(root / 'tb' / 'version_0')}")
    rows = list(csv.DictReader(open(root / "csv" / "version_0" / "metrics.csv")))
    logged = sorted({int(r["step"]) for r in rows if r.get("entropy_probe/deltaH1")})
    if logged != [0, 2, 4]:
        issues.append(f"CSV entropy_probe/deltaH1 at steps {logged}")
    if res.warnings:
        issues.append(f"warnings: {res.warnings}")
    return "; ".join(issues) or "ok"


def setup_two_callbacks(root: Path) -> str:
    """Two probes in one Trainer (an in-distribution and an out-of-distribution pool); the
    second is named, so its tags (``ood/*``) and checkpoint state are its own. Each probe's run
    directory is judged on its own (the log_dir holds two runs)."""
    other = EntropyProbeCallback(make_prompts(16, seed=999), every=3, name="ood", **PROBE)
    probed = fit(root / "with", callbacks=[other])
    plain = fit(root / "without", probe=False)
    log_dir = Path(probed.trainer.logger.log_dir)
    issues = []
    for callback, due, tag in ((probed.probe, [0, 2, 4], "entropy_probe/deltaH1"),
                               (other, [0, 3], "ood/deltaH1")):
        records = load_run(callback.json.root)
        issues += judge_records(records, due)
        if tb_steps(log_dir, tag) != due:
            issues.append(f"{tag} at steps {tb_steps(log_dir, tag)} != {due}")
    if not same_weights(probed.weights, plain.weights):
        issues.append("TRAJECTORY CHANGED (final weights differ)")
    if probed.warnings:
        issues.append(f"warnings: {sorted(set(w[:160] for w in probed.warnings))}")
    return "; ".join(issues) or "ok"


def setup_cli_parent(root: Path) -> str:
    """Two runs in one log_dir (logger=False twice): the CLI on the parent directory."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        fit(root, logger=False)
        fit(root, logger=False)
    finally:
        os.chdir(cwd)
    out = []
    for args in (["summary", str(root)], ["compare", str(root)], ["export", str(root)]):
        p = subprocess.run([sys.executable, "-m", "entropy_callback.cli", *args],
                           capture_output=True, text=True)
        out.append(f"{args[0]} rc={p.returncode}: {(p.stdout + p.stderr).strip()[:200]!r}")
    return " | ".join(out)


def setup_cli(root: Path) -> str:
    a = fit(root / "a", probe_kw=dict(attribution=True))
    b = fit(root / "b", probe_kw=dict(log_level="detailed", compress=True))
    da, db = a.trainer.logger.log_dir, b.trainer.logger.log_dir
    out = []
    for args in (["summary", da], ["plot", da, "-o", str(root / "p.png")], ["compare", da, db],
                 ["export", db], ["attribution", da, "--step", "2"]):
        p = subprocess.run([sys.executable, "-m", "entropy_callback.cli", *args],
                           capture_output=True, text=True)
        if p.returncode != 0:
            out.append(f"{args[0]} rc={p.returncode}: {p.stderr.strip()[-300:]}")
    return "; ".join(out) or "ok"


def scaler():
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


SETUPS = {
    "baseline-fp32": lambda r: standard("b", r),
    "16-mixed+GradScaler": lambda r: standard("s", r, plugins=scaler, cos_bar=1 - 1e-3,
                                                    due=[0, 1, 2, 3, 4]),
    "bf16-mixed": lambda r: standard("bm", r, precision="bf16-mixed", cos_bar=1 - 1e-3),
    "bf16-true": lambda r: standard("bt", r, precision="bf16-true", cos_bar=0.99),
    "accumulate=3": lambda r: standard("acc", r, accumulate_grad_batches=3),
    "clip-norm": lambda r: standard("cn", r, gradient_clip_val=0.01),
    "clip-value": lambda r: standard("cv", r, gradient_clip_val=1e-3,
                                     gradient_clip_algorithm="value"),
    "configure_gradient_clipping": lambda r: standard("cg", r, module_cls=ClipOwn),
    "manual+accumulate": lambda r: standard("ma", r, module_cls=ManualAccum, steps=4,
                                            due=[0, 2]),
    "manual-two-optimizers": lambda r: standard("m2", r, module_cls=ManualTwo, steps=6,
                                                due=[0, 2, 4]),
    "manual-ppo-epochs": lambda r: standard("mp", r, module_cls=ManualPPO, steps=6, every=2,
                                            due=[0, 2, 4]),
    "grad-checkpointing": lambda r: standard("gc", r, prepare=grad_ckpt),
    "gpt2-tied+lora-head": lambda r: standard("g2", r, prepare=gpt2_tied),
    "rerun logger=False same cwd": setup_rerun_logger_false,
    "rerun shared log_dir": setup_shared_log_dir,
    "one callback, two fits": setup_reuse_callback,
    "resume before last probe (4)": lambda r: setup_resume(r, 3),
    "resume after last probe (4)": lambda r: setup_resume(r, 5),
    "every=20 module.probe_prompts": setup_module_prompts,
    "detailed+compress+max_files": lambda r: setup_levels(r, "detailed"),
    "debug+compress+max_files": lambda r: setup_levels(r, "debug"),
    "attribution=True": lambda r: standard("at", r, probe_kw=dict(attribution=True)),
    "attribution+accumulate=2": lambda r: standard("aa", r, probe_kw=dict(attribution=True),
                                                   accumulate_grad_batches=2),
    "attribution+clip-norm": lambda r: standard("ac", r, probe_kw=dict(attribution=True),
                                                gradient_clip_val=0.01),
    "attribution+GradScaler": lambda r: standard("as", r, probe_kw=dict(attribution=True),
                                                 plugins=scaler, due=[0, 1, 2, 3, 4]),
    "attribution+bf16-mixed": lambda r: standard("ab", r, probe_kw=dict(attribution=True),
                                                 precision="bf16-mixed", cos_bar=1 - 1e-3),
    "attribution+manual+accumulate": lambda r: standard("am", r, module_cls=ManualAccum,
                                                        probe_kw=dict(attribution=True),
                                                        steps=4, due=[0, 2]),
    "attribution+manual-ppo-epochs every=1": lambda r: standard(
        "ap", r, module_cls=ManualPPOReuse, probe_kw=dict(attribution=True), steps=6, every=1),
    "SGD momentum (not Adam)": lambda r: standard("sg", r, module_cls=SGDMomentum, adam=False),
    "precision=16-mixed (no plugin)": lambda r: standard("16", r, precision="16-mixed",
                                                         due=None),
    "probe tokenizer pads right": setup_right_padding,
    "generation_config top_k/top_p/temp": setup_generation_config,
    "CSVLogger + TensorBoardLogger": setup_csv_loggers,
    "strict=True": lambda r: standard("st", r, probe_kw=dict(strict=True)),
    "gpt2 n_positions=64, probe max_new_tokens=80": lambda r: standard(
        "gp", r, prepare=gpt2_tied, probe_kw=dict(max_new_tokens=80)),
    "full fine-tune (no LoRA)": lambda r: standard("ff", r, prepare=full_finetune),
    "LoRA + modules_to_save lm_head": lambda r: standard("ms", r, prepare=lora_modules_to_save),
    "lora_dropout=0.1": lambda r: standard("ld", r, policy=dict(lora_dropout=0.1)),
    "grad-checkpointing reentrant": lambda r: standard("gr", r, prepare=grad_ckpt_reentrant),
    "every=1 + scheduler per step": lambda r: standard("e1", r, every=1, steps=4),
    "ddp_spawn x2 gloo": setup_ddp,
    "ddp_spawn x2 + attribution": lambda r: setup_ddp(r, probe_kw=dict(attribution=True)),
    "two probe callbacks, one Trainer": setup_two_callbacks,
    "cli": setup_cli,
    "cli on a parent of two runs": setup_cli_parent,
}


# What a reader should know about a verdict that is not a plain "ok" (read at 2026-11-30).
EXPECTED = {
    "16-mixed+GradScaler": "GradScaler's first steps overflow at scale 65536 and are skipped; "
                           "the probe re-arms: true warning",
    "bf16-true": "true warning (bf16 weights quantise log-probs)",
    "resume before last probe (4)": "true warning; TensorBoard repeats like Lightning's own",
    "attribution+GradScaler": "autocast rounding, reported by protocol_error (attribution.md)",
    "attribution+bf16-mixed": "autocast rounding, reported by protocol_error (attribution.md)",
    "attribution+manual+accumulate": "the module's own /2 before manual_backward is not in "
                                     "per_token_loss: parts 2x, protocol_error 1 (attribution.md)",
    "SGD momentum (not Adam)": "true warning",
    "gpt2 n_positions=64, probe max_new_tokens=80": "the intended ProbeConfigError at setup",
    "cli on a parent of two runs": "summary and export exit 2 naming both runs; compare "
                                   "compares both",
    "two probe callbacks, one Trainer": "the second named (name='ood'); unnamed, Lightning "
                                        "refuses two callbacks with one state_key",
}


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    for name in names or list(SETUPS):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                with contextlib.redirect_stderr(open(os.devnull, "w")):
                    verdict = SETUPS[name](Path(tmp))
            except Exception as exc:  # a crash of the run is a verdict, not the end
                tb = traceback.format_exc().strip().splitlines()
                verdict = f"CRASH {type(exc).__name__}: {exc} | {' / '.join(tb[-4:-1])}"
        note = f"  [{EXPECTED[name]}]" if name in EXPECTED else ""
        print(f"{name:32s} {verdict}{note}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
