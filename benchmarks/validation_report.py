"""The figures behind tests/test_validation.py, printed as the tables of docs/validation.md.

Same tiny float64 policy, same step, same seeds as the tests (it imports their helpers), so the
numbers are the ones the tests assert on, plus what the tests only bound (the ratio bias at
smaller B, the score share, the χ² statistics).

    python benchmarks/validation_report.py            # about 30 s on one CPU thread
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning)
_path = Path(__file__).resolve().parent.parent / "tests" / "test_validation.py"
_spec = importlib.util.spec_from_file_location("test_validation", _path)
tv = importlib.util.module_from_spec(_spec)
sys.modules["test_validation"] = tv
_spec.loader.exec_module(tv)


def unwrap(fixture):
    """The plain function under a pytest fixture."""
    return getattr(fixture, "__wrapped__", None) or fixture.__pytest_wrapped__.obj


def main() -> None:
    torch.set_num_threads(1)
    policy = next(unwrap(tv.policy)())
    model, tokenizer = policy
    grads = unwrap(tv.grads)(policy)
    step = unwrap(tv.step)(policy, grads)
    exact = unwrap(tv.exact)(policy, step)
    terms, upd, batch = tv.score_pool(model, tokenizer, step, tv.R * tv.B, step_index=0)
    print(f"pool: R = {tv.R} batches of B = {tv.B} (probe seed 0, step 0); lr {tv.LR}")

    print("\n| normalize | quantity | exact | mean over R | SE of mean | z | "
          "mean SE / sd |")
    print("|---|---|---|---|---|---|---|")
    for normalize in tv.NORMALIZATIONS:
        est = tv.chunk_estimates(terms, upd, tv.B, normalize)
        ex = exact[normalize]
        for label, key, target in (("δH₁ vs D_Δθ H", "d1", ex["D"]),
                                   ("ΔH_true vs ΔH", "dt", ex["dH"]),
                                   ("H_orig vs H(θ)", "H", ex["H"])):
            mean, se = tv.mean_and_se(est[key])
            ratio = (f"{float(est[key + '_se'].mean() / est[key].std()):.3f}"
                     if key != "H" else "–")
            print(f"| {normalize} | {label} | {target:.6g} | {mean:.6g} | {se:.2g} | "
                  f"{(mean - target) / se:+.2f} | {ratio} |")
        print(f"| {normalize} | min ESS/B | | {float(est['ess'].min()):.4f} | | | |")

    print("\nscore share (pool of R·B): pathwise A, score Bsum − Ĥ C, and δH₁ without the score")
    print("| normalize | pathwise | score | share | exact D | score / SE of mean |")
    print("|---|---|---|---|---|---|")
    T, h = terms["T"], terms["h"]
    for normalize in tv.NORMALIZATIONS:
        h_hat, denom = ((float(h.sum() / T.sum()), T.sum()) if normalize == "per_token"
                        else (0.0, T.numel()))
        path = float(terms["A"].sum() / denom)
        score = float((terms["Bsum"] - h_hat * terms["C"]).sum() / denom)
        _, se = tv.mean_and_se(tv.chunk_estimates(terms, upd, tv.B, normalize)["d1"])
        print(f"| {normalize} | {path:.4g} | {score:.4g} | "
              f"{abs(score) / (abs(path) + abs(score)):.2f} | {exact[normalize]['D']:.4g} | "
              f"{abs(score) / se:.1f} |")

    print("\nratio bias: mean over chunks of B − estimate on the whole pool, in SE of the mean "
          "at B = 32")
    print("| normalize | estimator | B = 8 | B = 16 | B = 32 | B = 64 | SE of mean (B = 32) |")
    print("|---|---|---|---|---|---|---|")
    for normalize in tv.NORMALIZATIONS:
        for key, label in (("d1", "δH₁"), ("dt_raw", "ΔH_true raw SNIS"),
                           ("dt", "ΔH_true (jackknife-corrected)")):
            _, se = tv.mean_and_se(tv.chunk_estimates(terms, upd, tv.B, normalize)[key])
            cells = [tv.ratio_bias(terms, upd, b, normalize, key) for b in (8, 16, 32, 64)]
            print(f"| {normalize} | {label} | " + " | ".join(
                f"{c:.2g} ({c / se:+.2f})" for c in cells) + f" | {se:.2g} |")

    print("\nSE formulas on the whole pool (R·B sequences): δH₁'s delta method against the "
          "jackknife, ΔH_true's jackknife against the paired delta method")
    print("| normalize | SE(δH₁) | jackknife | SE(ΔH_true) | delta method |")
    print("|---|---|---|---|---|")
    for normalize in tv.NORMALIZATIONS:
        jack = tv.jackknife_se_of_delta_h1(terms, normalize)
        delta = tv.delta_method_se_of_delta_h_true(terms, upd, normalize)
        d1 = tv.delta_h1(terms["A"], terms["Bsum"], terms["C"], h, T, normalize)
        gt = tv.snis(terms["S"], upd["S"], h, upd["h"], T, normalize)
        print(f"| {normalize} | {d1.deltaH1_se:.5g} | {jack:.5g} "
              f"({jack / d1.deltaH1_se - 1:+.3%}) | {gt.deltaH_true_se:.5g} | "
              f"{delta:.5g} ({delta / gt.deltaH_true_se - 1:+.3%}) |")

    pool = (terms, upd, batch)
    big_terms, big_upd, index, exact_big = unwrap(tv.large_step)(policy, pool)
    print(f"\nlarge step: the <eos>-only step × {tv.LARGE_M}, {len(index)} batches of "
          f"B = {tv.B} resampled from the pool")
    print("| normalize | exact ΔH | pool corrected ± SE (z) | mean raw (z) | "
          "mean corrected (z) | mean bias estimate | SE / sd corrected | ESS/B |")
    print("|---|---|---|---|---|---|---|---|")
    for normalize in tv.NORMALIZATIONS:
        whole = tv.snis(big_terms["S"], big_upd["S"], big_terms["h"], big_upd["h"],
                        big_terms["T"], normalize)
        est = tv.resampled_estimates(big_terms, big_upd, index, normalize)
        truth, ex = whole.deltaH_true_raw, exact_big[normalize]
        print(f"| {normalize} | {ex:.5g} | {whole.deltaH_true:.5g} ± "
              f"{whole.deltaH_true_se:.2g} ({(whole.deltaH_true - ex) / whole.deltaH_true_se:+.2f})"
              f" | {float(est['raw'].mean()):.5g} ({tv.z_score(est['raw'], truth):+.2f}) | "
              f"{float(est['dt'].mean()):.5g} ({tv.z_score(est['dt'], truth):+.2f}) | "
              f"{float((est['raw'] - est['dt']).mean()):.3g} | "
              f"{float(est['dt_se'].mean() / est['dt'].std()):.3f} | "
              f"{float(est['ess'].mean()):.3f} |")

    dists = unwrap(tv.response_distributions)(policy)
    stat, dof, p = tv.chi_square_of_batch(batch, dists)
    print(f"\nχ² of the pool's {batch.size} responses: {stat:.1f} on {dof} dof, p = {p:.3f}")
    config = model.generation_config
    config.update(top_k=2, top_p=0.5, temperature=0.3, repetition_penalty=2.0, do_sample=True)
    with tv.preserved_state(model):
        fresh = tv._probe(model, tokenizer, 3200)._sample(1)
    config.update(top_k=50, top_p=1.0, temperature=1.0, repetition_penalty=1.0, do_sample=False)
    stat, dof, p = tv.chi_square_of_batch(fresh, dists)
    print(f"χ² with generation_config top_k=2, top_p=0.5, temperature=0.3, "
          f"repetition_penalty=2: {stat:.1f} on {dof} dof, p = {p:.3f}")

    gpt2, gtok = next(unwrap(tv.gpt2_policy)())
    with tv.preserved_state(gpt2):
        gbatch = tv._probe(gpt2, gtok, 3200)._sample(0)
        gterms = tv._probe(gpt2, gtok, 3200)._score_all(gbatch, None)
    with torch.no_grad():
        gH = float(tv.exact_entropy(gpt2, gtok, tv.PROMPTS, max_new_tokens=tv.MAX_NEW))
    h_orig = torch.stack([gterms["h"][i: i + tv.B].sum() / gterms["T"][i: i + tv.B].sum()
                          for i in range(0, gbatch.size, tv.B)])
    mean, se = tv.mean_and_se(h_orig)
    gd = [tv.exact_response_distribution(gpt2, gtok, p, max_new_tokens=tv.MAX_NEW)
          for p in tv.PROMPTS]
    stat, dof, p = tv.chi_square_of_batch(gbatch, gd)
    print(f"\nGPT-2 (absolute positions), 100 batches of 32: H(θ) {gH:.6g}, mean H_orig "
          f"{mean:.6g} ± {se:.2g} (z {(mean - gH) / se:+.2f}); χ² {stat:.1f} on {dof} dof, "
          f"p = {p:.3f}")

    probe = tv._probe(model, tokenizer, tv.B)
    results = [tv._probe_step(probe, model, grads, step_index=1000 + r) for r in range(100)]
    print("\nend to end, 100 probed steps of B = 32 (per token):")
    for field, target in (("deltaH1", exact["per_token"]["D"]),
                          ("deltaH_true", exact["per_token"]["dH"])):
        values = torch.tensor([getattr(r, field) for r in results], dtype=torch.float64)
        ses = torch.tensor([getattr(r, field + "_se") for r in results], dtype=torch.float64)
        mean, se = tv.mean_and_se(values)
        ratio = float(ses.mean() / values.std())
        print(f"  {field}: exact {target:.6g}, mean {mean:.6g} ± {se:.2g} "
              f"(z {(mean - target) / se:+.2f}), mean SE / sd {ratio:.3f}")

    lin_grads = tv._gradients(model, tv._stop_loss(model, tokenizer, pad_weight=0.0))
    lin_step = tv.adamw_step(model, lin_grads)
    ms = (0.25, 0.5, 1.0, 2.0, 4.0)
    exact_dh = [tv.exact_delta(model, tokenizer, tv.PROMPTS, {k: m * v for k, v in
                                                                lin_step.items()},
                               max_new_tokens=tv.MAX_NEW) for m in ms]
    d = tv.exact_directional_derivative(model, tokenizer, tv.PROMPTS, lin_step,
                                        max_new_tokens=tv.MAX_NEW)
    result = tv._probe_step(tv._probe(model, tokenizer, 256, eta_multipliers=ms), model,
                            lin_grads, step_index=2000)
    print("\nlinearity (the <eos>-only step, per token, B = 256):")
    print("| m | exact ΔH | exact ΔH / (m D) | ΔH_true | m δH₁ |")
    print("|---|---|---|---|---|")
    for m, dh, point in zip(ms, exact_dh, result.eta_sweep, strict=True):
        print(f"| {m} | {dh:.4g} | {dh / (m * d):.4f} | {point['deltaH_true']:.4g} | "
              f"{point['deltaH1_linear']:.4g} |")
    print(f"log-log slope: exact {tv.loglog_slope(ms, exact_dh):.4f}, "
          f"probe {result.diagnostics['eta_loglog_slope']:.4f}")
    print(f"\nWilson–Hilferty check: sf(149.449, 100 dof) = {tv.chi_square_sf(149.449, 100):.5f} "
          f"(exact 0.001); sf(124.342, 100) = {tv.chi_square_sf(124.342, 100):.4f} (exact 0.05)")


if __name__ == "__main__":
    main()
