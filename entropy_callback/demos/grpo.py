"""A toy RL task with a verifiable reward, and a GRPO-style LightningModule that trains on it.

The task: a prompt ``"a+b="`` with two digits; the answer is ``(a + b) mod 10`` as one digit
followed by EOS. The reward gives partial credit for stopping, for starting with a digit and
for the exact format, so a random tiny policy has a signal from the first step. What the tiny
policy does with the defaults (seeds 0-2, measured): over the first ~60 steps it learns the
format (mean reward 0.1 -> 0.5) while its entropy collapses from about 3.3 nats per token to
about 0.5, then creeps down to 0.2-0.4 by step 200. The digit collapses too, to a nearly
prompt-independent choice, so the correct-answer rate stays near chance (about 10%): entropy
collapse ending exploration, in miniature, which is what the entropy probe is built to measure.

The update is Dr-GRPO: group-centred advantages without std division, and a constant
normaliser (number of sequences times ``max_new_tokens``) instead of per-sequence lengths.

Example::

    model, tokenizer = build_policy(seed=0)
    module = GRPOModule(model, tokenizer, make_prompts(256, seed=0))
    lightning.Trainer(max_steps=200, accelerator="cpu").fit(module)
"""

from __future__ import annotations

import inspect
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import lightning
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedTokenizerBase

from entropy_callback.demos.tiny import EOS_TOKEN

_PROMPT = re.compile(r"^(\d)\+(\d)=$")
_DIGITS = "0123456789"

RewardFn = Callable[[str, str], float]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts ``"a+b="`` with digits a, b drawn uniformly (with replacement).

    Deterministic in ``seed``; uses its own ``random.Random`` and no global RNG.
    """
    rng = random.Random(seed)
    return [f"{rng.randrange(10)}+{rng.randrange(10)}=" for _ in range(n)]


def answer(prompt: str) -> str:
    """The correct response text of a task prompt: ``(a + b) mod 10`` as one digit."""
    match = _PROMPT.match(prompt)
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not of the form 'a+b=' with digits a, b")
    return str((int(match.group(1)) + int(match.group(2))) % 10)


def reward(prompt: str, response: str) -> float:
    """Verifiable reward in [0, 1] for one response to one task prompt.

    ``response`` is the decoded response text, ending with the ``EOS_TOKEN`` marker ("<eos>")
    when the response stopped at EOS (without it, the response was cut at ``max_new_tokens``).

    Partial credit, additive, so that an untrained policy gets a signal from the first step
    (about 1 response in 8 earns something) and every group is not flat:

    - 0.2 if the response stopped at EOS;
    - 0.2 if its first character is a digit;
    - 0.1 if it is exactly one digit followed by EOS (format complete: 0.5 in all);
    - 0.5 if, moreover, that digit is the correct answer.

    Examples: "7<eos>" for "3+4=" scores 1.0, "8<eos>" 0.5, "7x<eos>" 0.4, "<eos>" 0.2,
    "777777" (cut) 0.2, "abcdef" 0.0.
    """
    target = answer(prompt)
    terminated = response.endswith(EOS_TOKEN)
    text = response[: -len(EOS_TOKEN)] if terminated else response
    score = 0.2 if terminated else 0.0
    if text[:1] != "" and text[:1] in _DIGITS:
        score += 0.2
        if terminated and len(text) == 1:
            score += 0.1
            if text == target:
                score += 0.5
    return score


class PromptBatches(IterableDataset):
    """Batches (lists) of prompt strings: shuffled passes over the pool, from ``seed``.

    Yields ``num_batches`` batches, or forever when it is None. Every ``iter()`` restarts the
    same sequence, so a run's data order depends on ``seed`` only.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        batch_size: int,
        seed: int = 0,
        num_batches: int | None = None,
    ) -> None:
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; pass a positive integer")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.seed = seed
        self.num_batches = num_batches

    def __iter__(self) -> Iterator[list[str]]:
        rng = random.Random(self.seed)
        order: list[str] = []
        emitted = 0
        while self.num_batches is None or emitted < self.num_batches:
            batch = []
            while len(batch) < self.batch_size:
                if not order:
                    order = self.prompts.copy()
                    rng.shuffle(order)
                batch.append(order.pop())
            yield batch
            emitted += 1


def _as_list(batch: list[str]) -> list[str]:
    return list(batch)


def prompt_dataloader(
    prompts: Sequence[str],
    batch_size: int,
    seed: int = 0,
    num_batches: int | None = None,
) -> DataLoader:
    """A ``DataLoader`` over ``PromptBatches``: each item is a list of ``batch_size`` prompts."""
    dataset = PromptBatches(prompts, batch_size, seed=seed, num_batches=num_batches)
    return DataLoader(dataset, batch_size=None, num_workers=0, collate_fn=_as_list)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final: float = 0.1) -> float:
    """Learning-rate factor: linear warmup to 1 over ``warmup_steps``, then cosine to ``final``.

    Step 0 already has the factor ``1 / warmup_steps`` (never 0); after ``total_steps`` the
    factor stays at ``final``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def sample_responses(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one response per (left-padded) prompt from ``softmax(logits / temperature)``.

    Plain ancestral sampling with a KV cache and the global torch RNG (reproducible under
    ``lightning.seed_everything``); no top-k, top-p or penalties. A response stops at its
    first EOS (included) or at ``max_new_tokens``; the positions after the stop hold
    ``pad_token_id``.

    Args:
        model: a causal LM taking ``input_ids, attention_mask, position_ids`` and a KV cache
            (``cache``, or ``past_key_values`` before transformers 5).
        prompt_ids: [N, P] token ids, left-padded.
        prompt_mask: [N, P] attention mask (1 = token, 0 = padding).

    Returns:
        ``(response_ids, lengths)``: [N, T] ids with T <= max_new_tokens (T shrinks when every
        response stopped early), and [N] response lengths T_i (EOS counted).

    On a model sharded with FSDP2 (DTensor parameters), every rank must run the same number of
    forwards (each all-gathers the parameters): the loop then stops only once no rank has a
    response still running (one all-reduce per step), like ``generate(synced_gpus=True)``.
    """
    n = prompt_ids.shape[0]
    synced = _sharded(model)
    cache_name = _cache_keyword(model)
    mask = prompt_mask
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=prompt_ids, attention_mask=mask, position_ids=position_ids, use_cache=True
    )
    finished = torch.zeros(n, dtype=torch.bool, device=prompt_ids.device)
    lengths = torch.zeros(n, dtype=torch.long, device=prompt_ids.device)
    tokens = []
    for k in range(max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
        y = torch.multinomial(probs, 1).squeeze(-1)
        y = torch.where(finished, torch.full_like(y, pad_token_id), y)
        active = ~finished
        tokens.append(y)
        lengths += active.long()
        finished = finished | (active & (y == eos_token_id))
        if k == max_new_tokens - 1 or _all_stopped(finished, synced):
            break
        mask = torch.cat([mask, active.long()[:, None]], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        out = model(
            input_ids=y[:, None],
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_name: _returned_cache(out)},
        )
    return torch.stack(tokens, dim=1), lengths


def _sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 DTensors in an initialised process group."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and any(type(p).__name__ == "DTensor" for p in model.parameters()))


def _all_stopped(finished: torch.Tensor, synced: bool) -> bool:
    """Whether every response stopped: on this rank, or (``synced``) on every rank."""
    running = torch.tensor([0 if bool(finished.all()) else 1], device=finished.device)
    if synced:
        torch.distributed.all_reduce(running, op=torch.distributed.ReduceOp.MAX)
    return not running.item()


def _cache_keyword(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` where it has one (transformers 5
    deprecates ``past_key_values``), else ``past_key_values``. The demo is a user's training
    code: it reads the model, not the probe's internals."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "cache" if "cache" in inspect.signature(base.forward).parameters else (
            "past_key_values")
    except (TypeError, ValueError):
        return "past_key_values"


def _returned_cache(out):
    """The KV cache a forward returned, under either name."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def score_responses(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    lengths: torch.Tensor,
    temperature: float = 1.0,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs and entropies of the sampled responses.

    Args:
        prompt_ids, prompt_mask: [N, P] left-padded prompts.
        response_ids: [N, T] responses, padded after their stop.
        lengths: [N] response lengths; the response mask is ``k < lengths[i]``.

    Returns:
        ``(token_logp, token_entropy, response_mask)``, each [N, T]: log pi(y_k | x, y_<k)
        (with grad), the full next-token entropy H_k in nats (detached unless
        ``entropy_grad``, for an entropy bonus), and the float mask.
        Both are zero outside the mask. float32, or float64 for a float64 model.
    """
    t = response_ids.shape[1]
    response_mask = torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=-1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    input_ids = torch.cat([prompt_ids, response_ids], dim=-1)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).logits
    logits = logits[:, prompt_ids.shape[1] - 1 : -1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp = F.log_softmax(logits, dim=-1)
    maskf = response_mask.to(logp.dtype)
    token_logp = logp.gather(-1, response_ids[..., None]).squeeze(-1) * maskf
    with torch.set_grad_enabled(entropy_grad):
        token_entropy = -(logp.exp() * logp).sum(-1) * maskf
    return token_logp, token_entropy, maskf


class GRPOModule(lightning.LightningModule):
    """Dr-GRPO on a prompt pool with a verifiable reward.

    Each training step takes a batch of prompts, samples ``group_size`` responses per prompt
    from the current policy, and minimises

        loss = -sum_i A_i * sum_k log pi(y_ik) / (N * max_new_tokens) - c * H_bar,
        A_i = r_i - mean(r over i's group),

    where H_bar is the token-mean entropy of the step's responses and c = ``entropy_coef``
    (an entropy bonus; 0 by default, and an attribute a controller may change between steps).

    with N = sequences in the step. Logs ``train/reward``, ``train/entropy`` (mean per-token
    entropy of the sampled responses, nats), ``train/response_length`` and ``train/full_reward``
    (fraction of responses scoring 1.0).

    The policy and tokenizer are the attributes ``model`` and ``tokenizer`` (what the entropy
    probe callback reads by default). ``training_step`` also returns the step's ``rollouts``
    and the module has ``per_token_loss(rollouts)``: the protocol of the probe's attribution
    (docs/attribution.md).

    Args:
        model: the policy (e.g. a LoRA ``PeftModel``); only its trainable parameters are
            optimised.
        tokenizer: the policy's tokenizer (left padding, with pad and eos tokens).
        prompts: the training prompt pool (``train_dataloader`` draws from it).
        group_size: G, responses per prompt.
        prompts_per_step: prompts per training step (N = prompts_per_step * group_size).
        max_new_tokens: L, the longest response.
        lr, weight_decay: AdamW settings (peak learning rate). At 1e-3 the tiny policy's
            entropy collapse spans steps ~0-60; at 5e-4 ~0-100; at 3e-3 it is over by ~30.
        warmup_steps, total_steps: the linear-warmup-then-cosine schedule (decays to 10%).
        temperature: sampling temperature tau; the log-probs use the same tau.
        reward_fn: ``reward_fn(prompt, response) -> float``; ``response`` ends with "<eos>"
            when it stopped at EOS.
        seed: seed of the prompt order in ``train_dataloader``.
        entropy_coef: c, the entropy bonus's coefficient (0: none, the loss above without it).
        probe_prompts: held-out prompts for ``EntropyProbeCallback(every=20)``, which reads
            ``pl_module.probe_prompts`` when it is given no prompts; None = not set.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        *,
        group_size: int = 4,
        prompts_per_step: int = 8,
        max_new_tokens: int = 6,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        total_steps: int = 200,
        temperature: float = 1.0,
        reward_fn: RewardFn = reward,
        seed: int = 0,
        entropy_coef: float = 0.0,
        probe_prompts: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer needs pad_token and eos_token set")
        if group_size < 2:
            raise ValueError(f"group_size={group_size}; GRPO needs at least 2 per group")
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.group_size = group_size
        self.prompts_per_step = prompts_per_step
        self.max_new_tokens = max_new_tokens
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.temperature = temperature
        self.reward_fn = reward_fn
        self.seed = seed
        self.entropy_coef = entropy_coef
        self.probe_prompts = probe_prompts
        self.save_hyperparameters(ignore=["model", "tokenizer", "prompts", "reward_fn",
                                          "probe_prompts"])

    def train_dataloader(self) -> DataLoader:
        """Endless batches of ``prompts_per_step`` prompts from the pool, ordered by ``seed``."""
        return prompt_dataloader(self.prompts, self.prompts_per_step, seed=self.seed)

    def decode_response(self, ids: torch.Tensor, length: int) -> str:
        """Response text for ``reward_fn``: tokens before the stop, plus "<eos>" if it hit EOS."""
        ids = ids[:length].tolist()
        terminated = bool(ids) and ids[-1] == self.tokenizer.eos_token_id
        body = ids[:-1] if terminated else ids
        text = self.tokenizer.decode(body, skip_special_tokens=False)
        return text + EOS_TOKEN if terminated else text

    def training_step(self, batch: list[str], batch_idx: int) -> dict[str, torch.Tensor]:
        """One Dr-GRPO step on ``batch`` (a list of prompt strings).

        Returns ``loss``, ``rewards`` [N], ``advantages`` [N], ``entropy`` (the responses'
        token-mean entropy, nats, detached) and ``rollouts``: ``prompt_ids``,
        ``prompt_mask`` [N, P], ``response_ids``, ``response_mask``, ``token_logp`` (detached)
        [N, T], ``lengths`` and ``advantages`` [N], ``prompts`` (N strings).
        """
        prompts = [p for p in batch for _ in range(self.group_size)]
        enc = self.tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=False
        ).to(self.device)
        response_ids, lengths = sample_responses(
            self.model,
            enc["input_ids"],
            enc["attention_mask"],
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            temperature=self.temperature,
        )
        texts = [
            self.decode_response(ids, int(n)) for ids, n in zip(response_ids, lengths, strict=True)
        ]
        rewards = torch.tensor(
            [self.reward_fn(p, t) for p, t in zip(prompts, texts, strict=True)],
            dtype=torch.float32,
            device=self.device,
        )
        grouped = rewards.view(-1, self.group_size)
        advantages = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()

        token_logp, token_entropy, mask = score_responses(
            self.model,
            enc["input_ids"],
            enc["attention_mask"],
            response_ids,
            lengths,
            temperature=self.temperature,
            entropy_grad=self.entropy_coef != 0,
        )
        seq_logp = token_logp.sum(-1)
        loss = -(advantages * seq_logp).sum() / (len(prompts) * self.max_new_tokens)
        if self.entropy_coef != 0:
            loss = loss - self.entropy_coef * token_entropy.sum() / mask.sum()

        log = partial(self.log, on_step=True, on_epoch=False, batch_size=len(batch))
        log("train/reward", rewards.mean(), prog_bar=True)
        entropy = (token_entropy.sum() / mask.sum()).detach()
        log("train/entropy", entropy, prog_bar=True)
        log("train/response_length", lengths.float().mean())
        log("train/full_reward", (rewards >= 1.0).float().mean())
        rollouts = {
            "prompt_ids": enc["input_ids"],
            "prompt_mask": enc["attention_mask"],
            "response_ids": response_ids,
            "lengths": lengths,
            "response_mask": mask.detach(),
            "advantages": advantages,
            "token_logp": token_logp.detach(),
            "prompts": prompts,
        }
        return {"loss": loss, "rewards": rewards, "advantages": advantages, "rollouts": rollouts,
                "entropy": entropy}

    def per_token_loss(self, rollouts: dict) -> torch.Tensor:
        """The attribution protocol (docs/attribution.md): the per-token Dr-GRPO losses of a
        ``training_step``'s ``rollouts``, [N, T], recomputed at the current parameters, zero
        outside the response mask; their sum is the loss ``training_step`` returned
        (``-A_i log pi(y_ik) / (N * max_new_tokens)`` per token)."""
        token_logp, _, _ = score_responses(
            self.model,
            rollouts["prompt_ids"],
            rollouts["prompt_mask"],
            rollouts["response_ids"],
            rollouts["lengths"],
            temperature=self.temperature,
        )
        n = token_logp.shape[0]
        advantages = rollouts["advantages"].to(token_logp.dtype)
        return -advantages[:, None] * token_logp / (n * self.max_new_tokens)

    def configure_optimizers(self) -> dict:
        """AdamW over the trainable parameters, with a per-step warmup-cosine schedule."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        schedule = partial(
            warmup_cosine, warmup_steps=self.warmup_steps, total_steps=self.total_steps
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
