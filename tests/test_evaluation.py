"""diffscrub.evaluation: metrics on known inputs, prompt sets, config errors, end-to-end evaluate."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffscrub.errors import ConfigError, InputError
from diffscrub.evaluation import (
    EvalConfig,
    bootstrap_ci,
    frechet_distance,
    mean_summary,
    paired_rate_drop,
    pixel_difference,
    rate_summary,
    read_prompts_file,
    ssim_per_sample,
    toy_prompt_sets,
    wilson_interval,
)

# ----------------------------------------------------------------------------- Wilson interval
Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def _wilson_by_hand(k, n, z=Z95):
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


def test_wilson_matches_hand_computation():
    # 5/10: symmetric around 0.5; the textbook values are 0.2366 and 0.7634.
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.236593, abs=1e-6) and hi == pytest.approx(0.763407, abs=1e-6)
    for k, n in [(0, 10), (10, 10), (3, 40), (17, 20)]:
        assert wilson_interval(k, n) == pytest.approx(_wilson_by_hand(k, n), abs=1e-12)
    # k = 0: the lower bound is exactly 0 and the upper bound z^2/(n + z^2).
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(0, 10)[1] == pytest.approx(Z95**2 / (10 + Z95**2), abs=1e-12)


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo90, hi90 = wilson_interval(5, 10, confidence=0.90)
    lo95, hi95 = wilson_interval(5, 10)
    assert lo95 < lo90 < 0.5 < hi90 < hi95
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(1, 10, confidence=1.0)


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_contains_mean_and_is_seeded():
    values = torch.linspace(0, 1, 40) ** 2
    lo, hi = bootstrap_ci(values, seed=3)
    assert lo < float(values.mean()) < hi
    assert bootstrap_ci(values, seed=3) == (lo, hi)
    assert bootstrap_ci(values, seed=4) != (lo, hi)
    # a statistic function gives the same interval as the vectorised mean on the same draws
    lo_f, hi_f = bootstrap_ci(values, lambda x: x.double().mean(), seed=3, n_resamples=200)
    lo_v, hi_v = bootstrap_ci(values, seed=3, n_resamples=200)
    assert (lo_f, hi_f) == pytest.approx((lo_v, hi_v), abs=1e-12)


def test_bootstrap_edge_cases():
    assert bootstrap_ci(torch.tensor([2.5])) == (2.5, 2.5)
    lo, hi = bootstrap_ci(torch.tensor([]))
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError):
        bootstrap_ci((torch.zeros(3), torch.zeros(4)), lambda a, b: 0.0, paired=True)
    # unpaired sets of different sizes are fine
    lo, hi = bootstrap_ci((torch.zeros(3), torch.ones(5)), lambda a, b: float(b.mean() - a.mean()), paired=False,
                          n_resamples=20)
    assert lo == hi == 1.0


def test_summaries():
    s = rate_summary(torch.tensor([True, False, True, True]))
    assert (s["k"], s["n"], s["rate"]) == (3, 4, 0.75) and s["ci"] == list(wilson_interval(3, 4))
    m = mean_summary(torch.tensor([1.0, 2.0, 3.0]), seed=0, n_resamples=100)
    assert m["mean"] == 2.0 and m["ci"][0] <= 2.0 <= m["ci"][1]
    assert mean_summary(torch.tensor([]))["mean"] is None
    d = paired_rate_drop(torch.tensor([1, 1, 1, 0]), torch.tensor([0, 0, 1, 0]), n_resamples=100)
    assert d["drop"] == 0.5 and d["ci"][0] <= 0.5 <= d["ci"][1]


# ----------------------------------------------------------------------------- image metrics
def test_ssim_and_pixel_difference():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 32, 32, generator=gen)
    assert ssim_per_sample(a, a) == pytest.approx(torch.ones(3), abs=1e-5)
    assert torch.equal(pixel_difference(a, a), torch.zeros(3))
    b = (a + 0.1).clamp(0, 1)
    assert (pixel_difference(a, b) > 0).all()
    assert (ssim_per_sample(a, torch.rand(3, 3, 32, 32, generator=gen)) < 0.5).all()
    # images smaller than the 11 px window still work
    small = torch.rand(2, 3, 8, 8, generator=gen)
    assert ssim_per_sample(small, small) == pytest.approx(torch.ones(2), abs=1e-5)


def test_frechet_distance_identical_and_shifted():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shifted = frechet_distance(x, x + 2.0)
    assert shifted == pytest.approx(6 * 4.0, rel=1e-6)  # only the mean term: ||2 * 1||^2 over 6 dims
    assert frechet_distance(x, x * 3.0) > 1.0
    with pytest.raises(ValueError):
        frechet_distance(x[:1], x)


def test_frechet_distance_agrees_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Flatten(torch.nn.Module):  # a custom feature module: [N, 3, 2, 2] -> [N, 12]
        num_features = 12

        def forward(self, x):
            return x.flatten(1)

    gen = torch.Generator().manual_seed(1)
    real = torch.rand(40, 3, 2, 2, generator=gen)
    fake = torch.rand(30, 3, 2, 2, generator=gen) * 0.8 + 0.1
    fid = FrechetInceptionDistance(feature=Flatten(), normalize=True)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    assert float(fid.compute()) == pytest.approx(frechet_distance(fake.flatten(1), real.flatten(1)), rel=1e-4)


# ----------------------------------------------------------------------------- prompts and config
def test_toy_prompt_sets():
    digit = toy_prompt_sets("7", max_prompts=8)
    assert len(digit.concept) == 8 and len(digit.other) == 8
    assert all("7" in p.split() for p in digit.concept)
    assert not any("7" in p.split() for p in digit.other)
    assert {p.split()[-1] for p in digit.other} == {"flat", "brick", "grass", "gravel"}
    assert len({p.split()[0] for p in digit.other}) == 8  # distinct digits
    bg = toy_prompt_sets("Brick", max_prompts=6)
    assert all(p.endswith(" on brick") for p in bg.concept)
    assert not any(p.endswith(" on brick") for p in bg.other)
    assert bg.null == [""]
    with pytest.raises(InputError):
        toy_prompt_sets("cat")


def test_read_prompts_file(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text("concept: [a cat, a cat on a sofa]\nother:\n  - a dog\n", encoding="utf-8")
    sets = read_prompts_file(y)
    assert sets.concept == ["a cat", "a cat on a sofa"] and sets.other == ["a dog"] and sets.null == [""]
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"other": ["a car"]}), encoding="utf-8")
    assert read_prompts_file(j).concept == [] and read_prompts_file(j).other == ["a car"]
    assert read_prompts_file(y, max_prompts=1).concept == ["a cat"]


@pytest.mark.parametrize("text, error, words", [
    ("concept: [a]\nnegative: [b]\n", ConfigError, "unknown key 'negative'"),
    ("concept: a cat\nother: 3\n", ConfigError, "'other' must be a list of strings"),
    ("- a\n- b\n", ConfigError, "must hold a mapping"),
    ("concept: []\n", ConfigError, "has no prompt"),
    ("concept: ['']\n", ConfigError, "empty prompt"),
    ("concept: [a\n", InputError, "could not be parsed"),
])
def test_read_prompts_file_errors(tmp_path, text, error, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(error, match="bad.yaml") as info:
        read_prompts_file(path)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_read_prompts_file_missing_and_suffix(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_prompts_file(tmp_path / "nope.yaml")
    (tmp_path / "p.txt").write_text("a", encoding="utf-8")
    with pytest.raises(InputError, match="suffix"):
        read_prompts_file(tmp_path / "p.txt")


@pytest.mark.parametrize("kwargs, key", [
    ({"n": 0}, "n="), ({"steps": -1}, "steps="), ({"detector_area": 1.5}, "detector_area="),
    ({"confidence": 1.0}, "confidence="), ({"device": "tpu"}, "device="), ({"toy_concept": "cat"}, "toy_concept="),
    ({"classifier": "no_colon"}, "classifier="), ({"resolution": 30}, "resolution="), ({"seed": -1}, "seed="),
])
def test_eval_config_validation(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        EvalConfig(**kwargs)


def test_base_seeds_draw_disjoint_sample_seeds():
    from diffscrub.evaluation.run import _layout

    prompts = ["7 on grass", "7 on brick"]

    def seeds(seed):
        config = EvalConfig(seed=seed, n=4, n_null=10)
        return {name: _layout(name, prompts, config)["seeds"] for name in ("null", "concept", "other")}

    zero, one = seeds(0), seeds(1)
    # --seed 0 keeps the seeds every recorded figure was drawn with
    assert zero["null"] == list(range(12)) and zero["concept"] == [1_000_000 + c for c in range(4)] * 2
    assert zero["other"][:4] == [2_000_000 + c for c in range(4)]
    every = lambda s: {x for v in s.values() for x in v}
    assert not every(zero) & every(one)  # a second base seed is an independent reading
    assert len(every(one)) == 12 + 4 + 4  # and the sets never share a seed within one


def test_eval_config_require():
    with pytest.raises(ConfigError, match="--model"):
        EvalConfig(forget="f", out="o", toy_concept="7").require()
    with pytest.raises(ConfigError, match="--prompts FILE"):
        EvalConfig(model="m", reference="r", forget="f", out="o").require()
    with pytest.raises(ConfigError, match="not both"):
        EvalConfig(model="m", reference="r", forget="f", out="o", toy_concept="7", prompts="p.yaml").require()
    EvalConfig(forget="f", out="o", toy_concept="7").require(library=True)


def test_load_callable_errors():
    from diffscrub.evaluation.readers import load_callable

    assert load_callable("math:sqrt") is math.sqrt
    with pytest.raises(InputError, match="cannot import"):
        load_callable("no_such_module_xyz:f")
    with pytest.raises(InputError, match="has no"):
        load_callable("math:no_such_function")


def test_cli_bad_inputs_exit_2(tmp_path, capsys):
    from diffscrub.evaluation.cli import main

    (tmp_path / "forget").mkdir()
    args = ["eval", "--model", "m", "--reference", "r", "--forget", str(tmp_path / "forget"),
            "--out", str(tmp_path / "out")]
    assert main(args + ["--prompts", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffscrub: error: prompts file") and "missing.yaml" in err and "\n" not in err
    assert main(args + ["--toy-concept", "7", "--n", "zero"]) == 2
    assert "n='zero'" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "diffscrub.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end
def _write_images(folder, n, seed):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """Two tiny SD pipelines with equal weights (erased = reference), image folders and an erase-run folder."""
    try:
        import tiny_pipelines
    except ImportError:
        from tests import tiny_pipelines
    from safetensors.torch import save_file

    from diffscrub.adapters import adapter_for

    root = tmp_path_factory.mktemp("eval-world")
    erased, reference = tiny_pipelines.build_tiny_pipeline("sd"), tiny_pipelines.build_tiny_pipeline("sd")
    _write_images(root / "forget", 3, 0)
    _write_images(root / "retain", 4, 1)
    run = root / "run"
    run.mkdir()
    # a prototype artifact in the reference's feature space (dimension read from one tapped call)
    adapter = adapter_for(reference)
    cond = adapter.encode_prompts([""], (32, 32)).take(torch.zeros(1, dtype=torch.long))
    _, feats = adapter.predict(adapter.denoiser, torch.randn(1, 4, 16, 16), torch.tensor([500]), cond, features=True)
    protos = torch.nn.functional.normalize(torch.randn(2, feats.vectors.shape[-1]), dim=-1)
    save_file({"prototypes": protos, "forget_masks": torch.rand(3, 1, 16, 16)},
              str(run / "diffscrub_artifacts.safetensors"))
    (run / "diffscrub.json").write_text(json.dumps({
        "config": {"forget": str(root / "forget")}, "method": "tss",
        "tss": {"tau": 0.1, "alpha": 15.0, "t_low": 300, "t_high": 700},
        "losses": [{"step": 1, "total": 1.0, "forget": 0.6, "background": 0.4, "mask_area": 0.3}],
    }), encoding="utf-8")
    (root / "prompts.yaml").write_text("concept: [7 on grass]\nother: [3 on brick, 5 on flat]\n", encoding="utf-8")
    return {"root": root, "erased": erased, "reference": reference, "run": run}


def _stub_classifier(images):
    """Concept 'present' when the image is brighter than average: deterministic, image-dependent."""
    return images.mean(dim=(1, 2, 3)) > 0.5


def test_evaluate_identical_models_prompts_file(tiny_world):
    from diffscrub.evaluation import evaluate
    from diffscrub.report import render_report

    w = tiny_world
    out = w["root"] / "eval-prompts"
    config = EvalConfig(model=str(w["run"]), forget=str(w["root"] / "forget"), retain=str(w["root"] / "retain"),
                        prompts=str(w["root"] / "prompts.yaml"), out=str(out), n=2, n_null=3, steps=2,
                        guidance=2.0, bootstrap=100, quiet=True)
    result = evaluate(config, pipe=w["erased"], reference_pipe=w["reference"], classifier=_stub_classifier)

    assert sorted(p.name for p in out.iterdir()) == [
        "grid_concept.png", "grid_null.png", "grid_other.png", "metrics.json", "samples.json"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["sets"] == json.loads(json.dumps(result["sets"]))
    assert result["readers"]["primary"] == "classifier"
    assert set(result["readers"]) >= {"classifier", "detector"}
    assert result["readers"]["detector"]["t"] == 500 and result["readers"]["detector"]["tau"] == 0.1
    assert result["sets"]["null"]["n"] == 3 and result["sets"]["concept"]["n"] == 2 and result["sets"]["other"]["n"] == 4
    for name in ("null", "other"):
        pres = result["sets"][name]["preservation"]
        assert pres["pixel_diff"]["mean"] == 0.0 and pres["pixel_diff"]["ci"] == [0.0, 0.0]
        assert pres["ssim"]["mean"] == pytest.approx(1.0, abs=1e-5)
    for name in ("null", "concept", "other"):
        for reader, rates in result["sets"][name]["concept_rate_by_reader"].items():
            assert rates["reference"] == rates["erased"], (name, reader)
            assert rates["drop"]["drop"] == 0.0
    assert any("Fréchet distance skipped" in note for note in result["notes"])  # no Inception weights here
    assert result["frechet_features"] is None and "frechet_distance" not in result["sets"]["null"]
    samples = json.loads((out / "samples.json").read_text())
    assert samples["concept"]["prompt"] == ["7 on grass", "7 on grass"]
    assert samples["concept"]["seed"] == [1_000_000, 1_000_001]  # same seed per column
    assert result["grids"]["null"]["rows"] == ["", ""]  # 3 null samples fill two rows of n=2

    page = render_report(w["run"], out)  # the report reads real evaluate output
    assert "concept rate, classifier (primary)" in page and page.count("<img") >= 3 + 2 * 3


def test_evaluate_toy_path_with_oracle(tiny_world):
    from diffscrub.evaluation import evaluate
    from diffscrub.toy.oracle import Oracle, OracleNet

    w = tiny_world
    torch.manual_seed(0)
    oracle = Oracle(OracleNet())  # random weights: this checks wiring, not accuracy
    out = w["root"] / "eval-toy"
    config = EvalConfig(forget=str(w["root"] / "forget"), retain=str(w["root"] / "retain"), toy_concept="7",
                        out=str(out), n=2, n_null=2, max_prompts=2, steps=2, guidance=2.0, bootstrap=50,
                        fd_bootstrap=5, quiet=True)
    result = evaluate(config, pipe=w["erased"], reference_pipe=w["reference"], oracle=oracle)
    sets = result["sets"]
    assert result["readers"]["primary"] == "oracle"
    assert result["frechet_features"].startswith("toy oracle")
    assert sets["concept"]["prompts"] == ["7 on flat", "7 on brick"]
    assert sets["other"]["prompt_adherence"]["reference"] == sets["other"]["prompt_adherence"]["erased"]
    ba = sets["other"]["background_adherence"]  # every toy "other" prompt asks for a background
    assert ba["reference"] == ba["erased"] and ba["reference"]["n"] == sets["other"]["n"]
    samples = json.loads((out / "samples.json").read_text())["other"]
    assert sum(samples["background_erased"]) == ba["erased"]["k"]
    for name in ("null", "other"):
        fd = sets[name]["frechet_distance"]
        assert fd["features"].startswith("toy oracle")
        assert fd["reference"]["value"] == pytest.approx(fd["erased"]["value"], abs=1e-6)
        assert fd["reference"]["ci"][0] <= fd["reference"]["ci"][1]
    assert "frechet_distance" not in sets["concept"]
    assert result["readers"]["oracle"]["forget_rate"]["n"] == 3


def test_cli_eval_end_to_end(tiny_pipeline_dirs, tiny_world, tmp_path, monkeypatch, capsys):
    """`diffscrub eval` from saved pipeline folders, with a --classifier given as module:callable."""
    from diffscrub.evaluation.cli import main

    folder = tiny_pipeline_dirs("sd")
    (tmp_path / "my_classifier.py").write_text(
        "def brightness(images):\n    return images.mean(dim=(1, 2, 3))  # a probability-like score\n",
        encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    root = tiny_world["root"]
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(folder), "--reference", str(folder), "--forget", str(root / "forget"),
                 "--prompts", str(root / "prompts.yaml"), "--out", str(out), "--n", "1", "--n-null", "2",
                 "--steps", "1", "--guidance", "1.0", "--bootstrap", "20", "--classifier", "my_classifier:brightness",
                 "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["readers"]["primary"] == "classifier"
    assert metrics["config"]["classifier"] == "my_classifier:brightness"
    assert metrics["sets"]["other"]["preservation"]["pixel_diff"]["mean"] == 0.0
    assert "concept rate (classifier)" in captured.out and str(out) in captured.out
    # the concept set prompt by prompt, from the same per-sample flags as the set's rate
    concept = metrics["sets"]["concept"]
    samples = json.loads((out / "samples.json").read_text())["concept"]
    rows = concept["concept_rate_by_prompt"]
    assert [r["prompt"] for r in rows] == concept["prompts"] and all(r["erased"]["n"] == 1 for r in rows)
    for side in ("reference", "erased"):
        assert sum(r[side]["k"] for r in rows) == concept["concept_rate"][side]["k"]
        flags = dict(zip(samples["prompt"], samples[f"classifier_{side}"]))
        assert [r[side]["k"] for r in rows] == [int(flags[r["prompt"]]) for r in rows]
    assert "concept_rate_by_prompt" not in metrics["sets"]["null"]
    first = rows[0]
    assert any(line.split()[1:2] == first["prompt"].split()[:1] and line.endswith(f"{first['erased']['k']} of 1")
               for line in captured.out.splitlines() if line.startswith("concept"))
    # the output folder now exists: a second run refuses to overwrite it
    assert main(["eval", "--model", str(folder), "--reference", str(folder), "--forget", str(root / "forget"),
                 "--prompts", str(root / "prompts.yaml"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_oracle_reader_on_real_canvases():
    """The shipped oracle, read through OracleReader, on canvases with known contents."""
    import numpy as np

    from diffscrub.evaluation.readers import OracleFeatures, OracleReader
    from diffscrub.toy.canvas import caption, sample_canvases
    from diffscrub.toy.oracle import Oracle, default_oracle_path, to_float_images

    if not default_oracle_path().is_file():
        pytest.skip(f"oracle weights not built yet ({default_oracle_path()})")
    oracle = Oracle.load()
    rng = np.random.default_rng(0)
    with7, labels7 = sample_canvases(24, rng, split="heldout", include="7")
    without7, labels_other = sample_canvases(24, rng, split="heldout", exclude="7")
    reader = OracleReader(oracle, "7")
    present, score = reader(to_float_images(with7))
    assert present.float().mean() > 0.7 and score.shape == (24,)
    assert reader(to_float_images(without7))[0].float().mean() < 0.2
    brick = OracleReader(oracle, "brick")
    truth = torch.tensor([lab.background == "brick" for lab in labels7])
    assert (brick(to_float_images(with7))[0] == truth).float().mean() > 0.8
    prompts = [caption(lab) for lab in labels_other]
    assert reader.adherence(to_float_images(without7), prompts).float().mean() > 0.6
    # the asked background alone: found on the canvases it was asked for, not once every prompt asks another one
    asked, found = reader.background_adherence(to_float_images(without7), prompts + [""])  # "" asks none
    assert asked[:-1].all() and not asked[-1] and not found[-1] and found.float().mean() > 0.8
    others = {"flat": "grass", "brick": "gravel", "grass": "flat", "gravel": "brick"}
    swapped = [p.replace(lab.background, others[lab.background]) for p, lab in zip(prompts, labels_other)]
    assert reader.background_adherence(to_float_images(without7), swapped)[1].float().mean() < 0.2
    assert OracleFeatures(oracle)(to_float_images(with7[:3])).shape == (3, 192)


def test_evaluate_bad_readers(tiny_world, tmp_path):
    from diffscrub.evaluation import evaluate
    from diffscrub.evaluation.readers import CallableReader

    w = tiny_world
    config = EvalConfig(forget=str(w["root"] / "forget"), prompts=str(w["root"] / "prompts.yaml"),
                        out=str(tmp_path / "out"), artifacts=str(tmp_path), quiet=True)
    with pytest.raises(InputError, match="diffscrub_artifacts.safetensors"):
        evaluate(config, pipe=w["erased"], reference_pipe=w["reference"])
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(InputError, match="returned 1 values for 3 images"):
        CallableReader(lambda x: torch.tensor([True]))(torch.rand(3, 3, 8, 8))
    flags, score = CallableReader(lambda x: x.mean(dim=(1, 2, 3)), batch_size=2)(torch.full((3, 3, 8, 8), 0.75))
    assert flags.tolist() == [True] * 3 and score.tolist() == [0.75] * 3


def test_only_runs_with_prototypes_feed_the_detector(tmp_path):
    """An erase folder of a method without prototypes (esd, attention, ...) is evaluated without the
    prototype detector instead of failing; a TSS folder's prototypes are found."""
    import torch
    from safetensors.torch import save_file

    from diffscrub.evaluation.readers import ARTIFACTS_FILE, has_prototypes

    (tmp_path / "none").mkdir()
    (tmp_path / "attention").mkdir()
    (tmp_path / "tss").mkdir()
    save_file({"attention_pattern": torch.zeros(3)}, str(tmp_path / "attention" / ARTIFACTS_FILE))
    save_file({"prototypes": torch.zeros(2, 4)}, str(tmp_path / "tss" / ARTIFACTS_FILE))
    assert not has_prototypes(tmp_path / "none")
    assert not has_prototypes(tmp_path / "attention")
    assert has_prototypes(tmp_path / "tss")


def test_summary_keeps_large_frechet_distances_apart():
    """A distance in the thousands with its interval still leaves the reference and erased columns apart."""
    from diffscrub.evaluation.cli import format_summary

    fd = {"reference": {"value": 911.2529, "ci": [840.6867, 1248.7172]},
          "erased": {"value": 840.5327, "ci": [807.8255, 1075.8151]}}
    (line,) = [ln for ln in format_summary({"sets": {"other": {"frechet_distance": fd}}}).splitlines()
               if "Fréchet" in ln]
    assert line.split()[-6:] == ["911.3", "[840.7,", "1248.7]", "840.5", "[807.8,", "1075.8]"]
