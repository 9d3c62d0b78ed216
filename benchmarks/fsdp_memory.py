"""Peak memory per rank of the probe's passes on an FSDP2-sharded model (2 gloo ranks on CPU).

A Llama built from a config (float32, SDPA attention, random weights, LoRA r = 8 on every
projection, ``--vocab`` tokens), sharded per decoder layer and at the root, and a synthetic E
batch of ``--batch-size`` responses of exactly ``--length`` tokens (random ids, no stop, a
4-token prompt; each rank scores its half). Per pass, each rank resets its resident-set
high-water mark (``VmHWM``, through ``/proc/self/clear_refs``) and reports the peak minus the
resident set before: the rescoring pass (``EntropyProbe._score_all``), the forward-mode
derivative pass and the reverse derivative pass (``EntropyProbe._derivative_pass``), in
microbatches of ``--microbatch-size``. ``MALLOC_MMAP_THRESHOLD_`` (``--mmap-threshold``) makes
every large allocation its own mapping, returned when freed, so the peak is close to the peak of
live tensors. The model's logits of a microbatch, [microbatch, prompt + length, vocab] float32,
are printed for scale. Which code runs is whatever ``entropy_callback`` PYTHONPATH finds:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/fsdp_memory.py --vocab 128000 --length 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_derivative import _free_port  # noqa: E402
from probe_cost import _reset_peak, _status  # noqa: E402

PROMPT = 4
MIB = 2**20


def _build(args: dict):
    import peft
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from entropy_callback import EntropyProbe
    from entropy_callback.demos.tiny import build_char_tokenizer
    from entropy_callback.sampling import EBatch
    from entropy_callback.testing import randomize_lora_b

    tok = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=args["vocab"], hidden_size=args["hidden"],
        intermediate_size=4 * args["hidden"], num_hidden_layers=args["layers"],
        num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=PROMPT + args["length"], pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    torch.nn.init.normal_(base.lm_head.weight, std=1.0 / math.sqrt(args["hidden"]))
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                             "up_proj", "down_proj"]))
    randomize_lora_b(model, std=0.05, seed=1)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    probe = EntropyProbe(model, tok, ["1+2="], batch_size=args["batch_size"],
                         microbatch_size=args["microbatch_size"], max_new_tokens=args["length"],
                         log_level="minimal")
    b, width = args["batch_size"] // 2, PROMPT + args["length"]
    ids = torch.randint(3, args["vocab"], (b, width), generator=torch.Generator().manual_seed(0))
    batch = EBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                   position_ids=torch.arange(width).expand(b, width).clone(),
                   response_mask=torch.ones(b, args["length"], dtype=torch.bool),
                   lengths=torch.full((b,), args["length"]),
                   prompt_index=torch.zeros(b, dtype=int),
                   prompt_lengths=torch.full((b,), PROMPT), stopped=torch.zeros(b, dtype=bool),
                   prompt_width=PROMPT)
    return model, probe, batch


def _worker(rank: int, port: int, args: dict, out: str) -> None:
    from entropy_callback.sharded import Lockstep, local_copies, reshard_all

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, probe, batch = _build(args)
        model.eval()
        gen = torch.Generator().manual_seed(1)
        direction = {n: 1e-3 * torch.randn(p.shape, generator=gen)
                     for n, p in probe.params.items()}
        probe._lockstep = Lockstep(probe.device)
        probe._score_all(batch.slice(0, 1), None)  # warm-up: FSDP's lazy init, the split check
        reshard_all(model)
        peaks = {}
        for name in ("rescoring", "forward", "reverse"):
            before = _reset_peak()
            if name == "rescoring":
                probe._score_all(batch, None)
            else:
                pending = types.SimpleNamespace(batch=batch, tokens=[])
                probe._derivative_pass(pending, local_copies(probe.params), direction, name, {})
            reshard_all(model)
            peaks[name] = round((_status("VmHWM") - before) / MIB, 1)
        Path(out, f"rank{rank}.json").write_text(json.dumps(peaks))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=256, help="response tokens")
    parser.add_argument("--vocab", type=int, default=128000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="E rows, both ranks")
    parser.add_argument("--microbatch-size", type=int, default=4)
    parser.add_argument("--mmap-threshold", type=int, default=131072,
                        help="MALLOC_MMAP_THRESHOLD_ for the ranks (bytes)")
    args = vars(parser.parse_args(argv))
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args["mmap_threshold"])  # the spawned ranks'
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(_free_port(), args, out), nprocs=2,
                           start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    logits = args["microbatch_size"] * (PROMPT + args["length"]) * args["vocab"] * 4 / MIB
    report = {"setup": args, "microbatch_logits_float32_mib": round(logits, 1),
              "peak_increment_mib": {k: max(r[k] for r in ranks) for k in ranks[0]}}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
