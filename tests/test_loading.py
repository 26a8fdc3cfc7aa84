"""Model loading: safe defaults, clear refusals, toy names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from diffscrub.errors import InputError
from diffscrub.loading import _guess_single_file_family, check_model_arg, load_pipeline


@pytest.mark.parametrize("key,family", [
    ("model.diffusion_model.input_blocks.0.0.weight", "sd"),
    ("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "sd3"),
    ("double_blocks.0.img_attn.qkv.weight", "flux"),
])
def test_single_file_family_guess(tmp_path, key, family):
    path = tmp_path / "m.safetensors"
    save_file({key: torch.zeros(1)}, str(path))
    assert _guess_single_file_family(path) == family


def test_single_file_unknown_family_asks_for_flag(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"something.else": torch.zeros(1)}, str(path))
    with pytest.raises(InputError, match="pass --family"):
        _guess_single_file_family(path)


def test_pickle_refused_without_opt_in(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(InputError, match="--allow-pickle"):
        check_model_arg(str(ckpt))
    check_model_arg(str(ckpt), allow_pickle=True)  # opted in: passes the cheap check


def test_folder_with_pickle_weights_only_refused(tiny_pipeline_dirs, tmp_path):
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_dirs("sd"), folder)
    for st in (folder / "unet").glob("*.safetensors"):
        st.rename(st.with_suffix(".bin"))
    with pytest.raises(InputError, match="pickle .*--allow-pickle"):
        load_pipeline(str(folder))


def test_folder_with_custom_code_refused(tiny_pipeline_dirs, tmp_path):
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_dirs("sd"), folder)
    (folder / "pipeline.py").write_text("raise SystemExit('should never run')\n")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = ["pipeline", "MyPipeline"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="--trust-remote-code"):
        load_pipeline(str(folder))


def test_not_a_pipeline_folder(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(InputError, match="model_index.json"):
        check_model_arg(str(tmp_path / "x"))
    with pytest.raises(InputError, match="does not exist"):
        check_model_arg(str(tmp_path / "nope.safetensors"))


def test_loads_saved_folder_in_float32(tiny_pipeline_dirs):
    pipe = load_pipeline(str(tiny_pipeline_dirs("sd3")))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert pipe.transformer.dtype == torch.float32
