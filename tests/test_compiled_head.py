"""compile_head=True: the head maths compiled by torch.compile (inductor's C++ backend) give the
eager ``head_maths`` numbers, compile one graph per variant for every block shape, leave the
training bitwise untouched, do not change the run's identity, and fall back to the eager maths
with one warning when compiling fails. The compiles take seconds: the module shares them (one
graph per variant, float32 logits, compiled by the first test and reused by the second)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._inductor.config as inductor_config
from conftest import TINY_POLICY
from torch._dynamo.utils import counters

from entropy_callback import EntropyProbe, EntropyProbeWarning, ProbeConfig
from entropy_callback.compiled_head import CompiledHeadMaths
from entropy_callback.demos import build_policy
from entropy_callback.scoring import Scorer, head_maths
from entropy_callback.testing import randomize_lora_b

PROMPTS = ["1+2=", "33+44=", "5=", "7+8+9+0="]
FIELDS = ("deltaH1", "deltaH1_se", "deltaH_true", "deltaH_true_se", "H_orig", "H_upd")


def _graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """The graph counts below start from nothing compiled."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_head_maths_equal_eager_with_one_graph_per_variant():
    """Tolerance: float64 rounding of the two summation orders (inductor's 16 lanes in sequence,
    eager's cascade) is ~1e-15 relative here (measured); D H, a difference of two sums, is
    compared relative to its largest value in the block."""
    gen = torch.Generator().manual_seed(4)
    z = 3 * torch.randn(6, 5000, generator=gen)  # peaked and flat rows
    z[0] /= 30
    dz = torch.randn(6, 5000, generator=gen)
    targets = torch.randint(5000, (6,), generator=gen)
    before = _graphs()
    for temperature in (1.0, 0.7):  # the temperature is a tensor input: no new graph
        maths = CompiledHeadMaths(temperature)
        got = maths(z, targets, dz)
        ref = head_maths(z.clone(), targets, temperature, dz.clone())
        for a, b in zip(got, ref, strict=True):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13 * float(b.abs().max()))
        # the primal is bitwise the same with or without the tangent: Delta H_true takes
        # theta's terms from the derivative pass and theta''s from rescoring
        primal = maths(z, targets)
        assert all(torch.equal(a, b) for a, b in zip(primal, got[:2], strict=True))
        # blocks of any size (the last block is smaller; one row is padded to two) give each
        # row bitwise what the full block gives, and so does another vocabulary's graph
        for rows in (1, 2, 5):
            part = maths(z[:rows], targets[:rows], dz[:rows])
            assert all(torch.equal(a, b[:rows]) for a, b in zip(part, got, strict=True))
            assert all(torch.equal(a, b[:rows]) for a, b in
                       zip(maths(z[:rows], targets[:rows]), primal, strict=True))
        narrow = maths(z[:, :3001].contiguous(), targets % 3001, dz[:, :3001].contiguous())
        ref = head_maths(z[:, :3001].clone(), targets % 3001, temperature, dz[:, :3001].clone())
        for a, b in zip(narrow, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13 * float(b.abs().max()))
    assert _graphs() - before == 2  # one per variant, compiled at the first call


def _probe_twice(compile_head: bool, observer) -> tuple[list, str]:
    """Two probed AdamW steps of the tiny policy; each probe phase leaves everything as it was."""
    model, tok = build_policy(seed=0, **TINY_POLICY)
    randomize_lora_b(model, std=0.05, seed=3)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    probe = EntropyProbe(model, tok, PROMPTS, batch_size=12, microbatch_size=5,
                         max_new_tokens=6, eta_multipliers=(1.0, 2.0), strict=True,
                         derivative="forward", compile_head=compile_head)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    results = []
    for step in range(2):
        opt.zero_grad()
        model(**enc, labels=enc["input_ids"]).loss.backward()
        state = observer.capture(model, opt)
        probe.before_step(opt, step=step)
        assert observer.differences(state, observer.capture(model, opt)) == []
        opt.step()
        state = observer.capture(model, opt)
        results.append(probe.after_step())
        assert observer.differences(state, observer.capture(model, opt)) == []
    return results, probe.config.config_hash()


def test_a_compiled_probe_measures_what_the_eager_one_does_and_observes_only(observer):
    """Blocks of every size (microbatches of 5, 5 and 2 sequences, responses of any length)
    reuse the two float32 graphs; the tolerance is the head maths' rounding above, carried
    through the sums and the SNIS estimator."""
    CompiledHeadMaths(1.0)(torch.randn(3, 50), torch.arange(3), torch.randn(3, 50))
    before = _graphs()  # both float32 graphs exist now (compiled here or by the test above)
    compiled, compiled_hash = _probe_twice(True, observer)
    assert _graphs() == before  # the first test's graphs: no recompilation for any block
    eager, eager_hash = _probe_twice(False, observer)
    assert compiled_hash == eager_hash  # how it is computed, not what: the same run
    assert ProbeConfig(compile_head=True).config_hash() == ProbeConfig().config_hash()
    for got, ref in zip(compiled, eager, strict=True):
        assert got.error is None and got.derivative == "forward"
        for name in FIELDS:
            a, b = getattr(got, name), getattr(ref, name)
            assert a is not None and a == pytest.approx(b, rel=1e-11, abs=1e-13), name


def test_a_failed_compile_falls_back_to_the_eager_maths_with_one_warning():
    """No working C++ compiler: the scorer warns once and scores with the eager head maths,
    bitwise what compile_head=False gives. (Float64 logits need a graph not compiled above;
    inductor's caches are off, so the compiler is really called.)"""
    model, tok = build_policy(seed=0, dtype=torch.float64, **TINY_POLICY)
    randomize_lora_b(model, std=0.05, seed=3)
    probe = EntropyProbe(model, tok, PROMPTS, batch_size=6, max_new_tokens=5)
    with torch.no_grad():
        batch = probe._sample(0)
    eager = Scorer(model, 1.0, None).score(batch)
    scorer = Scorer(model, 1.0, None, compile_head=True)
    broken = {"cpp.cxx": (None, "/nonexistent/c++"), "force_disable_caches": True}
    with inductor_config.patch(broken), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [scorer.score(batch) for _ in range(2)]
    said = [w for w in caught if issubclass(w.category, EntropyProbeWarning)]
    assert len(said) == 1 and "compile_head=True" in str(said[0].message)
    assert "InvalidCxxCompiler" in str(said[0].message)
    for scores in got:
        assert all(torch.equal(a, b) for a, b in zip(scores, eager, strict=True))
