"""The erase run: checks, loading, Phase 1 (method.prepare), Phase 2 (the shared loop), output.

The loop knows no method and no model family: it asks the registry for the method, the
adapter registry for the family, and the method for each step's loss.

Under a launcher (``torchrun``, ``accelerate launch``) the same loop trains data-parallel over
several processes with the single-process result on the same global batch: see :mod:`.distributed`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import shutil
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..adapters import adapter_for
from ..config import EraseConfig, build, to_dict
from ..errors import ConfigError, InputError, Interrupted, TrainingError
from ..methods import INPUTS, METHODS
from . import distributed
from .context import ErasureContext, LatentCache
from .checkpoint import (checkpoint_path, checkpoint_root, clean_partial, complete_checkpoints, load_checkpoint,
                         read_optimizer_state, restore_forget_extra, run_identity, save_checkpoint, unshared)
from .output import atomic_dir, check_output_dir, write_json
from .naming import add_name_samples, add_vocab_anchors, name_concept
from .params import lora_state_dict, merge_lora, select_trainable
from .progress import Progress


@dataclass
class EraseResult:
    out: Any
    record: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import transformers

    from .. import __version__

    return {
        "diffscrub": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__,
        "python": sys.version.split()[0], "platform": platform.platform(),
    }


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    out = {"cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        out["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def resolve_method_config(config: EraseConfig, method_config=None):
    method_cls = METHODS.get(config.method)
    if method_config is None:
        method_config = method_cls.config_class()
    elif isinstance(method_config, dict):
        method_config = build(method_cls.config_class, method_config, where=config.method)
    elif not isinstance(method_config, method_cls.config_class):
        raise ConfigError(f"method options for {config.method!r} must be a {method_cls.config_class.__name__}")
    return method_cls, method_config


def preflight(config: EraseConfig, method_cls, method_config=None) -> None:
    """Every check that needs no model: paths, folders, required inputs. Raises one-line errors."""
    from ..data import scan_image_folder
    from ..loading import check_model_arg

    config.require_paths()
    for need, flag in (("retain", config.retain), ("concept_prompt", config.concept_prompt)):
        if need in method_cls.needs and not flag:
            raise ConfigError(f"method {method_cls.name!r} needs {INPUTS[need]}")
    inversion_pool = getattr(method_cls, "inversion_pool", True)  # False: the method keeps no names in its pool
    if config.conditioning == "auto" and not inversion_pool:
        if config.names:
            raise ConfigError(f"method {method_cls.name!r} keeps its conditioning pool as the model draws it, so names "
                              "there would be preserved, not erased: drop --names (name the concept with "
                              "--concept-prompt)")
        if config.name_samples:
            raise ConfigError(f"method {method_cls.name!r} names no concept in its conditioning pool, so there are "
                              "no named prompts to draw: drop --name-samples")
    # the options that act on the names in the conditioning pool: refused where the run puts none there
    names_in_pool = config.conditioning == "inversion" or (config.conditioning == "auto" and inversion_pool)
    for flag, value in (("inversion-rerank", config.inversion_rerank), ("random-contexts", config.random_contexts)):
        if value and not names_in_pool:
            raise ConfigError(f"--{flag} acts on the concept's names in the conditioning pool, and this run puts none "
                              f"there (method {method_cls.name!r}, --conditioning {config.conditioning}): drop "
                              f"--{flag}" + (", or use --conditioning auto" if config.conditioning != "auto" else ""))
    if config.inversion_rerank and config.names:
        raise ConfigError("--inversion-rerank orders the words textual inversion finds, and with --names no "
                          "inversion runs: drop one of them")
    both = {w.lower() for w in getattr(method_config, "anchor_words", None) or []} & {n.lower() for n in config.names}
    if both:
        raise ConfigError(f"{', '.join(sorted(both))!r} is both a name of the concept (--names) and a word to keep "
                          "(--anchor-words): drop it from one of them")
    scan_image_folder(config.forget, name="forget")
    if config.retain:
        scan_image_folder(config.retain, name="retain")
    check_output_dir(config.out, overwrite=config.overwrite)
    check_checkpoints(config)
    check_model_arg(config.model, allow_pickle=config.allow_pickle)
    check = getattr(method_cls, "check_inputs", None)
    if check is not None and method_config is not None:
        check(method_config, retain=config.retain, concept_prompt=config.concept_prompt,
              conditioning=config.conditioning, fsdp=config.fsdp)


def check_checkpoints(config: EraseConfig) -> None:
    """Refuse to silently discard an interrupted run's checkpoints."""
    root = checkpoint_root(config.out)
    if not config.resume and complete_checkpoints(root):
        raise InputError(
            f"found checkpoints of an interrupted run in '{root}': pass --resume to continue it, "
            "or delete that folder to start afresh"
        )


def half_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """``--mixed-precision`` as a dtype (``None`` for ``no``); fp16 needs a GPU."""
    if mixed_precision == "no":
        return None
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError("mixed_precision='fp16' has no fast CPU kernels and may overflow there: "
                          "use --mixed-precision bf16 or no on the CPU")
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is visible: pass --device cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current step and stops."""

    def __init__(self):
        self.signal: str | None = None

    @contextlib.contextmanager
    def installed(self):
        import signal as signals
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, _frame):
            self.signal = signals.Signals(signum).name

        previous = {s: signals.signal(s, handler) for s in (signals.SIGTERM, signals.SIGINT)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signals.signal(s, h)


@dataclass
class Run:
    """Everything set up for a run, before Phase 1: used by :func:`erase` and the benchmarks."""

    config: EraseConfig
    method_config: Any
    pipe: Any
    adapter: Any
    ctx: ErasureContext
    method: Any
    params: list
    forget_images: Any
    retain_images: Any
    timing: dict[str, float]
    started: float


def setup_run(
    config: EraseConfig, method_config=None, *, pipe=None, log: Callable[[str], None] | None = None,
    check_output: bool = True, dist: distributed.Distributed | None = None,
) -> Run:
    """Checks, image loading, model loading, latent caching, conditioning, teacher/student and method.

    ``dist``: this process's place among several (from :func:`distributed.setup`); it picks the device.
    """
    from ..data import load_image_folder

    log = log or (lambda msg: print(msg, file=sys.stderr))
    method_cls, method_config = resolve_method_config(config, method_config)
    if config.compile and not method_cls.compilable:  # before any loading
        raise ConfigError(f"method '{config.method}' reads values from inside the student's forward pass, "
                          "which a compiled graph does not expose: drop --compile")
    auto_trainable = config.trainable is None
    if auto_trainable:
        config.trainable = method_cls.default_trainable
    if pipe is None:
        preflight(config, method_cls, method_config)
    else:
        config.require_paths()
        if check_output:
            check_output_dir(config.out, overwrite=config.overwrite)
    device = dist.device if dist is not None and dist.enabled else pick_device(config.device)
    half = half_dtype(config.mixed_precision, device)  # before any loading: fp16 on a CPU is refused here
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()

    warn = lambda msg, *a, **k: log(f"warning: {msg}")  # noqa: E731
    forget_images = load_image_folder(config.forget, name="forget", resolution=config.resolution, warn=warn)
    retain_images = None
    if config.retain:
        retain_images = load_image_folder(config.retain, name="retain", resolution=config.resolution, warn=warn)
        if retain_images.hw != forget_images.hw:
            raise ConfigError(
                f"retain images are {retain_images.hw} but forget images are "
                f"{forget_images.hw}: pass --resolution N to bring both to N x N"
            )

    if pipe is None:
        from ..loading import load_pipeline

        pipe = load_pipeline(config.model, family=config.family, allow_pickle=config.allow_pickle,
                             trust_remote_code=config.trust_remote_code)
    adapter = adapter_for(pipe, config.family)
    for module in adapter.frozen_modules():
        module.requires_grad_(False)
        module.eval()
        # Frozen parts run without gradients: half precision halves their memory. The VAE stays
        # in fp32 under fp16 (SD/SDXL VAEs overflow in fp16); bf16 has fp32's range.
        if half is not None and (module is not adapter.vae or half is torch.bfloat16):
            module.to(half)
    pipe.to(device)
    timing["load_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- latents and conditioning
    t1 = time.perf_counter()
    image_hw = forget_images.hw
    forget = LatentCache.encode(adapter, forget_images.pixels, config.batch_size)
    retain = LatentCache.encode(adapter, retain_images.pixels, config.batch_size) if retain_images else None
    prompts = [""] + (list(config.prompts) if config.conditioning == "prompts" else [])
    cond = adapter.encode_prompts(prompts, image_hw).to(device)
    timing["encode_s"] = time.perf_counter() - t1

    # ---------------------------------------------------------------- teacher and student
    student = adapter.denoiser
    if config.gradient_checkpointing and getattr(student, "_supports_gradient_checkpointing", False):
        student.enable_gradient_checkpointing()
    if auto_trainable and config.trainable == "cross-attention" and not adapter.attention_parameters(
            student, cross_only=True):
        # Class-conditional families (DiT) have no text-to-image attention: the method trains everything.
        config.trainable = "full"
    teacher = None
    if config.trainable != "lora":
        teacher = copy.deepcopy(student).requires_grad_(False).eval()
        if half is not None:
            teacher.to(half)  # the teacher only ever runs forward: half weights, half activations
    elif half is not None:
        student.to(half)  # LoRA: the frozen base (which is also the teacher) in half precision
    select_trainable(adapter, student, config.trainable, rank=config.lora_rank, alpha=config.lora_alpha)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    for p in params:  # trainable weights (and so their gradients and Adam moments) stay fp32
        p.data = p.data.float()

    ctx = ErasureContext(adapter=adapter, schedule=adapter.schedule(), student=student, teacher=teacher,
                         forget=forget, retain=retain, cond=cond, generator=generator, device=device,
                         image_hw=image_hw, concept_prompt=config.concept_prompt, anchor_prompt=config.anchor_prompt,
                         lr=config.lr)
    if half is not None:
        ctx.dtype = half
        ctx.autocast = adapter.autocast = functools.partial(torch.autocast, device.type, dtype=half)
    method = method_cls(method_config, ctx)
    if config.compile:
        # Compiled callables beside the eager modules: parameters, names and the saved folder are the
        # modules' own, and calls that tap features with a forward hook run the eager module.
        ctx.student_forward = torch.compile(student)
        ctx.teacher_forward = torch.compile(teacher) if teacher is not None else ctx.student_forward

    return Run(config, method_config, pipe, adapter, ctx, method, params, forget_images, retain_images, timing, t0)


def erase(
    config: EraseConfig, method_config=None, *, pipe=None, log: Callable[[str], None] | None = None,
) -> EraseResult:
    """Erase the concept shown in ``config.forget`` from ``config.model`` and write ``config.out``.

    Args:
        config: the run configuration (validated on construction).
        method_config: the method's options dataclass (or a dict of them); defaults if omitted.
        pipe: an already-loaded pipeline to use instead of loading ``config.model`` (library use).
        log: where one-line notices go (warnings about skipped images, the output path).

    Returns:
        An :class:`EraseResult` with the output folder and the run record saved as ``diffscrub.json``.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    dist = distributed.setup(config)
    main = dist.is_main
    if not main:
        log = lambda msg: None  # noqa: E731  (one voice: the main process's)
    quiet = config.quiet or not main
    run = setup_run(config, method_config, pipe=pipe, log=log, dist=dist)
    pipe, adapter, ctx, method, params = run.pipe, run.adapter, run.ctx, run.method, run.params
    method_config, timing, t0 = run.method_config, run.timing, run.started
    forget_images, retain_images = run.forget_images, run.retain_images
    student, device = ctx.student, ctx.device

    identity = run_identity(config, method_config, forget_images.paths,
                            retain_images.paths if retain_images else None)
    root = checkpoint_root(config.out)
    if main:
        clean_partial(root)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    resume_from = complete_checkpoints(root)[-1] if config.resume and complete_checkpoints(root) else None
    if dist.enabled:  # every process resumes from the checkpoint the main process picked (a shared folder)
        resume_from = dist.broadcast(resume_from)
    if config.resume and resume_from is None:
        log(f"no complete checkpoint in '{root}': starting from the beginning")

    if resume_from is not None:
        # Phase 1 is restored, not redone: prototypes, masks and the conditioning pool come from the checkpoint
        # (methods whose state is not all in the checkpoint prepare again first).
        restore_forget_extra(resume_from, ctx)
        if not method.resumable_state:
            method.prepare(batch_size=config.batch_size)
        # A sharded student's optimizer is built (and its state loaded) after sharding, below.
        # The optimizer's state is loaded below, once the method's own parameter groups are in it.
        meta = load_checkpoint(resume_from, student=student, optimizer=None, ctx=ctx, method=method,
                               identity=identity)
        start, history = meta["step"] + 1, meta["history"]
        inversion, prepare_figures = meta["extra"].get("inversion"), meta["extra"].get("prepare", {})
        timing.update({k: v for k, v in meta["extra"].get("timing", {}).items() if k not in timing})
        log(f"resuming from {resume_from.name} (step {meta['step']} of {config.steps})")
    else:
        # ------------------------------------------------------------ phase 1
        # With several processes, the main process alone names the concept and (when the method's state
        # is all in its state_dict) prepares; the others take the results from it.
        once = dist.enabled and method.resumable_state
        t2 = time.perf_counter()
        inversion = name_concept(run, log) if main else None
        drawn = add_name_samples(run, log) if main else None
        if drawn is not None:
            inversion = {**(inversion or {}), "name_samples": drawn}
        anchors = add_vocab_anchors(run, log) if main else None
        if anchors is not None:
            inversion = {**(inversion or {}), "vocab_anchors": anchors}
        timing["inversion_s"] = time.perf_counter() - t2
        if dist.enabled and not once:
            inversion = distributed.apply_phase1(
                dist.broadcast(distributed.phase1_payload(ctx, inversion=inversion) if main else None), ctx
            )["inversion"]
        t2 = time.perf_counter()
        prepare_figures = None
        if main or not once:
            bar = Progress(method.prepare_work(len(ctx.forget)), "phase 1: fingerprint", quiet)
            try:
                prepare_figures = method.prepare(progress=bar, batch_size=config.batch_size)
            finally:
                bar.close()
        if once:
            payload = distributed.phase1_payload(ctx, method, inversion=inversion, prepare=prepare_figures) if main \
                else None
            extra = distributed.apply_phase1(dist.broadcast(payload), ctx, method)
            inversion, prepare_figures = extra["inversion"], extra["prepare"]
        timing["phase1_s"] = time.perf_counter() - t2
        start, history = 1, []

    # Parameters the method trains outside the denoiser (the names' embedding rows): their own optimizer
    # groups, their gradients averaged over processes by hand (DDP wraps the student only).
    extra_groups = method.parameter_groups()
    extra = [p for group in extra_groups for p in group["params"]]
    if extra and dist.fsdp:
        raise ConfigError("--fsdp shards the denoiser only, and this method also trains parameters outside it "
                          "(--name-embeddings): drop --fsdp, or drop --name-embeddings")
    for group in extra_groups:
        optimizer.add_param_group(group)
    if resume_from is not None and not dist.fsdp:
        optimizer.load_state_dict(read_optimizer_state(resume_from))

    local_batch = config.batch_size
    if dist.enabled:
        # Phase 2 splits each global batch over the processes; gradients are averaged by DDP.
        local_batch = config.batch_size // dist.world
        ctx.shard(dist.rank, dist.world)
        ctx.student_forward = dist.wrap(student)
        if dist.fsdp:  # the student's parameters are now shards: a fresh optimizer over them
            # Nothing may keep the whole tensors alive (the old optimizer, run.params), or each rank would
            # still hold the full model beside its shard.
            params = run.params = [p for p in student.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
            if resume_from is not None:
                dist.load_optimizer_state(student, optimizer, read_optimizer_state(resume_from))
        if config.compile:  # the DDP module compiled, behind the same proxy (adapters read model.config)
            ctx.student_forward = distributed.DDPStudent(torch.compile(ctx.student_forward._wrapped), student)

    # ---------------------------------------------------------------- phase 2
    def checkpoint(step: int):
        extra = {"inversion": inversion, "prepare": prepare_figures,
                 "timing": {k: v for k, v in timing.items() if k in ("inversion_s", "phase1_s", "encode_s")}}
        path = checkpoint_path(root, step)
        trainable, optimizer_state = dist.trainable_tensors(student), dist.optimizer_state(student, optimizer)
        if main:
            path = save_checkpoint(root, step, trainable=trainable, optimizer_state=optimizer_state, ctx=ctx,
                                   method=method, history=history, identity=identity, extra=extra)
        dist.barrier()
        return path

    stop = _StopFlag()
    bar = Progress(config.steps, "phase 2: distil", quiet)
    if bar.bar is not None:
        bar.bar.update(start - 1)
    t3 = time.perf_counter()
    step = start - 1
    try:
        with stop.installed():
            for step in range(start, config.steps + 1):
                total, terms = method.loss(step, local_batch)
                loss = total
                signal_name = stop.signal
                if dist.enabled:
                    # Losses (for the checks and the log) as means over the global batch, and a stop
                    # signal that reached any process stops them all after this step.
                    total, terms, stopped = _reduce(dist, total, terms, stop.signal is not None)
                    signal_name = (stop.signal or "SIGTERM") if stopped else None
                if not torch.isfinite(total):
                    bad = [k for k, v in terms.items() if not torch.isfinite(v)] or ["total"]
                    kept = complete_checkpoints(root)
                    where = f"; the last good checkpoint is '{kept[-1]}'" if kept else ""
                    raise TrainingError(
                        f"loss became non-finite at step {step} (term: {', '.join(bad)}): lower --lr "
                        f"or check the inputs; nothing was written to --out{where}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                if extra:
                    if dist.enabled:
                        for p in extra:
                            if p.grad is not None:
                                p.grad = dist.sum(p.grad) / dist.world
                    torch.nn.utils.clip_grad_norm_(extra, 1.0)
                optimizer.step()
                if step % config.log_every == 0 or step == config.steps or step == 1:
                    row = {"step": step, "total": float(total.detach())}
                    row.update({k: float(v) for k, v in terms.items()})
                    history.append(row)
                bar(1, loss=f"{float(total.detach()):.4f}")
                if not dist.enabled:
                    signal_name = stop.signal
                if signal_name is not None:
                    path = checkpoint(step)
                    raise Interrupted(
                        f"stopped by {signal_name} at step {step}; checkpoint saved to '{path}': "
                        "rerun the same command with --resume to continue"
                    )
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                    checkpoint(step)
    finally:
        bar.close()
    timing["phase2_s"] = time.perf_counter() - t3
    timing["step_s"] = timing["phase2_s"] / max(1, config.steps - start + 1)

    # ---------------------------------------------------------------- output
    student.eval()
    record = {
        "config": to_dict(config),
        "method": config.method,
        config.method: to_dict(method_config),
        "family": adapter.family,
        "pipeline_class": type(pipe).__name__,
        "versions": versions(),
        "seed": config.seed,
        "steps": config.steps,
        "device": str(device),
        "forget_images": len(forget_images),
        "retain_images": len(retain_images) if retain_images else 0,
        "skipped_images": len(forget_images.skipped) + (len(retain_images.skipped) if retain_images else 0),
        "image_size": list(forget_images.hw),
        "latent_shape": list(ctx.forget.mean.shape[1:]),
        "trainable": config.trainable,
        "mixed_precision": config.mixed_precision,
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "trainable_tensors": sum(1 for p in params if p.requires_grad),
        "prepare": prepare_figures,
        "conditioning": {"mode": config.conditioning, "pool": ctx.cond.prompts[:ctx.cond.pool_len], **(inversion or {})},
        "losses": history,
        "timing": timing,
        "memory": peak_memory_mb(device),
    }
    sampling = method.sampling()
    if sampling is not None:
        record["sampling"] = sampling
    if dist.enabled:
        record["world_size"] = dist.world
    t4 = time.perf_counter()
    if dist.fsdp:  # every rank helps gather the shards; the main process saves a whole, plain copy
        whole = dist.unsharded(student)
        if main:
            name = next(k for k, v in pipe.components.items() if v is student)
            setattr(pipe, name, whole)
            student = whole
    if main:
        with atomic_dir(config.out, overwrite=config.overwrite) as tmp:
            if config.trainable == "lora":
                save_lora(pipe, adapter, student, tmp)
                merge_lora(student)
            if ctx.dtype != torch.float32:
                student.to(ctx.dtype)  # under --mixed-precision the pipeline is saved in that precision
            record.update(method.finish(pipe))
            pipe.save_pretrained(tmp, safe_serialization=True)
            artifacts = method.artifacts()
            if artifacts:
                from safetensors.torch import save_file

                save_file(unshared({k: v.float() for k, v in artifacts.items()}),
                      str(tmp / "diffscrub_artifacts.safetensors"))
            timing["save_s"] = time.perf_counter() - t4
            timing["total_s"] = time.perf_counter() - t0
            write_json(tmp / "diffscrub.json", record)
        shutil.rmtree(root, ignore_errors=True)  # the run is complete: its checkpoints are no longer needed
        log(f"wrote {config.out}")
    else:
        timing["save_s"] = 0.0
        timing["total_s"] = time.perf_counter() - t0
    dist.barrier()  # the other processes return once the output is in place
    return EraseResult(config.out, record, history)


def _reduce(dist, total: torch.Tensor, terms: dict, stop: bool):
    """Means over the processes of the loss and its terms (local means over equal local batches, so
    global means), and whether any process was asked to stop; one all-reduce."""
    keys = list(terms)
    local = [total.detach().float().reshape(())] + [torch.as_tensor(terms[k]).detach().float().reshape(()).to(
        total.device) for k in keys]
    summed = dist.sum(torch.stack(local + [torch.tensor(float(stop), device=total.device)]))
    means = summed[:-1] / dist.world
    return means[0], {k: means[i + 1] for i, k in enumerate(keys)}, bool(summed[-1] > 0)


def save_lora(pipe, adapter, model, folder) -> None:
    """Save the LoRA weights where ``pipe.load_lora_weights(folder)`` finds them (or peft format otherwise)."""
    state = lora_state_dict(model)
    if hasattr(type(pipe), "save_lora_weights"):
        from diffusers.utils import convert_state_dict_to_diffusers

        type(pipe).save_lora_weights(
            folder, **{adapter.lora_layers_kwarg(): convert_state_dict_to_diffusers(state)}, safe_serialization=True
        )
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "lora_peft.safetensors"))
