"""The probe session in a plain PyTorch loop, and the two bugs of a result changed after the
engine returned it (issue 18).

Real parts: the tiny LoRA policy, real AdamW, real backward passes, a real RunLogger writing
JSON records that are read back.
"""

from __future__ import annotations

import gc
import json
import types
import warnings

import pytest
import torch
from probe_harness import backward_on, probe_prompts, tiny_policy

from entropy_callback import EntropyProbe, ProbeConfig, RunLogger, load_run
from entropy_callback.observer import EntropyProbeWarning
from entropy_callback.result import ProbeResult
from entropy_callback.session import ProbeSession

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL = dict(batch_size=8, microbatch_size=8, max_new_tokens=4)


def _loop(session: ProbeSession, model, tokenizer, steps: int, not_taken=()) -> list:
    """A hand-written AdamW loop with the session; the optimizer skips ``not_taken`` steps
    (as GradScaler does on inf gradients: no ``optimizer.step()`` at all)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    results = []
    for t in range(steps):
        optimizer.zero_grad()
        backward_on(model, tokenizer)
        session.before_step(optimizer, t)
        if t not in not_taken:
            optimizer.step()
            session.after_step(optimizer)
        results += session.step_end({"rewards": torch.tensor([1.0, 0.0, 0.5])})
    session.end()
    return results


def test_a_plain_loop_probes_due_steps_and_rearms_after_a_step_not_taken(tmp_path):
    """Step t is due when t % every == 0; step 2 is never taken: its probe, still pending at
    step 3, is recorded as skipped and step 3 is probed instead. Records carry the update
    batch's statistics that step_end handed in."""
    model, tokenizer = tiny_policy()
    session = ProbeSession(ProbeConfig(**SMALL), every=2)
    session.bind(model, tokenizer, probe_prompts())
    session.open(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _loop(session, model, tokenizer, steps=6, not_taken={2})
    assert [r.step for r in results] == [0, 2, 3, 4]
    by_step = {r.step: r for r in results}
    assert by_step[2].update_source == "skipped" and by_step[2].deltaH1 is None
    assert "step count did not advance" in by_step[2].null_reasons["deltaH1"]
    for t in (0, 3, 4):
        assert by_step[t].error is None and by_step[t].update_cosine >= 1 - 1e-6
        assert by_step[t].batch_statistics["U_batch"] == {
            "num_sequences": 3, "avg_reward": 0.5, "reward_std": 0.5}
    assert [r["step"] for r in load_run(tmp_path)] == [0, 2, 3, 4]
    assert len([w for w in caught if "did not take step 2" in str(w.message)]) == 1
    assert session.probed_steps == [0, 2, 3, 4]


def test_attribution_is_refused_at_construction_where_no_rollouts_can_come():
    with pytest.raises(ValueError, match="attribution=True needs the step's rollouts"):
        ProbeSession(ProbeConfig(attribution=True), every=1, framework="hf", rollouts=False)


def _tensor_bytes(root) -> int:
    """Bytes of every distinct tensor reachable from ``root`` through Python references
    (modules and functions not followed: their globals reach everything)."""
    seen, tensors, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, str, bytes, int, float, types.ModuleType,
                                               types.FunctionType, types.BuiltinFunctionType)):
            continue
        seen.add(id(obj))
        if torch.is_tensor(obj):
            tensors[obj.data_ptr()] = obj.untyped_storage().nbytes()
            continue
        stack.extend(gc.get_referents(obj))
    return sum(tensors.values())


def test_attribution_without_rollouts_keeps_no_probe_alive():
    """attribution=True in a plain loop that never hands rollouts in: each probe's snapshots
    (theta, Adam state, raw gradients, E) are released with its result; e619d40 kept every
    probe's (5 probes, 5 retained)."""
    model, tokenizer = tiny_policy()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    probe = EntropyProbe(model, tokenizer, probe_prompts(), ProbeConfig(attribution=True,
                                                                         **SMALL))
    held, sections = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EntropyProbeWarning)
        for t in range(5):
            optimizer.zero_grad()
            backward_on(model, tokenizer)
            probe.before_step(optimizer, step=t)
            optimizer.step()
            sections.append(probe.after_step().attribution)
            gc.collect()
            held.append(_tensor_bytes(probe))
    # after the first probe the engine holds nothing more: the model, its scorer, the prompts
    assert held[1:] == [held[0]] * 4, held
    assert all("no rollouts" in s["error"]["message"] for s in sections)  # each says why


class FailingMetricLogger:
    """A metric-logger sink that always raises."""

    def __call__(self, scalars, step):
        raise RuntimeError("metric backend down")


def test_a_failing_sink_leaves_the_callers_result_as_it_was(tmp_path):
    """RunLogger.emit with a failing sink: the record on disk holds the sink's error and the
    null reasons it implies; the result the caller holds is unchanged (e619d40 wrote 9
    null_reasons blaming the logger into this one while its error stayed None)."""
    result = ProbeResult(step=3, B_E=4, learning_rate=1e-5, deltaH1=-2.5e-4, bars_dot=-25.0)
    run = RunLogger(ProbeConfig(), tmp_path, tensorboard=False,
                    metric_loggers=[FailingMetricLogger()]).open()
    with pytest.warns(EntropyProbeWarning, match="metric backend down"):
        run.emit(result)
    run.close()
    assert result.error is None and dict(result.null_reasons) == {}
    (line,) = load_run(tmp_path)
    assert line["error"]["message"] == "metric backend down"
    assert line["null_reasons"]["deltaH_true"] == "phase 'logger' failed: RuntimeError"
    on_disk = json.loads((run.run_dir / "step_00000003.json").read_text())
    assert on_disk["core_results"]["deltaH1"] == -2.5e-4


def test_step_hooks_run_after_the_session_and_are_contained(tmp_path):
    """A governor-like hook sees every step at both points; one that raises costs a warning,
    never the loop."""
    model, tokenizer = tiny_policy()
    session = ProbeSession(ProbeConfig(**SMALL), every=2)
    session.bind(model, tokenizer, probe_prompts())
    seen = []
    session.before_step_hooks.append(lambda s, t: seen.append(("before", t, s.probe.pending)))
    session.after_step_hooks.append(lambda s, t: seen.append(("after", t)))
    session.after_step_hooks.append(lambda s, t: 1 / 0)
    with pytest.warns(EntropyProbeWarning, match="phase 'hook'"):
        _loop(session, model, tokenizer, steps=3)
    assert seen == [("before", 0, True), ("after", 0), ("before", 1, False),
                    ("before", 2, True), ("after", 2)]
