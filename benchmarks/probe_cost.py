"""What one probe costs in time and memory, against an honest floor and against another checkout.

Time. The probe (``before_step`` + ``after_step``, its phases from ``result.timing``) is set
against the cheapest way to do each of its jobs on the same model and the same E batch:

- sampling: the faster of a KV-cache decode loop (last-position logits, float32 multinomial)
  and ``model.generate(do_sample=True, top_k=0)``, all rows at once;
- derivative: forward-mode AD through the model's body only (hidden states), the faster of
  ``torch.func.jvp`` and ``entropy_callback.forward_mode.jvp`` (dual tensors without torch's
  zero-tensor path for constant operands), and apart
  (``derivative_head``) the two head matmuls any implementation needs at the response positions:
  the logits W h and their tangent W dh, float32, 128 rows at a time;
- rescoring: one plain forward of the model (float32 logits, nothing else) per scoring pass.

Memory. The peak resident-set increment (``VmHWM`` reset through ``/proc/self/clear_refs``) of
one probe, and of one training step (forward + backward of the response log-probabilities) of the
same model on the same E sequences in microbatches of ``--microbatch-size``, each measured in a
fresh process after the model and the batch exist.

``--baseline DIR`` runs the same measurements with the package found in DIR (e.g. a worktree of
the commit before issue #11) in subprocesses interleaved with this checkout's, round by round;
figures are minima over rounds of medians over repeats (the machine is shared: only ratios
within one run count).

    python benchmarks/probe_cost.py --vocab 32000 --hidden 256 --layers 4 --max-new-tokens 32
    python benchmarks/probe_cost.py --vocab 150000 --hidden 128 --layers 2 --max-new-tokens 32 \\
        --memory --baseline /work/wt/base
    python benchmarks/probe_cost.py --attribution   # the probe with attribution=True vs without
    python benchmarks/probe_cost.py --derivative reverse --memory   # reverse vs forward pass
    python benchmarks/probe_cost.py --compile-head   # also with compile_head=True, same floor

``--derivative reverse`` measures the probe with ``derivative="reverse"`` and with
``derivative="forward"``, round by round (time and, with ``--memory``, peak memory each against
one training step); no floor, no baseline.

``--compile-head`` adds this checkout with ``compile_head=True`` ("compiled") to the runs,
its phases over the same floor; ``first_probe`` is the dropped warm-up probe (with the
one-off compile).

``--attribution`` hands the remaining options to ``attribution_cost.py`` (the demo's Dr-GRPO
module and character vocabulary: its per-token loss protocol is what attribution needs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIB = 1024


# ---------------------------------------------------------------------- measuring (worker)
def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * KIB
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> int:
    """Reset the peak RSS (VmHWM) to the current RSS; returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmRSS")


def _build(args):
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from entropy_callback import EntropyProbe, ProbeConfig
    from entropy_callback.demos.tiny import build_char_tokenizer
    from entropy_callback.testing import randomize_lora_b

    tok = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=max(args.vocab, len(tok)), hidden_size=args.hidden,
        intermediate_size=2 * args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    torch.nn.init.normal_(base.lm_head.weight, std=1.0 / math.sqrt(args.hidden))
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                             "up_proj", "down_proj"]))
    randomize_lora_b(model, std=0.05, seed=1)
    prompts = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    cfg = ProbeConfig(batch_size=args.batch_size, microbatch_size=args.microbatch_size,
                      max_new_tokens=args.max_new_tokens, log_level="minimal",
                      derivative=args.derivative, compile_head=args.compile_head)
    probe = EntropyProbe(model, tok, prompts, cfg)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-3)

    def make_grads():
        opt.zero_grad()
        enc = tok(prompts[:16], return_tensors="pt", padding=True)
        model(**enc, labels=enc["input_ids"]).loss.backward()

    return model, tok, probe, params, opt, make_grads


def _train_step(model, batch, microbatch_size):
    """Forward + backward of sum of response log-probs, microbatch by microbatch (no step)."""
    import torch

    for start in range(0, batch.size, microbatch_size):
        mb = batch.slice(start, min(start + microbatch_size, batch.size))
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                       position_ids=mb.position_ids).logits[:, mb.prompt_width - 1 : -1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, mb.response_ids.unsqueeze(-1))
        (logp.squeeze(-1) * mb.response_mask).sum().backward()
        del logits, logp


def _floor(model, tok, batch, params, args) -> dict[str, float]:
    """Seconds of the cheapest way to do each phase, on ``batch``."""
    import torch
    from torch.func import functional_call
    from torch.func import jvp as func_jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from entropy_callback.forward_mode import jvp as dual_jvp
    from entropy_callback.sampling import cache_keyword, returned_cache

    out = {}
    P, L = batch.prompt_width, batch.response_mask.shape[1]
    ids, mask = batch.input_ids[:, :P], batch.attention_mask[:, :P]
    with torch.no_grad():
        start = time.perf_counter()  # a KV-cache decode loop, last-position logits
        gen = torch.Generator().manual_seed(0)
        o = model(input_ids=ids, attention_mask=mask, position_ids=batch.position_ids[:, :P],
                  use_cache=True, logits_to_keep=1)
        past, m, pos = returned_cache(o), mask, batch.position_ids[:, P - 1]
        for k in range(L):
            tok_k = torch.multinomial(torch.softmax(o.logits[:, -1].float(), -1), 1, generator=gen)
            if k == L - 1:
                break
            m = torch.cat([m, torch.ones_like(tok_k)], 1)
            o = model(input_ids=tok_k, attention_mask=m, position_ids=pos[:, None] + k + 1,
                      use_cache=True, **{cache_keyword(model): past})
            past = returned_cache(o)
        loop = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                       max_new_tokens=L, min_new_tokens=L, pad_token_id=tok.pad_token_id)
        out["sampling"] = min(loop, time.perf_counter() - start)
    body = model.get_base_model().model
    theta = {n.removeprefix("base_model.model.model."): p.detach() for n, p in params.items()}
    tangents = {n: torch.randn_like(t) * 1e-3 for n, t in theta.items()}
    mbs = [batch.slice(s, min(s + args.microbatch_size, batch.size))
           for s in range(0, batch.size, args.microbatch_size)]
    weight = model.get_output_embeddings().weight.detach()
    out["derivative_head"] = 0.0
    jvp_seconds = {"torch.func": 0.0, "dual": 0.0}
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        for mb in mbs:
            kw = dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                      position_ids=mb.position_ids, use_cache=False)
            for name, jvp in (("torch.func", func_jvp), ("dual", dual_jvp)):
                start = time.perf_counter()
                h, dh = jvp(lambda p, kw=kw: functional_call(body, p, (), kw, strict=False)
                            .last_hidden_state, (theta,), (tangents,))
                jvp_seconds[name] += time.perf_counter() - start
            start = time.perf_counter()  # logits and their tangent at the response positions
            h, dh = h[:, P - 1 : -1].reshape(-1, h.shape[-1]), dh[:, P - 1 : -1].reshape(
                -1, h.shape[-1])
            for r in range(0, h.shape[0], 128):
                torch.nn.functional.linear(h[r : r + 128], weight)
                torch.nn.functional.linear(dh[r : r + 128], weight)
            out["derivative_head"] += time.perf_counter() - start
    out["derivative"] = min(jvp_seconds.values())
    start = time.perf_counter()
    with torch.no_grad():
        for mb in mbs:
            model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                  position_ids=mb.position_ids)
    out["rescoring"] = time.perf_counter() - start
    return out


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, tok, probe, params, opt, make_grads = _build(args)
    model.eval()
    if args.mode == "time":
        rows: dict[str, list[float]] = {}
        for rep in range(args.repeats + 1):  # the first repetition warms up and is dropped
            make_grads()
            start = time.perf_counter()
            probe.before_step(opt, step=rep)
            opt.step()
            result = probe.after_step()
            seconds = time.perf_counter() - start
            assert result.error is None, result.error
            if rep == 0:  # the warm-up probe (with compile_head: the one-off compile)
                rows["first_probe"] = [seconds]
            phases = {k: v for k, v in result.timing.items() if k != "total"}
            if args.floor:
                with torch.no_grad():
                    batch = probe._sample(rep)
                phases.update({f"floor.{k}": v for k, v in
                               _floor(model, tok, batch, params, args).items()})
            if rep > 0:
                for k, v in {"probe": seconds, **phases}.items():
                    rows.setdefault(k, []).append(v)
        return {k: statistics.median(v) for k, v in rows.items()}
    # memory: the model, its gradients and the E batch exist; then one probe or one train step
    make_grads()
    with torch.no_grad():
        batch = probe._sample(10_000)
    before = _reset_peak()
    if args.mode == "memory_probe":
        probe.before_step(opt, step=0)
        opt.step()
        result = probe.after_step()
        assert result.error is None, result.error
    else:
        model.train()
        _train_step(model, batch, args.microbatch_size)
    return {"peak_increment_mib": (_status("VmHWM") - before) / 2**20,
            "tokens": int(batch.lengths.sum())}


# ---------------------------------------------------------------------- orchestrating
def _run(args, mode: str, package: Path, floor: bool = False, derivative: str = "forward",
         compile_head: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, *args.passthrough,
           f"--derivative={derivative}"]
    if floor:
        cmd.append("--floor")
    if compile_head:
        cmd.append("--compile-head")
    env = dict(os.environ, PYTHONPATH=str(package), OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} in {package} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--attribution" in argv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import attribution_cost

        return attribution_cost.main([a for a in argv if a != "--attribution"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attribution", action="store_true",
                        help="time the probe with attribution=True against without instead")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--microbatch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="also measure peak memory")
    parser.add_argument("--no-time", action="store_true", help="skip the time measurements")
    parser.add_argument("--baseline", type=Path, help="a checkout to compare against")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--derivative", choices=("forward", "reverse"), default="forward",
                        help="reverse: compare the reverse derivative pass with the forward one")
    parser.add_argument("--compile-head", action="store_true",
                        help="also time this checkout with compile_head=True ('compiled'), "
                             "round by round, against the same floor")
    args = parser.parse_args(argv)
    if args.worker:
        args.mode = args.worker
        print(json.dumps(worker(args)))
        return {}
    args.passthrough = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in (
        "vocab", "hidden", "layers", "batch-size", "microbatch-size", "max-new-tokens",
        "repeats", "threads")]
    if args.derivative == "reverse":
        return _reverse_report(args)
    packages = {"this": ROOT, **({"compiled": ROOT} if args.compile_head else {}),
                **({"baseline": args.baseline} if args.baseline else {})}
    report: dict = {"setup": {k: getattr(args, k) for k in (
        "vocab", "hidden", "layers", "batch_size", "microbatch_size", "max_new_tokens",
        "repeats", "rounds", "threads")}}
    if not args.no_time:
        runs: dict[str, list[dict]] = {name: [] for name in packages}
        for _ in range(args.rounds):  # interleaved: this, baseline, this, baseline, ...
            for name, package in packages.items():
                runs[name].append(_run(args, "time", package, floor=name == "this",
                                       compile_head=name == "compiled"))
        best = {name: {k: min(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
        this = best["this"]
        floor = {k.removeprefix("floor."): v for k, v in this.items() if k.startswith("floor.")}
        floor["total"] = sum(floor.values())  # derivative_head included
        report["seconds"] = {name: {k: round(v, 3) for k, v in b.items()
                                    if not k.startswith("floor.")} for name, b in best.items()}
        report["floor_seconds"] = {k: round(v, 3) for k, v in floor.items()}
        phase_floor = {"sampling": floor["sampling"], "rescoring": floor["rescoring"],
                       "derivative": floor["derivative"] + floor["derivative_head"]}
        report["phase_over_floor"] = {name: {k: round(b[k] / v, 3) for k, v in phase_floor.items()}
                                      for name, b in best.items()}
        report["probe_over_floor"] = round(this["probe"] / floor["total"], 3)
        if "compiled" in best:
            report["compiled_probe_over_floor"] = round(
                best["compiled"]["probe"] / floor["total"], 3)
        report["probe_over_floor_without_head_matmuls"] = round(
            this["probe"] / (floor["total"] - floor["derivative_head"]), 3)
        if "baseline" in best:
            report["speedup_over_baseline"] = round(best["baseline"]["probe"] / this["probe"], 3)
    if args.memory:
        mem = {"train_step": _run(args, "memory_train", ROOT)}
        for name, package in packages.items():
            mem[f"probe_{name}"] = _run(args, "memory_probe", package,
                                        compile_head=name == "compiled")
        report["peak_increment_mib"] = {k: round(v["peak_increment_mib"], 1)
                                        for k, v in mem.items()}
        report["probe_over_train_step"] = round(
            mem["probe_this"]["peak_increment_mib"] / mem["train_step"]["peak_increment_mib"], 3)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


def _reverse_report(args) -> dict:
    """The probe with the reverse derivative pass against the forward one (and a train step)."""
    report: dict = {"setup": {k: getattr(args, k) for k in (
        "vocab", "hidden", "layers", "batch_size", "microbatch_size", "max_new_tokens",
        "repeats", "rounds", "threads")}}
    kinds = ("forward", "reverse")
    if not args.no_time:
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for kind in kinds:
                runs[kind].append(_run(args, "time", ROOT, derivative=kind))
        best = {k: {p: min(r[p] for r in rs) for p in rs[0]} for k, rs in runs.items()}
        report["seconds"] = {k: {p: round(v, 3) for p, v in b.items()} for k, b in best.items()}
        report["reverse_over_forward"] = {p: round(best["reverse"][p] / best["forward"][p], 3)
                                          for p in ("probe", "derivative")}
    if args.memory:
        mem = {"train_step": _run(args, "memory_train", ROOT)}
        for kind in kinds:
            mem[f"probe_{kind}"] = _run(args, "memory_probe", ROOT, derivative=kind)
        report["peak_increment_mib"] = {k: round(v["peak_increment_mib"], 1)
                                        for k, v in mem.items()}
        train = mem["train_step"]["peak_increment_mib"]
        report["over_train_step"] = {k: round(mem[f"probe_{k}"]["peak_increment_mib"] / train, 3)
                                     for k in kinds}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()
