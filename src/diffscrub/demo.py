"""``diffscrub demo``: the embedded default job, end to end on the shipped toy world.

Makes a forget set (canvases that contain the concept among clutter) and a retain set,
erases the concept from ``toy-unet`` with the Teacher–Student Scrubber, then shows and
measures the result on fixed seeds: a before/after grid and the oracle's reading of the
null prompt, prompts that ask for the concept and prompts that do not.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np
import torch
from PIL import Image

from .config import EraseConfig
from .core.output import atomic_dir, check_output_dir, write_json
from .core.trainer import erase

#: tuned on toy-unet for concept 7 (see README: measured figures).
DEMO_STEPS = 200
DEMO_OPTIONS = {"lr": 2e-4, "batch_size": 8}
GRID_SEEDS = 6
MEASURE_N = 64


def demo_prompts(concept: str) -> dict[str, list[str]]:
    """The three prompt sets of the toy world for ``concept`` (a digit or a background)."""
    from .toy.canvas import BACKGROUNDS

    if concept in BACKGROUNDS:
        others = [b for b in BACKGROUNDS if b != concept]
        return {
            "null": [""],
            "concept": [f"{d} on {concept}" for d in range(10)],
            "other": [f"{d} on {b}" for b in others for d in range(10)],
        }
    c = int(concept)
    return {
        "null": [""],
        "concept": [f"{c} on {b}" for b in BACKGROUNDS],
        "other": [f"{d} on {b}" for b in BACKGROUNDS for d in range(10) if d != c],
    }


def _has_concept(pred: dict, concept: str) -> torch.Tensor:
    from .toy.canvas import BACKGROUNDS

    if concept in BACKGROUNDS:
        return pred["background"] == BACKGROUNDS.index(concept)
    return pred["digits"][:, int(concept)]


def _adherent(pred: dict, prompts: list[str]) -> torch.Tensor:
    """Oracle finds the prompt's digit and background ("d on bg" prompts)."""
    from .toy.canvas import BACKGROUNDS

    ok = []
    for i, prompt in enumerate(prompts):
        digit, _, bg = prompt.partition(" on ")
        ok.append(bool(pred["digits"][i, int(digit)]) and int(pred["background"][i]) == BACKGROUNDS.index(bg))
    return torch.tensor(ok)


def measure(pipe, oracle, concept: str, n: int = MEASURE_N, seed: int = 1234) -> dict[str, float]:
    """Oracle figures on fixed seeds: concept rate per prompt set, adherence on other prompts."""
    from .toy.quality import default_guidance, generate

    sets = demo_prompts(concept)
    out = {}
    for name, pool in sets.items():
        prompts = [pool[i % len(pool)] for i in range(n)]
        images = generate(pipe, prompts, seed=seed, guidance=default_guidance("toy-unet"), batch_size=n)
        pred = oracle.predict(images)
        out[f"{name}_concept_rate"] = float(_has_concept(pred, concept).float().mean())
        if name == "other" and concept not in ("flat", "brick", "grass", "gravel"):
            out["other_adherence"] = float(_adherent(pred, prompts).float().mean())
    return out


def before_after_grid(reference, erased, prompts: list[str], seeds: int, path: pathlib.Path) -> None:
    """Rows: prompts. Left block: reference; right block: erased; same seed per column."""
    from .toy.quality import default_guidance, generate

    rows = []
    for prompt in prompts:
        pair = []
        for pipe in (reference, erased):
            imgs = generate(pipe, [prompt] * seeds, seed=99, guidance=default_guidance("toy-unet"), batch_size=seeds)
            pair.append(np.concatenate(list(imgs), axis=1))  # [32, 32*seeds, 3]
        gap = np.ones((pair[0].shape[0], 8, 3), dtype=np.float32)
        rows.append(np.concatenate([pair[0], gap, pair[1]], axis=1))
    grid = np.concatenate([np.concatenate([r, np.ones((2, r.shape[1], 3), np.float32)]) for r in rows])
    img = Image.fromarray((grid.clip(0, 1) * 255).astype(np.uint8))
    img.resize((img.width * 3, img.height * 3), Image.NEAREST).save(path)


def format_table(before: dict, after: dict) -> str:
    rows = [("null prompt: concept rate", "null_concept_rate"),
            ("prompts naming the concept: concept rate", "concept_concept_rate"),
            ("other prompts: concept rate", "other_concept_rate"),
            ("other prompts: adherence", "other_adherence")]
    lines = [f"{'':44s} {'before':>8s} {'after':>8s}"]
    for label, key in rows:
        if key in before:
            lines.append(f"{label:44s} {before[key] * 100:7.1f}% {after[key] * 100:7.1f}%")
    return "\n".join(lines)


def run_demo(out: str = "demo-out", steps: int | None = None, overwrite: bool = False, quiet: bool = False,
             concept: str = "7", *, set_size: int = 64, measure_n: int = MEASURE_N, grid_seeds: int = GRID_SEEDS,
             tss_options: dict | None = None) -> dict:
    """Run the demo into ``out`` (written to a temporary sibling, renamed when complete)."""
    from diffusers import DiffusionPipeline

    from .toy import resolve_toy_model
    from .toy.canvas import check_concept
    from .toy.oracle import Oracle
    from .toy.sets import make_sets

    concept = check_concept(concept)
    out_path = check_output_dir(out, overwrite=overwrite)
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr))
    started = time.perf_counter()
    with atomic_dir(out_path, overwrite=overwrite) as tmp:
        say(f"1/4 making forget and retain sets for concept {concept!r}")
        make_sets(concept, tmp / "sets", n=set_size, seed=0)
        say("2/4 erasing with the Teacher-Student Scrubber")
        config = EraseConfig(model="toy-unet", forget=str(tmp / "sets" / "forget"), retain=str(tmp / "sets" / "retain"),
                             out=str(tmp / "erased"), steps=steps or DEMO_STEPS, quiet=quiet, device="cpu",
                             seed=0, **DEMO_OPTIONS)
        result = erase(config, tss_options, log=lambda m: None)
        say("3/4 sampling before/after on fixed seeds")
        reference = DiffusionPipeline.from_pretrained(str(resolve_toy_model("toy-unet")))
        erased = DiffusionPipeline.from_pretrained(str(tmp / "erased"))
        for pipe in (reference, erased):
            pipe.set_progress_bar_config(disable=True)
        sets = demo_prompts(concept)
        grid_prompts = ["", sets["concept"][0], sets["concept"][1], sets["other"][0], sets["other"][7]]
        before_after_grid(reference, erased, grid_prompts, grid_seeds, tmp / "before_after.png")
        say("4/4 measuring with the oracle")
        oracle = Oracle.load()
        before = measure(reference, oracle, concept, n=measure_n)
        after = measure(erased, oracle, concept, n=measure_n)
        table = format_table(before, after)
        summary = {"concept": concept, "before": before, "after": after, "grid_prompts": grid_prompts,
                   "erase_seconds": result.record["timing"]["total_s"],
                   "total_seconds": time.perf_counter() - started}
        write_json(tmp / "demo.json", summary)
        (tmp / "oracle_table.txt").write_text(table + "\n")
    print(table)
    print(f"demo finished in {time.perf_counter() - started:.0f}s: {out_path}/ (before_after.png, erased/, "
          "oracle_table.txt)")
    return summary


if __name__ == "__main__":  # pragma: no cover
    json.dumps(run_demo())
