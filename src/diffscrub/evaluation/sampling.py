"""Sampling both models on the same seeds, and PNG grids of the results."""

from __future__ import annotations

import io
import pathlib

import torch

from ..errors import ConfigError


def check_text_to_image(pipe, which: str) -> None:
    """Evaluation samples from prompts: refuse class-conditional pipelines (DiT) with a clear line."""
    if getattr(pipe, "tokenizer", None) is None and getattr(pipe, "text_encoder", None) is None:
        raise ConfigError(
            f"{which} pipeline {type(pipe).__name__} takes no text prompt: diffscrub eval needs a "
            "text-to-image pipeline"
        )


def _call_options(pipe) -> dict:
    """Pipeline-specific call options that keep the asked size and the plain prompt text."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    extra = {}
    if "use_resolution_binning" in params:  # PixArt: otherwise the size snaps to a bin (or fails on small models)
        extra["use_resolution_binning"] = False
    if "clean_caption" in params:  # needs optional packages and would rewrite the prompt
        extra["clean_caption"] = False
    return extra


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                  height: int, width: int, batch_size: int = 16) -> torch.Tensor:
    """One image per ``(prompt, seed)`` pair: float ``[N, 3, H, W]`` in [0, 1] on the CPU.

    Every sample gets its own CPU ``torch.Generator`` seeded with its seed, so a sample depends
    only on its prompt and seed (not on the batch it fell in), and two pipelines of the same
    family given the same seeds start from the same initial latent noise and draw the same
    sampler noise.
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    extra = _call_options(pipe)
    out = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[start:start + batch_size])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:start + batch_size]]
        res = pipe(prompt=batch_prompts, generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                   height=height, width=width, output_type="pt", **extra)
        images = res.images if isinstance(res.images, torch.Tensor) else torch.as_tensor(res.images)
        if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        out.append(images.float().clamp(0, 1).cpu())
    return torch.cat(out) if out else torch.empty(0, 3, height, width)


def one_step_timestep(model: str | None) -> int | None:
    """The timestep a one-step generator (``sfd --one-step``) samples at, from the run record in its
    folder; ``None`` for a model sampled by its pipeline's own sampler."""
    from .readers import RECORD_FILE, read_run_record

    if not model or not (pathlib.Path(model) / RECORD_FILE).is_file():
        return None
    t = (read_run_record(model).get("sampling") or {}).get("one_step_timestep")
    return None if t is None else int(t)


@torch.no_grad()
def sample_one_step(pipe, prompts: list[str], seeds: list[int], *, timestep: int, height: int, width: int,
                    batch_size: int = 16) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] from a one-step generator: one denoiser call per sample.

    For each ``(prompt, seed)``: pure noise ``z [C, H/f, W/f]`` from a CPU generator seeded with the
    seed, the denoiser's prediction at ``timestep`` under the prompt, its clean-latent estimate
    ``z0_hat`` (the schedule's ``predict_z0``, as in training), decoded by the VAE. No guidance: a
    one-step generator has its guidance distilled in. Everything goes through the family adapter,
    as training does, so every family samples the same way.
    """
    from ..adapters import adapter_for

    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    adapter = adapter_for(pipe)
    model = adapter.denoiser
    param = next(model.parameters())
    schedule = adapter.schedule()
    channels = int(pipe.vae.config.latent_channels)
    # the pipelines' own convention (DiTPipeline has no vae_scale_factor attribute)
    factor = int(getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1))
    out = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[start:start + batch_size])
        cond = adapter.encode_prompts(batch_prompts, (height, width)).to(param.device)
        z = torch.stack([torch.randn((channels, height // factor, width // factor),
                                     generator=torch.Generator("cpu").manual_seed(int(s)))
                         for s in seeds[start:start + batch_size]]).to(param.device)
        t = torch.full((len(batch_prompts),), int(timestep), dtype=torch.long, device=param.device)
        with adapter.eval_mode(model):
            pred, _ = adapter.predict(model, z.to(param.dtype), t, cond.take(torch.arange(len(batch_prompts))))
        mean, _ = adapter.split_variance(pred.float(), channels)
        images = adapter.decode(schedule.predict_z0(z, mean, t))  # [b, 3, H, W] in [-1, 1]
        out.append(((images + 1) / 2).float().clamp(0, 1).cpu())
    return torch.cat(out) if out else torch.empty(0, 3, height, width)


# ----------------------------------------------------------------------------- grids
def _to_pil(image: torch.Tensor):
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def comparison_grid(reference: torch.Tensor, erased: torch.Tensor, rows: int, cols: int,
                    row_labels: list[str] | None = None, cell: int = 64):
    """A PIL image: reference block on the left, erased block on the right.

    ``reference``/``erased``: ``[rows * cols, 3, H, W]`` in [0, 1], row-major (row = prompt,
    column = seed). Cells are resized so their longer side is at most ``cell`` pixels; a strip
    above each block names it and a strip on the left names each row.
    """
    from PIL import Image, ImageDraw, ImageFont

    n = rows * cols
    if reference.shape[0] != n or erased.shape[0] != n:
        raise ValueError(f"expected {n} images per side, got {reference.shape[0]} and {erased.shape[0]}")
    h, w = reference.shape[-2:]
    scale = min(1.0, cell / max(h, w))
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    font = ImageFont.load_default()
    labels = [(lab if lab else '"" (null)') for lab in (row_labels or [""] * rows)]
    label_w = 8 + max((int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(lab, font=font)) for lab in labels),
                      default=0)
    pad, gap, head = 2, 12, 16
    block_w = cols * (cw + pad) - pad
    width = label_w + 2 * block_w + gap
    height = head + rows * (ch + pad) - pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x0s = (label_w, label_w + block_w + gap)
    for x0, name in zip(x0s, ("reference", "erased")):
        draw.text((x0, 2), name, fill=(0, 0, 0), font=font)
    for r in range(rows):
        y = head + r * (ch + pad)
        draw.text((2, y + max(0, ch // 2 - 6)), labels[r], fill=(0, 0, 0), font=font)
        for c in range(cols):
            for x0, side in zip(x0s, (reference, erased)):
                img = _to_pil(side[r * cols + c])
                if (ch, cw) != (h, w):
                    img = img.resize((cw, ch), Image.LANCZOS)
                canvas.paste(img, (x0 + c * (cw + pad), y))
    return canvas


def save_png(image, path: str | pathlib.Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    pathlib.Path(path).write_bytes(buf.getvalue())
