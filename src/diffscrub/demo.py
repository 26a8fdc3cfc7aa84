"""``diffscrub demo``: the embedded default job, end to end on the shipped toy world.

Makes a forget set (canvases that contain the concept among clutter) and a retain set,
erases the concept from ``toy-unet`` with the Teacher–Student Scrubber, then evaluates both
models on the same seeds (the oracle reads the null prompt, prompts that ask for the concept
and prompts that do not) and writes the HTML report.

The default concept is the ``brick`` background, erased with the recipe that meets every target for
it on toy-unet (README, the table at the top); another background (``--concept grass``) gets the
same recipe. A digit (``--concept 7``) gets the first pass of the 7 recipe (a small mask); the
second pass that erases a digit under its name as well is a separate ``erase --then`` (README,
"The toy world").
"""

from __future__ import annotations

import sys
import time

from .config import EraseConfig
from .core.output import atomic_dir, check_output_dir, write_json
from .core.trainer import erase

#: the demo's concept and erase settings: the recipe that meets every target for brick on toy-unet in six
#: seeds of ten at 256 samples per column, seed 0 among them (README, "What the scrubber reaches", and
#: docs/toy-unet-brick.md, "What is left"). The prototypes find brick (the fingerprint's default); the mask
#: is filled from the same places of a retain image; the forget folder is named by textual inversion,
#: re-ranked by fit, and every word it weighed is left out of the vocabulary anchors.
DEMO_CONCEPT = "brick"
DEMO_STEPS = 400
#: a digit covers a small part of the canvas: the 7 recipe's first pass (docs/toy-unet-7.md)
DIGIT_OPTIONS = {"lr": 1e-4, "batch_size": 8, "inversion_steps": 50}
DIGIT_TSS_OPTIONS = {"fingerprint": "knn", "knn_area": 0.15, "blind_fill": "contrast"}
#: brick's recipe (above) on the same base
DEMO_OPTIONS = {**DIGIT_OPTIONS, "inversion_rerank": 10, "random_contexts": 8, "leave_out_candidates": True}
DEMO_TSS_OPTIONS = {"blind_fill": "contrast", "name_target": "neutral", "blind_prompt": "keep", "vocab_anchors": 19,
                    "lambda_v": 8.0, "lambda_f": 2.0, "lambda_r": 2.0}
#: samples per prompt (concept and other sets), of the null prompt, and prompts per set, in the demo's evaluation.
EVAL_N, EVAL_N_NULL, EVAL_PROMPTS = 4, 64, 4


def run_demo(out: str = "demo-out", steps: int | None = None, overwrite: bool = False, quiet: bool = False,
             concept: str = DEMO_CONCEPT, *, set_size: int = 64, eval_n: int = EVAL_N, eval_n_null: int = EVAL_N_NULL,
             max_prompts: int = EVAL_PROMPTS, erase_options: dict | None = None,
             tss_options: dict | None = None) -> dict:
    """Run the demo into ``out`` (written to a temporary sibling, renamed when complete).

    ``out/`` gets ``sets/`` (forget and retain PNGs), ``erased/`` (the pipeline and its run record),
    ``eval/`` (metrics.json, before/after grids on fixed seeds) and ``report.html``.
    """
    from .evaluation import EvalConfig, evaluate
    from .evaluation.cli import format_summary
    from .report import build_report
    from .toy.canvas import check_concept
    from .toy.sets import make_sets

    concept = check_concept(concept)
    out_path = check_output_dir(out, overwrite=overwrite)
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr))
    started = time.perf_counter()
    with atomic_dir(out_path, overwrite=overwrite) as tmp:
        say(f"1/4 making forget and retain sets for concept {concept!r}")
        make_sets(concept, tmp / "sets", n=set_size, seed=0)
        say("2/4 erasing it from toy-unet with the Teacher-Student Scrubber")
        options, recipe = (DIGIT_OPTIONS, DIGIT_TSS_OPTIONS) if concept.isdigit() else (DEMO_OPTIONS, DEMO_TSS_OPTIONS)
        options = {**options, **(erase_options or {})}
        config = EraseConfig(model="toy-unet", forget=str(tmp / "sets" / "forget"), retain=str(tmp / "sets" / "retain"),
                             out=str(tmp / "erased"), steps=steps or DEMO_STEPS, quiet=quiet, device="cpu", seed=0,
                             **options)
        result = erase(config, {**recipe, **(tss_options or {})}, log=say)
        say("3/4 sampling both models on the same seeds and reading the samples with the oracle")
        metrics = evaluate(EvalConfig(model=str(tmp / "erased"), reference="toy-unet", forget=str(tmp / "sets" / "forget"),
                                      retain=str(tmp / "sets" / "retain"), toy_concept=concept, out=str(tmp / "eval"),
                                      n=eval_n, n_null=eval_n_null, max_prompts=max_prompts, device="cpu",
                                      quiet=True))
        say("4/4 writing the report")
        build_report(tmp / "erased", tmp / "eval", out=tmp / "report.html")
        summary = {"concept": concept, "erase_seconds": result.record["timing"]["total_s"],
                   "nearest_words": result.record["conditioning"].get("nearest_words"),
                   "total_seconds": time.perf_counter() - started}
        write_json(tmp / "demo.json", summary)
    print(format_summary(metrics))
    print(f"demo finished in {time.perf_counter() - started:.0f}s: open {out_path / 'report.html'}")
    return {**summary, "metrics": metrics}
