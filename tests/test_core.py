"""Per-step cost, config merging and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffscrub.config import EraseConfig, build, merge
from diffscrub.errors import ConfigError
from random_images import write_random_images as _images


# ----------------------------------------------------------------------------- per-step cost
@pytest.mark.parametrize("mask_mode,teacher_calls", [("cached", 1), ("online", 2)])
def test_step_cost(mask_mode, teacher_calls, tmp_path, monkeypatch):
    """Per step: no VAE encode, one student call, and one (cached) or two (online) teacher calls,
    whatever the retain set; the seed's step makes three teacher calls and a VAE encode."""
    from diffscrub.core.trainer import erase
    from tiny_pipelines import build_tiny_pipeline

    forget, retain = _images(tmp_path / "f"), _images(tmp_path / "r")
    pipe = build_tiny_pipeline("sd")
    counts = {"teacher": 0, "student": 0, "vae": 0, "training": False}
    from diffscrub.core import context as ctx_mod
    from diffscrub.methods.tss import method as tss_mod

    real_teacher, real_student = ctx_mod.ErasureContext.teacher_predict, ctx_mod.ErasureContext.student_predict
    real_loss = tss_mod.TeacherStudentScrubber.loss

    def teacher(self, *a, **k):
        counts["teacher"] += counts["training"]
        return real_teacher(self, *a, **k)

    def student(self, *a, **k):
        counts["student"] += counts["training"]
        return real_student(self, *a, **k)

    def loss(self, *a, **k):
        counts["training"] = True
        return real_loss(self, *a, **k)

    real_encode = pipe.vae.encode

    def encode(*a, **k):
        counts["vae"] += counts["training"]
        return real_encode(*a, **k)

    monkeypatch.setattr(ctx_mod.ErasureContext, "teacher_predict", teacher)
    monkeypatch.setattr(ctx_mod.ErasureContext, "student_predict", student)
    monkeypatch.setattr(tss_mod.TeacherStudentScrubber, "loss", loss)
    pipe.vae.encode = encode
    cfg = EraseConfig(model="sd", forget=str(forget), retain=str(retain), out=str(tmp_path / "o"), steps=3,
                      batch_size=2, quiet=True, device="cpu", conditioning="null")
    result = erase(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                         "mask_mode": mask_mode}, pipe=pipe, log=lambda m: None)
    assert counts["vae"] == 0
    assert counts["teacher"] == 3 * teacher_calls
    assert counts["student"] == 3
    assert "retain" in result.history[-1]


def test_compile_matches_eager(tmp_path, monkeypatch):
    """--compile runs compiled student and teacher calls: the same losses as an eager run (the feature
    taps of Phase 1 still fire), the same parameter names in the saved folder. (Dynamo's eager backend:
    graph capture without the C++ build.) A method that reads the student's insides refuses it."""
    from diffscrub.core.trainer import erase
    from tiny_pipelines import build_tiny_pipeline

    compiled = []
    real = torch.compile

    def compile_eager(model, *a, **k):
        compiled.append(type(model).__name__)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eager)
    forget, retain = _images(tmp_path / "f"), _images(tmp_path / "r")
    histories = {}
    for flag in (False, True):
        cfg = EraseConfig(model="sd", forget=str(forget), retain=str(retain), out=str(tmp_path / f"o{flag}"), steps=2,
                          batch_size=2, quiet=True, device="cpu", conditioning="null", compile=flag, log_every=1)
        result = erase(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1},
                       pipe=build_tiny_pipeline("sd"), log=lambda m: None)
        histories[flag] = [h["total"] for h in result.history]
    torch._dynamo.reset()
    assert compiled == ["UNet2DConditionModel", "UNet2DConditionModel"]
    assert histories[True] == pytest.approx(histories[False], rel=1e-4)
    from safetensors.torch import load_file

    keys = {flag: set(load_file(str(tmp_path / f"o{flag}" / "unet" / "diffusion_pytorch_model.safetensors")))
            for flag in (False, True)}
    assert keys[True] == keys[False] and not any("_orig_mod" in k for k in keys[True])
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "oa"), steps=1, batch_size=2, quiet=True,
                      device="cpu", method="attention", concept_prompt="red", compile=True)
    with pytest.raises(ConfigError, match="drop --compile"):
        erase(cfg, {}, pipe=build_tiny_pipeline("sd"), log=lambda m: None)


# ----------------------------------------------------------------------------- config
def test_config_file_and_flags_merge(tmp_path):
    from diffscrub.cli import build_parser, config_from_args

    (tmp_path / "c.yaml").write_text("steps: 7\nlr: 0.001\ntss:\n  tau: 0.5\n  alpha: 9\n")
    ns = build_parser().parse_args(["erase", "--config", str(tmp_path / "c.yaml"), "--steps", "9", "--tau", "0.7",
                                    "--model", "m", "--forget", "f", "--out", "o"])
    for key in ("_run", "command"):
        delattr(ns, key)
    config, tss = config_from_args(ns)
    assert config.steps == 9 and config.lr == 0.001  # flag wins, file fills the rest
    from diffscrub.methods.tss import TSSConfig

    options = build(TSSConfig, tss, where="tss")
    assert (options.tau, options.alpha, options.num_prototypes) == (0.7, 9.0, 5)


def test_boolean_defaults_can_be_turned_off(tmp_path):
    from diffscrub.cli import build_parser, config_from_args
    from diffscrub.methods.tss import TSSConfig

    (tmp_path / "c.toml").write_text("[tss]\ncontrastive = true\n")
    ns = build_parser().parse_args(["erase", "--config", str(tmp_path / "c.toml"), "--no-contrastive", "--model", "m",
                                    "--forget", "f", "--out", "o"])
    for key in ("_run", "command"):
        delattr(ns, key)
    _, tss = config_from_args(ns)
    assert build(TSSConfig, tss, where="tss").contrastive is False


@pytest.mark.parametrize("values,match", [
    ({"stepz": 3}, "unknown key 'stepz'"),
    ({"steps": "many"}, "steps='many' has the wrong type"),
    ({"steps": 0}, "steps=0 is out of range"),
    ({"random_context_words": 0}, "random_context_words=0 is out of range"),
    ({"trainable": "lora"}, "--lora-rank"),
    ({"device": "tpu"}, "device='tpu' is not valid"),
    ({"name_contexts": ["on grass"]}, "exactly one '{}'"),
    ({"name_contexts": ["{} and {}"]}, "exactly one '{}'"),
    ({"name_contexts": []}, "name_contexts is empty"),
    ({"names": ["7"], "conditioning": "null"}, "drop --names or use --conditioning auto"),
    ({"names": ["7 {}"]}, "without braces"),
    ({"names": [" "]}, "non-empty"),
    ({"fsdp": True, "lora_rank": 4}, "LoRA the frozen base is also the teacher"),
    ({"fsdp": True, "compile": True}, "--fsdp with --compile"),
])
def test_config_rejects(values, match):
    with pytest.raises(ConfigError, match=match):
        build(EraseConfig, values)


@pytest.mark.parametrize("values,match", [
    ({"tau": 1.5}, "tss.tau=1.5 is out of range"),
    ({"num_prototypes": 0}, "tss.num_prototypes=0"),
    ({"lambda_f": -1}, "tss.lambda_f=-1"),
    ({"t_low": 700, "t_high": 300}, "tss.t_high=300"),
    ({"mask_mode": "sometimes"}, "tss.mask_mode"),
    ({"forget_target": "raw"}, "tss.forget_target"),
    ({"snr_floor": 9.0}, "tss.snr_floor=9.0"),
    ({"fingerprint": "knn", "mask_mode": "online"}, "mask_mode 'cached'"),
    ({"fingerprint": "names", "mask_mode": "online"}, "mask_mode 'cached'"),
    ({"names_smooth": 1.5}, "tss.names_smooth=1.5"),
    ({"names_z": 3.0}, "add --fingerprint names"),
    ({"knn_z": 2.0}, "add --fingerprint knn"),
    ({"knn_z": -1.0, "fingerprint": "knn"}, "tss.knn_z=-1.0"),
    ({"names_z": -1.0, "fingerprint": "names"}, "tss.names_z=-1.0"),
    ({"knn_area": 1.0}, "tss.knn_area=1.0"),
    ({"fill_prior": -0.5}, "tss.fill_prior=-0.5"),
    ({"fill_prior": 0.5, "blind_fill": "noise"}, "needs --blind-fill surround"),
    ({"fingerprint": "nearest"}, "tss.fingerprint"),
    ({"name_target": "null"}, "tss.name_target"),
    ({"forget_prompts": "null"}, "tss.forget_prompts"),
    ({"kk": 1}, "unknown key 'kk' in tss"),
])
def test_tss_config_rejects(values, match):
    from diffscrub.methods.tss import TSSConfig

    with pytest.raises(ConfigError, match=match):
        build(TSSConfig, values, where="tss")


def test_merge_nested():
    assert merge({"a": 1, "tss": {"x": 1, "y": 2}}, {"tss": {"y": 3}}) == {"a": 1, "tss": {"x": 1, "y": 3}}


# ----------------------------------------------------------------------------- command line
def test_cli_end_to_end(tiny_pipeline_dirs, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    from diffscrub.cli import main

    model = tiny_pipeline_dirs("sd")
    forget = _images(tmp_path / "forget")
    (tmp_path / "run.toml").write_text('steps = 5\nbatch_size = 2\n[tss]\nnum_prototypes = 2\nvectors_per_image = 16\n'
                                       'contrast_samples = 2\ncontrast_sample_steps = 2\n')
    out = tmp_path / "out"
    rc = main(["erase", "--model", str(model), "--forget", str(forget), "--out", str(out), "--config",
               str(tmp_path / "run.toml"), "--steps", "3", "--quiet", "--seed", "5", "--inversion-steps", "2"])
    assert rc == 0
    record = json.loads((out / "diffscrub.json").read_text())
    assert record["steps"] == 3 and record["seed"] == 5 and record["config"]["batch_size"] == 2
    assert record["tss"]["num_prototypes"] == 2 and record["tss"]["tau"] == 0.6
    assert {"load_s", "phase1_s", "phase2_s", "total_s"} <= set(record["timing"])
    assert record["versions"]["diffusers"]
    assert len(record["losses"]) >= 2
    assert DiffusionPipeline.from_pretrained(str(out)).unet is not None
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert "erased with tss on sd" in capsys.readouterr().out


def test_cli_passes_chain_into_one_folder(tiny_pipeline_dirs, tmp_path, capsys):
    """``--then``: the second pass erases from the first one's output (what the first changed and the
    second does not train is in the final weights), takes the run settings of the first command line
    and the names the first pass's inversion found, and leaves one folder with both records."""
    from diffusers import DiffusionPipeline

    from diffscrub.cli import main

    model = tiny_pipeline_dirs("sd")
    forget = _images(tmp_path / "forget")
    out = tmp_path / "out"
    small = "--num-prototypes 2 --vectors-per-image 8 --contrast-samples 2 --contrast-sample-steps 2"
    # the second pass's options from its own config file, a flag beside it winning over the file
    (tmp_path / "pass2.toml").write_text('trainable = "cross-attention"\nsteps = 5\nlr = 1e-3\n[tss]\n'
                                         'num_prototypes = 2\nvectors_per_image = 8\ncontrast_samples = 2\n'
                                         'contrast_sample_steps = 2\n')
    rc = main(["erase", "--model", str(model), "--forget", str(forget), "--out", str(out), "--steps", "2",
               "--batch-size", "2", "--seed", "3", "--quiet", "--inversion-steps", "2", "--lr", "1e-3", *small.split(),
               "--then", f"--config {tmp_path / 'pass2.toml'} --steps 1"])
    assert rc == 0
    assert "pass 2 of 2" in capsys.readouterr().err
    record = json.loads((out / "diffscrub.json").read_text())
    (first,) = record["earlier_passes"]
    assert first["config"]["model"] == str(model) and record["config"]["model"] == str(tmp_path / "out.pass1")
    assert (first["steps"], record["steps"]) == (2, 1)
    assert record["config"]["seed"] == 3 and record["config"]["batch_size"] == 2  # taken from the first line
    assert first["trainable"] == "full" and record["trainable"] == "cross-attention"
    found = first["conditioning"]["nearest_words"]
    assert found and record["conditioning"]["given_names"] == found[:1]  # no inversion against the erased model
    assert record["conditioning"]["names_from_pass"] == 1
    assert not (tmp_path / "out.pass1").exists() and not list(tmp_path.glob(".out*"))

    def conv_in(folder):
        return DiffusionPipeline.from_pretrained(str(folder)).unet.conv_in.weight

    # conv_in is trained by the first pass only: the second pass started from the first one's output
    assert not torch.equal(conv_in(out), conv_in(model))

    # --resume does not run a pass whose folder is complete again (here: made by a one-pass run)
    first_line = ["erase", "--model", str(model), "--forget", str(forget), "--steps", "2", "--batch-size", "2",
                  "--seed", "3", "--quiet", "--names", "zz", "--lr", "1e-3", *small.split()]
    assert main([*first_line, "--out", str(tmp_path / "again.pass1")]) == 0
    before = conv_in(tmp_path / "again.pass1")
    capsys.readouterr()
    # the names carried over are all words to keep: the run stops there, pass 1 kept for --resume
    assert main([*first_line, "--out", str(tmp_path / "again"), "--resume", "--then",
                 f"--steps 1 --trainable cross-attention --anchor-words zz {small}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffscrub:")]
    assert len(err) == 1 and "(zz) are all --anchor-words" in err[0] and "give --names in --then" in err[0]
    assert "again.pass1' and will not run again" in err[0] and not (tmp_path / "again").exists()
    assert torch.equal(conv_in(tmp_path / "again.pass1"), before)
    assert main([*first_line, "--out", str(tmp_path / "again"), "--resume", "--then",
                 f"--steps 1 --inversion-rerank 4 {small}"]) == 2  # refused before anything runs
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffscrub:")]
    assert len(err) == 1 and "--then (pass 2) sets --inversion-rerank" in err[0] and "before --then" in err[0]
    assert main([*first_line, "--out", str(tmp_path / "again"), "--resume", "--then",
                f"--steps 1 --trainable cross-attention {small}"]) == 0
    assert "pass 1 of 2: complete in" in capsys.readouterr().err
    again = json.loads((tmp_path / "again" / "diffscrub.json").read_text())
    assert again["earlier_passes"][0]["conditioning"]["given_names"] == ["zz"]
    assert again["conditioning"]["given_names"] == ["zz"]  # given names pass on too
    assert torch.equal(conv_in(tmp_path / "again"), before)  # pass 2 started from it


def test_cli_passes_refuse_mistakes_before_running(tiny_pipeline_dirs, tmp_path, capsys):
    """A mistake in a later pass's flags is a one-line error before the first pass loads anything."""
    from diffscrub.cli import main

    model = str(tiny_pipeline_dirs("sd"))
    base = ["erase", "--model", model, "--forget", str(_images(tmp_path / "forget")), "--quiet",
            "--out", str(tmp_path / "out")]
    capsys.readouterr()
    (tmp_path / "bad.toml").write_text('out = "elsewhere"\n')
    for then, expected in (("--model other --lr 1e-3", "sets --model, which belongs to the whole run"),
                           (f"--config {tmp_path / 'bad.toml'}", "sets --out, which belongs to the whole run"),
                           ("--bogus 1 --lr 1e-3", "unknown option '--bogus'"),
                           ("--lr fast --steps 2", "lr"),
                           ("--method nope --steps 2", "nope")):
        assert main(base + ["--then", then]) == 2, then
        err = _err(capsys)
        assert err.startswith("diffscrub: error: ") and expected in err and "\n" not in err, err
    (tmp_path / "out.pass1").mkdir()
    (tmp_path / "out.pass1" / "mine.txt").write_text("keep")
    assert main(base + ["--then", "--lr 1e-3 --steps 2"]) == 2
    err = _err(capsys)
    assert "out.pass1' exists and is not empty" in err and "\n" not in err
    assert (tmp_path / "out.pass1" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "forget", "out.pass1"]


def _err(capsys):
    return capsys.readouterr().err.strip()


def test_out_of_memory_is_one_line_and_other_bugs_keep_their_traceback(tiny_pipeline_dirs, tmp_path, capsys,
                                                                      monkeypatch):
    """Running out of GPU memory mid-run (here: raised from the training step) ends with one line that
    names the options that shrink the step, exit code 1, and no output folder; a RuntimeError that is
    not about memory is a bug and propagates."""
    from diffscrub.cli import main
    from diffscrub.methods.tss.method import TeacherStudentScrubber

    model = str(tiny_pipeline_dirs("sd"))
    args = ["erase", "--model", model, "--forget", str(_images(tmp_path / "forget")), "--quiet", "--steps", "2",
            "--conditioning", "null", "--out", str(tmp_path / "out")]

    def oom(self, step, batch_size):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB. GPU 0 has 79 GiB\nmore")

    monkeypatch.setattr(TeacherStudentScrubber, "loss", oom)
    assert main(args) == 1
    err = _err(capsys)  # (library warnings from loading may precede it)
    ours = [line for line in err.splitlines() if line.startswith("diffscrub:")]
    assert len(ours) == 1 and "Traceback" not in err
    assert ours[0].startswith("diffscrub: error: out of GPU memory (CUDA out of memory. Tried to allocate 16.00 GiB")
    assert "--batch-size" in ours[0] and "--gradient-checkpointing" in ours[0] and "more" not in ours[0]
    assert not (tmp_path / "out").exists()

    def bug(self, step, batch_size):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(TeacherStudentScrubber, "loss", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(args)


def test_cli_errors_are_one_line(tiny_pipeline_dirs, tmp_path, capsys):
    from diffscrub.cli import main

    model = str(tiny_pipeline_dirs("sd"))
    forget = str(_images(tmp_path / "forget"))
    out = tmp_path / "out"
    base = ["erase", "--model", model, "--forget", forget, "--quiet"]
    capsys.readouterr()  # what building the fixtures printed (a library's first-import notice) is not ours

    assert main(["erase", "--model", model, "--forget", str(tmp_path / "none"), "--out", str(out)]) == 2
    err = _err(capsys)
    assert err.startswith("diffscrub: error: forget folder") and "does not exist" in err and "\n" not in err

    (out).mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(base + ["--out", str(out)]) == 2
    err = _err(capsys)
    assert "exists and is not empty" in err and "--overwrite" in err and "\n" not in err
    assert (out / "keep.txt").read_text() == "precious"

    (tmp_path / "m.ckpt").write_bytes(b"\x80\x04")
    assert main(["erase", "--model", str(tmp_path / "m.ckpt"), "--forget", forget, "--out", str(tmp_path / "o2")]) == 2
    err = _err(capsys)
    assert "pickle" in err and "--allow-pickle" in err

    assert main(base + ["--out", str(tmp_path / "o3"), "--family", "unet9"]) == 2
    assert "unknown family 'unet9'" in _err(capsys)

    mixed = _images(tmp_path / "mixed", n=1)
    Image.fromarray(np.zeros((48, 40, 3), dtype=np.uint8)).save(mixed / "big.png")
    assert main(["erase", "--model", model, "--forget", str(mixed), "--out", str(tmp_path / "o4"), "--quiet"]) == 2
    assert "--resolution" in _err(capsys)

    assert main(base + ["--out", str(tmp_path / "o5"), "--method", "sfd", "--concept-prompt", "x", "--names", "x"]) == 2
    err = _err(capsys)
    assert "drop --names" in err and "\n" not in err and not (tmp_path / "o5").exists()
    assert main(base + ["--out", str(tmp_path / "o6"), "--method", "sfd", "--concept-prompt", "x",
                        "--name-samples", "4"]) == 2
    err = _err(capsys)
    assert "drop --name-samples" in err and "\n" not in err and not (tmp_path / "o6").exists()

    # --inversion-rerank or --random-contexts where no names go in the pool: refused in one line, not unused
    for flag, extra, fix in (("--inversion-rerank", ["--names", "x"], "drop one of them"),
                             ("--inversion-rerank", ["--conditioning", "null"], "or use --conditioning auto"),
                             ("--inversion-rerank", ["--method", "sfd", "--concept-prompt", "x"], "drop --inversion-rerank"),
                             ("--random-contexts", ["--conditioning", "prompts", "--prompts", "a"], "drop --random-contexts, or use"),
                             ("--random-contexts", ["--method", "sfd", "--concept-prompt", "x"], "method 'sfd'")):
        assert main(base + ["--out", str(tmp_path / "o7"), flag, "4", *extra]) == 2
        err = _err(capsys)
        assert flag in err and fix in err and "\n" not in err and not (tmp_path / "o7").exists()


def test_overwrite_replaces_only_when_complete(tiny_pipeline_dirs, tmp_path, monkeypatch):
    """A run that dies while saving leaves the previous output as it was."""
    from diffscrub.cli import main

    model = str(tiny_pipeline_dirs("sd"))
    forget = str(_images(tmp_path / "forget"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("diffusers.DiffusionPipeline.save_pretrained", boom)
    rc = main(["erase", "--model", model, "--forget", forget, "--out", str(out), "--overwrite", "--steps", "1",
               "--quiet", "--num-prototypes", "2", "--vectors-per-image", "8", "--conditioning", "null",
               "--contrast-samples", "2", "--contrast-sample-steps", "2"])
    assert rc == 2
    assert (out / "old.txt").read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forget", "out"]
