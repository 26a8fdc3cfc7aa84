"""``evaluate``: sample the erased and the reference model on the same seeds and measure.

The flow: check the config, load images and pipelines, build the prompt sets, check each
concept reader on real forget/retain images, sample every set from both models with the
same per-sample seeds, read the samples, measure the change, write ``metrics.json``,
``samples.json`` and one PNG grid per set. The schema is documented in docs/metrics-schema.md.
"""

from __future__ import annotations

import datetime as _dt
import math
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..config import to_dict
from ..errors import ConfigError, InputError
from . import metrics as M
from .config import DEFAULT_GUIDANCE, SEED_STRIDE, EvalConfig
from .prompts import SET_NAMES, PromptSets, read_prompts_file, toy_prompt_sets
from .readers import (
    ARTIFACTS_FILE,
    CallableReader,
    FeatureRecorder,
    OracleFeatures,
    OracleReader,
    PrototypeDetector,
    has_prototypes,
    inception_features,
    load_callable,
)
from .sampling import (
    check_text_to_image,
    comparison_grid,
    one_step_timestep,
    sample_images,
    sample_one_step,
    save_png,
)

SCHEMA_VERSION = 1
SET_SEED_OFFSETS = {"null": 0, "concept": 1_000_000, "other": 2_000_000}
"""Sample seeds: ``seed * SEED_STRIDE + offset[set] + column`` (+ ``row * n`` in the null set, whose rows
repeat one prompt). The stride keeps the seeds of ``--seed k`` apart from those of every other ``k``, so
two base seeds are two independent readings (with ``seed + ...``, ``--seed 1`` redrew 127 of the 128
null samples of ``--seed 0``); ``--seed 0`` draws the seeds it always drew."""
READER_ORDER = ("classifier", "oracle", "detector")
"""The first available reader is the primary one (``concept_rate`` of each set)."""
PRESERVATION_SETS = ("null", "other")


def _log(config: EvalConfig, msg: str) -> None:
    if not config.quiet:
        print(msg, file=sys.stderr)


def _versions() -> dict[str, str]:
    import torchmetrics

    from ..core.trainer import versions

    return {**versions(), "torchmetrics": torchmetrics.__version__}


def _device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _is_toy_name(model: str) -> bool:
    try:
        from ..toy.recipes import MODEL_NAMES
    except ImportError:
        return False
    return pathlib.Path(str(model)).name.lower() in MODEL_NAMES


def _prepare_pipe(pipe, device: torch.device):
    pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def _layout(set_name: str, prompts: list[str], config: EvalConfig) -> dict:
    """Rows, columns, the prompt and seed of every sample (row-major)."""
    base = config.seed * SEED_STRIDE + SET_SEED_OFFSETS[set_name]
    if set_name == "null":
        cols = min(config.n, config.n_null)
        rows = -(-config.n_null // cols)
        row_prompts = [""] * rows
        cells = [(r, c) for r in range(rows) for c in range(cols)]
        seeds = [base + r * cols + c for r, c in cells]
    else:
        rows, cols = len(prompts), config.n
        row_prompts = list(prompts)
        cells = [(r, c) for r in range(rows) for c in range(cols)]
        seeds = [base + c for _r, c in cells]
    return {"rows": rows, "cols": cols, "row_prompts": row_prompts,
            "prompts": [row_prompts[r] for r, _ in cells], "seeds": seeds}


def _finite(tree):
    """NaN and infinities become None, so metrics.json stays strict JSON."""
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_finite(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def preflight(config: EvalConfig, *, library: bool = False) -> PromptSets:
    """Every check that needs no model (required keys, output folder, prompts, image folders); the prompt sets."""
    from ..core.output import check_output_dir
    from ..data import scan_image_folder
    from ..loading import check_model_arg

    config.require(library=library)
    check_output_dir(config.out, overwrite=config.overwrite)
    if config.toy_concept is not None:
        prompt_sets = toy_prompt_sets(config.toy_concept, config.max_prompts)
    else:
        prompt_sets = read_prompts_file(config.prompts, config.max_prompts)
    scan_image_folder(config.forget, name="forget")
    if config.retain:
        scan_image_folder(config.retain, name="retain")
    if config.sample_cache and pathlib.Path(config.sample_cache).is_file():
        raise InputError(f"--sample-cache '{config.sample_cache}' is a file: pass a folder (it is made if missing)")
    if not library:
        check_model_arg(config.model, allow_pickle=config.allow_pickle)
        check_model_arg(config.reference, allow_pickle=config.allow_pickle)
    return prompt_sets


def _paired_rates(reference: torch.Tensor, erased: torch.Tensor, seed: int, config: EvalConfig) -> dict:
    """Each model's rate of a bool ``[N]`` reading on the same samples, and the paired drop between them."""
    return {"reference": M.rate_summary(reference, config.confidence),
            "erased": M.rate_summary(erased, config.confidence),
            "drop": M.paired_rate_drop(reference, erased, seed, config.bootstrap, config.confidence)}


def _rates_by_prompt(prompts: list[str], reference: list[bool], erased: list[bool], confidence: float) -> list[dict]:
    """``[{"prompt", "reference": RATE, "erased": RATE}]`` in the set's prompt order (a list: metrics.json
    sorts its keys)."""
    rows: dict[str, tuple[list[bool], list[bool]]] = {}
    for prompt, ref, era in zip(prompts, reference, erased):
        r, e = rows.setdefault(prompt, ([], []))
        r.append(ref)
        e.append(era)
    return [{"prompt": prompt, "reference": M.rate_summary(torch.tensor(r), confidence),
             "erased": M.rate_summary(torch.tensor(e), confidence)} for prompt, (r, e) in rows.items()]


def evaluate(
    config: EvalConfig,
    pipe=None,
    reference_pipe=None,
    classifier: Callable[[torch.Tensor], Any] | None = None,
    *,
    oracle=None,
    feature_extractor: torch.nn.Module | None = None,
    sample_cache=None,
) -> dict:
    """Evaluate an erased pipeline against its reference; write ``config.out``; return the metrics dict.

    Args:
        config: the evaluation options.
        pipe: the erased pipeline, already loaded (otherwise ``config.model`` is loaded).
        reference_pipe: the original pipeline, already loaded (otherwise ``config.reference``).
        classifier: an external concept classifier ``fn(images [N,3,H,W] in [0,1]) -> [N]`` (bool,
            or probabilities read as present above 0.5); overrides ``config.classifier``.
        oracle: the toy oracle to use (default ``Oracle.load()`` when ``config.toy_concept`` is set).
        feature_extractor: an ``nn.Module`` for the Fréchet distance (float images in [0, 1] to
            ``[N, D]``, with ``num_features``); default: the oracle's features on the toy world,
            else Inception if its weights are on this machine.
        sample_cache: a :class:`~diffscrub.evaluation.cache.SampleCache` (default: one on
            ``config.sample_cache`` when that is set): a model given by its folder
            (``config.model`` / ``config.reference``) is read from it where it was sampled before on the
            same prompts, seeds and settings, and what is drawn is put in it. Pipelines passed in are
            always sampled.

    Returns:
        The dict written to ``metrics.json`` (see docs/metrics-schema.md).
    """
    from ..core.output import atomic_dir, write_json
    from ..data import load_image_folder

    started = time.perf_counter()
    started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    prompt_sets = preflight(config, library=pipe is not None and reference_pipe is not None)
    notes: list[str] = []

    # ---------------------------------------------------------------- images
    warn = lambda msg, *a, **k: _log(config, f"warning: {msg}")
    forget = load_image_folder(config.forget, name="forget", resolution=config.resolution, warn=warn)
    retain = None
    if config.retain:
        retain = load_image_folder(config.retain, name="retain", resolution=config.resolution, warn=warn)
    height, width = (config.resolution,) * 2 if config.resolution else forget.hw
    forget01 = (forget.images + 1.0) / 2.0
    retain01 = (retain.images + 1.0) / 2.0 if retain is not None else None
    if retain01 is not None and tuple(retain01.shape[-2:]) != (height, width):
        retain01 = torch.nn.functional.interpolate(retain01, size=(height, width), mode="bilinear",
                                                   antialias=True, align_corners=False).clamp(0, 1)

    # ---------------------------------------------------------------- pipelines
    from ..core.trainer import pick_device

    device = pick_device(config.device)
    pipe_given, ref_given = pipe is not None, reference_pipe is not None
    if pipe is None or reference_pipe is None:
        from ..loading import load_pipeline

        _log(config, "loading pipelines")
        if pipe is None:
            pipe = load_pipeline(config.model, family=config.family, allow_pickle=config.allow_pickle)
        if reference_pipe is None:
            reference_pipe = load_pipeline(config.reference, family=config.family, allow_pickle=config.allow_pickle)
    check_text_to_image(pipe, "erased")
    check_text_to_image(reference_pipe, "reference")
    if type(pipe) is not type(reference_pipe):
        raise InputError(
            f"the erased pipeline is a {type(pipe).__name__} but the reference is a {type(reference_pipe).__name__}: "
            "pass the model the erased one was made from as --reference"
        )
    _prepare_pipe(pipe, device)
    _prepare_pipe(reference_pipe, device)
    guidance = config.guidance
    if guidance is None:
        if _is_toy_name(config.model) or _is_toy_name(config.reference):
            from ..toy.quality import default_guidance

            guidance = default_guidance(config.reference or config.model)
        else:
            guidance = DEFAULT_GUIDANCE

    # ---------------------------------------------------------------- concept readers
    readers: dict[str, Any] = {}
    reader_info: dict[str, dict] = {}
    if classifier is None and config.classifier:
        classifier = load_callable(config.classifier)
    if classifier is not None:
        readers["classifier"] = CallableReader(classifier, label=config.classifier, batch_size=config.batch_size)
        reader_info["classifier"] = {"callable": readers["classifier"].label}
    if config.toy_concept is not None:
        if oracle is None:
            from ..toy.oracle import Oracle

            oracle = Oracle.load(device=device)
        readers["oracle"] = OracleReader(oracle, config.toy_concept)
        reader_info["oracle"] = {"concept": config.toy_concept}
    # An explicit --artifacts must hold the prototypes (from_run raises otherwise); the --model folder may.
    artifacts_dir = pathlib.Path(config.artifacts or config.model) if (config.artifacts or config.model) else None
    if artifacts_dir is not None and (config.artifacts or has_prototypes(artifacts_dir)):
        from ..adapters import adapter_for

        ref_adapter = adapter_for(reference_pipe, config.family)
        detector = PrototypeDetector.from_run(artifacts_dir, ref_adapter, area=config.detector_area,
                                              draws=config.detector_draws, seed=config.seed,
                                              batch_size=config.batch_size, device=device)
        readers["detector"] = detector
        reader_info["detector"] = {**detector.settings(), "artifacts": str(artifacts_dir / ARTIFACTS_FILE)}
    else:
        where = artifacts_dir / ARTIFACTS_FILE if artifacts_dir else "(no --artifacts or --model folder)"
        notes.append(f"prototype detector not used: no {where}")
    primary = next((name for name in READER_ORDER if name in readers), None)
    if primary is None:
        notes.append("concept rates skipped: no concept reader (give --toy-concept, --classifier, or an erase run "
                     "folder with diffscrub_artifacts.safetensors)")

    # Each reader read on real images: how often it sees the concept in the forget images (it should)
    # and in the retain images (it should not). A reader that fails this check cannot be trusted.
    for name, reader in readers.items():
        flags, _ = reader(forget01)
        reader_info[name]["forget_rate"] = M.rate_summary(flags, config.confidence)
        if retain01 is not None:
            flags, _ = reader(retain01)
            reader_info[name]["retain_rate"] = M.rate_summary(flags, config.confidence)

    # ---------------------------------------------------------------- Fréchet distance extractor
    fd_module, fd_name = feature_extractor, "user feature extractor" if feature_extractor is not None else ""
    if fd_module is None and retain01 is not None:
        if config.toy_concept is not None and oracle is not None:
            fd_module, fd_name = OracleFeatures(oracle), "toy oracle penultimate layer (192-d)"
        else:
            fd_module, fd_name = inception_features(config.fd_weights)
            if fd_module is None:
                notes.append(fd_name)
    if retain01 is None:
        notes.append("Fréchet distance skipped: no --retain folder of real images to compare with")
        fd_module = None
    if retain01 is not None and retain01.shape[0] < 2:
        notes.append("Fréchet distance skipped: the retain folder needs at least two images")
        fd_module = None
    fid = real_features = None
    if fd_module is None:
        fd_name = None
    else:
        from torchmetrics.image.fid import FrechetInceptionDistance

        if not hasattr(fd_module, "num_features"):
            raise ConfigError("the Fréchet feature extractor needs a num_features attribute (its output size)")
        recorder = FeatureRecorder(fd_module)
        fid = FrechetInceptionDistance(feature=recorder, normalize=True, reset_real_features=False).to(device)
        for start in range(0, retain01.shape[0], config.batch_size):
            fid.update(retain01[start:start + config.batch_size].to(device), real=True)
        real_features = recorder.take()

    # ---------------------------------------------------------------- sample and measure every set
    # A one-step generator (sfd --one-step) samples in one denoiser call without guidance; any other
    # model through its pipeline's sampler with the evaluation's steps and guidance.
    era_one_step, ref_one_step = one_step_timestep(config.model), one_step_timestep(config.reference)

    identities = {}
    if sample_cache is None and config.sample_cache:
        from .cache import SampleCache

        sample_cache = SampleCache(config.sample_cache)
    if sample_cache is not None:
        from ..loading import resolve_model
        from .cache import folder_identity

        for side, name, given in (("erased", config.model, pipe_given), ("reference", config.reference, ref_given)):
            path = pathlib.Path(resolve_model(name)) if name and not given else None
            if path is not None and path.exists():
                identities[side] = folder_identity(path)

    def sample(side: str, which_pipe, timestep: int | None, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        key = None
        if side in identities:
            from .cache import sample_key

            key = sample_key(identities[side], prompts, seeds, steps=config.steps, guidance=guidance, height=height,
                             width=width, one_step=timestep)
            cached = sample_cache.get(key)
            if cached is not None:
                return cached
        size = {"height": height, "width": width, "batch_size": config.batch_size}
        if timestep is not None:
            images = sample_one_step(which_pipe, prompts, seeds, timestep=timestep, **size)
        else:
            images = sample_images(which_pipe, prompts, seeds, steps=config.steps, guidance=guidance, **size)
        if key is not None:
            sample_cache.put(key, images)
        return images

    out_dir_files: dict[str, Any] = {}
    sets: dict[str, dict] = {}
    samples: dict[str, list] = {}
    grids: dict[str, dict] = {}
    for set_index, set_name in enumerate(SET_NAMES):
        prompts = prompt_sets.get(set_name)
        if not prompts:
            sets[set_name] = {"skipped": "no prompts in this set"}
            continue
        lay = _layout(set_name, prompts, config)
        t0 = time.perf_counter()
        _log(config, f"sampling {set_name}: {len(lay['seeds'])} samples x 2 models")
        ref_images = sample("reference", reference_pipe, ref_one_step, lay["prompts"], lay["seeds"])
        era_images = sample("erased", pipe, era_one_step, lay["prompts"], lay["seeds"])
        n_total = len(lay["seeds"])
        if set_name == "null":  # keep exactly n_null samples for the figures (the grid shows full rows)
            ref_used, era_used, used = ref_images[:config.n_null], era_images[:config.n_null], config.n_null
        else:
            ref_used, era_used, used = ref_images, era_images, n_total
        bseed = config.seed + 17 * (set_index + 1)
        figures: dict[str, Any] = {"prompts": prompts if set_name != "null" else [""], "n": used,
                                   "samples_per_prompt": config.n if set_name != "null" else used}
        per_sample: dict[str, Any] = {"prompt": lay["prompts"][:used], "seed": lay["seeds"][:used]}

        # concept rates, by every reader
        readings: dict[str, dict] = {}
        ref_flags_primary = None
        for name, reader in readers.items():
            rf, rs = reader(ref_used)
            ef, es = reader(era_used)
            readings[name] = {"reference": M.rate_summary(rf, config.confidence),
                              "erased": M.rate_summary(ef, config.confidence),
                              "drop": M.paired_rate_drop(rf, ef, bseed, config.bootstrap, config.confidence)}
            per_sample[f"{name}_reference"] = [bool(x) for x in rf]
            per_sample[f"{name}_erased"] = [bool(x) for x in ef]
            per_sample[f"{name}_score_reference"] = [round(float(x), 5) for x in rs]
            per_sample[f"{name}_score_erased"] = [round(float(x), 5) for x in es]
            if name == primary:
                ref_flags_primary = rf
        if primary is not None:
            figures["concept_rate"] = {**readings[primary], "reader": primary}
            if set_name != "null":  # which prompts still draw it: the set's rate can hide one that does
                figures["concept_rate_by_prompt"] = _rates_by_prompt(
                    lay["prompts"][:used], per_sample[f"{primary}_reference"], per_sample[f"{primary}_erased"],
                    config.confidence)
        figures["concept_rate_by_reader"] = readings

        # change against the reference on the same seeds
        diff = M.pixel_difference(ref_used, era_used)
        ssim = M.ssim_per_sample(ref_used, era_used)
        per_sample["pixel_diff"] = [round(float(x), 6) for x in diff]
        per_sample["ssim"] = [round(float(x), 6) for x in ssim]
        change = {"pixel_diff": M.mean_summary(diff, bseed, config.bootstrap, config.confidence),
                  "ssim": M.mean_summary(ssim, bseed, config.bootstrap, config.confidence)}
        if ref_flags_primary is not None and set_name in PRESERVATION_SETS:
            keep = ~ref_flags_primary
            change["concept_free"] = {
                "reader": primary,
                "pixel_diff": M.mean_summary(diff[keep], bseed, config.bootstrap, config.confidence),
                "ssim": M.mean_summary(ssim[keep], bseed, config.bootstrap, config.confidence),
            }
        figures["preservation" if set_name in PRESERVATION_SETS else "change"] = change

        # Fréchet distance to real retain images
        if fid is not None and set_name in PRESERVATION_SETS:
            fd: dict[str, Any] = {"features": fd_name, "real_n": int(real_features.shape[0])}
            for side, images in (("reference", ref_used), ("erased", era_used)):
                if images.shape[0] < 2:
                    fd[side] = None
                    continue
                fid.reset()
                for start in range(0, images.shape[0], config.batch_size):
                    fid.update(images[start:start + config.batch_size].to(device), real=False)
                value = float(fid.compute())
                fake = recorder.take()
                lo, hi = M.bootstrap_ci((fake, real_features), M.frechet_distance, seed=bseed,
                                        n_resamples=config.fd_bootstrap, confidence=config.confidence, paired=False)
                fd[side] = {"value": value, "n": int(fake.shape[0]), "ci": [lo, hi]}
            figures["frechet_distance"] = fd

        # prompt adherence (toy, other prompts)
        if "oracle" in readers and set_name == "other":
            ref, era = (readers["oracle"].read_prompts(images, lay["prompts"][:used])
                        for images in (ref_used, era_used))  # one oracle pass per model
            per_sample["adherence_reference"] = [bool(x) for x in ref["adherent"]]
            per_sample["adherence_erased"] = [bool(x) for x in era["adherent"]]
            figures["prompt_adherence"] = _paired_rates(ref["adherent"], era["adherent"], bseed, config)
            asked = ref["background_asked"]
            if asked.any():  # the asked background alone, over the prompts that ask for one
                per_sample["background_reference"] = [bool(x) for x in ref["background_found"]]
                per_sample["background_erased"] = [bool(x) for x in era["background_found"]]
                figures["background_adherence"] = _paired_rates(ref["background_found"][asked],
                                                                era["background_found"][asked], bseed, config)
        figures["sampling_s"] = round(time.perf_counter() - t0, 2)
        sets[set_name] = figures
        samples[set_name] = per_sample

        grid = comparison_grid(ref_images, era_images, lay["rows"], lay["cols"], lay["row_prompts"],
                               cell=config.grid_cell)
        grids[set_name] = {"file": f"grid_{set_name}.png", "rows": lay["row_prompts"], "cols": lay["cols"],
                           "seeds": [lay["seeds"][r * lay["cols"]:(r + 1) * lay["cols"]] for r in range(lay["rows"])]}
        out_dir_files[grids[set_name]["file"]] = grid

    result = {
        "schema_version": SCHEMA_VERSION,
        "kind": "diffscrub-eval",
        "run": {"started": started_at, "wall_s": round(time.perf_counter() - started, 2),
                "versions": _versions(), **_device_info(device)},
        "config": to_dict(config),
        "models": {"erased": config.model or "(passed in)", "reference": config.reference or "(passed in)",
                   "pipeline_class": type(pipe).__name__},
        "sampling": {"steps": config.steps, "guidance": guidance, "height": height, "width": width,
                     "scheduler": type(reference_pipe.scheduler).__name__,
                     "seeds": "seed * seed_stride + offset[set] + column (+ row * n in the null set); one CPU "
                              "torch.Generator per sample, the same for both models",
                     "seed_stride": SEED_STRIDE, "seed_offsets": SET_SEED_OFFSETS,
                     # one-step generators: one denoiser call at this timestep, no guidance (else absent)
                     **({"erased_one_step_timestep": era_one_step} if era_one_step is not None else {}),
                     **({"reference_one_step_timestep": ref_one_step} if ref_one_step is not None else {})},
        "prompts": prompt_sets.to_dict(),
        "readers": {"primary": primary, **reader_info},
        "frechet_features": fd_name or None,
        "sets": sets,
        "grids": grids,
        "notes": notes,
        "images": {"forget": len(forget), "retain": len(retain) if retain is not None else 0},
    }
    with atomic_dir(config.out, overwrite=config.overwrite) as tmp:
        for name, image in out_dir_files.items():
            save_png(image, tmp / name)
        write_json(tmp / "samples.json", _finite(samples))
        result["run"]["wall_s"] = round(time.perf_counter() - started, 2)
        result = _finite(result)
        write_json(tmp / "metrics.json", result)
    _log(config, f"wrote {config.out}")
    return result


__all__ = ["EvalConfig", "PromptSets", "evaluate"]
