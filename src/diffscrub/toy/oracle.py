"""The oracle: a small CNN that reads digit canvases.

It predicts, for a 32x32 canvas, which of the ten digits are present (multi-label) and
which of the four backgrounds it shows. It is trained only on canvases drawn from the
*train* handwriting split, with light blur/noise/colour jitter so that it also reads
slightly blurry generated images, and is judged on canvases from the *held-out*
handwriting (``diffscrub toy oracle-check``).

``Oracle.load()`` returns the shipped oracle; ``predict`` gives digit presence,
background and probabilities; ``features`` gives the penultimate-layer activations
(used for a Frechet distance between image sets).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from diffscrub.errors import InputError
from diffscrub.toy.canvas import BACKGROUNDS, sample_canvases, targets

WIDTHS = (24, 48, 96)
FEATURE_DIM = 192
DIGIT_THRESHOLD = 0.5


def weights_dir() -> Path:
    return Path(__file__).resolve().parent / "weights"


def default_oracle_path() -> Path:
    return weights_dir() / "oracle.safetensors"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class OracleNet(nn.Module):
    """Three conv stages (32 -> 16 -> 8 px), max+mean pooling, a 192-d feature layer, 14 logits."""

    def __init__(self, widths: tuple[int, int, int] = WIDTHS, feature_dim: int = FEATURE_DIM):
        super().__init__()
        w1, w2, w3 = widths
        self.stage1 = _block(3, w1)
        self.stage2 = _block(w1, w2)
        self.stage3 = _block(w2, w3)
        self.fc = nn.Linear(2 * w3, feature_dim)
        self.head = nn.Linear(feature_dim, 10 + len(BACKGROUNDS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, 3, 32, 32] in [0, 1] -> [N, feature_dim]."""
        x = (x - 0.5) / 0.25
        x = F.max_pool2d(self.stage1(x), 2)
        x = F.max_pool2d(self.stage2(x), 2)
        x = self.stage3(x)
        pooled = torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)
        return F.relu(self.fc(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_float_images(images: Any) -> torch.Tensor:
    """Convert images to float [N, 3, H, W] in [0, 1].

    Accepts uint8 arrays/tensors (NHWC or NCHW, 0..255), float arrays/tensors in [0, 1]
    (NHWC or NCHW, e.g. a diffusers pipeline's ``output_type="np"``/``"pt"`` output), a single
    image, or a list of PIL images.
    """
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise InputError("no images given to the oracle: pass at least one image")
        images = np.stack([np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images])
    if isinstance(images, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, torch.Tensor):
        t = images.detach().cpu()
    elif hasattr(images, "convert"):
        t = torch.from_numpy(np.asarray(images.convert("RGB")))
    else:
        raise InputError(f"cannot read images of type {type(images).__name__}: pass uint8/float arrays or PIL images")
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise InputError(f"images have shape {tuple(t.shape)}: expected [N, H, W, 3] or [N, 3, H, W]")
    if t.shape[1] != 3 and t.shape[-1] == 3:
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] != 3:
        raise InputError(f"images have shape {tuple(t.shape)}: expected 3 colour channels")
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    else:
        t = t.float().clamp(0.0, 1.0)
    if t.shape[-2:] != (32, 32):
        t = F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    return t.contiguous()


class Oracle:
    """Shipped canvas reader. ``Oracle.load()``; ``predict(images)``; ``features(images)``."""

    def __init__(self, net: OracleNet, device: str | torch.device = "cpu"):
        self.net = net.eval().to(device)
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> "Oracle":
        from safetensors.torch import load_file

        path = Path(path) if path is not None else default_oracle_path()
        if not path.is_file():
            raise InputError(f"oracle weights {path} not found: run `diffscrub toy train --model oracle` to build them")
        state = load_file(str(path))
        net = OracleNet()
        net.load_state_dict({k: v.float() for k, v in state.items()})
        return cls(net, device)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(path))
        return path

    @torch.no_grad()
    def _run(self, images: Any, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 512) -> torch.Tensor:
        x = to_float_images(images)
        outs = [fn(x[i : i + batch_size].to(self.device)).float().cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(outs)

    def logits(self, images: Any) -> torch.Tensor:
        """Raw [N, 14] logits: 10 digit-presence logits then 4 background logits."""
        return self._run(images, self.net)

    def features(self, images: Any) -> torch.Tensor:
        """Penultimate-layer activations, float [N, 192]."""
        return self._run(images, self.net.features)

    def predict(self, images: Any) -> dict[str, torch.Tensor]:
        """``digits`` bool [N, 10], ``background`` int [N] (index into BACKGROUNDS),
        ``digit_probs`` [N, 10], ``background_probs`` [N, 4]."""
        z = self.logits(images)
        digit_probs = torch.sigmoid(z[:, :10])
        bg_probs = torch.softmax(z[:, 10:], dim=1)
        return {
            "digits": digit_probs > DIGIT_THRESHOLD,
            "background": bg_probs.argmax(dim=1),
            "digit_probs": digit_probs,
            "background_probs": bg_probs,
        }


# --------------------------------------------------------------------------- training


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light blur, noise and colour jitter on float [N, 3, 32, 32] images in [0, 1]."""
    n = x.shape[0]
    # blur a random half with a random-width 3x3 gaussian
    sigma = torch.rand(n, generator=gen) * 1.1 + 0.3
    blur = torch.rand(n, generator=gen) < 0.5
    if blur.any():
        idx = blur.nonzero().squeeze(1)
        s = sigma[idx][:, None]
        k1 = torch.exp(-(torch.tensor([-1.0, 0.0, 1.0])[None, :] ** 2) / (2 * s**2))
        k1 = k1 / k1.sum(dim=1, keepdim=True)
        k2 = k1[:, :, None] * k1[:, None, :]  # [m, 3, 3]
        xb = x[idx]
        m = xb.shape[0]
        weight = k2[:, None].repeat_interleave(3, dim=0)  # [m*3, 1, 3, 3]
        xb = F.conv2d(F.pad(xb.reshape(1, m * 3, 32, 32), (1, 1, 1, 1), mode="replicate"), weight, groups=m * 3)
        x = x.clone()
        x[idx] = xb.reshape(m, 3, 32, 32)
    gain = 1.0 + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.16
    offset = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.08
    noise = torch.randn(x.shape, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) * 0.04)
    return (x * gain + offset + noise).clamp(0.0, 1.0)


def train_oracle(
    out_path: str | Path | None = None,
    steps: int = 2500,
    batch_size: int = 64,
    n_pool: int = 40000,
    seed: int = 0,
    lr: float = 2e-3,
    log: Callable[[str], None] | None = print,
    init: str | Path | None = None,
) -> Oracle:
    """Train the oracle on train-split canvases (from scratch, or further from the weights
    at ``init``) and save it to ``out_path``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    imgs, labels = sample_canvases(n_pool, rng, split="train", digit_weights=(1.0, 1.0, 1.0))
    presence, bg = targets(labels)
    x_all = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    y_dig = torch.from_numpy(presence)
    y_bg = torch.from_numpy(bg)
    if log:
        log(f"oracle: {n_pool} canvases generated in {time.time() - t0:.1f}s")

    net = Oracle.load(init).net if init is not None else OracleNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, min(200, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, n_pool, (batch_size,), generator=gen)
        x = augment(x_all[idx].float() / 255.0, gen)
        z = net(x)
        loss = F.binary_cross_entropy_with_logits(z[:, :10], y_dig[idx]) + F.cross_entropy(z[:, 10:], y_bg[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 250 == 0 or step == steps - 1):
            log(f"oracle step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    oracle = Oracle(net)
    if out_path is not None:
        oracle.save(out_path)
    return oracle


SHIPPED_STAGES = (
    dict(steps=2000, n_pool=30000, seed=0, lr=2e-3),
    dict(steps=2500, n_pool=40000, seed=1, lr=1e-3),
    dict(steps=1500, n_pool=40000, seed=2, lr=5e-4),
)
"""How the shipped oracle was trained: three runs, each continuing from the previous one
(batch 64, 6,000 steps in all), on fresh train-split canvases each time."""


def train_oracle_staged(
    out_path: str | Path,
    stages: tuple[dict, ...] = SHIPPED_STAGES,
    log: Callable[[str], None] | None = print,
) -> Oracle:
    """Reproduce the shipped oracle's training schedule (see :data:`SHIPPED_STAGES`)."""
    import tempfile

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="diffscrub-oracle-") as tmp:
        init = None
        for i, stage in enumerate(stages):
            path = Path(tmp) / f"stage{i}.safetensors"
            oracle = train_oracle(path, init=init, log=log, **stage)
            init = path
        oracle.save(out_path)
    return oracle


def oracle_check(oracle: Oracle | None = None, n: int = 1024, seed: int = 12345) -> dict[str, Any]:
    """Score the oracle on ``n`` canvases drawn from held-out handwriting.

    Returns ``digit_f1`` (list of 10), ``min_digit_f1``, ``background_accuracy``,
    ``background_confusion`` and ``n``.
    """
    oracle = oracle or Oracle.load()
    rng = np.random.default_rng(seed)
    imgs, labels = sample_canvases(n, rng, split="heldout")
    presence, bg = targets(labels)
    pred = oracle.predict(imgs)
    p = pred["digits"].numpy()
    t = presence.astype(bool)
    f1 = []
    for d in range(10):
        tp = np.sum(p[:, d] & t[:, d])
        fp = np.sum(p[:, d] & ~t[:, d])
        fn = np.sum(~p[:, d] & t[:, d])
        f1.append(float(2 * tp / max(1, 2 * tp + fp + fn)))
    bg_pred = pred["background"].numpy()
    conf = np.zeros((len(BACKGROUNDS), len(BACKGROUNDS)), np.int64)
    for a, b in zip(bg, bg_pred):
        conf[a, b] += 1
    return {
        "n": n,
        "digit_f1": f1,
        "min_digit_f1": min(f1),
        "background_accuracy": float(np.mean(bg_pred == bg)),
        "background_confusion": conf.tolist(),
    }


def format_oracle_check(result: dict[str, Any]) -> str:
    lines = [f"oracle on {result['n']} canvases from held-out handwriting"]
    lines.append("digit  " + " ".join(f"{d:>5}" for d in range(10)))
    lines.append("F1     " + " ".join(f"{v:5.3f}" for v in result["digit_f1"]))
    lines.append(f"min digit F1        {result['min_digit_f1']:.4f}  (bar 0.97)")
    lines.append(f"background accuracy {result['background_accuracy']:.4f}  (bar 0.98)")
    return "\n".join(lines)
