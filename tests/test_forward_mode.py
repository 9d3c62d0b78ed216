"""forward_mode.jvp: the same primal and tangent as torch.func.jvp, op by op and through a real
LoRA model's body, with the constant-operand fast path taken."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from torch.func import jvp as func_jvp

from entropy_callback import forward_mode
from entropy_callback.demos import build_policy
from entropy_callback.forward_mode import jvp
from entropy_callback.scoring import no_flash_attention

torch.manual_seed(0)
A = torch.randn(3, 4, 5, dtype=torch.float64)
TA = torch.randn(3, 4, 5, dtype=torch.float64)
C = torch.randn(3, 4, 5, dtype=torch.float64)  # a constant: no tangent
ROW = torch.randn(5, dtype=torch.float64)

# each case once with the dual on the left and once on the right, plus broadcasting, python
# scalars, type promotion and the ops the fast path leaves to torch (kwargs, c / a)
CASES = {
    "a + c": lambda a: a + C,
    "c + a": lambda a: C + a,
    "a + 2": lambda a: a + 2.0,
    "2 + a": lambda a: 2.0 + a,
    "torch.add": lambda a: torch.add(a, C),
    "a.add(c)": lambda a: a.add(C),
    "a - c": lambda a: a - C,
    "c - a": lambda a: C - a,
    "2 - a": lambda a: 2.0 - a,
    "torch.sub(c, a)": lambda a: torch.sub(C, a),
    "a * c": lambda a: a * C,
    "c * a": lambda a: C * a,
    "3 * a": lambda a: 3.0 * a,
    "a / c": lambda a: a / C,
    "a / 4": lambda a: a / 4.0,
    "c / a (torch's rule)": lambda a: C / a,
    "row * a (dual broadcast up)": lambda a: ROW * a,
    "a[:1] + c (dual broadcast up)": lambda a: a[:1] + C,
    "a * c[..., :1]": lambda a: a * C[..., :1],
    "float32 a + float64 c": lambda a: a.float() + C,
    "a * bool mask": lambda a: a * (C > 0),
    "alpha kwarg (torch's rule)": lambda a: torch.add(a, C, alpha=0.5),
    "a + a (both dual)": lambda a: a + a * a,
    "chain": lambda a: torch.tanh(a * 2.0 + C).sum(-1) / 3.0 - C[..., 0],
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_func_jvp(name):
    fn = CASES[name]
    want_p, want_t = func_jvp(fn, (A,), (TA,))
    got_p, got_t = jvp(fn, (A,), (TA,))
    assert got_p.dtype == want_p.dtype and got_t.dtype == want_t.dtype
    assert got_p.shape == want_p.shape and got_t.shape == want_t.shape
    # the same closed forms torch uses: equal to float64 rounding of one operation
    torch.testing.assert_close(got_p, want_p, rtol=0, atol=0)
    torch.testing.assert_close(got_t, want_t, rtol=1e-15, atol=1e-15)


# in-place ops on the output of a fast-path op: they must not reach the input's tangent (the
# input is used again afterwards) nor the caller's tangent
IN_PLACE = {
    "(a + c).mul_(5) + a": lambda a: (a + C).mul_(5.0) + a,
    "(a - c).relu_() + a": lambda a: (a - C).relu_() + a,
    "(c - a) item set + a": lambda a: _set0(C - a) + a,
    "(a[:1] + c).mul_(2)": lambda a: (a[:1] + C).mul_(2.0),
    "(a + 0).add_(a)": lambda a: (a + 0.0).add_(a),
}


def _set0(x):
    x[..., 0] = 0.0
    return x


@pytest.mark.parametrize("name", list(IN_PLACE))
def test_in_place_ops_on_the_output_leave_inputs_and_caller_alone(name):
    fn = IN_PLACE[name]
    tangent = TA.clone()
    want_p, want_t = func_jvp(fn, (A,), (tangent,))
    got_p, got_t = jvp(fn, (A,), (tangent,))
    torch.testing.assert_close(got_p, want_p, rtol=0, atol=0)
    torch.testing.assert_close(got_t, want_t, rtol=1e-15, atol=1e-15)
    assert torch.equal(tangent, TA)  # the caller's tangent is untouched


def test_dicts_tuples_and_independent_outputs():
    params = {"w": A, "b": ROW}
    tangents = {"w": TA, "b": torch.ones_like(ROW)}

    def fn(p):
        return (p["w"] * C + p["b"]).sum(), C.sum()  # the second ignores the primals

    (p1, p2), (t1, t2) = jvp(fn, (params,), (tangents,))
    (q1, q2), (u1, u2) = func_jvp(fn, (params,), (tangents,))
    torch.testing.assert_close(p1, q1)
    torch.testing.assert_close(t1, u1)
    assert torch.equal(p2, q2) and torch.equal(t2, torch.zeros(()).double())


def test_mode_is_gone_afterwards():
    jvp(CASES["a * c"], (A,), (TA,))
    assert not torch._C._is_torch_function_mode_enabled()
    with pytest.raises(ZeroDivisionError):  # an exception inside leaves no mode behind
        jvp(lambda a: a * (1 / 0), (A,), (TA,))
    assert not torch._C._is_torch_function_mode_enabled()


def test_fast_path_is_taken(monkeypatch):
    """The constant-operand ops are answered by the mode (else the speed-up is gone)."""
    seen = []
    original = forward_mode.fwAD.make_dual
    monkeypatch.setattr(forward_mode.fwAD, "make_dual", lambda p, t: seen.append(1) or
                        original(p, t))
    jvp(lambda a: (a * C + 2.0) / 4.0, (A,), (TA,))
    assert len(seen) == 1 + 3  # the input, then mul, add and div by the mode


def test_lora_body_bitwise_equal_to_torch_func():
    """The demo policy's body along a random LoRA direction: primal and tangent bitwise those of
    torch.func.jvp (the fast path computes the same closed forms torch does)."""
    torch.manual_seed(1)
    model, _ = build_policy(seed=0)
    model.eval()
    body = model.get_base_model().get_decoder()
    params = {n: p.detach().clone() for n, p in body.named_parameters() if p.requires_grad}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    ids = torch.randint(3, 40, (4, 9))

    def run(p):
        return functional_call(body, p, args=(), kwargs={"input_ids": ids, "use_cache": False},
                               strict=False).last_hidden_state

    with torch.no_grad(), no_flash_attention():
        want = func_jvp(run, (params,), (tangents,))
        got = jvp(run, (params,), (tangents,))
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    assert got[1].abs().max() > 0
