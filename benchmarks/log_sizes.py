"""Bytes per probe at each log level, measured on the demo configuration.

A short real Lightning run of the demo (``configs/demo.yaml``: the tiny character Llama + LoRA,
Dr-GRPO, probe with B_E = 256, max_new_tokens = 6, eta multipliers 0.5/1/2) probes steps
0, every, 2*every, ...; each probe's ``ProbeResult`` is then written by ``JsonLogWriter`` at every
level (minimal, standard, detailed, debug), plain and gzipped, and the files are measured.
Reported per level: the step record ``step_<t>.json[.gz]`` (mean and max over the probes), next
to the sizes seed 000 states. Every probe also writes ``step_<t>_summary.json`` and one
``probes.jsonl`` line, whatever the level (reported once below the table).

    python benchmarks/log_sizes.py                       # 21 steps, probes at 0, 10, 20
    python benchmarks/log_sizes.py --steps 1 --every 1   # one probe, fastest
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml

from entropy_callback import EntropyProbeCallback, ProbeConfig
from entropy_callback.config import LOG_LEVELS
from entropy_callback.demos import GRPOModule, build_policy, make_prompts
from entropy_callback.jsonlog import JSONL_NAME, JsonLogWriter, step_filename, summary_filename

ROOT = Path(__file__).resolve().parents[1]
SEED_000 = {"minimal": "~1 KB", "standard": "5-10 KB", "detailed": "50-500 KB",
            "debug": "1-10 MB"}


class _Collecting(EntropyProbeCallback):
    """The demo's callback, keeping every ProbeResult it emits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.results = []

    def _emit(self, trainer, result):
        super()._emit(trainer, result)
        self.results.append(result)


def run_demo(config_path: Path, steps: int, every: int, workdir: Path):
    """A real Lightning run of the demo module; returns the probes' results and the config."""
    cfg = yaml.safe_load(config_path.read_text())
    train = dict(cfg["training"])
    clip = train.pop("gradient_clip_val", None)
    seed = cfg["seed"]
    probe_cfg = ProbeConfig.from_dict({**cfg["probe"], "log_level": "debug"})
    L.seed_everything(seed, verbose=False)
    model, tokenizer = build_policy(seed=seed)
    module = GRPOModule(model, tokenizer, make_prompts(4096, seed=seed), total_steps=cfg["steps"],
                        seed=seed, **train)
    callback = _Collecting(make_prompts(100, seed=seed + 1), every=every, config=probe_cfg,
                           log_dir=str(workdir / "run"))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                        callbacks=[callback], gradient_clip_val=clip, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module)
    return callback.results, probe_cfg, every


def measure(results, probe_cfg: ProbeConfig, every: int, workdir: Path) -> dict:
    """Write every result at every level, plain and gzip; the sizes in bytes."""
    sizes: dict = {"record": {}, "summary": [], "jsonl_line": []}
    for level in LOG_LEVELS:
        for compress in (False, True):
            cfg = ProbeConfig(**{**probe_cfg.to_dict(), "log_level": level,
                                 "compress": compress})
            root = workdir / f"{level}_{'gz' if compress else 'plain'}"
            writer = JsonLogWriter(root, cfg)
            found = []
            for result in results:
                writer.write(result, {"global_step": result.step, "every": every, "epoch": 0})
                found.append((root / step_filename(result.step, compress)).stat().st_size)
                if level == "standard" and not compress:
                    sizes["summary"].append((root / summary_filename(result.step)).stat().st_size)
            sizes["record"][(level, compress)] = found
            if level == "standard" and not compress:
                lines = (root / JSONL_NAME).read_bytes().splitlines(keepends=True)
                sizes["jsonl_line"] = [len(line) for line in lines]
    return sizes


def _kb(n: float) -> str:
    return f"{n / 1000:.1f} KB" if n < 1e6 else f"{n / 1e6:.2f} MB"


def report(results, sizes: dict, probe_cfg: ProbeConfig) -> None:
    lengths = [r.T_E / max(r.B_E, 1) for r in results]
    print(f"demo probes at steps {[r.step for r in results]}: B_E = {probe_cfg.batch_size}, "
          f"max_new_tokens = {probe_cfg.max_new_tokens}, mean response length "
          f"{min(lengths):.2f}-{max(lengths):.2f} tokens, "
          f"{len(probe_cfg.multipliers)} eta multipliers")
    print()
    print("| level | plain (mean / max) | gzip (mean / max) | seed 000 states |")
    print("|---|---|---|---|")
    for level in LOG_LEVELS:
        cells = []
        for compress in (False, True):
            found = sizes["record"][(level, compress)]
            cells.append(f"{_kb(statistics.mean(found))} / {_kb(max(found))}")
        print(f"| {level} | {cells[0]} | {cells[1]} | {SEED_000[level]} |")
    print()
    print(f"every level also writes per probe: step_<t>_summary.json "
          f"{_kb(statistics.mean(sizes['summary']))}, one probes.jsonl line "
          f"{_kb(statistics.mean(sizes['jsonl_line']))}")
    raw = json.dumps({"bytes": {f"{lv}{'.gz' if gz else ''}": v
                                for (lv, gz), v in sizes["record"].items()}})
    print(f"raw: {raw}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=21, help="optimizer steps of the demo run")
    parser.add_argument("--every", type=int, default=10, help="probe every N steps")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="log_sizes_") as tmp:
        workdir = Path(tmp)
        results, probe_cfg, every = run_demo(Path(args.config), args.steps, args.every, workdir)
        bad = [r.step for r in results if r.error is not None]
        if not results or bad:
            raise SystemExit(f"the demo run produced no clean probe (errors at steps {bad})")
        sizes = measure(results, probe_cfg, every, workdir / "levels")
        report(results, sizes, probe_cfg)


if __name__ == "__main__":
    main()
