"""Oracle-measured quality bars of a toy text-to-image model.

* single-digit prompts ``"d on bg"`` over all ten digits and four backgrounds: how often
  the asked digit is present and how often the asked background is shown;
* the null (empty) prompt: how often at least one digit is found, and which digit classes
  appear at all.

Samples use fixed seeds, so a run is reproducible on the same machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffscrub.errors import ConfigError
from diffscrub.toy.canvas import BACKGROUNDS
from diffscrub.toy.models import load_toy_pipeline, model_folder
from diffscrub.toy.oracle import Oracle
from diffscrub.toy.recipes import DEFAULT_GUIDANCE, DEFAULT_STEPS

BARS = {"digit": 0.85, "background": 0.90, "null_any_digit": 0.80}


def single_prompts() -> list[tuple[str, int, int]]:
    """All ``(prompt, digit, background index)`` single-digit prompts."""
    return [(f"{d} on {bg}", d, b) for b, bg in enumerate(BACKGROUNDS) for d in range(10)]


def default_guidance(name_or_path: str | Path) -> float:
    key = Path(str(name_or_path)).name.lower()
    return DEFAULT_GUIDANCE.get(key, 3.0)


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = 3.0,
    batch_size: int = 64,
) -> np.ndarray:
    """Sample one image per prompt (float NHWC in [0, 1]), batch ``i`` seeded with ``seed + i``."""
    out = []
    for i in range(0, len(prompts), batch_size):
        gen = torch.Generator("cpu").manual_seed(seed + i // batch_size)
        res = pipe(
            prompt=prompts[i : i + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            output_type="np",
        )
        out.append(np.asarray(res.images, dtype=np.float32))
    return np.concatenate(out)


def measure_quality(
    model: str | Path,
    guidance: float | None = None,
    steps: int = DEFAULT_STEPS,
    per_prompt: int = 8,
    n_null: int = 256,
    seed: int = 0,
    batch_size: int = 80,
    oracle: Oracle | None = None,
    pipe=None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Sample ``model`` and score it with the oracle. Returns the figures and pass flags."""
    if per_prompt < 1 or n_null < 1 or steps < 1:
        raise ConfigError(f"per_prompt={per_prompt}, n_null={n_null}, steps={steps} must all be at least 1")
    folder = model_folder(model)
    guidance = default_guidance(folder) if guidance is None else float(guidance)
    pipe = pipe or load_toy_pipeline(folder, device=device)
    oracle = oracle or Oracle.load()
    t0 = time.time()

    items = [it for it in single_prompts() for _ in range(per_prompt)]
    imgs = generate(pipe, [p for p, _, _ in items], seed=seed, steps=steps, guidance=guidance, batch_size=batch_size)
    pred = oracle.predict(imgs)
    digit_ok = np.array([bool(pred["digits"][i, d]) for i, (_, d, _) in enumerate(items)])
    bg_ok = np.array([int(pred["background"][i]) == b for i, (_, _, b) in enumerate(items)])
    n_found = pred["digits"].sum(dim=1).numpy()
    digits_of = np.array([d for _, d, _ in items])
    bgs_of = np.array([b for _, _, b in items])

    null_imgs = generate(pipe, [""] * n_null, seed=seed + 100_000, steps=steps, guidance=guidance, batch_size=batch_size)
    null_pred = oracle.predict(null_imgs)
    null_digits = null_pred["digits"].numpy()
    class_counts = null_digits.sum(axis=0).astype(int).tolist()
    bg_counts = np.bincount(null_pred["background"].numpy(), minlength=len(BACKGROUNDS)).tolist()

    res = {
        "model": str(folder),
        "guidance": guidance,
        "steps": steps,
        "seed": seed,
        "n_single": len(items),
        "digit_rate": float(digit_ok.mean()),
        "background_rate": float(bg_ok.mean()),
        "digit_rate_by_digit": [float(digit_ok[digits_of == d].mean()) for d in range(10)],
        "background_rate_by_background": [float(bg_ok[bgs_of == b].mean()) for b in range(len(BACKGROUNDS))],
        "mean_digits_found_single": float(n_found.mean()),
        "n_null": n_null,
        "null_any_digit_rate": float(null_digits.any(axis=1).mean()),
        "null_digit_counts": class_counts,
        "null_background_counts": bg_counts,
        "null_all_classes": bool(all(c > 0 for c in class_counts)),
        "wall_s": round(time.time() - t0, 1),
    }
    res["passes"] = {
        "digit": res["digit_rate"] >= BARS["digit"],
        "background": res["background_rate"] >= BARS["background"],
        "null_any_digit": res["null_any_digit_rate"] >= BARS["null_any_digit"],
        "null_all_classes": res["null_all_classes"],
    }
    return res


def format_quality(res: dict[str, Any]) -> str:
    ok = lambda b: "PASS" if b else "FAIL"  # noqa: E731
    p = res["passes"]
    lines = [
        f"model {res['model']}  guidance {res['guidance']}  steps {res['steps']}  seed {res['seed']}",
        f"{'measure':<44}{'value':>8}  {'bar':>6}  result",
        f"{'single-digit prompts: asked digit present':<44}{res['digit_rate']:>8.3f}  {'0.85':>6}  {ok(p['digit'])}",
        f"{'single-digit prompts: asked background':<44}{res['background_rate']:>8.3f}  {'0.90':>6}  {ok(p['background'])}",
        f"{'null prompt: at least one digit':<44}{res['null_any_digit_rate']:>8.3f}  {'0.80':>6}  {ok(p['null_any_digit'])}",
        f"{'null prompt: every digit class appears':<44}{str(res['null_all_classes']):>8}  {'yes':>6}  {ok(p['null_all_classes'])}",
        f"(single: {res['n_single']} samples, {res['n_single'] // 40} per prompt; null: {res['n_null']} samples; {res['wall_s']}s)",
        "asked digit present, by digit:  " + " ".join(f"{d}:{v:.2f}" for d, v in enumerate(res["digit_rate_by_digit"])),
        "asked background, by background: "
        + " ".join(f"{b}:{v:.2f}" for b, v in zip(BACKGROUNDS, res["background_rate_by_background"])),
        "null prompt digit counts:        " + " ".join(f"{d}:{c}" for d, c in enumerate(res["null_digit_counts"])),
    ]
    return "\n".join(lines)
