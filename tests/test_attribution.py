"""Attribution of delta H_1 (entropy_callback.attribution, docs/attribution.md) on the float64 tiny
policy, after a real Lightning step of the demo's Dr-GRPO module with real AdamW/Adam.

The reference delta H_1 is the engine's forward-mode estimator (``Scorer.score_with_tangent`` +
``delta_h1``) along the step the optimizer *really* took (theta' - theta, float64). The
attribution reaches it by another road (reverse mode over E, forward mode over the rollouts'
per-token losses), so agreement to 1e-10 is a check of both; float64 round-off is ~1e-14 here.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from conftest import TINY_GRPO, TINY_POLICY
from jsonschema import Draft202012Validator
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from entropy_callback import ProbeConfigError, cli
from entropy_callback.attribution import (
    _Bound,
    attribute_step,
    surrogate_gradient,
)
from entropy_callback.attribution_report import build_section, parts
from entropy_callback.attribution_view import render_terminal
from entropy_callback.demos.grpo import GRPOModule, make_prompts
from entropy_callback.demos.tiny import DEFAULT_ALPHABET, EOS_TOKEN, build_policy
from entropy_callback.estimators import delta_h1
from entropy_callback.observer import EntropyProbeWarning
from entropy_callback.runlog import load_step
from entropy_callback.sampling import draw_randomness, sample_batch
from entropy_callback.scoring import Scorer, sequence_terms
from entropy_callback.testing import exact_float64, randomize_lora_b
from entropy_callback.update import adam_replay, optimizer_state, probed_parameters

pytestmark = pytest.mark.usefixtures("single_thread")
SCHEMA = Draft202012Validator(json.loads(
    (Path(__file__).resolve().parents[1] / "docs" / "log-schema.json").read_text("utf-8")))
PROBED_STEP = 2  # two earlier steps give Adam a non-zero momentum and second moment


class Capture(Callback):
    """Records what the attribution needs at the optimizer step ``PROBED_STEP``."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {"rollouts": []}
        self._step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step != PROBED_STEP:
            return
        params = probed_parameters(pl_module.model)
        data = self.data
        data["theta"] = {n: p.detach().clone() for n, p in params.items()}
        data["state"] = optimizer_state(optimizer, params)
        data["raw"] = {n: p.grad.detach().clone() for n, p in params.items()}

        def after_step(opt, args, kwargs) -> None:  # as the engine: the gradients Adam read
            handle.remove()
            data["consumed"] = {n: p.grad.detach().clone() for n, p in params.items()}
            data["replay"] = adam_replay(opt, params, data["theta"], data["state"],
                                         data["consumed"], split=True)
            data["lr"] = opt.param_groups[0]["lr"]

        handle = optimizer.register_step_post_hook(after_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._step != PROBED_STEP:
            return
        self.data["rollouts"].append(outputs["rollouts"])


class AdamModule(GRPOModule):
    """The demo module with Adam (weight decay added to the gradient) and amsgrad."""

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, weight_decay=0.1, amsgrad=True)


SETUPS = {
    # AdamW, decoupled weight decay, norm clipping active, two micro-batches per step
    "adamw_clip_accumulate": dict(cls=GRPOModule, trainer=dict(
        gradient_clip_val=1e-3, gradient_clip_algorithm="norm", accumulate_grad_batches=2)),
    # Adam with L2 weight decay folded into g, amsgrad, no clipping
    "adam_l2_amsgrad": dict(cls=AdamModule, trainer={}),
    # value clipping: not linear in g, the split leaves a residual
    "adamw_value_clip": dict(cls=GRPOModule, trainer=dict(
        gradient_clip_val=1e-4, gradient_clip_algorithm="value")),
}


def _run(setup: str) -> dict[str, Any]:
    spec = SETUPS[setup]
    lightning.seed_everything(0, verbose=False)
    model, tokenizer = build_policy(seed=0, dtype=torch.float64, **TINY_POLICY)
    model = exact_float64(model)
    randomize_lora_b(model, std=0.05, seed=1234)
    module = spec["cls"](model, tokenizer, make_prompts(64, seed=0), seed=0,
                         **{**TINY_GRPO, "weight_decay": 0.1})
    capture = Capture()
    accumulate = spec["trainer"].get("accumulate_grad_batches", 1)
    trainer = lightning.Trainer(
        accelerator="cpu", devices=1, max_steps=PROBED_STEP + 1, logger=False,
        callbacks=[capture], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, **spec["trainer"],
    )
    trainer.fit(module)
    data = capture.data
    params = probed_parameters(model)
    data["observed"] = {n: p.detach() - data["theta"][n] for n, p in params.items()}
    data.update(module=module, model=model, tokenizer=tokenizer, loss_scale=1 / accumulate)
    # the evaluation batch E: 16 sequences from the tiny model
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in make_prompts(8, 7)]
    index, uniforms = draw_randomness(len(prompts), 16, 4, torch.Generator().manual_seed(5))
    model.eval()
    data["E"] = sample_batch(model, prompts, index, uniforms, temperature=1.0,
                             eos_token_ids=(tokenizer.eos_token_id,),
                             pad_token_id=tokenizer.pad_token_id, microbatch_size=16,
                             device=torch.device("cpu"))
    data["scorer"] = Scorer(model, 1.0, 256)
    return data


@pytest.fixture(scope="module", params=list(SETUPS))
def stepped(request) -> dict[str, Any]:
    data = _run(request.param)
    data["setup"] = request.param
    return data


def _delta_h1(data: dict[str, Any], direction: dict[str, torch.Tensor]) -> float:
    """The engine's delta H_1 along ``direction``: forward mode on E at theta."""
    E, theta = data["E"], data["theta"]
    logp, ent, dl, dH = data["scorer"].score_with_tangent(
        E, theta, {n: direction[n].to(theta[n].dtype) for n in theta})
    t = sequence_terms(logp, ent, E.response_mask, dl, dH)
    return delta_h1(t["A"], t["Bsum"], t["C"], t["h"], t["T"]).deltaH1


def _attribute(data: dict[str, Any]):
    E = data["E"]
    t = sequence_terms(*data["scorer"].score(E, data["theta"]), E.response_mask)
    g_E = surrogate_gradient(data["scorer"], [E], data["theta"],
                             float(t["h"].sum() / t["T"].sum()), float(t["T"].sum()))
    return g_E, attribute_step(
        model=data["model"], per_token_loss=data["module"].per_token_loss,
        rollouts=data["rollouts"], theta=data["theta"], replay=data["replay"],
        raw_grads=data["raw"], consumed_grads=data["consumed"], g_E=g_E,
        loss_scale=data["loss_scale"])


def _rollout_gradient(data, part: int, row: int, col: int | None = None):
    """Reverse mode: the gradient of one rollout's (or one token's) loss at theta."""
    leaves = {n: t.clone().requires_grad_(True) for n, t in data["theta"].items()}
    bound = _Bound(data["model"], data["module"].per_token_loss)
    losses = torch.func.functional_call(
        bound, {f"model.{n}": t for n, t in leaves.items()}, (data["rollouts"][part],),
        strict=False)
    loss = losses[row].sum() if col is None else losses[row, col]
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(leaves[n]))
            for n, g in zip(leaves, grads, strict=True)}


def test_the_parts_sum_to_delta_h1_of_the_step_taken(stepped):
    g_E, att = _attribute(stepped)
    reference = _delta_h1(stepped, stepped["observed"])
    assert abs(att.total - reference) <= 1e-10 * abs(reference), (att.total, reference)
    assert att.momentum != 0 and att.decay != 0
    if stepped["setup"] == "adamw_value_clip":
        # clipping by value is not c * g: the rollouts do not add up, the residual says so
        assert att.clip_offset > 1e-3
        assert abs(reference - att.parts_sum) > 1e-6 * abs(reference)
        return
    assert att.clip_offset < 1e-12 and att.protocol_error < 1e-10
    assert abs(att.parts_sum - reference) <= 1e-10 * abs(reference), (att.parts_sum, reference)


def test_each_rollout_is_the_change_when_its_gradient_is_removed(stepped):
    """Brute force: delta H_1 along the step minus delta H_1 along the step whose gradient lacks
    rollout i (c and s' held fixed), by reverse mode on the rollout and forward mode on E."""
    if stepped["setup"] == "adamw_value_clip":
        pytest.skip("value clipping has no per-rollout split")
    _, att = _attribute(stepped)
    step = stepped["replay"]
    c = att.c
    for part, rollouts in enumerate(stepped["rollouts"]):
        for row in range(rollouts["response_mask"].shape[0]):
            g_i = _rollout_gradient(stepped, part, row)
            without = {n: stepped["consumed"][n] - c * g_i[n] for n in g_i}
            brute = _delta_h1(stepped, step.step(stepped["consumed"])) - _delta_h1(
                stepped, step.step(without))
            ours = float(att.tokens[part][row].sum())
            assert abs(ours - brute) <= 1e-8 * abs(att.total), (part, row, ours, brute)
    # and one token, the largest, the same way
    part, flat = max(((k, int(t.abs().argmax())) for k, t in enumerate(att.tokens)),
                     key=lambda kv: float(att.tokens[kv[0]].abs().flatten()[kv[1]]))
    row, col = divmod(flat, att.tokens[part].shape[1])
    g_t = _rollout_gradient(stepped, part, row, col)
    brute = _delta_h1(stepped, {n: step.scale[n] * c * g_t[n] for n in g_t})
    assert abs(float(att.tokens[part][row, col]) - brute) <= 1e-8 * abs(att.total)


# ------------------------------------------------------------------ what users see
@pytest.fixture(scope="module")
def section() -> dict[str, Any]:
    """The attribution section of the clipped, accumulated AdamW step, at level detailed."""
    data = _run("adamw_clip_accumulate")
    E = data["E"]
    t = sequence_terms(*data["scorer"].score(E, data["theta"]), E.response_mask)
    out = build_section(
        model=data["model"], scorer=data["scorer"], microbatches=[E],
        tokenizer=data["tokenizer"], per_token_loss=data["module"].per_token_loss,
        rollouts=data["rollouts"], theta=data["theta"], replay=data["replay"],
        raw_grads=data["raw"], consumed_grads=data["consumed"],
        H_hat=float(t["h"].sum() / t["T"].sum()), denominator=float(t["T"].sum()),
        normalize="per_token", deltaH1=_delta_h1(data, data["observed"]),
        learning_rate=data["lr"],
        loss_scale=data["loss_scale"], detailed=True)
    return {"section": out, "data": data}


def test_advantage_signs_and_cui_quadrants_partition_the_rollouts_part(section):
    p = section["section"]["parts"]
    total = abs(p["momentum"]) + abs(p["rollouts"])
    by_sign = p["rollouts_pos_adv"] + p["rollouts_neg_adv"] + p["rollouts_zero_adv"]
    assert by_sign == pytest.approx(p["rollouts"], abs=1e-14 * total)
    quadrants = sum(p[k] for k in ("tokens_pos_adv_high_p", "tokens_pos_adv_low_p",
                                   "tokens_neg_adv_high_p", "tokens_neg_adv_low_p"))
    # Dr-GRPO's loss is A_i * log pi: a zero-advantage token contributes exactly nothing
    assert quadrants == pytest.approx(p["rollouts"], abs=1e-14 * total)
    assert abs(p["residual"]) <= 1e-10 * total
    assert p["num_rollouts"] == 16 and p["rollouts_pos_adv"] != 0


def test_cui_proxy_is_minus_the_token_covariance_of_log_prob_and_advantage(section):
    rows = [(float(lp), float(a)) for r in section["data"]["rollouts"]
            for lps, a, m in zip(r["token_logp"], r["advantages"], r["response_mask"],
                                 strict=True)
            for lp, keep in zip(lps, m, strict=True) if keep]
    x = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    a = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    cov = float(((x - x.mean()) * (a - a.mean())).mean())
    p = section["section"]["parts"]
    assert p["num_tokens"] == len(rows)
    assert p["cui_proxy"] == pytest.approx(-cov, rel=1e-12)
    lr = section["data"]["lr"]
    assert p["cui_proxy_lr"] == pytest.approx(-lr * cov, rel=1e-12)


def test_top_lists_hold_the_largest_contributions_with_their_text(section):
    s = section["section"]
    tokens = [t["deltaH"] for t in s["top_tokens"]]
    assert tokens == sorted(tokens, key=abs, reverse=True) and len(tokens) == 8
    alphabet = set(DEFAULT_ALPHABET) | {EOS_TOKEN}
    assert all(t["text"] in alphabet and 0 < t["prob"] <= 1 for t in s["top_tokens"])
    rollouts = s["top_rollouts"]
    assert [abs(r["deltaH"]) for r in rollouts] == sorted(
        (abs(r["deltaH"]) for r in rollouts), reverse=True)
    for r in rollouts:
        assert sum(t["deltaH"] for t in r["tokens"]) == pytest.approx(r["deltaH"], rel=1e-12)
        assert r["prompt"].endswith("=")
    # the largest token sits in one of the listed rollouts, with the same value
    best = s["top_tokens"][0]
    listed = {r["index"]: r for r in rollouts}
    assert listed[best["rollout"]]["tokens"][best["position"]]["deltaH"] == best["deltaH"]


def test_cli_renders_the_step_in_the_terminal_and_as_html(section, tmp_path, capsys):
    record = {"core_results": {"step": 2, "deltaH1": section["section"]["parts"]["reverse_total"]},
              "attribution": section["section"]}
    probe_dir = tmp_path / "entropy_probe"
    probe_dir.mkdir()
    (probe_dir / "step_00000002.json").write_text(json.dumps(record))
    assert cli.main(["attribution", str(tmp_path), "--step", "2"]) == 0
    text = capsys.readouterr().out
    assert "momentum" in text and "Cui proxy" in text and "top rollouts" in text
    first = section["section"]["top_rollouts"][0]
    assert first["prompt"] in text and f"{first['tokens'][0]['deltaH']:+.1e}" in text
    html_path = tmp_path / "step2.html"
    assert cli.main(["attribution", str(tmp_path), "--step", "2", "--html", str(html_path)]) == 0
    page = html_path.read_text()
    assert page.count("<span style=\"background:rgb(") == sum(
        len(r["tokens"]) for r in section["section"]["top_rollouts"])
    shaded = io.StringIO()
    render_terminal(record, 2, shaded, color=True)
    # the largest raise of entropy is full red, the largest fall full blue
    assert "\x1b[48;2;255;64;64m" in shaded.getvalue() or "\x1b[48;2;64;64;255m" in (
        shaded.getvalue())
    assert cli.main(["attribution", str(tmp_path), "--step", "4"]) == 2
    (probe_dir / "step_00000006.json").write_text(json.dumps({"core_results": {"step": 6}}))
    assert cli.main(["attribution", str(tmp_path), "--step", "6"]) == 2
    assert "attribution=True" in capsys.readouterr().err


# ------------------------------------------------------------------ inside a live run
def test_a_live_run_logs_the_parts_to_json_and_tensorboard_and_the_cli_reads_them(
    make_grpo, make_probe, fit, observer, tmp_path, capsys
):
    """attribution=True in a real Lightning run (float32 tiny policy, two micro-batches per step,
    norm clipping): every probed record has the parts, TensorBoard has them as scalars, the
    training is bitwise the one without the probe, and the CLI renders the step."""
    final = {}
    for probed in (False, True):
        module = make_grpo(seed=0)
        probe = make_probe(3, attribution=True, log_level="detailed", strict=True)
        fit(module, tmp_path / str(probed), max_steps=7, callbacks=(probe,) if probed else (),
            accumulate_grad_batches=2, gradient_clip_val=0.05)
        final[probed] = observer.capture(module.model, None)
    assert observer.differences(final[False], final[True]) == []
    run = tmp_path / "True" / "run" / "version_0"
    for step in (0, 3, 6):
        record = load_step(run, step)
        parts = record["attribution"]["parts"]
        deltaH1 = record["core_results"]["deltaH1"]
        assert parts["num_rollouts"] == 16  # 2 micro-batches x 4 prompts x 2 responses
        # float32 model: the engine's delta H_1 (forward mode, float32-rounded step) and the
        # parts (reverse mode, float64 step) agree to float32 round-off, not to 1e-10
        assert abs(parts["residual"]) <= 1e-3 * abs(deltaH1) + 1e-9, (step, parts, deltaH1)
        assert parts["protocol_error"] < 1e-4 and parts["clip_offset"] < 1e-6
        assert len(record["attribution"]["top_tokens"]) == 8
        assert list(SCHEMA.iter_errors(record)) == []
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("momentum", "rollouts_pos_adv", "tokens_neg_adv_low_p", "cui_proxy"):
        events = acc.Scalars(f"entropy_probe/attribution/{tag}")
        assert [e.step for e in events] == [0, 3, 6]
        assert events[-1].value == pytest.approx(
            load_step(run, 6)["attribution"]["parts"][tag], rel=1e-6)
    assert cli.main(["attribution", str(run), "--step", "3", "--no-color"]) == 0
    assert "this step's rollouts" in capsys.readouterr().out


def test_attribution_without_the_protocol_fails_at_setup_naming_it(make_probe, fit, tmp_path):
    class NoProtocol(GRPOModule):
        per_token_loss = None

    lightning.seed_everything(0, verbose=False)
    model, tokenizer = build_policy(seed=0, **TINY_POLICY)
    module = NoProtocol(model, tokenizer, make_prompts(64, seed=0), **TINY_GRPO)
    with pytest.raises(ProbeConfigError, match="per_token_loss"):
        fit(module, tmp_path, max_steps=1, callbacks=(make_probe(1, attribution=True),))


def test_a_step_without_rollouts_gets_an_error_section_and_keeps_its_record(
    make_probe, fit, tmp_path
):
    class NoRollouts(GRPOModule):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            del out["rollouts"]
            return out

    lightning.seed_everything(0, verbose=False)
    model, tokenizer = build_policy(seed=0, **TINY_POLICY)
    module = NoRollouts(model, tokenizer, make_prompts(64, seed=0), **TINY_GRPO)
    with pytest.warns(EntropyProbeWarning, match="phase 'attribution'"):
        fit(module, tmp_path, max_steps=2, callbacks=(make_probe(1, attribution=True),))
    record = load_step(tmp_path / "run" / "version_0", 1)
    assert "no 'rollouts'" in record["attribution"]["error"]["message"]
    assert record["core_results"]["deltaH1"] is not None and "error" not in record["core_results"]
    assert list(SCHEMA.iter_errors(record)) == []


def test_the_surrogate_gradient_gives_delta_h1_per_sequence_too(section):
    data = section["data"]
    E, theta, obs = data["E"], data["theta"], data["observed"]
    logp, ent, dl, dH = data["scorer"].score_with_tangent(E, theta, obs)
    t = sequence_terms(logp, ent, E.response_mask, dl, dH)
    reference = delta_h1(t["A"], t["Bsum"], t["C"], t["h"], t["T"], "per_sequence").deltaH1
    g_E = surrogate_gradient(data["scorer"], [E], theta, float(t["h"].mean()),
                             float(E.size), "per_sequence")
    ours = sum(float((g_E[n] * obs[n]).sum()) for n in obs)
    assert abs(ours - reference) <= 1e-10 * abs(reference)


def test_per_token_advantages_give_the_same_parts_as_per_rollout_ones(section):
    """A module may return advantages [N, L] (PPO-style, per token): broadcasting the demo's
    [N] advantages to [N, L] must not change the grouping or Cui's proxy."""
    data = section["data"]
    g_E = {n: torch.ones_like(t, dtype=torch.float64) for n, t in data["theta"].items()}
    att = attribute_step(
        model=data["model"], per_token_loss=data["module"].per_token_loss,
        rollouts=data["rollouts"], theta=data["theta"], replay=data["replay"],
        raw_grads=data["raw"], consumed_grads=data["consumed"], g_E=g_E,
        loss_scale=data["loss_scale"])
    wide = [{**r, "advantages": r["advantages"][:, None].expand_as(r["token_logp"])}
            for r in data["rollouts"]]
    narrow_parts = parts(att, data["rollouts"], None, 1e-3)
    assert parts(att, wide, None, 1e-3) == narrow_parts
    assert narrow_parts["tokens_pos_adv_high_p"] != 0
