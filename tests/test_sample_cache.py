"""The sample cache: a model sampled again on the same prompts, seeds and settings is read back."""

import json
import shutil

import pytest
import torch

from diffscrub.errors import InputError
from diffscrub.evaluation import EvalConfig
from diffscrub.evaluation.cache import SampleCache, folder_identity, sample_key


def test_identity_follows_contents_not_place(tmp_path):
    a = tmp_path / "a"
    (a / "unet").mkdir(parents=True)
    (a / "model_index.json").write_text("{}")
    (a / "unet" / "w.bin").write_bytes(b"\x00\x01")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert folder_identity(a) == folder_identity(b)  # a copy is the same model
    (b / "unet" / "w.bin").write_bytes(b"\x00\x02")
    assert folder_identity(a) != folder_identity(b)  # one changed byte is another model
    (b / "unet" / "w.bin").write_bytes(b"\x00\x01")
    (b / "unet" / "w.bin").rename(b / "unet" / "v.bin")
    assert folder_identity(a) != folder_identity(b)  # so is a file under another name


def test_key_changes_with_every_setting():
    base = dict(steps=20, guidance=5.0, height=32, width=32, one_step=None)
    key = sample_key("m", ["7 on flat", ""], [1, 2], **base)
    assert key == sample_key("m", ["7 on flat", ""], [1, 2], **base)
    others = [sample_key("n", ["7 on flat", ""], [1, 2], **base),
              sample_key("m", ["", "7 on flat"], [1, 2], **base),
              sample_key("m", ["7 on flat", ""], [1, 3], **base),
              *(sample_key("m", ["7 on flat", ""], [1, 2], **{**base, k: v})
                for k, v in (("steps", 21), ("guidance", 3.0), ("height", 64), ("one_step", 999)))]
    assert len({key, *others}) == 1 + len(others)


def test_cache_round_trip_on_disk(tmp_path):
    images = torch.rand(3, 3, 8, 8)
    cache = SampleCache(tmp_path / "c")
    assert cache.get("k") is None and cache.misses == 1
    cache.put("k", images)
    got = cache.get("k")
    assert torch.equal(got, images) and cache.hits == 1
    got.zero_()  # the caller may change what it got; the cache keeps its own copy
    assert torch.equal(SampleCache(tmp_path / "c").get("k"), images)  # a later process reads it back
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["k.safetensors"]  # no temporary file left
    (tmp_path / "c" / "k.safetensors").write_bytes(b"not a tensor file")
    assert SampleCache(tmp_path / "c").get("k") is None  # an unreadable entry is drawn again


def test_cache_keeps_one_copy_where_it_stores(tmp_path):
    """Without a folder the images live in memory, safe from the caller on both sides; with one they live
    only on disk (a run's full-size samples would otherwise stay resident), so a removed file is a miss."""
    images = torch.rand(2, 3, 8, 8)
    memory = SampleCache()
    memory.put("k", images)
    kept = images.clone()
    images.zero_()  # the caller's tensor changes after put
    got = memory.get("k")
    assert torch.equal(got, kept)
    got.zero_()  # and the copy it got back
    assert torch.equal(memory.get("k"), kept) and memory.hits == 2
    disk = SampleCache(tmp_path / "c")
    disk.put("k", kept)
    (tmp_path / "c" / "k.safetensors").unlink()
    assert disk.get("k") is None and disk.misses == 1


def test_cache_folder_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="'.*f' is a file: pass a folder"):
        SampleCache(tmp_path / "f")


def test_evaluate_reads_an_unchanged_model_back(tiny_pipeline_dirs, tmp_path, monkeypatch):
    """Two evaluations of the same folders through one cache: the second samples nothing and measures
    the same; a model whose weights changed is sampled again."""
    from diffscrub.evaluation import run, sampling

    folder = tiny_pipeline_dirs("sd")
    for name in ("forget", "retain"):
        (tmp_path / name).mkdir()
        for i in range(2):
            from PIL import Image

            Image.new("RGB", (32, 32), (40 * i + 60 * (name == "retain"), 90, 30)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "prompts.yaml").write_text("concept: [7 on grass]\nother: [3 on brick]\n", encoding="utf-8")
    calls = []
    real = sampling.sample_images

    def counting(pipe, prompts, seeds, **kw):
        calls.append(len(prompts))
        return real(pipe, prompts, seeds, **kw)

    monkeypatch.setattr(run, "sample_images", counting)
    cache = SampleCache(tmp_path / "cache")

    def evaluate(model, out):
        config = EvalConfig(model=str(model), reference=str(folder), forget=str(tmp_path / "forget"),
                            prompts=str(tmp_path / "prompts.yaml"), out=str(tmp_path / out), n=2, n_null=2,
                            steps=2, guidance=2.0, bootstrap=20, quiet=True)
        return run.evaluate(config, classifier=lambda x: x.mean(dim=(1, 2, 3)) > 0.4, sample_cache=cache)

    first = evaluate(folder, "e1")
    # both sides are the same folder: the erased side reads the reference's samples back already
    assert len(calls) == 3 and cache.hits == 3
    second = evaluate(folder, "e2")
    assert len(calls) == 3  # nothing drawn again
    def figures(result):  # all but the sampling time
        return {name: {k: v for k, v in s.items() if k != "sampling_s"} for name, s in result["sets"].items()}

    assert figures(second) == figures(first)
    for grid in ("grid_null.png", "grid_concept.png", "grid_other.png"):  # the same images, pixel for pixel
        assert (tmp_path / "e2" / grid).read_bytes() == (tmp_path / "e1" / grid).read_bytes()

    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    weights = next((changed / "unet").glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("conv_out.bias"))
    state[name] = state[name] + 0.5
    save_file(state, str(weights))
    third = evaluate(changed, "e3")
    assert len(calls) == 6  # the changed model only: the reference is read back
    assert third["sets"]["other"]["preservation"]["pixel_diff"]["mean"] > 0
    samples = json.loads((tmp_path / "e3" / "samples.json").read_text())
    assert samples["other"]["seed"] == json.loads((tmp_path / "e1" / "samples.json").read_text())["other"]["seed"]


def test_bench_samples_the_original_and_the_retrained_model_once(tiny_pipeline_dirs, tmp_path, monkeypatch):
    """bench: the original is sampled once for every row, and with --sample-cache a second run draws only
    the erased models (the erase itself is faked: a copy of the model with one weight moved)."""
    import subprocess

    from safetensors.torch import load_file, save_file

    from diffscrub.bench import compare
    from diffscrub.evaluation import run

    original = tiny_pipeline_dirs("sd")
    retrained = tmp_path / "retrained"

    def moved_copy(dest, shift):
        shutil.copytree(original, dest)
        weights = next((dest / "unet").glob("*.safetensors"))
        state = load_file(str(weights))
        name = next(k for k in state if k.endswith("conv_out.bias"))
        state[name] = state[name] + shift
        save_file(state, str(weights))

    moved_copy(retrained, -0.1)

    real_run = subprocess.run
    erases = []

    def fake_erase(cmd, **kwargs):
        if "erase" not in cmd:  # compare.subprocess is the module itself: other callers pass through
            return real_run(cmd, **kwargs)
        out = __import__("pathlib").Path(cmd[cmd.index("--out") + 1])
        erases.append(out)
        moved_copy(out, 0.1 * len(erases))  # every erase run gives another model
        (out / "diffscrub.json").write_text(json.dumps({"memory": {"cpu_peak_rss_mb": 1.0}}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(compare.subprocess, "run", fake_erase)
    import functools

    from diffscrub import evaluation

    # few bootstrap resamples: the intervals are not what this test reads, and each costs a full distance
    monkeypatch.setattr(evaluation, "EvalConfig", functools.partial(EvalConfig, bootstrap=20, fd_bootstrap=2))
    drawn = []
    real = run.sample_images
    monkeypatch.setattr(run, "sample_images", lambda pipe, prompts, seeds, **kw: (
        drawn.append(len(prompts)), real(pipe, prompts, seeds, **{**kw, "steps": 1}))[1])

    def bench(out, cache=None):
        drawn.clear()
        return compare.run_bench("7", str(tmp_path / out), model=str(original), methods=["tss", "esd"],
                                 retrained=str(retrained), n=1, n_null=2, max_prompts=2, set_size=4,
                                 sample_cache=cache, log=lambda m: None)

    first = bench("b1", tmp_path / "cache")
    # three sets; the original once (not once per row), the two erased models and the retrained one
    assert len(drawn) == 3 * 4
    second = bench("b2", tmp_path / "cache")
    assert len(drawn) == 3 * 2  # the erases ran again: only their two new models are sampled
    for i in (0, 3):  # the original's and the retrained model's rows are read back as they were
        assert {k: v for k, v in first["rows"][i].items() if k != "wall_s"} == \
            {k: v for k, v in second["rows"][i].items() if k != "wall_s"}


def test_eval_cli_sample_cache_that_is_a_file(tmp_path, capsys):
    """`eval --sample-cache FILE` is a one-line error before any model loads, and FILE is left as it was."""
    from diffscrub.evaluation.cli import main

    (tmp_path / "forget").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "forget" / "a.png")
    (tmp_path / "notes.txt").write_text("mine")
    code = main(["eval", "--model", "toy-unet", "--reference", "toy-unet", "--forget", str(tmp_path / "forget"),
                 "--toy-concept", "7", "--out", str(tmp_path / "e"), "--sample-cache", str(tmp_path / "notes.txt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "notes.txt" in err[0] and "pass a folder" in err[0]
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "e").exists()
