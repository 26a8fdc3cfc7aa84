"""Training of the toy world's models, from scratch and seeded.

Order: the VAE first (reconstruction + a small KL term), then a large fixed set of
canvases is encoded once into cached latents (the VAE is frozen from then on), then
each denoiser is trained jointly with its text encoder(s) on the cached latents with
10 % caption dropout (so classifier-free guidance works), AdamW with warm-up and an EMA
of the weights. The EMA weights are saved, in float16, as diffusers pipeline folders.

``train_toy(model, out_dir, exclude=..., steps=..., seed=...)`` is what
``diffscrub toy train`` calls. With ``exclude`` every training canvas (VAE included)
leaves that concept out: the gold-standard "never saw it" model.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from diffscrub.errors import ConfigError, TrainingError
from diffscrub.toy import recipes as R
from diffscrub.toy.canvas import caption, check_concept, sample_canvases
from diffscrub.toy.saving import load_vae, save_mmdit_pipeline, save_unet_pipeline
from diffscrub.toy.short_t5 import KeyBias, compress_t5_ids, patch_for_short_t5, unpatch_short_t5

Log = Callable[[str], None] | None

LAST_RUN: dict[str, float] = {}
"""Facts of the latest denoiser run in this process (steps done, training seconds)."""


def _log(log: Log, msg: str) -> None:
    if log is not None:
        log(msg)


def _lr_lambda(warmup: int, steps: int, floor: float = 0.1) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    return f


class EMA:
    """Exponential moving average of a list of modules' float parameters."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.modules = modules
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        # short runs: warm the average up so it is not dominated by the random init
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, live in zip(self.shadow, self.modules):
            # one fused call per module: on a GPU a per-tensor loop is launch-bound
            torch._foreach_lerp_(list(shadow.parameters()), [p.detach() for p in live.parameters()], 1 - d)
            for bs, bl in zip(shadow.buffers(), live.buffers()):
                bs.copy_(bl)


CANVAS_CHUNK = 2048
"""Training canvases are drawn in chunks of this many, chunk ``i`` from the seed
``(seed, i)``: the set is the same whatever the number of worker processes."""


def _canvas_chunk(args) -> tuple[np.ndarray, list[str]]:
    n, seed, index, exclude, digit_weights = args
    rng = np.random.default_rng([seed, index])
    imgs, labels = sample_canvases(n, rng, split="train", exclude=exclude, digit_weights=digit_weights)
    return imgs, [caption(lab) for lab in labels]


def make_training_set(
    n: int,
    seed: int,
    exclude: str | None = None,
    digit_weights: tuple[float, ...] = (0.4, 0.3, 0.3),
    workers: int = 1,
    chunk: int = CANVAS_CHUNK,
) -> tuple[np.ndarray, list[str]]:
    """``n`` train-split canvases (uint8 NHWC) and their captions, built by ``workers`` processes."""
    jobs = [(min(chunk, n - i), seed, i // chunk, exclude, digit_weights) for i in range(0, n, chunk)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_canvas_chunk, jobs)
    else:
        parts = [_canvas_chunk(j) for j in jobs]
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


def _to_model_range(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------- VAE


def train_vae(
    imgs: np.ndarray,
    cfg: R.VAEConfig | None = None,
    seed: int = 0,
    log: Log = print,
):
    """Train the shared AutoencoderKL on ``imgs`` and set its scaling/shift factors."""
    cfg = cfg or R.VAEConfig()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = R.build_vae()
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    warm = max(1, min(100, cfg.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warm, cfg.steps))
    x_all = _to_model_range(imgs)
    t0 = time.time()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = rec_loss + cfg.kl_weight * kl * z[0].numel()
        if not torch.isfinite(loss):
            raise TrainingError(f"VAE loss became {loss.item()} at step {step}: lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == cfg.steps - 1:
            _log(log, f"vae step {step}/{cfg.steps} rec {rec_loss.item():.4f} kl {kl.item():.3f} ({time.time() - t0:.0f}s)")
    vae.eval().requires_grad_(False)
    # scaling so cached latents have unit variance, shift for SD3-style pipelines
    with torch.no_grad():
        z = encode_latents(vae, imgs[: min(len(imgs), 2048)], raw=True)
    shift = float(z.mean())
    scale = float(1.0 / (z - shift).std())
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    _log(log, f"vae scaling_factor {scale:.4f} shift_factor {shift:.4f}")
    return vae


@torch.no_grad()
def encode_latents(vae, imgs: np.ndarray, raw: bool = False, shift: bool = False, batch_size: int = 256) -> torch.Tensor:
    """Posterior means of ``imgs`` (uint8 NHWC). Scaled as a pipeline expects unless ``raw``;
    ``shift`` subtracts the VAE's shift_factor first (SD3 convention)."""
    out = []
    for i in range(0, len(imgs), batch_size):
        x = _to_model_range(imgs[i : i + batch_size]).to(vae.device)
        out.append(vae.encode(x).latent_dist.mean.cpu())
    z = torch.cat(out)
    if raw:
        return z
    if shift:
        z = z - vae.config.shift_factor
    return z * vae.config.scaling_factor


# ----------------------------------------------------------------------------- text


def tokenize(tokenizer, captions: list[str], max_length: int) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _dropout_ids(ids: torch.Tensor, empty: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    drop = torch.rand(ids.shape[0], generator=gen) < p
    if drop.any():
        ids = ids.clone()
        ids[drop] = empty
    return ids


def unet_text_embeds(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """What StableDiffusionPipeline feeds the UNet: the last hidden state (no mask)."""
    return text_encoder(ids)[0]


def sd3_text_embeds(clip1, clip2, t5, ids1, ids2, ids3) -> tuple[torch.Tensor, torch.Tensor]:
    """What StableDiffusion3Pipeline.encode_prompt builds (clip_skip=None)."""
    o1 = clip1(ids1, output_hidden_states=True)
    o2 = clip2(ids2, output_hidden_states=True)
    clip_embeds = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    t5_embeds = t5(ids3)[0]
    clip_embeds = F.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
    prompt_embeds = torch.cat([clip_embeds, t5_embeds], dim=-2)
    pooled = torch.cat([o1[0], o2[0]], dim=-1)
    return prompt_embeds, pooled


# ----------------------------------------------------------------------------- denoisers


def _optimizer(denoiser, text_modules, cfg: R.TrainConfig, device: torch.device):
    groups = [{"params": list(denoiser.parameters()), "lr": cfg.lr}]
    text_params = [p for m in text_modules for p in m.parameters()]
    if text_params:
        groups.append({"params": text_params, "lr": cfg.text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.99), fused=device.type == "cuda")
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt, _Schedule(opt, min(cfg.warmup, max(1, cfg.steps // 5)), cfg.steps)


class _Schedule:
    """Warm-up then cosine decay to 10 %; progress is the larger of step/steps and
    elapsed/time_limit, so a run cut by a time limit still ends with a decayed rate."""

    def __init__(self, opt, warmup: int, steps: int, floor: float = 0.1):
        self.opt, self.warmup, self.steps, self.floor = opt, warmup, steps, floor
        self.step_i = 0
        self.time_limit_s: float | None = None
        self.t0 = time.time()

    def progress(self) -> float:
        p = self.step_i / max(1, self.steps)
        if self.time_limit_s:
            p = max(p, (time.time() - self.t0) / self.time_limit_s)
        return min(1.0, p)

    def step(self) -> None:
        self.step_i += 1
        if self.step_i < self.warmup:
            f = (self.step_i + 1) / self.warmup
        else:
            p = self.progress()
            f = self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * p))
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f


def _fit(
    name: str,
    loss_fn: Callable[[], torch.Tensor],
    ema: EMA,
    denoiser: torch.nn.Module,
    text_modules: list[torch.nn.Module],
    cfg: R.TrainConfig,
    device: torch.device,
    log: Log,
    time_limit_s: float | None,
    checkpoint: Callable[[list], None] | None,
    checkpoint_every_s: float,
) -> list[torch.nn.Module]:
    """The loop both denoisers share: AdamW with warm-up and cosine decay, gradient clipping,
    EMA, logging, periodic checkpoints of the EMA and the time limit. ``loss_fn()`` draws its
    own batch. Returns the EMA modules, on the CPU."""
    for m in ema.modules:
        m.train()
    opt, sched = _optimizer(denoiser, text_modules, cfg, device)
    sched.time_limit_s = time_limit_s
    params = [p for g in opt.param_groups for p in g["params"]]
    t0 = last_ckpt = time.time()
    run_loss = None
    for step in range(cfg.steps):
        loss = loss_fn()
        if not torch.isfinite(loss):
            raise TrainingError(f"{name} loss became {loss.item()} at step {step}: lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update()
        if step % 100 == 0 or step == cfg.steps - 1:  # .item() syncs a GPU: only when logging
            value = loss.item()
            run_loss = value if run_loss is None else 0.8 * run_loss + 0.2 * value
            _log(log, f"{name} step {step}/{cfg.steps} loss {run_loss:.4f} ({time.time() - t0:.0f}s)")
        if checkpoint is not None and time.time() - last_ckpt > checkpoint_every_s:
            checkpoint(ema.shadow)
            last_ckpt = time.time()
            _log(log, f"{name}: checkpoint at step {step}")
        if time_limit_s is not None and time.time() - t0 > time_limit_s:
            _log(log, f"{name}: time limit {time_limit_s:.0f}s reached at step {step}")
            break
    LAST_RUN.update(steps_done=ema.updates, train_s=round(time.time() - t0, 1))
    return [m.to("cpu") for m in ema.shadow]


class _Batches:
    """Seeded draws on the CPU (the same numbers on every device), moved to ``device``."""

    def __init__(self, seed: int, n: int, batch_size: int, device: torch.device):
        self.gen = torch.Generator().manual_seed(seed)
        self.n, self.batch_size, self.device = n, batch_size, device

    def index(self) -> torch.Tensor:
        return torch.randint(0, self.n, (self.batch_size,), generator=self.gen)

    def randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen).to(self.device)

    def rand(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.gen)


def train_unet(
    latents: torch.Tensor,
    captions: list[str],
    cfg: R.TrainConfig,
    seed: int = 0,
    log: Log = print,
    time_limit_s: float | None = None,
    checkpoint: Callable[[list], None] | None = None,
    checkpoint_every_s: float = 900.0,
    init: str | Path | None = None,
    device: str | torch.device = "cpu",
):
    """Train text encoder + UNet on cached (scaled) latents. Returns EMA (tokenizer, text_encoder, unet)."""
    from diffscrub.schedules import DDPMSchedule

    device = torch.device(device)
    torch.manual_seed(seed)
    draw = _Batches(seed + 1, len(latents), cfg.batch_size, device)
    tok = R.build_clip_tokenizer()
    te = R.build_unet_text_encoder(tok)
    unet = R.build_unet()
    if init is not None:  # continue from a saved toy-unet folder
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        te = CLIPTextModel.from_pretrained(str(Path(init) / "text_encoder"), dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(str(Path(init) / "unet"), torch_dtype=torch.float32)
    te, unet = te.to(device), unet.to(device)
    sched_train = R.build_unet_train_scheduler()
    schedule = DDPMSchedule(sched_train.alphas_cumprod.float().to(device))
    ids_all = tokenize(tok, captions, R.TOKEN_LENGTH)
    empty = tokenize(tok, [""], R.TOKEN_LENGTH)[0]
    snr = schedule.snr(torch.arange(sched_train.config.num_train_timesteps, device=device))
    weight_t = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 weighting for epsilon prediction
    latents = latents.to(device)

    def loss_fn() -> torch.Tensor:
        idx = draw.index()
        x0 = latents[idx.to(device)]
        ids = _dropout_ids(ids_all[idx], empty, cfg.caption_dropout, draw.gen).to(device)
        noise = draw.randn(x0.shape)
        t = torch.randint(0, sched_train.config.num_train_timesteps, (x0.shape[0],), generator=draw.gen).to(device)
        pred = unet(schedule.add_noise(x0, noise, t), t, encoder_hidden_states=unet_text_embeds(te, ids)).sample
        return (((pred - noise) ** 2).mean(dim=(1, 2, 3)) * weight_t[t]).mean()

    ema = EMA([te, unet], cfg.ema_decay)
    te_ema, unet_ema = _fit("toy-unet", loss_fn, ema, unet, [te], cfg, device, log, time_limit_s,
                            checkpoint, checkpoint_every_s)
    return tok, te_ema, unet_ema


def train_mmdit(
    latents: torch.Tensor,
    captions: list[str],
    cfg: R.TrainConfig,
    seed: int = 0,
    log: Log = print,
    time_limit_s: float | None = None,
    checkpoint: Callable[[list], None] | None = None,
    checkpoint_every_s: float = 900.0,
    init: str | Path | None = None,
    device: str | torch.device = "cpu",
):
    """Train the three text encoders + SD3 transformer with rectified flow on cached
    (shifted, scaled) latents. Returns EMA (tok, clip1, tok2, clip2, t5tok, t5, transformer)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    draw = _Batches(seed + 2, len(latents), cfg.batch_size, device)
    tok = R.build_clip_tokenizer()
    tok2 = R.build_clip_tokenizer()
    t5tok = R.build_t5_tokenizer()
    clip1 = R.build_mmdit_clip(tok)
    clip2 = R.build_mmdit_clip(tok2)
    t5 = R.build_mmdit_t5(t5tok)
    tr = R.build_transformer()
    if init is not None:  # continue from a saved toy-mmdit folder
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        clip1 = CLIPTextModelWithProjection.from_pretrained(str(Path(init) / "text_encoder"), dtype=torch.float32)
        clip2 = CLIPTextModelWithProjection.from_pretrained(str(Path(init) / "text_encoder_2"), dtype=torch.float32)
        t5 = T5EncoderModel.from_pretrained(str(Path(init) / "text_encoder_3"), dtype=torch.float32)
        tr = SD3Transformer2DModel.from_pretrained(str(Path(init) / "transformer"), torch_dtype=torch.float32)
    clip1, clip2, t5, tr = (m.to(device) for m in (clip1, clip2, t5, tr))
    ids1_all = tokenize(tok, captions, R.TOKEN_LENGTH)
    ids3_all, logw_all = compress_t5_ids(tokenize(t5tok, captions, R.T5_SEQUENCE_LENGTH), t5tok.pad_token_id)
    empty1 = tokenize(tok, [""], R.TOKEN_LENGTH)[0]
    empty3, empty_logw = compress_t5_ids(tokenize(t5tok, [""], R.T5_SEQUENCE_LENGTH), t5tok.pad_token_id)
    n_img = (latents.shape[-1] // tr.config.patch_size) ** 2
    n_clip = ids1_all.shape[1]
    for block in t5.encoder.block:  # the relative position bias stays at zero (see recipes)
        attn = block.layer[0].SelfAttention
        if attn.has_relative_attention_bias:
            attn.relative_attention_bias.weight.requires_grad_(False)
    latents = latents.to(device)
    holder = KeyBias()

    def loss_fn() -> torch.Tensor:
        idx = draw.index()
        x0 = latents[idx.to(device)]
        drop = draw.rand(len(idx)) < cfg.caption_dropout
        ids1 = ids1_all[idx].clone()
        ids3 = ids3_all[idx].clone()
        logw = logw_all[idx].clone()
        ids1[drop] = empty1
        ids3[drop] = empty3[0]
        logw[drop] = empty_logw[0]
        ids1, ids3, logw = ids1.to(device), ids3.to(device), logw.to(device)
        holder.t5 = logw[:, None, None, :]
        holder.joint = F.pad(logw, (n_img + n_clip, 0))[:, None, None, :]
        noise = draw.randn(x0.shape)
        # logit-normal times (SD3), mixed with a uniform share so the ends are covered too
        u = torch.sigmoid(torch.randn(len(idx), generator=draw.gen))
        uni = draw.rand(len(idx))
        sigma = torch.where(draw.rand(len(idx)) < cfg.flow_uniform_share, uni, u).to(device)
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        prompt_embeds, pooled = sd3_text_embeds(clip1, clip2, t5, ids1, ids1, ids3)
        pred = tr(hidden_states=xt, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                  timestep=sigma * 1000).sample
        return F.mse_loss(pred, noise - x0)

    ema = EMA([clip1, clip2, t5, tr], cfg.ema_decay)  # copied before the patch: the EMA stays plain
    patch_for_short_t5(t5, tr, holder)
    try:
        c1, c2, t5e, tre = _fit("toy-mmdit", loss_fn, ema, tr, [clip1, clip2, t5], cfg, device, log,
                                time_limit_s, checkpoint, checkpoint_every_s)
    finally:
        unpatch_short_t5(t5, tr)
    return tok, c1, tok2, c2, t5tok, t5e, tre


# ----------------------------------------------------------------------------- top level


MODEL_CHOICES = ("toy-unet", "toy-mmdit", "all", "oracle")


def train_toy(
    model: str = "all",
    out_dir: str | Path = "toy-models",
    exclude: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    vae_steps: int | None = None,
    n_canvases: int | None = None,
    batch_size: int | None = None,
    vae_dir: str | Path | None = None,
    time_limit_s: float | None = None,
    num_threads: int | None = 2,
    checkpoints: bool = False,
    init_dir: str | Path | None = None,
    device: str = "cpu",
    workers: int = 1,
    log: Log = print,
) -> dict[str, Path]:
    """Train toy model(s) from scratch into ``out_dir/<name>/``; returns the folders written.

    ``steps`` overrides the denoiser step count (and, when small, shrinks the VAE run and
    the number of canvases so that a smoke run takes seconds). ``vae_dir`` reuses a trained
    VAE folder instead of training one. ``exclude`` removes a concept from every training
    canvas. ``model="oracle"`` retrains the oracle into ``out_dir/oracle.safetensors``.
    ``init_dir`` continues training from a saved pipeline folder of the same model (with
    ``model`` naming one model). ``device`` runs the denoiser training there (the random
    draws stay on the CPU generator); ``workers`` processes build the training canvases.
    """
    if init_dir is not None and model not in ("toy-unet", "toy-mmdit"):
        raise ConfigError(f"--init needs --model toy-unet or toy-mmdit, not {model!r}")
    if model not in MODEL_CHOICES:
        raise ConfigError(f"unknown toy model {model!r}: use one of {', '.join(MODEL_CHOICES)}")
    if exclude is not None:
        exclude = check_concept(exclude)
    if steps is not None and int(steps) < 1:
        raise ConfigError(f"--steps {steps} must be at least 1")
    if num_threads:
        torch.set_num_threads(int(num_threads))
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as err:
        raise ConfigError(f"--device {device!r} is not usable here ({str(err).splitlines()[0]}): use cpu") from None
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    t_start = time.time()

    if model == "oracle":
        if exclude is not None:
            raise ConfigError("the oracle is a judge and always sees every concept: drop --exclude for --model oracle")
        from diffscrub.toy.oracle import SHIPPED_STAGES, train_oracle, train_oracle_staged

        path = out / "oracle.safetensors"
        if steps is None:  # the shipped schedule
            stages = tuple(dict(st, seed=st["seed"] + seed) for st in SHIPPED_STAGES)
            train_oracle_staged(path, stages, log=log)
        else:
            train_oracle(path, steps=steps, n_pool=max(64, steps * 64) if steps < 100 else 40000, seed=seed, log=log)
        written["oracle"] = path
        return written

    cfg = R.TrainConfig()
    if steps is not None:
        cfg.steps = int(steps)
    small = cfg.steps < 100
    if batch_size is not None:
        cfg.batch_size = int(batch_size)
    elif small:
        cfg.batch_size = 8
    n = n_canvases or (max(32, cfg.steps * cfg.batch_size) if small else cfg.n_canvases)
    n = min(n, cfg.n_canvases) if n_canvases is None else n

    t0 = time.time()
    imgs, caps = make_training_set(n, seed, exclude=exclude, digit_weights=cfg.digit_weights, workers=workers)
    _log(log, f"{n} training canvases{' without ' + exclude if exclude else ''} in {time.time() - t0:.1f}s")

    if vae_dir is not None:
        vae = load_vae(vae_dir).to(dev)
    else:
        vcfg = R.VAEConfig()
        if vae_steps is not None:
            vcfg.steps = int(vae_steps)
        elif small:
            vcfg.steps = cfg.steps
        if small:
            vcfg.batch_size = min(vcfg.batch_size, 8)
        t0 = time.time()
        vae = train_vae(imgs[: vcfg.n_canvases], vcfg, seed=seed, log=log).to(dev)
        _log(log, f"vae trained in {time.time() - t0:.0f}s")
        vae.save_pretrained(str(out / "vae"), safe_serialization=True)
        written["vae"] = out / "vae"

    names = ["toy-unet", "toy-mmdit"] if model == "all" else [model]
    for name in names:
        t0 = time.time()
        if name == "toy-unet":
            lat = encode_latents(vae, imgs)
            _log(log, f"encoded {len(lat)} latents in {time.time() - t0:.0f}s")
            tok = R.build_clip_tokenizer()
            ck = (lambda sh, _o=out / f"{name}-checkpoint": save_unet_pipeline(_o, vae, tok, *sh)) if checkpoints else None
            tok, te, unet = train_unet(
                lat, caps, cfg, seed=seed, log=log, time_limit_s=time_limit_s, checkpoint=ck, init=init_dir,
                device=dev,
            )
            save_unet_pipeline(out / name, vae, tok, te, unet)
        else:
            lat = encode_latents(vae, imgs, shift=True)
            _log(log, f"encoded {len(lat)} latents in {time.time() - t0:.0f}s")
            toks = (R.build_clip_tokenizer(), R.build_clip_tokenizer(), R.build_t5_tokenizer())

            def ck(sh, _o=out / f"{name}-checkpoint"):
                save_mmdit_pipeline(_o, vae, toks[0], sh[0], toks[1], sh[1], toks[2], sh[2], sh[3])

            parts = train_mmdit(
                lat, caps, cfg, seed=seed, log=log, time_limit_s=time_limit_s,
                checkpoint=ck if checkpoints else None, init=init_dir, device=dev,
            )
            save_mmdit_pipeline(out / name, vae, *parts)
        meta = {
            "model": name,
            "exclude": exclude,
            "steps": cfg.steps,
            "steps_done": LAST_RUN.get("steps_done"),
            "train_s": LAST_RUN.get("train_s"),
            "init": str(init_dir) if init_dir is not None else None,
            "batch_size": cfg.batch_size,
            "n_canvases": n,
            "seed": seed,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "time_limit_s": time_limit_s,
            "wall_s": round(time.time() - t0, 1),
        }
        (out / name / "diffscrub_toy.json").write_text(json.dumps(meta, indent=2))
        written[name] = out / name
        _log(log, f"{name} written to {out / name} ({time.time() - t0:.0f}s)")
    _log(log, f"train_toy total {time.time() - t_start:.0f}s")
    return written
