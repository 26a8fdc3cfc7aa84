"""Options of ``diffscrub eval``: one dataclass, help text per field, checked on construction."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DEVICES, check_choice, check_range, option
from ..errors import ConfigError

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5

SEED_STRIDE = 10_000_000
"""Sample seeds are ``seed * SEED_STRIDE + ...`` (``run.SET_SEED_OFFSETS``), so each ``--seed`` has its own range."""
SAMPLE_SEED_END = 10**11
"""``--seed`` stays under this: times ``SEED_STRIDE`` it is still a valid 64-bit generator seed."""


@dataclass
class EvalConfig:
    """Everything about an evaluation run (``diffscrub eval``); see docs/metrics-schema.md."""

    model: str = option("", "the erased pipeline (the erase run's output folder, holding diffscrub.json)")
    reference: str = option("", "the original pipeline the erased one came from")
    forget: str = option("", "the forget image folder of the erase run (for the concept readers' check)")
    out: str = option("", "output folder for metrics.json, samples.json and the image grids")
    retain: str | None = option(None, "folder of real images without the concept (reader check, Fréchet distance)")
    prompts: str | None = option(None, "YAML/JSON file {concept: [...], other: [...]} (not needed with --toy-concept)")
    toy_concept: str | None = option(None, "toy world concept (a digit 0-9 or a background): prompts and oracle from the toy world")
    n: int = option(8, "samples (seeds) per prompt of the concept and other sets")
    n_null: int = option(32, "samples of the null prompt")
    max_prompts: int = option(8, "at most this many prompts per set")
    steps: int = option(DEFAULT_STEPS, "sampling steps")
    guidance: float | None = option(None, "classifier-free guidance scale (default: the toy default for toy models, else 7.5)")
    seed: int = option(0, "base seed: sample seeds derive from it, and two base seeds share none (independent "
                          "readings); the same seeds drive both models")
    resolution: int | None = option(None, "sample size in pixels (default: the forget images' size)")
    batch_size: int = option(16, "images per pipeline call")
    device: str = option("auto", "auto, cpu or cuda")
    family: str | None = option(None, "force a denoiser family instead of detecting it from the pipeline class")
    classifier: str | None = option(None, "external concept classifier 'module.path:callable' taking float images "
                                    "[N,3,H,W] in [0,1] and returning a bool or probability tensor [N]")
    artifacts: str | None = option(None, "erase run folder holding diffscrub.json and diffscrub_artifacts.safetensors "
                                   "(default: --model)")
    detector_area: float = option(0.05, "the prototype detector calls the concept present when its mask covers more than this share of the image")
    detector_draws: int = option(2, "noise draws averaged per sample by the prototype detector")
    fd_weights: str | None = option(None, "Inception weights for the Fréchet distance outside the toy world "
                                    "(torch-fidelity's .pth file); without them the distance is skipped")
    bootstrap: int = option(1000, "bootstrap resamples for intervals of means")
    fd_bootstrap: int = option(200, "bootstrap resamples for the Fréchet distance interval (each one is a full distance)")
    confidence: float = option(0.95, "two-sided confidence level of every interval")
    grid_cell: int = option(64, "largest side in pixels of one image in the PNG grids")
    sample_cache: str | None = option(None, "folder that keeps each model's samples by its files' contents, prompts, "
                                      "seeds and sampler settings: a model evaluated again (the reference, most often) "
                                      "is read back, not sampled (local folders or files only)")
    overwrite: bool = option(False, "replace a non-empty --out folder")
    allow_pickle: bool = option(False, "allow pickle checkpoints (they can run arbitrary code)")
    quiet: bool = option(False, "no progress messages")

    def __post_init__(self):
        for name in ("n", "n_null", "max_prompts", "steps", "batch_size", "detector_draws", "bootstrap",
                     "fd_bootstrap"):
            check_range(name, getattr(self, name), 1)
        check_range("grid_cell", self.grid_cell, 8)
        check_range("seed", self.seed, 0, SAMPLE_SEED_END, high_open=True)
        check_range("detector_area", self.detector_area, 0.0, 1.0, high_open=True)
        check_range("confidence", self.confidence, 0.0, 1.0, low_open=True, high_open=True)
        if self.guidance is not None:
            check_range("guidance", self.guidance, 0.0)
        if self.resolution is not None:
            check_range("resolution", self.resolution, 8)
            if self.resolution % 8:
                raise ConfigError(f"resolution={self.resolution} must be a multiple of 8")
        check_choice("device", self.device, DEVICES)
        if self.toy_concept is not None:
            from ..toy.canvas import CONCEPTS

            self.toy_concept = str(self.toy_concept).strip().lower()
            if self.toy_concept not in CONCEPTS:
                raise ConfigError(
                    f"toy_concept={self.toy_concept!r} is not a toy concept: use a digit 0-9 or one of "
                    "flat, brick, grass, gravel"
                )
        if self.classifier is not None and ":" not in self.classifier:
            raise ConfigError(f"classifier={self.classifier!r} must look like 'module.path:callable'")

    def require(self, *, library: bool = False) -> None:
        """The keys a run cannot start without (``library``: pipelines were passed in, paths not needed)."""
        keys = [("forget", "--forget"), ("out", "--out")]
        if not library:
            keys = [("model", "--model"), ("reference", "--reference")] + keys
        for key, flag in keys:
            if not getattr(self, key):
                raise ConfigError(f"{key} is not set: pass {flag}")
        if self.toy_concept is None and self.prompts is None:
            raise ConfigError("no prompts: pass --prompts FILE ({concept: [...], other: [...]}) or --toy-concept C")
        if self.toy_concept is not None and self.prompts is not None:
            raise ConfigError("pass either --prompts or --toy-concept, not both")
