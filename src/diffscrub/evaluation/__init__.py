"""Evaluation of an erased model against its reference: concept rates, preservation, adherence.

``evaluate(EvalConfig(...))`` samples both models on the same seeds and writes ``metrics.json``
(schema: docs/metrics-schema.md), ``samples.json`` and PNG grids. Metrics are pure functions in
:mod:`diffscrub.evaluation.metrics`; models that read images live in
:mod:`diffscrub.evaluation.readers`.
"""

from .config import EvalConfig
from .metrics import (
    bootstrap_ci,
    frechet_distance,
    mean_summary,
    paired_rate_drop,
    pixel_difference,
    rate_summary,
    ssim_per_sample,
    wilson_interval,
)
from .prompts import SET_NAMES, PromptSets, read_prompts_file, toy_prompt_sets
from .run import evaluate

__all__ = [
    "SET_NAMES",
    "EvalConfig",
    "PromptSets",
    "bootstrap_ci",
    "evaluate",
    "frechet_distance",
    "mean_summary",
    "paired_rate_drop",
    "pixel_difference",
    "rate_summary",
    "read_prompts_file",
    "ssim_per_sample",
    "toy_prompt_sets",
    "wilson_interval",
]
