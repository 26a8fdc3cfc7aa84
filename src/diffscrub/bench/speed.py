"""``diffscrub bench-speed``: our training step against the seed's, same model, batch and device.

The reference re-implements the seed's ``training_step`` as written: it VAE-encodes the
batch every step, runs the teacher once for the mask features, once on the blinded latent
and once more on the original latent, then the student; the retain anchor adds another VAE
encode, teacher pass and student pass. Both steps use the same adapter calls, conditioning,
optimizer and trainable parameters, so the ratio isolates the algorithmic cost.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from ..concept import blind, concept_mask
from ..config import EraseConfig
from ..data.images import to_float
from ..core.trainer import peak_memory_mb, setup_run


class SeedStep:
    """The seed's per-step computation (three teacher passes, a VAE encode per step)."""

    def __init__(self, run, forget_images: torch.Tensor, retain_images: torch.Tensor | None):
        self.run = run
        self.ctx = run.ctx
        self.cfg = run.method_config
        self.forget_images, self.retain_images = forget_images, retain_images

    def _encode(self, images):
        # The seed encodes with the frozen VAE inside every step.
        mean, std = self.run.adapter.encode_moments(to_float(images.to(self.ctx.device)))
        return mean + std * torch.randn_like(mean)

    def loss(self, batch_size: int):
        ctx, cfg = self.ctx, self.cfg
        index = ctx.forget_sampler.next(batch_size)
        with torch.no_grad():
            z0 = self._encode(self.forget_images[index])
        b = z0.shape[0]
        cond = ctx.cond.take(ctx.null_index(b))
        t = ctx.timesteps(b)
        eps = ctx.randn_like(z0)
        z_t = ctx.schedule.add_noise(z0, eps, t)
        with torch.no_grad():
            _, feats = ctx.teacher_predict(z_t, t, cond, features=True)  # pass 1: features only
            mask = concept_mask(feats, self.run.method.prototypes, cfg.tau, cfg.alpha, z_t.shape[-2:])
            z_t_blind = ctx.schedule.add_noise(blind(z0, mask, ctx.randn_like(z0)), eps, t)
            t_blind, _ = ctx.teacher_predict(z_t_blind, t, cond)  # pass 2
            t_orig, _ = ctx.teacher_predict(z_t, t, cond)  # pass 3
        s = ctx.student_predict(z_t, t, cond)
        total = cfg.lambda_f * ((s - t_blind) * mask).pow(2).mean() + cfg.lambda_b * (
            (s - t_orig) * (1 - mask)).pow(2).mean()
        if self.retain_images is not None and cfg.lambda_r > 0:
            r_index = ctx.retain_sampler.next(batch_size)
            with torch.no_grad():
                z0r = self._encode(self.retain_images[r_index])
            cond_r = ctx.cond.take(ctx.null_index(z0r.shape[0]))
            t_r = ctx.timesteps(z0r.shape[0])
            z_tr = ctx.schedule.add_noise(z0r, ctx.randn_like(z0r), t_r)
            with torch.no_grad():
                target_r, _ = ctx.teacher_predict(z_tr, t_r, cond_r)
            total = total + cfg.lambda_r * (ctx.student_predict(z_tr, t_r, cond_r) - target_r).pow(2).mean()
        return total, {}


def _write_random_images(folder: pathlib.Path, n: int, size: int, seed: int) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _time_steps(loss_fn, params, optimizer, steps: int, batch_size: int, device, peaks: list | None = None) -> list[float]:
    """Seconds of each of ``steps`` optimizer steps; on a GPU, appends the block's peak memory (MiB) to ``peaks``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        total, _ = loss_fn(batch_size)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda" and peaks is not None:
        peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
    return times


def bench_speed(model: str, *, batch_size: int = 4, steps: int = 10, warmup: int = 2, rounds: int = 3,
                resolution: int = 32, retain: bool = True, trainable: str = "full", lora_rank: int = 0,
                device: str = "auto", family: str | None = None, pipe=None, arch: str | None = None,
                mixed_precision: str = "no", gradient_checkpointing: bool = False, compile: bool = False,
                log=print) -> dict:
    """Measure seconds per step of both steps, interleaved in ``rounds`` blocks, and their ratio.

    ``arch`` builds a randomly initialised full-size pipeline (see :mod:`.architectures`) on the
    device instead of loading ``model``; it is built in bf16/fp16 when ``mixed_precision`` says so.
    """
    if arch is not None and pipe is None:
        from ..core.trainer import half_dtype, pick_device
        from .architectures import build_pipeline

        dev = pick_device(device)
        pipe = build_pipeline(arch, device=dev, dtype=half_dtype(mixed_precision, dev) or torch.float32)
        model = arch
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        n = max(8, batch_size * 2)
        forget = _write_random_images(tmp / "forget", n, resolution, 0)
        retain_dir = _write_random_images(tmp / "retain", n, resolution, 1) if retain else None
        config = EraseConfig(model=model, forget=str(forget), retain=str(retain_dir) if retain_dir else None,
                             out=str(tmp / "out"), steps=1, batch_size=batch_size, device=device, quiet=True,
                             trainable=trainable, lora_rank=lora_rank, family=family,
                             mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
                             compile=compile)
        # Preparation is not timed: without retain images, a few cheap self-generated samples suffice.
        run = setup_run(config, {"num_prototypes": 5, "vectors_per_image": 256, "fit_draws": 1, "mask_draws": 1,
                                 "contrast_samples": max(4, batch_size), "contrast_sample_steps": 4},
                        pipe=pipe, log=lambda m: None)
        run.method.prepare(batch_size=batch_size)
        seed_step = SeedStep(run, run.forget_images.pixels, run.retain_images.pixels if retain_dir else None)
        optimizer = torch.optim.AdamW(run.params, lr=1e-6)
        device_t = run.ctx.device
        ours_fn = lambda b: run.method.loss(0, b)  # noqa: E731
        for fn in (ours_fn, seed_step.loss):
            _time_steps(fn, run.params, optimizer, warmup, batch_size, device_t)
        ours, seed, ours_peak, seed_peak = [], [], [], []
        per_round = max(1, steps // rounds)
        for _ in range(rounds):
            ours += _time_steps(ours_fn, run.params, optimizer, per_round, batch_size, device_t, ours_peak)
            seed += _time_steps(seed_step.loss, run.params, optimizer, per_round, batch_size, device_t, seed_peak)
        result = {
            "model": model, "family": run.adapter.family, "device": str(device_t),
            "device_name": torch.cuda.get_device_name(device_t) if device_t.type == "cuda" else _cpu_name(),
            "threads": torch.get_num_threads(), "batch_size": batch_size, "resolution": resolution,
            "retain": retain, "trainable": trainable, "lora_rank": lora_rank, "mixed_precision": mixed_precision,
            "gradient_checkpointing": gradient_checkpointing, "compile": compile, "steps_each": len(ours),
            "ours_s_per_step": statistics.median(ours), "seed_s_per_step": statistics.median(seed),
            "memory": peak_memory_mb(device_t),
        }
        if ours_peak:  # peak GPU memory while each kind of step ran (weights, optimizer state included)
            result["ours_gpu_peak_mb"], result["seed_gpu_peak_mb"] = max(ours_peak), max(seed_peak)
        result["speedup"] = result["seed_s_per_step"] / result["ours_s_per_step"]
        log(format_result(result))
        return result


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def format_result(r: dict) -> str:
    return (f"{r['family']} on {r['device']} ({r['device_name']}, {r['threads']} threads), batch {r['batch_size']}, "
            f"{r['resolution']}px, retain={'yes' if r['retain'] else 'no'}, {r['trainable']}, "
            f"precision {r.get('mixed_precision', 'no')}{', checkpointing' if r.get('gradient_checkpointing') else ''}"
            f"{', compiled' if r.get('compile') else ''}: "
            f"seed step {r['seed_s_per_step'] * 1000:.1f} ms, diffscrub step {r['ours_s_per_step'] * 1000:.1f} ms, "
            f"speed-up x{r['speedup']:.2f} (medians of {r['steps_each']} steps each)"
            + (f", peak GPU memory: seed step {r['seed_gpu_peak_mb'] / 1024:.1f} GiB, diffscrub step "
               f"{r['ours_gpu_peak_mb'] / 1024:.1f} GiB" if "ours_gpu_peak_mb" in r else ""))


def write_json(result: dict, path: str) -> None:
    pathlib.Path(path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
