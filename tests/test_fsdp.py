"""The engine on a model sharded with FSDP2 (``fully_shard``), 2 gloo ranks on CPU, spawned.

Each rank shards E as under DDP; the passes run the sharded model's own forward in lockstep
(``sharded.Lockstep``); theta and theta + m Delta theta are written into the live local shards
and theta' written back. The derivative is taken in forward mode (the tangent along Delta theta
enters through forward hooks) or in reverse mode (backwards of the sharded model with respect to
injection leaves, ``sharded_reverse.py``). The result must equal one unsharded process on the
same seed, whichever derivative either takes, and training must be bitwise what it is without
the probe, FSDP's own per-iteration state included.
"""

from __future__ import annotations

import faulthandler
import os
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import FAILURES, PROMPTS, _free_port, inject

from entropy_callback import EntropyProbe, ProbeConfig, sharded_reverse
from entropy_callback.config import ProbeConfigError
from entropy_callback.demos.tiny import (
    LORA_TARGET_MODULES,
    add_lora,
    build_char_tokenizer,
    build_tiny_llama,
)
from entropy_callback.distributed import shard
from entropy_callback.reverse import choose_derivative
from entropy_callback.sharded_reverse import fsdp_pending
from entropy_callback.testing import exact_float64, randomize_lora_b

WORLD = 2
CONFIG = dict(batch_size=24, microbatch_size=5, max_new_tokens=5, eta_multipliers=(0.5, 1.0),
              log_level="detailed")


def _model(shard: bool, lora_dropout: float = 0.0, exact: bool = True,
           checkpointing: bool = False, shard_root: bool = True):
    """The float64 tiny LoRA Llama (same weights on every rank), sharded per decoder layer and
    at the root when ``shard``; its AdamW optimizer and a fixed training batch. LoRA on the LM
    head too: those parameters belong to the root's FSDP unit, which stays unsharded after a
    forward (the probe must reshard it before writing theta or theta' into its shards). Its
    RMSNorms run in float64 (``exact_float64``): as shipped they round through float32, which
    would limit the agreement of the two differentiation orders to ~1e-7 (test_reverse.py).
    ``exact=False`` keeps them as shipped; ``checkpointing`` enables the user's activation
    checkpointing of the decoder layers (before sharding, as a training script would);
    ``shard_root=False`` shards the decoder layers only."""
    tok = build_char_tokenizer()
    base = build_tiny_llama(tok, seed=0, dtype=torch.float64, attn_implementation="sdpa")
    if exact:
        base = exact_float64(base)
    model = add_lora(base, r=8, alpha=16, dropout=lora_dropout, seed=0,
                     target_modules=(*LORA_TARGET_MODULES, "lm_head"))
    randomize_lora_b(model, std=0.05, seed=1)
    if checkpointing:
        model.get_base_model().activation_checkpointing_enable()
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        if shard_root:
            fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    enc = tok(["3+4=7", "1+1=2", "9+9=8"], return_tensors="pt", padding=True)
    return model, tok, opt, enc


def fsdp_state(model) -> list[str]:
    """What FSDP2 holds of an iteration (``sharded_reverse.fsdp_pending``: training states,
    unsharded groups, gradients or reductions in flight) and its forward records (the
    post-forward order the next backward prefetches by), as comparable strings."""
    from torch.distributed.fsdp import FSDPModule

    records = [f"{name or '<root>'}: {len(m._get_fsdp_state()._comm_ctx.post_forward_order)} "
               f"{[g._post_forward_indices for g in m._get_fsdp_state()._fsdp_param_groups]}"
               for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    return [*fsdp_pending(model), *records]


@contextmanager
def fail_between_forward_and_backward(fail: bool):
    """With ``fail``: the reverse pass's objectives raise at the second microbatch, after its
    forward (FSDP's pre-backward hooks are registered) and before its backwards."""
    if not fail:
        yield
        return
    original = sharded_reverse.estimator_weights

    def broken(normalize):
        weights, calls = original(normalize), []

        def failing(ent, mask):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected failure between forward and backward")
            return weights(ent, mask)

        return failing

    sharded_reverse.estimator_weights = broken
    try:
        yield
    finally:
        sharded_reverse.estimator_weights = original


@contextmanager
def fail_inside_backward(fail: bool):
    """With ``fail``: the reverse pass's first backward through the body raises inside the
    autograd engine (a hook on the body's injection leaf, the first leaf made), on every rank:
    FSDP's pre-backward hooks have run, its final callback is queued and never runs."""
    if not fail:
        yield
        return
    original, made = sharded_reverse.leaf, []

    def hooked(n, injector, device):
        eps = original(n, injector, device)

        def boom(grad):
            raise RuntimeError("injected failure inside the backward")

        if not made:
            eps.register_hook(boom)
        made.append(eps)
        return eps

    sharded_reverse.leaf = hooked
    try:
        yield
    finally:
        sharded_reverse.leaf = original


def _probe_once(shard: bool, fail: str | None = None, step: int = 3,
                derivative: str = "forward") -> tuple:
    """One probed AdamW step; identical inputs on every rank (FSDP averages the gradients, so
    the step is the single process's). Returns the result, FSDP's state after it and this
    rank's per-sequence derivative terms in float64 (P_i = A_i + Bsum_i and C_i, [B_E / world];
    the record's columns are float32). ``fail``: a phase of ``FAILURES`` or
    "between_forward_and_backward" (the reverse pass)."""
    derivative, _, checkpointed = derivative.partition("+")
    model, tok, opt, enc = _model(shard, checkpointing=checkpointed == "checkpointing")
    model(**enc, labels=enc["input_ids"]).loss.backward()
    calls = [0]  # the decoder layers' attention calls in the probe (recomputations included)
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    probe = EntropyProbe(model, tok, PROMPTS, ProbeConfig(**CONFIG, derivative=derivative))
    between = fail == "between_forward_and_backward"
    if fail == "not_last_backward":  # FSDP would keep the probe's backward state
        model.set_is_last_backward(False)
    own = None if fail in ("between_forward_and_backward", "not_last_backward") else fail
    heads = []  # the LM head's output shapes in the passes after the step
    with inject(probe, own), fail_between_forward_and_backward(between):
        probe.before_step(opt, step=step)
        opt.step()
        hook = model.get_base_model().lm_head.register_forward_hook(
            lambda _m, _a, out: heads.append(tuple(out.shape)))
        measured = probe.measure()
        hook.remove()
        t = measured.terms
        terms = None if t is None else {"P": t["A"] + t["Bsum"], "C": t["C"]}
        state = {"fsdp": fsdp_state(model) if shard else None, "attention_calls": calls[0],
                 "head_shapes": heads}
        return probe.finish(measured), state, terms


def _train(probed: str | None, steps: int = 3, fail_at: int | None = None,
           checkpointing: bool = False) -> dict[str, torch.Tensor]:
    """``steps`` training steps of the sharded model (LoRA dropout on, the decoder layers
    checkpointed with ``checkpointing``), the probe around each optimizer step (``probed`` its
    derivative) or not; this rank's local shards of parameters, grads and AdamW state, and
    FSDP's state. With ``fail_at``, that step's probe fails inside its reverse pass's backward
    (``fail_inside_backward``) on every rank."""
    torch.manual_seed(1234)
    model, tok, opt, enc = _model(True, lora_dropout=0.1, checkpointing=checkpointing)
    model.train()
    probe = (EntropyProbe(model, tok, PROMPTS, ProbeConfig(**CONFIG, derivative=probed))
             if probed else None)
    errors = []
    for step in range(steps):
        opt.zero_grad()
        model(**enc, labels=enc["input_ids"]).loss.backward()
        if probe is not None:
            probe.before_step(opt, step=step)
        opt.step()
        if probe is not None:
            with fail_inside_backward(step == fail_at):
                result = probe.after_step()
            errors.append(result.error)
    out = {"rng": torch.get_rng_state(),  # FSDP's state: every parameter resharded again
           "sharded": torch.tensor([type(p).__name__ == "DTensor" for p in model.parameters()]),
           "fsdp": fsdp_state(model), "errors": errors}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[f"param:{name}"] = p.to_local().clone()
            out[f"grad:{name}"] = p.grad.to_local().clone()
            for key, value in opt.state[p].items():
                out[f"state:{key}:{name}"] = (value.to_local() if hasattr(value, "to_local")
                                              else value).clone()
    return out


class _ValueHead(torch.nn.Module):
    """A wrapper around the policy (a value head), sharded as one unit with it."""

    def __init__(self, policy):
        super().__init__()
        self.policy, self.value = policy, torch.nn.Linear(1, 1, dtype=torch.float64)

    def forward(self, **inputs):
        return self.policy(**inputs)


def _refusals() -> list:
    """What the probe refuses on a sharded model, at construction (unequal E shards,
    attribution), and what ``derivative="auto"`` picks for the sharded model on CPU (as
    shipped: ``exact_float64``'s RMSNorm forwards look like Hub-kernel layers to
    ``kernelcheck``)."""
    model, tok, _, _ = _model(True, exact=False)
    messages = []
    for bad in (dict(batch_size=25), dict(attribution=True)):
        try:
            EntropyProbe(model, tok, PROMPTS, ProbeConfig(**{**CONFIG, **bad}))
        except ProbeConfigError as exc:
            messages.append(str(exc))
    wrapped, tok, _, _ = _model(True, exact=False, shard_root=False)
    from torch.distributed.fsdp import fully_shard

    fully_shard(_ValueHead(wrapped))  # the wrapper's unit holds the policy's root parameters
    try:
        EntropyProbe(wrapped, tok, PROMPTS, ProbeConfig(**CONFIG))
    except ProbeConfigError as exc:
        messages.append(str(exc))
    return [*messages, choose_derivative(model, "auto")]


def _worker(rank: int, port: int, out: str, job: str,
            phases: list[tuple[str | None, str]]) -> None:
    """Runs ``job`` on this rank, saving each result as soon as it is there (a hang shows as
    the first missing file)."""
    faulthandler.enable()  # a native crash (an abort in a collective) prints where it was
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        if job == "train":
            torch.save({"forward": _train("forward"), "unprobed": _train(None),
                        "reverse": _train("reverse", 4, 1, checkpointing=True),
                        "unprobed4": _train(None, 4, checkpointing=True),
                        "refusals": _refusals()}, Path(out) / f"0_rank{rank}.pt")
            return
        for i, (phase, derivative) in enumerate(phases):
            start = time.monotonic()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result, state, terms = _probe_once(True, phase if rank == 1 else None,
                                                   step=i, derivative=derivative)
            torch.save({"core": result.core(), "error": result.error, "terms": terms,
                        "sequences": result.sequences, "timing": result.timing,
                        "diagnostics": result.diagnostics, **state,
                        "seconds": time.monotonic() - start,
                        "warnings": [str(w.message) for w in caught]},
                       Path(out) / f"{i}_rank{rank}.pt")
    except BaseException:  # kept where the test can read it: a native abort at exit loses it
        (Path(out) / f"traceback_rank{rank}").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, job: str, phases: list[tuple[str | None, str]],
           deadline_s: float = 300.0) -> list[list[dict] | None]:
    """``_worker`` on 2 ranks; per entry, both ranks' results, or None where it did not finish
    before the deadline (a hang guard: the ranks are then killed).

    A rank that dies after both ranks saved every result is let be: on this machine a rank
    sometimes aborts natively at exit, after its last result, in the process group's teardown
    ("terminate called without an active exception"; docs/distributed.md). A rank dying
    earlier fails the test, with its Python traceback when it left one."""
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path), job, phases),
                             nprocs=WORLD, join=False, start_method="spawn")
    start = time.monotonic()
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() - start > deadline_s:
                break
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:
        if not _results(tmp_path, phases) or None in _results(tmp_path, phases):
            tracebacks = [f.read_text() for f in sorted(tmp_path.glob("traceback_rank*"))]
            raise AssertionError(f"a rank died: {exc}\n" + "\n".join(tracebacks)) from exc
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return _results(tmp_path, phases)


def _results(tmp_path: Path, phases: list) -> list[list[dict] | None]:
    out = []
    for i in range(max(1, len(phases))):
        files = [tmp_path / f"{i}_rank{r}.pt" for r in range(WORLD)]
        out.append([torch.load(f, weights_only=False) for f in files]  # files this test wrote
                   if all(f.exists() for f in files) else None)
    return out


# after the clean forward-mode probe and one per phase of FAILURES (forward mode)
REVERSE = {"clean": (None, "reverse"), "checkpointing": (None, "reverse+checkpointing"),
           "between_forward_and_backward": ("between_forward_and_backward", "reverse"),
           "derivative": ("derivative", "reverse"),
           "not_last_backward": ("not_last_backward", "reverse")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A clean probe, then one per phase of FAILURES failing on rank 1, the reverse pass clean
    and failing on rank 1 in its derivative phase, then a clean forward-mode probe."""
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.delenv("MASTER_PORT", raising=False)
        phases = [(None, "forward"), *((f, "forward") for f in FAILURES), *REVERSE.values(),
                  (None, "forward")]
        return _spawn(tmp_path_factory.mktemp("fsdp"), "probe", phases)


def _reverse_run(runs, fail):
    return runs[1 + len(FAILURES) + list(REVERSE).index(fail)]


def test_fsdp2_shards_give_the_single_process_result(runs):
    single = _probe_once(False, step=0)[0]
    ranks = runs[0]
    assert ranks is not None, "the sharded probe did not finish (hang)"
    for got in ranks:
        assert got["error"] is None, got["error"]
        assert got["core"]["derivative"] == "forward"
        assert got["fsdp"] == fsdp_state_after_backward()
        for key in ("deltaH1", "deltaH1_se", "deltaH_true", "deltaH_true_se", "H_orig", "H_upd",
                    "ESS", "bars_dot", "update_cosine"):
            # float64 throughout; FSDP's averaged gradients change only the rounding (bitwise
            # equal when measured, ~1e-15 relative through the full forward); 1e-8 is the issue's
            assert got["core"][key] == pytest.approx(single.core()[key], rel=1e-8,
                                                     abs=1e-12), key
        assert got["core"]["B_E"] == single.B_E == 24
        assert got["core"]["T_E"] == single.T_E
        for column in ("prompt_id", "stopped_eos", "prompt_length", "generation_length"):
            assert got["sequences"][column] == single.sequences[column], column


def test_fsdp2_passes_never_build_microbatch_logits(runs):
    """The derivative (forward and reverse mode, checkpointed or not), rescoring and sweep
    passes on the sharded model run the body once and the LM head on rows of real response
    positions (2-D, at most a microbatch's response tokens), never on [microbatch, L, V]: the
    only 3-D calls are the split's one-row check (the model's own forward and head(body(x)) on
    one sequence)."""
    most = CONFIG["microbatch_size"] * CONFIG["max_new_tokens"]
    for ranks in (runs[0], runs[-1], _reverse_run(runs, "clean"),
                  _reverse_run(runs, "checkpointing")):
        assert ranks is not None
        for got in ranks:
            shapes = got["head_shapes"]
            assert len(shapes) > 1
            three_d = [s for s in shapes if len(s) == 3]
            assert len(three_d) == 2 and all(s[0] == 1 for s in three_d), three_d
            assert all(len(s) == 3 or 0 < s[0] <= most for s in shapes), shapes


def test_fsdp2_reverse_pass_gives_the_single_process_forward_and_reverse_results(runs):
    """The reverse pass on the sharded model (backwards through FSDP with respect to the
    injection leaves) against one unsharded process taking the forward and the reverse pass on
    the same seed (so the same E): delta H_1, its SE and each rank's per-sequence derivative
    terms (float64) to 1e-10 relative (two differentiation orders and two summation orders of
    the same float64 numbers; measured ~1e-15, docs/distributed.md); its check over both
    ranks' rows holds. The same with the user's activation checkpointing on: the reverse pass
    recomputes each decoder layer once per backward (two per microbatch, per token), through
    FSDP's re-gathered parameters."""
    microbatches = -(-CONFIG["batch_size"] // WORLD // CONFIG["microbatch_size"])
    ranks = {label: _reverse_run(runs, label) for label in ("clean", "checkpointing")}
    for label, runs_ in ranks.items():
        assert runs_ is not None, f"the sharded reverse probe ({label}) did not finish (hang)"
        assert runs_[0]["diagnostics"] == runs_[1]["diagnostics"]
    for plain, got in zip(ranks["clean"], ranks["checkpointing"], strict=True):
        assert got["attention_calls"] - plain["attention_calls"] == 2 * 2 * microbatches
    for label, runs_ in ranks.items():
        step = 1 + len(FAILURES) + list(REVERSE).index(label)  # the worker's step: its index
        singles = [_probe_once(False, step=step, derivative=d) for d in ("forward", "reverse")]
        for rank, got in enumerate(runs_):
            assert got["error"] is None, got["error"]
            assert got["core"]["derivative"] == "reverse"
            assert got["fsdp"] == fsdp_state_after_backward()
            for single, _, terms in singles:
                for key in ("deltaH1", "deltaH1_se"):
                    assert got["core"][key] == pytest.approx(single.core()[key], rel=1e-10)
                for key in ("deltaH_true", "H_orig", "bars_dot"):  # the same E and Delta theta
                    assert got["core"][key] == pytest.approx(single.core()[key], rel=1e-8)
                rows = shard(CONFIG["batch_size"], WORLD, rank)
                for key in ("P", "C"):
                    want = terms[key][rows]
                    torch.testing.assert_close(got["terms"][key], want, rtol=1e-10,
                                               atol=1e-10 * float(want.abs().max()))
            assert got["diagnostics"]["reverse_check_gap"] < 1e-12


@pytest.mark.parametrize("fail", ["between_forward_and_backward", "derivative",
                                  "not_last_backward"])
def test_fsdp2_reverse_pass_failing_on_one_rank_is_skipped_by_both(runs, fail):
    """Rank 1 fails in the reverse pass's derivative phase (after a microbatch's forward, before
    its backwards; at the phase's start; refusing to run a backward while FSDP is told the
    next backward is not the last): both skip the probe, no rank waits in a backward's
    all-gather, and FSDP's state is left as the training step left it."""
    ranks = _reverse_run(runs, fail)
    assert ranks is not None, f"a failure ({fail}) in the reverse pass on rank 1 hung"
    assert ranks[1]["error"]["phase"] == "derivative"
    assert ranks[0]["error"]["phase"] == "distributed"
    if fail == "not_last_backward":
        assert "set_is_last_backward(False)" in ranks[1]["error"]["message"]
        assert "derivative='forward'" in ranks[1]["error"]["message"]
        assert ranks[1]["fsdp"] == sorted(
            f"{m}: set_is_last_backward(False)" for m in (
                "<root>", "base_model.model.model.layers.0", "base_model.model.model.layers.1")
        ) + fsdp_state_after_backward()  # as the user left it
        ranks = ranks[:1]
    else:
        assert "injected failure" in ranks[1]["error"]["message"]
    for got in ranks:
        assert got["fsdp"] == fsdp_state_after_backward()


def fsdp_state_after_backward() -> list[str]:
    """FSDP's state after a training step's backward: nothing pending, no forward records."""
    return ["<root>: 0 [[]]", "base_model.model.model.layers.0: 0 [[]]",
            "base_model.model.model.layers.1: 0 [[]]"]


@pytest.mark.parametrize("phase", list(FAILURES))
def test_fsdp2_failure_on_one_rank_in_any_phase_is_skipped_by_both(runs, phase):
    ranks = runs[1 + list(FAILURES).index(phase)]
    assert ranks is not None, f"a failure in '{phase}' on rank 1 left a rank waiting (hang)"
    assert ranks[1]["error"]["phase"] == FAILURES[phase][2]
    assert "injected failure" in ranks[1]["error"]["message"]
    assert ranks[0]["error"]["phase"] == "distributed"
    for got in ranks:
        assert any("entropy probe failed" in w for w in got["warnings"])


def test_fsdp2_ranks_stay_in_step_after_every_failure(runs):
    ranks = runs[-1]
    assert ranks is not None
    for got in ranks:
        assert got["fsdp"] == fsdp_state_after_backward()
        assert got["error"] is None and got["core"]["deltaH_true"] is not None
    assert ranks[0]["core"] == ranks[1]["core"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both ranks' local state after training probed by either derivative and unprobed, and
    the refusals."""
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.delenv("MASTER_PORT", raising=False)
        (ranks,) = _spawn(tmp_path_factory.mktemp("fsdp_train"), "train", [])
    return ranks


@pytest.mark.parametrize("derivative", ["forward", "reverse"])
def test_fsdp2_training_is_bitwise_unchanged_by_the_probe(trained, derivative):
    """Parameters, gradients, AdamW state, RNG, every parameter resharded and FSDP's own state
    (nothing pending, no forward record of the probe's left) after training probed at every
    step are bitwise those of the unprobed run. The reverse run is 4 steps, and its probe at
    step 1 fails inside its backward on both ranks (FSDP's final callback never runs): the
    probe resets FSDP's per-iteration state, and the steps after it are unchanged too; its
    decoder layers are checkpointed (in training and in the probe's backwards)."""
    assert trained is not None, "the sharded training run did not finish (hang)"
    for got in trained:
        probed = got[derivative]
        unprobed = got["unprobed4" if derivative == "reverse" else "unprobed"]
        errors = list(probed["errors"])
        if derivative == "reverse":
            assert errors[1]["phase"] == "derivative"
            assert "injected failure inside the backward" in errors[1]["message"]
            errors.pop(1)
        assert errors == [None] * len(errors)
        assert probed.keys() == unprobed.keys()
        assert any(k.startswith("state:exp_avg:") for k in probed)
        assert bool(unprobed["sharded"].all())
        assert unprobed["fsdp"] == probed["fsdp"] == fsdp_state_after_backward()
        for key, value in unprobed.items():
            if key not in ("fsdp", "errors"):
                assert torch.equal(probed[key], value), key


def test_fsdp2_refusals_name_the_argument_and_the_fix_and_auto_is_forward_on_cpu(trained):
    assert trained is not None
    for got in trained:
        uneven, attribution, outer, auto = got["refusals"]
        assert "embed_tokens" in outer and "outside the model" in outer
        assert "batch_size=25 is not divisible by world_size=2" in uneven
        assert "attribution=True" in attribution and "functional_call" in attribution
        # on CPU the forward pass is the faster one (docs/distributed.md)
        assert auto == ("forward", "auto: every op has a forward-mode rule")
