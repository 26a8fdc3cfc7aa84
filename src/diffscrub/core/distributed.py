"""Several processes (DDP through accelerate): one process per device, the same run as one process.

A run started by a launcher (``accelerate launch``, ``torchrun``; both set ``WORLD_SIZE``) trains with
data parallelism: ``--batch-size`` is the GLOBAL batch and each of the ``W`` ranks takes ``B / W`` samples.

* Every random draw of a training step goes through the :class:`~.context.ErasureContext`. All ranks
  hold the same generator state, so each draw is made at the global batch size on every rank and each
  rank keeps its own slice: the run consumes exactly the random stream of a single-process run, and
  every sample gets the same image, timestep, prompt and noises as there.
* The loss is a mean over the local batch; DDP averages gradients over ranks, which gives the
  gradient of the global mean. Clipping and the optimizer then see what one process would see.
* Phase 1 (textual inversion and, for methods whose state is all in ``state_dict``, ``prepare``) runs
  once, on the main process, and its results (conditioning pool, method state, latent caches,
  generator state) are broadcast. Methods with ``resumable_state = False`` run ``prepare`` on every
  rank instead, from the same generator state.
* Only the main process writes (checkpoints, the output folder); the others wait at a barrier.
* ``--fsdp`` shards the student instead of replicating it (FSDP2, ``fully_shard``): each block of the
  denoiser (the children of its top-level ``ModuleList`` s) and then the whole model. Weights, gradients
  and Adam state are split over the ranks; the forward and backward passes gather a block's weights
  when they reach it, and gradients are reduce-scattered as means, the same mean DDP takes. The teacher
  stays whole on every rank (frozen, and half precision under ``--mixed-precision``), which is why LoRA,
  whose frozen base is the teacher, is refused. Checkpoints and the output hold the full tensors,
  gathered by every rank and written by the main process.

Without a launcher nothing here is used: :func:`setup` returns :data:`SINGLE` and the trainer runs as
it always did.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch

from ..errors import ConfigError

#: how long ranks wait for each other (Phase 1 runs on the main process alone while the others wait).
TIMEOUT = datetime.timedelta(hours=3)


def launched() -> bool:
    """Whether this process is one of several started by a launcher."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


class Distributed:
    """This process's place in the run and the few collectives the trainer needs (no-ops alone)."""

    def __init__(self, accelerator=None, fsdp: bool = False):
        self.accelerator = accelerator
        self.fsdp = fsdp and accelerator is not None
        self._plain_class: type | None = None  # the student's class before fully_shard subclassed it
        if accelerator is None:
            self.rank, self.world, self.device = 0, 1, None
        else:
            self.rank, self.world, self.device = accelerator.process_index, accelerator.num_processes, accelerator.device

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast(self, obj: Any = None) -> Any:
        """The main process's ``obj`` on every rank (pickled; keep tensors on the CPU)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor, on this rank's device)."""
        if not self.enabled:
            return tensor
        out = tensor.detach().clone().to(self.device)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out

    def wrap(self, model: torch.nn.Module):
        """What the student's training forward should call: the DDP-wrapped model (gradients averaged over
        ranks), seen through :class:`DDPStudent` so that attribute look-ups still reach the model. Under
        ``--fsdp`` the model itself, sharded in place: its parameters are new (sharded) tensors, so an
        optimizer must be built over them afterwards."""
        if not self.enabled:
            return model
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            self._plain_class = type(model)
            for child in list(model.children()):
                if isinstance(child, torch.nn.ModuleList):  # the denoiser's blocks: one gather unit each
                    for block in child:
                        if any(True for _ in block.parameters()):
                            fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model
        return DDPStudent(self.accelerator.prepare_model(model), model)

    # Under --fsdp the three calls below are collectives: every rank must make them, in the same order.
    def trainable_tensors(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The full trainable tensors by name, on the CPU, for the main process (None elsewhere)."""
        if self.fsdp:
            full = self._full_state(model)
            if not self.is_main:
                return None
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            return {n: v for n, v in full.items() if n in names}
        if not self.is_main:
            return None
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}

    def optimizer_state(self, model: torch.nn.Module, optimizer) -> dict | None:
        """The optimizer's full state for the main process (None elsewhere); keyed by parameter name under
        --fsdp, by position otherwise (a checkpoint is only resumed with the same options)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            state = get_optimizer_state_dict(model, optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return state if self.is_main else None
        return optimizer.state_dict() if self.is_main else None

    def load_optimizer_state(self, model: torch.nn.Module, optimizer, state: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)

    def unsharded(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """A plain copy of a sharded student with its full weights (on the CPU) for the main process, None
        elsewhere; without --fsdp the model itself. Saving needs the plain class: diffusers writes the class
        name into the folder, and fully_shard subclassed it."""
        if not self.fsdp:
            return model
        full = self._full_state(model)
        if not self.is_main:
            return None
        with torch.device("meta"):
            plain = self._plain_class.from_config(model.config)
        plain.load_state_dict(full, assign=True)
        for name, buffer in model.named_buffers():  # non-persistent buffers are in no state dict
            owner, _, attr = name.rpartition(".")
            holder = plain.get_submodule(owner)
            if getattr(holder, attr).is_meta:
                holder._buffers[attr] = buffer.detach().cpu()
        return plain.train(model.training)

    @staticmethod
    def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


SINGLE = Distributed()


class DDPStudent:
    """Calls go through the DDP wrapper; attributes (submodules to hook, ``config``) come from the model.

    Adapters call ``model(...)`` and read ``model.config`` or hook ``model.mid_block``: with this proxy
    they need not know about DDP, and hooks land on the very modules DDP runs.
    """

    def __init__(self, wrapped: torch.nn.Module, module: torch.nn.Module):
        object.__setattr__(self, "_wrapped", wrapped)
        object.__setattr__(self, "_module", module)

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def setup(config) -> Distributed:
    """:data:`SINGLE` without a launcher; otherwise start accelerate (gloo on CPU, NCCL on GPUs).

    Raises :class:`ConfigError` when the global batch does not split evenly over the processes.
    """
    if not launched():
        if getattr(config, "fsdp", False):
            raise ConfigError("--fsdp shards the student over several processes, and this is one: launch with "
                              "torchrun or accelerate launch, or drop --fsdp")
        return SINGLE
    world = int(os.environ["WORLD_SIZE"])
    if config.batch_size % world:
        raise ConfigError(
            f"--batch-size {config.batch_size} is the global batch and must split evenly over the {world} "
            f"processes: pass a multiple of {world}"
        )
    want = config.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is visible: pass --device cpu")
    cpu = want == "cpu" or (want == "auto" and not torch.cuda.is_available())
    if not cpu and want not in ("auto", "cuda"):
        raise ConfigError(f"device={want!r} is not supported with several processes: use cuda, cpu or auto")
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    # Precision is diffscrub's own (--mixed-precision): accelerate must not add autocast or compile the model,
    # whatever its launch flags or config say.
    accelerator = Accelerator(cpu=cpu, mixed_precision="no", dynamo_backend="no",
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=TIMEOUT)])
    if accelerator.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise ConfigError(
            f"accelerate set up {accelerator.distributed_type.value}: diffscrub runs DDP, or its own sharding "
            "with --fsdp (no DeepSpeed or Megatron): launch without accelerate's FSDP/DeepSpeed options"
        )
    if accelerator.num_processes != world:
        raise ConfigError(f"WORLD_SIZE={world} but accelerate started {accelerator.num_processes} processes")
    return Distributed(accelerator, fsdp=bool(getattr(config, "fsdp", False)))


# --------------------------------------------------------------------------- Phase 1 results
def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, bool]]:
    return {k: (v.detach().cpu(), v.device.type != "cpu") for k, v in tensors.items()}


def phase1_payload(ctx, method=None, **extra) -> dict:
    """What the other ranks need from the main process's Phase 1 (tensors on the CPU): the conditioning pool,
    the RNG and batch-sampler states, the latent caches and (``method`` given) the method's state."""
    from .checkpoint import _flatten_cond

    payload = {
        "prompts": list(ctx.cond.prompts),
        "neutral": ctx.cond.neutral,
        "pool_size": ctx.cond.pool_size,
        "cond": {k: v.detach().cpu() for k, v in _flatten_cond(ctx.cond.kwargs).items()},
        "generator": ctx.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "samplers": [sampler.state_dict() if sampler is not None else None
                     for sampler in (ctx.forget_sampler, ctx.retain_sampler)],
        "forget": (ctx.forget.mean, ctx.forget.std),
        "retain": (ctx.retain.mean, ctx.retain.std) if ctx.retain is not None else None,
        "method": _on_cpu(method.state_dict()) if method is not None else None,
        "extra": extra,
    }
    return payload


def apply_phase1(payload: dict, ctx, method=None) -> dict:
    """Make this rank's context (and method) equal to the main process's; returns ``extra``."""
    from ..adapters.base import Conditioning
    from .checkpoint import _restore_cond

    ctx.cond = Conditioning(payload["prompts"], _restore_cond(ctx.cond.kwargs, payload["cond"]), payload["neutral"],
                            payload["pool_size"])
    ctx.generator.set_state(payload["generator"])
    torch.set_rng_state(payload["torch_rng"])
    for sampler, state in zip((ctx.forget_sampler, ctx.retain_sampler), payload["samplers"]):
        if sampler is not None and state is not None:
            sampler.load_state_dict(state)
    ctx.forget.mean, ctx.forget.std = payload["forget"]
    ctx.forget_sampler.n = len(ctx.forget)  # phase 1 may have added images (--name-samples)
    if payload["retain"] is not None:
        ctx.retain.mean, ctx.retain.std = payload["retain"]
    if method is not None and payload["method"] is not None:
        method.load_state_dict({k: v.to(ctx.device) if on_device else v for k, (v, on_device) in payload["method"].items()})
    return payload["extra"]
