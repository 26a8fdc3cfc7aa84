"""Toy models: loading by name, sampling, and a tiny training run through the CLI."""

import json

import numpy as np
import pytest
import torch

from diffscrub.errors import ConfigError, InputError
from diffscrub.toy import resolve_toy_model
from diffscrub.toy.models import WEIGHTS_DIR


def _shipped(name):
    return (WEIGHTS_DIR / name / "model_index.json").is_file()


def test_resolve_unknown_names_is_none():
    assert resolve_toy_model("runwayml/stable-diffusion-v1-5") is None
    assert resolve_toy_model("/some/folder") is None
    assert resolve_toy_model("toy") is None


@pytest.mark.parametrize("name", ["toy-unet", "toy-mmdit"])
def test_shipped_model_loads_by_name_and_samples(name):
    if not _shipped(name):
        pytest.skip(f"{name} weights are not shipped yet (expected under {WEIGHTS_DIR / name})")
    from diffusers import DiffusionPipeline

    torch.set_num_threads(min(2, torch.get_num_threads()))
    folder = resolve_toy_model(name)
    assert folder == WEIGHTS_DIR / name
    pipe = DiffusionPipeline.from_pretrained(str(folder))  # plain load, float32 on CPU
    pipe.set_progress_bar_config(disable=True)
    expected = "StableDiffusionPipeline" if name == "toy-unet" else "StableDiffusion3Pipeline"
    assert type(pipe).__name__ == expected
    out = pipe(
        ["3 on flat", ""],
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert out.images.shape == (2, 32, 32, 3)
    assert np.isfinite(out.images).all()


@pytest.mark.parametrize("base,concept", [("toy-unet", "7"), ("toy-unet", "brick"), ("toy-mmdit", "brick")])
def test_shipped_retrains_are_found_by_bench_and_match_their_base(base, concept):
    """Each gold-standard retrain is the base model's pipeline and configs, trained without the concept, and
    ``bench`` finds it by itself."""
    from diffscrub.bench.compare import _retrained_folder

    folder = WEIGHTS_DIR / f"{base}-without-{concept}"
    assert _retrained_folder(base, concept, None) == folder
    meta = json.loads((folder / "diffscrub_toy.json").read_text())
    assert meta["model"] == base and meta["exclude"] == concept
    index = json.loads((folder / "model_index.json").read_text())
    assert index == json.loads((WEIGHTS_DIR / base / "model_index.json").read_text())
    for config in (WEIGHTS_DIR / base).glob("*/config.json"):
        ours = json.loads((folder / config.parent.name / "config.json").read_text())
        theirs = json.loads(config.read_text())
        ours.pop("_name_or_path", None)  # where the folder was saved from, not what it is
        theirs.pop("_name_or_path", None)
        assert ours == theirs, config.parent.name


def test_weights_stay_small():
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert total < 30 * 2**20


def _smoke(tmp_path, model, extra=()):
    from diffusers import DiffusionPipeline

    from diffscrub.toy.cli import main

    torch.set_num_threads(min(2, torch.get_num_threads()))
    args = ["toy", "train", "--model", model, "--steps", "2", "--canvases", "8", "--batch-size", "4",
            "--exclude", "7", "--out", str(tmp_path), "--quiet", *extra]
    assert main(args) == 0
    meta = json.loads((tmp_path / model / "diffscrub_toy.json").read_text())
    assert meta["exclude"] == "7" and meta["steps_done"] == 2
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / model))
    pipe.set_progress_bar_config(disable=True)
    img = pipe("3 on grass", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 32, 32, 3)
    return type(pipe).__name__


def test_train_smoke_and_reload(tmp_path):
    assert _smoke(tmp_path, "toy-unet") == "StableDiffusionPipeline"
    assert (tmp_path / "vae" / "config.json").is_file()


@pytest.mark.slow
def test_train_smoke_mmdit(tmp_path):
    assert _smoke(tmp_path, "toy-mmdit") == "StableDiffusion3Pipeline"


def test_train_rejects_bad_values(tmp_path):
    from diffscrub.toy.train import train_toy

    with pytest.raises(InputError, match="unknown toy concept"):
        train_toy("toy-unet", tmp_path, exclude="cat", steps=1)
    with pytest.raises(ConfigError, match="unknown toy model"):
        train_toy("toy-gan", tmp_path, steps=1)
