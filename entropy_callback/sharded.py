"""Probing a model sharded with FSDP2 (``fully_shard``: its parameters are DTensors).

FSDP2 all-gathers a block's parameters inside every forward of that block, so every rank must
run the same forwards in the same order, and a rank that fails must not leave the others inside
an all-gather. Five pieces make the engine's passes work on such a model:

- ``Lockstep``: every forward (a decode step, a microbatch) and every collective is preceded by
  one check, a MAX all-reduce of (failed, running) reached by every rank; each phase ends with
  one too. A rank whose phase fails announces it at its phase's end check, which meets the
  other ranks' next check: they raise ``OtherRankFailed`` there, before their next forward, and
  every rank skips the rest of the probe. The decode loop uses the same check to run until no
  rank has a row still running.
- ``at_shards``: the passes at theta and theta + m Delta theta write those values into the live
  DTensors' local shards (no ``functional_call``: DTensor substitution has no sharding rule),
  run, and write theta' back bitwise, resharding every FSDP module before and after (the root
  keeps its parameters unsharded after a forward, which would otherwise hold stale values).
- ``TangentInjector``: forward-mode AD without substituted parameters: a forward hook on each
  module owning a probed parameter (FSDP has unsharded it by then) adds a dual zero whose
  tangent is the module's own derivative along Delta theta, its input held fixed. The chain
  rule through the rest of the model is forward-mode AD's own.
- ``unshard_outer``: the passes run the body once and the LM head per chunk of positions, as
  unsharded (``scoring.Scorer``); the root's parameters, which FSDP unshards only in the root's
  own forward, are unsharded before each body call.
- local / full tensors: theta, the Adam state and the consumed gradients are read as each rank's
  local shards (the Adam replay is elementwise); Delta theta is all-gathered (LoRA-sized) for
  the tangent and the update check.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from .injection import Injector, _attribute
from .scoring import sequence_terms


class OtherRankFailed(RuntimeError):
    """Another rank announced a failure at this check: this rank skips the probe."""


def is_sharded(params: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> bool:
    """Whether the probed parameters are DTensors (FSDP2's ``fully_shard``), or ``model`` has
    DTensor parameters elsewhere: LoRA added after transformers sharded the base model at load
    (``from_pretrained(distributed_config=...)``) stays replicated, but every forward still
    all-gathers the base weights, so the passes must run in lockstep all the same."""
    if not torch.distributed.is_available():  # a build without distributed has no DTensor
        return False
    from torch.distributed.tensor import DTensor

    others = model.parameters() if model is not None else ()
    return any(isinstance(p, DTensor) for p in (*params.values(), *others))


FSDP1_REFUSAL = (
    "EntropyProbe cannot probe a model wrapped with FSDP1 (FullyShardedDataParallel: its "
    "parameters are flattened into per-rank buffers whose slices the probe cannot map back to "
    "the LoRA tensors). Shard the model with FSDP2 instead (torch.distributed.fsdp.fully_shard), "
    "which the probe supports (docs/distributed.md), or probe a DDP or single-process run."
)


def refuse_fsdp1(model: nn.Module) -> None:
    """ProbeConfigError for a model wrapped with FSDP1, naming FSDP2 as the supported way."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    from .config import ProbeConfigError

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ProbeConfigError(FSDP1_REFUSAL)


def check_sharded_model(model: nn.Module) -> None:
    """ProbeConfigError for a sharded model the probe cannot run: a torch without FSDP2's
    public API (``torch.distributed.fsdp.FSDPModule``, torch >= 2.6), or a DTensor parameter
    that no FSDP2 unit inside ``model`` manages (the policy sharded as part of a larger unit,
    e.g. a value-head wrapper: the probe calls the policy's own forward, which would not
    unshard that unit's parameters). A parameter is managed by the nearest FSDP2 module above
    it (``fully_shard`` takes every parameter not in a nested unit)."""
    from .config import ProbeConfigError

    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:
        raise ProbeConfigError(
            f"model: its parameters are sharded (DTensors), but this torch ({torch.__version__}) "
            "has no torch.distributed.fsdp.FSDPModule; probing an FSDP2 model needs torch >= "
            "2.6. Upgrade torch, or probe a DDP or single-process run.") from None
    units = {name for name, m in model.named_modules() if isinstance(m, FSDPModule)}
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            continue
        parts = name.split(".")[:-1]
        owners = {".".join(parts[:i]) for i in range(len(parts) + 1)}
        if not owners & units:
            raise ProbeConfigError(
                f"model: its parameter {name!r} is sharded by an FSDP2 unit outside the model "
                "given to the probe (fully_shard was applied to a module that contains the "
                "policy), so the policy's own forward would not unshard it. Apply fully_shard "
                "to the policy itself too (after its blocks, before any wrapper around it).")


def forward_injectable(model: nn.Module, params: Mapping[str, torch.Tensor]) -> bool:
    """Whether the sharded forward-mode pass can inject every probed parameter's tangent: each
    sits in a plain ``nn.Linear`` or ``nn.Embedding`` (LoRA's layers; ``TangentInjector``).
    Full fine-tuning (norms, other layers trained) needs the reverse pass."""
    for name in params:
        owner = model.get_submodule(name.rpartition(".")[0])
        if type(owner) not in (nn.Linear, nn.Embedding) or getattr(owner, "max_norm", None):
            return False
    return True


def check_sharded_config(config) -> tuple[int, int]:
    """ProbeConfigError for what a sharded model does not support; else the default process
    group's (rank, world size), for ``EntropyProbe.set_distributed``."""
    import torch.distributed as dist

    from .config import ProbeConfigError

    if config.attribution:
        raise ProbeConfigError(
            "attribution=True is not supported on a model sharded with FSDP2 (its passes "
            "substitute copies of the parameters with functional_call, which DTensor "
            "parameters do not allow); set attribution=False.")
    if not dist.is_initialized():
        raise ProbeConfigError(
            "model: its parameters are DTensors (FSDP2) but torch.distributed is not "
            "initialised; build the probe after init_process_group and fully_shard.")
    return dist.get_rank(), dist.get_world_size()


def agree_max(value: float) -> float:
    """The largest of every rank's ``value`` (one MAX all-reduce over the default group): a
    decision each rank makes on its own rows (the body/head split check) that all must share,
    since the two paths run different forwards."""
    import torch.distributed as dist

    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    out = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return float(out.item())


class Lockstep:
    """The check every rank reaches before each forward and collective, and at each phase's end
    (module docstring). One per probe; once a failure is known to all ranks, the probe's
    remaining phases are skipped on every rank and no further check is made."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self._dist = dist
        self._device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def check(self, failed: bool = False, running: bool = False) -> bool:
        """Whether any rank is still running (decode loops); raises ``OtherRankFailed`` when
        another rank failed and this one did not."""
        flags = torch.tensor([int(failed), int(running)], dtype=torch.int32, device=self._device)
        self._dist.all_reduce(flags, op=self._dist.ReduceOp.MAX)
        if flags[0].item() and not failed:
            raise OtherRankFailed("the probe failed on another rank; all ranks skip it")
        return bool(flags[1].item())

    def sum(self, values: list[float]) -> list[float]:
        """One check, then ``values`` summed over the ranks (a float64 all-reduce)."""
        self.check()
        total = torch.tensor(values, dtype=torch.float64, device=self._device)
        self._dist.all_reduce(total)
        return total.tolist()

    def end_phase(self, failed: bool) -> bool:
        """A phase's closing check; True when another rank failed (this one did not)."""
        try:
            self.check(failed=failed)
        except OtherRankFailed:
            return True
        return False


def reshard_all(model: nn.Module) -> None:
    """Reshard every FSDP2 module (a no-op where already sharded)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local(x):
    """A DTensor's local shard (other values unchanged)."""
    from torch.distributed.tensor import DTensor

    return x.to_local() if isinstance(x, DTensor) else x


def local_copies(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of each parameter's local shard."""
    return {n: local(p).detach().clone() for n, p in params.items()}


def local_state(state: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, object]]:
    """``update.optimizer_state`` copies with every DTensor read as its local shard."""
    return {n: {k: local(v) for k, v in s.items()} for n, s in state.items()}


def full_tensors(params: Mapping[str, torch.Tensor],
                 shards: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full tensors whose local shards are ``shards``, laid out as ``params`` (all-gathers:
    every rank must call it, after a ``Lockstep.check``); a replicated (plain) parameter's
    shard is already its full tensor."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in params.items():
        if not isinstance(p, DTensor):
            out[n] = shards[n]
            continue
        d = DTensor.from_local(shards[n], p.device_mesh, p.placements, shape=p.shape,
                               stride=p.stride())
        out[n] = d.full_tensor()
    return out


@contextmanager
def at_shards(model: nn.Module, params: Mapping[str, torch.Tensor],
              shards: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """The live parameters hold ``shards`` (local values, any float dtype) inside; their own
    local values are written back bitwise on exit, and every FSDP module is resharded before and
    after (so no unsharded copy outlives either value)."""
    live = {n: local(p) for n, p in params.items()}
    kept = {n: t.clone() for n, t in live.items()}
    reshard_all(model)
    try:
        with torch.no_grad():
            for n, t in live.items():
                t.copy_(shards[n])
        yield
    finally:
        try:
            reshard_all(model)
        finally:  # theta' goes back even when resharding raised
            with torch.no_grad():
                for n, t in live.items():
                    t.copy_(kept[n])


class TangentInjector(Injector):
    """Forward hooks turning the output of every module that owns a probed parameter into
    ``out + make_dual(0, D_u out)``: inside ``forward_ad.dual_level`` the model's outputs then
    carry their derivative along u, with no parameter substituted. D_u out is the module's own
    derivative, its input's primal held fixed (its input's tangent flows through the module by
    forward-mode AD). Linear and embedding layers only (LoRA's), since a nested dual level for
    other modules is not possible."""

    def _hook(self, module, args, kwargs, output):
        if not torch.is_tensor(output):
            raise RuntimeError(
                f"the sharded forward-mode pass needs the output of {type(module).__name__} (it "
                f"owns probed parameters) as a tensor, got {type(output).__name__}.")
        u = {local_name: self.tangents[full].to(_attribute(module, local_name).dtype)
             for local_name, full in self.owners[module]}
        x = fwAD.unpack_dual(args[0]).primal if args and torch.is_tensor(args[0]) else None
        if type(module) is nn.Linear and x is not None:
            d = (F.linear(x, u["weight"], u.get("bias")) if "weight" in u
                 else u["bias"].expand(*x.shape[:-1], module.out_features))
        elif type(module) is nn.Embedding and set(u) == {"weight"} and module.max_norm is None:
            d = F.embedding(x, u["weight"])
        else:
            raise RuntimeError(
                f"probed parameters of a sharded model must sit in Linear or Embedding layers "
                f"(LoRA's); {type(module).__name__} owns some.")
        return output + fwAD.make_dual(torch.zeros_like(output), d.to(output.dtype))


@contextmanager
def forward_records_kept(model: nn.Module) -> Iterator[None]:
    """FSDP2 records every forward of a block, with or without grad (its post-forward order,
    which the next backward reads to prefetch and clears); the probe's forwards are not the
    training step's, so the records are put back as they were when the block is left."""
    from torch.distributed.fsdp import FSDPModule

    states = {id(s): s for s in (m._get_fsdp_state() for m in model.modules()
                                 if isinstance(m, FSDPModule))}.values()
    orders = {id(s._comm_ctx): s._comm_ctx.post_forward_order for s in states}
    groups = [g for s in states for g in s._fsdp_param_groups]
    kept = ({k: list(v) for k, v in orders.items()}, [list(g._post_forward_indices)
                                                      for g in groups])
    try:
        yield
    finally:
        for k, order in orders.items():
            order[:] = kept[0][k]
        for g, indices in zip(groups, kept[1], strict=True):
            g._post_forward_indices[:] = indices


@contextmanager
def sharded_phase(runner, lockstep: Lockstep | None, model: nn.Module, name: str):
    """``runner.phase(name)`` (``observer.PhaseRunner``); with a ``lockstep`` (a sharded model)
    FSDP's forward records are kept (``forward_records_kept``), every FSDP module is then
    resharded and the phase's closing check made: a failure on another rank becomes this
    rank's, phase "distributed"."""
    other = False
    with runner.phase(name), (forward_records_kept(model) if lockstep is not None
                              else nullcontext()):
        try:
            yield
        except OtherRankFailed:
            other = True
        finally:
            if lockstep is not None:
                reshard_all(model)
    if lockstep is not None and not other:
        other = lockstep.end_phase(runner.failed)
    if other:
        with runner.phase("distributed"):
            raise RuntimeError("the probe failed on another rank; all ranks skip it")


def unshard_outer(model: nn.Module, body: nn.Module, head: nn.Module) -> None:
    """Before the body is called directly (``scoring.Scorer``'s split path): every FSDP2 module
    around ``body`` or ``head`` (the root, whose unit holds the embedding, the final norm and
    the LM head) is unsharded, as its own pre-forward would do, since its forward is skipped.
    The outermost is lazily initialised first when no forward has run yet (else the first
    decoder layer called would make itself the root). ``unshard`` is a no-op where already
    unsharded and one all-gather otherwise, the same on every rank; the modules stay unsharded,
    as the root does after its forward, until the phase reshards every module (``at_shards``,
    ``sharded_phase``). The modules inside (the decoder layers) run their own hooks.

    Raises (the scorer then falls back to the full forward, ``Scorer.check_split``) when the
    head is in an FSDP unit of its own, or a grouped unit holds part of the body or head
    (transformers' FSDP plan: ``fully_shard([norm, lm_head])``): FSDP's hooks there would run
    once per chunk and leave its per-forward state half done outside a backward."""
    from torch.distributed.fsdp import FSDPModule

    inside = {id(m) for part in (body, head) for m in part.modules()}
    for module in model.modules():
        if isinstance(module, FSDPModule) and (
                any(module is m for m in head.modules())
                or (len(units := module._get_fsdp_state()._modules) > 1
                    and any(id(m) in inside for m in units))):
            raise RuntimeError(
                f"{type(module).__name__} is an FSDP2 unit of the LM head or a grouped unit "
                "around the body or head: the probe cannot run the head per chunk outside "
                "the model's forward")
    outer = [m for m in model.modules() if isinstance(m, FSDPModule) and any(
        m is not part and any(x is part for x in m.modules()) for part in (body, head))]
    for module in outer:  # outermost first (pre-order): the others are then initialised
        module._get_fsdp_state()._lazy_init()
        module.unshard()


def sharded_forward(scorer, params: Mapping[str, torch.Tensor], microbatches,
                    theta: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor]):
    """The forward-mode derivative pass on a sharded model, per microbatch (l, H, terms) as
    ``scoring.sequence_terms`` gives them: the live local shards hold ``theta`` (this rank's)
    while the tangent along the full ``direction`` enters through ``TangentInjector``, whose
    hooks are off during the split's one-time check (its forwards carry no tangent)."""
    with at_shards(scorer.model, params, theta):
        hooks = TangentInjector(scorer.model, params, direction)
        for mb in microbatches:
            scorer.check_split(mb)
            with hooks:
                logp, ent, dlogp, dent = scorer.score_with_injected_tangent(mb, direction)
            mask = mb.response_mask.to(logp.device)
            yield logp, ent, sequence_terms(logp, ent, mask, dlogp, dent)
