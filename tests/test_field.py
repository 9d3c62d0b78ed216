"""Setups found by the field matrix (benchmarks/field_matrix.py) that lost records or misled."""

from __future__ import annotations

from entropy_callback.runlog import load_run


def test_one_callback_reused_for_a_second_fit_probes_the_second_model(make_grpo, make_probe,
                                                                      fit, tmp_path):
    # A notebook habit: the same callback object passed to two Trainers, each fitting a newly
    # built module. The second fit must probe its own model, on schedule.
    probe = make_probe(2)
    fit(make_grpo(seed=0), tmp_path / "one", max_steps=3, callbacks=(probe,))
    first_root = probe.json.root
    second = make_grpo(seed=1)
    fit(second, tmp_path / "two", max_steps=3, callbacks=(probe,))
    assert probe.probe.model is second.model
    assert probe.json.root != first_root
    assert [r["step"] for r in load_run(first_root)] == [0, 2]
    assert [r["step"] for r in load_run(probe.json.root)] == [0, 2]
