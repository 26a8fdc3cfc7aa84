"""diffscrub.report: one self-contained HTML page; checked as text and in a real headless browser."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from diffscrub.errors import InputError
from diffscrub.report import build_report, render_report, svg_line_chart

CHROMIUM = pathlib.Path("/usr/bin/chromium")
BROWSER_TIMEOUT_S = 60
SECTIONS = ("Summary", "Evaluation", "Before and after, same seeds", "The concept", "Detector masks on forget images",
            "Loss curves", "Run configuration")


def _rate(k, n):
    from diffscrub.evaluation import rate_summary

    return rate_summary(torch.tensor([True] * k + [False] * (n - k)))


def _mean(v):
    return {"mean": v, "n": 4, "ci": [v * 0.9, v * 1.1]}


def make_run(root: pathlib.Path, n_forget: int = 5) -> pathlib.Path:
    """A synthetic erase run folder (diffscrub.json, artifacts, forget PNGs) and an eval folder inside it."""
    from safetensors.torch import save_file

    from diffscrub.evaluation.sampling import comparison_grid, save_png

    forget = root / "forget"
    forget.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n_forget):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(forget / f"f{i:02d}.png")
    run = root / "run"
    run.mkdir()
    masks = torch.zeros(n_forget, 1, 16, 16)
    masks[:, :, 4:12, 4:12] = 1.0
    save_file({"prototypes": torch.nn.functional.normalize(torch.randn(3, 8), dim=-1), "forget_masks": masks},
              str(run / "diffscrub_artifacts.safetensors"))
    losses = [{"step": s, "total": 1.0 / s, "forget": 0.6 / s, "background": 0.4 / s + 0.01, "retain": 0.05,
               "mask_area": 0.25} for s in (1, 10, 20, 30, 40)]
    record = {"config": {"forget": str(forget), "model": "toy-unet", "method": "tss", "steps": 40, "resolution": None},
              "method": "tss", "tss": {"tau": 0.6, "alpha": 15.0, "t_low": 300, "t_high": 700},
              "family": "sd", "pipeline_class": "StableDiffusionPipeline", "steps": 40, "forget_images": n_forget,
              "losses": losses, "timing": {"total_s": 12.5}, "device": "cpu"}
    (run / "diffscrub.json").write_text(json.dumps(record), encoding="utf-8")

    ev = run / "eval"
    ev.mkdir()
    grids = {}
    for name, rows in (("null", [""]), ("concept", ["7 on grass", "7 on flat"]), ("other", ["3 on brick"])):
        ref = torch.rand(len(rows) * 2, 3, 32, 32)
        save_png(comparison_grid(ref, ref.flip(-1), len(rows), 2, rows), ev / f"grid_{name}.png")
        grids[name] = {"file": f"grid_{name}.png", "rows": rows, "cols": 2, "seeds": [[0, 1]] * len(rows)}
    rate = {"reference": _rate(3, 4), "erased": _rate(0, 4), "drop": {"drop": 0.75, "n": 4, "ci": [0.25, 1.0]}}
    metrics = {
        "schema_version": 1, "kind": "diffscrub-eval", "config": {"confidence": 0.95, "n": 2},
        "run": {"started": "2026-01-01T00:00:00+00:00", "wall_s": 1.0, "device": "cpu"},
        "sampling": {"steps": 2, "guidance": 3.0, "scheduler": "DDIMScheduler"},
        "readers": {"primary": "oracle", "oracle": {"concept": "7", "forget_rate": _rate(5, 5),
                                                    "retain_rate": _rate(0, 4)}},
        "sets": {
            "null": {"n": 4, "concept_rate": {**rate, "reader": "oracle"}, "concept_rate_by_reader": {"oracle": rate},
                     "preservation": {"pixel_diff": _mean(0.02), "ssim": _mean(0.9)},
                     "frechet_distance": {"features": "toy oracle", "real_n": 4,
                                          "reference": {"value": 1.5, "n": 4, "ci": [1.0, 2.0]},
                                          "erased": {"value": 1.7, "n": 4, "ci": [1.1, 2.3]}}},
            "concept": {"n": 4, "concept_rate": {**rate, "reader": "oracle"}, "concept_rate_by_reader": {"oracle": rate},
                        "concept_rate_by_prompt": [{"prompt": "7 and <3>", "reference": rate["reference"],
                                                    "erased": rate["erased"]}],
                        "change": {"pixel_diff": _mean(0.2), "ssim": _mean(0.5)}},
            "other": {"n": 2, "concept_rate_by_reader": {}, "preservation": {"pixel_diff": _mean(0.01),
                                                                           "ssim": _mean(0.95)},
                      "prompt_adherence": {"reference": _rate(2, 2), "erased": _rate(1, 2),
                                           "drop": {"drop": 0.5, "n": 2, "ci": [0.0, 1.0]}},
                      "background_adherence": {"reference": _rate(2, 2), "erased": _rate(0, 2),
                                               "drop": {"drop": 1.0, "n": 2, "ci": [1.0, 1.0]}}},
        },
        "grids": grids,
        "notes": ["a note <with> markup & such"],
    }
    (ev / "metrics.json").write_text(json.dumps(metrics, sort_keys=True), encoding="utf-8")  # as eval writes it
    return run


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path)


def _img_srcs(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)


def test_report_sections_and_only_data_uris(run_dir):
    out = build_report(run_dir)
    assert out == run_dir / "report.html"
    page = out.read_text(encoding="utf-8")
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    srcs = _img_srcs(page)
    # 3 grids + 5 forget images x (plain, overlay)
    assert len(srcs) == 3 + 2 * 5
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in page.lower()
    assert not re.search(r"(?:src|href)=\"(?!data:)", page)  # nothing fetched from anywhere
    assert "url(" not in page and "@import" not in page
    assert page.count("<polyline") == 5  # total, forget, background, retain, mask_area
    assert "a note &lt;with&gt; markup &amp; such" in page  # escaped
    assert "concept rate, oracle (primary)" in page and "prompt adherence" in page and "Fréchet distance" in page
    assert "asked background (oracle)" in page
    assert "reference &minus; erased" in page
    by_prompt = page[page.index("<h3>Concept rate by prompt (oracle)</h3>"):]
    assert re.search(r"<td>concept</td><td><code>7 and &lt;3&gt;</code></td><td[^>]*>", by_prompt)
    # sets in the evaluation's order, although metrics.json keeps its keys sorted
    assert page.index("<h3>null prompts") < page.index("<h3>concept prompts") < page.index("<h3>other prompts")


def test_report_says_what_the_concept_was_taken_to_be(run_dir):
    """The words found for the concept, the pool, the images drawn of its names, the anchors and the prototypes
    kept; masks of drawn images are not mistaken for a changed forget folder."""
    from safetensors.torch import load_file, save_file

    record = json.loads((run_dir / "diffscrub.json").read_text())
    record["config"]["name_words"] = 1
    record["tss"].update(fingerprint="knn", contrast_ratio=2.0, blind_fill="surround")
    record["conditioning"] = {"mode": "auto", "nearest_words": ["7", "and", "gra<vel"],
                              "pool": ["", "7", "<concept>", "7 on grass"],
                              "name_samples": {"count": 2, "prompts": ["7", "7 on grass"], "steps": 20},
                              "vocab_anchors": {"count": 3, "examples": ["q on brick", "two"], "left_out": ["7"],
                                                "kept_words": ["3", "eig<ht"]}}
    record["name_embeddings"] = {"tokens": {"text_encoder": ["7"], "text_encoder_2": ["7"]},
                                 "largest_relative_change": 0.714}
    record["prepare"] = {"prototypes_kept": 1, "prototype_selection": {
        "forget_rate": [0.30, 0.10], "retain_rate": [0.05, 0.12], "kept": [True, False]}}
    (run_dir / "diffscrub.json").write_text(json.dumps(record))
    artifacts = load_file(str(run_dir / "diffscrub_artifacts.safetensors"))
    masks = artifacts["forget_masks"]
    artifacts["forget_masks"] = torch.cat([masks, torch.ones(2, *masks.shape[1:])])  # 5 folder + 2 drawn
    save_file(artifacts, str(run_dir / "diffscrub_artifacts.safetensors"))

    page = render_report(run_dir)
    concept = page[page.index("<h2>The concept</h2>"):page.index("<h2>Detector masks")]
    assert "Your forget folder looks like: <b>7</b>, <b>and</b>, <b>gra&lt;vel</b>" in concept
    assert "The first 1 counted as the concept's names" in concept
    assert "Conditioning pool (4 prompts): <code>(null prompt)</code>, <code>7</code>, <code>&lt;concept&gt;</code>" in concept
    assert "drew 2 images of <code>7</code>, <code>7 on grass</code>" in concept
    assert "3 vocabulary anchors" in concept and "left out: <b>7</b>" in concept
    assert "kept in every template: <b>3</b>, <b>eig&lt;ht</b>" in concept
    assert "learned their input embeddings of <b>7</b> (--name-embeddings; largest change 71%" in concept
    assert "Prototypes kept: 1 of 2" in concept and "at least 2.0 times" in concept and "--fingerprint knn" in concept

    # --inversion-rerank: the words' scores are shown, best first, as recorded
    record["conditioning"]["word_fit"] = [["7", -0.012], ["and", -0.001], ["gra<vel", 0.04]]
    (run_dir / "diffscrub.json").write_text(json.dumps(record))
    page = render_report(run_dir)
    concept = page[page.index("<h2>The concept</h2>"):page.index("<h2>Detector masks")]
    assert "its 3 nearest words" in concept and "<b>7</b> (-1.20%), <b>and</b> (-0.10%), <b>gra&lt;vel</b> (+4.00%)" in concept
    rows = re.findall(r"<tr><td>(\d)</td><td>([\d.]+)%</td><td>([\d.]+)%</td><td>(\w+)</td></tr>", concept)
    assert rows == [("0", "30.0", "5.0", "kept"), ("1", "10.0", "12.0", "dropped")]
    masks_part = page[page.index("<h2>Detector masks"):page.index("<h2>Loss curves")]
    assert "The last 2 masks belong to the images the model drew" in masks_part
    assert "folder changed" not in masks_part and len(_img_srcs(masks_part)) == 2 * 5
    assert "mean colour around it." in masks_part  # the default fill, no prior
    record["tss"].update(fill_prior=0.5)
    (run_dir / "diffscrub.json").write_text(json.dumps(record))
    masks_part = render_report(run_dir).split("<h2>Detector masks")[1].split("<h2>")[0]
    assert "colour of a contrast image, drawn for each image and step, as 0.5 image areas" in masks_part
    record["tss"].update(fill_prior=0.0, blind_fill="contrast")
    (run_dir / "diffscrub.json").write_text(json.dumps(record))
    masks_part = render_report(run_dir).split("<h2>Detector masks")[1].split("<h2>")[0]
    assert "same places of a contrast image" in masks_part and "mean colour" not in masks_part
    record["tss"]["fingerprint"] = "names"
    (run_dir / "diffscrub.json").write_text(json.dumps(record))
    concept = render_report(run_dir).split("<h2>The concept</h2>")[1].split("<h2>")[0]
    assert "--fingerprint names" in concept and "--fingerprint knn" not in concept
    assert "robust standard deviations" not in concept  # a fixed area: no threshold to tell
    record["tss"]["names_z"] = 2.5
    (run_dir / "diffscrub.json").write_text(json.dumps(record))
    concept = render_report(run_dir).split("<h2>The concept</h2>")[1].split("<h2>")[0]
    assert "median by 2.5 robust standard deviations" in concept
    record["tss"].update(fingerprint="knn", knn_z=3.0)  # names_z does not speak for the knn fingerprint
    (run_dir / "diffscrub.json").write_text(json.dumps(record))
    concept = render_report(run_dir).split("<h2>The concept</h2>")[1].split("<h2>")[0]
    assert "--fingerprint knn" in concept and "median by 3.0 robust standard deviations" in concept

    record["conditioning"] = {"mode": "auto", "given_names": ["7", "seven"], "pool": [""]}
    del record["prepare"]
    (run_dir / "diffscrub.json").write_text(json.dumps(record))
    concept = render_report(run_dir).split("<h2>The concept</h2>")[1]
    assert "Names given with --names: <b>7</b>, <b>seven</b>" in concept and "Prototypes kept" not in concept.split("<h2>")[0]
    assert "--random-contexts" not in concept
    record["conditioning"]["random_contexts"] = ["q {} 4", "on {}"]
    (run_dir / "diffscrub.json").write_text(json.dumps(record))
    concept = render_report(run_dir).split("<h2>The concept</h2>")[1].split("<h2>")[0]
    assert "2 templates drawn from the vocabulary (--random-contexts)" in concept and "q {} 4" in concept
    assert "--leave-out-candidates" not in concept
    record["conditioning"]["left_out_candidates"] = ["two", "brick"]
    (run_dir / "diffscrub.json").write_text(json.dumps(record))
    concept = render_report(run_dir).split("<h2>The concept</h2>")[1].split("<h2>")[0]
    assert "(--leave-out-candidates): <b>two</b>, <b>brick</b>" in concept


def test_overlay_marks_the_mask_red(run_dir):
    from diffscrub.report.html import overlay

    image = torch.zeros(3, 32, 32)  # mid-grey in [-1, 1]
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1.0
    plain, over = overlay(image, mask)
    p, o = np.asarray(plain).astype(int), np.asarray(over).astype(int)
    assert (p[16, 16] == 128).all() and o[16, 16, 0] > 200 and o[16, 16, 1] < 80
    assert (o[0, 0] == p[0, 0]).all()  # outside the mask: unchanged


def test_report_forget_folder_gone_and_no_eval(run_dir, tmp_path):
    shutil.rmtree(tmp_path / "forget")
    shutil.rmtree(run_dir / "eval")
    page = render_report(run_dir)
    assert "is gone" in page and "No evaluation folder was given" in page
    assert _img_srcs(page) == []
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page


def test_report_errors(run_dir, tmp_path):
    with pytest.raises(InputError, match="diffscrub.json"):
        build_report(tmp_path / "nowhere")
    with pytest.raises(InputError, match="metrics.json"):
        build_report(run_dir, eval_dir=tmp_path)
    with pytest.raises(InputError, match="is a folder"):
        build_report(run_dir, out=tmp_path)
    (run_dir / "eval" / "grid_other.png").unlink()
    assert "grid_other.png is missing" in render_report(run_dir)


def test_svg_line_chart_edge_cases():
    assert "<polyline" not in svg_line_chart([1], [0.5], "one point") and "<circle" in svg_line_chart([1], [0.5], "x")
    assert "no finite values" in svg_line_chart([1, 2], [float("nan"), float("inf")], "bad")
    svg = svg_line_chart([1, 2, 3], [2.0, 2.0, 2.0], "flat")
    assert svg.count("<polyline") == 1 and "nan" not in svg


def test_report_cli(run_dir, tmp_path, capsys):
    from diffscrub.evaluation.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "--eval", str(run_dir / "eval"), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out


# ----------------------------------------------------------------------------- real browser
CHECK_SCRIPT = """<script>
(function () {
  var errors = [];
  var origError = console.error;
  console.error = function () { errors.push(Array.prototype.join.call(arguments, ' ')); };
  window.addEventListener('error', function (e) {
    errors.push(('error event: ' + (e.message || (e.target && (e.target.src || e.target.tagName)) || '?')).slice(0, 200));
  }, true);
  window.addEventListener('load', function () {
    var imgs = Array.prototype.slice.call(document.images);
    var result = {
      images: imgs.length,
      broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length,
      svgs: document.querySelectorAll('svg polyline').length,
      errors: errors
    };
    var pre = document.createElement('pre');
    pre.id = '__browser_check__';
    pre.textContent = JSON.stringify(result);
    document.body.appendChild(pre);
  });
})();
</script>"""


def _chromium(args: list[str], profile: pathlib.Path) -> subprocess.CompletedProcess:
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless browser test needs Debian's chromium at /usr/bin/chromium "
                    "(apt-get install -y chromium)")
def test_report_in_headless_chromium(run_dir, tmp_path):
    report = build_report(run_dir)
    page = report.read_text(encoding="utf-8")

    # 1. A copy with a checking script injected (the report itself has none): the browser writes into the DOM
    #    how many images it decoded, and every console error or error event; --dump-dom prints the DOM.
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("<head>", "<head>" + CHECK_SCRIPT, 1), encoding="utf-8")
    proc = _chromium(["--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
                      checked.as_uri()], tmp_path / "profile1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="__browser_check__">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert found, f"the check did not run; stderr tail: {proc.stderr[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["images"] == len(_img_srcs(page)) == 13
    assert result["broken"] == 0, result
    assert result["errors"] == [], result
    assert result["svgs"] == 5
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console

    # 2. A screenshot of the report as it is.
    shot = tmp_path / "shot.png"
    proc = _chromium([f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars",
                      report.as_uri()], tmp_path / "profile2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000
    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10  # not a blank page


def test_report_masks_follow_the_runs_file_order(run_dir, tmp_path):
    forget = tmp_path / "forget"
    # a broken file is skipped when loading, as during the run: the five masks still pair with the five images
    (forget / "f02b.png").write_bytes(b"not a png")
    page = render_report(run_dir)
    assert "5 of 5 forget images" in page and "folder changed" not in page
    assert page.index("f02.png") < page.index("f03.png")
    # one more usable image than masks: the page says the pairs may not match
    Image.new("RGB", (32, 32)).save(forget / "f99.png")
    assert "the folder changed since the run" in render_report(run_dir)


def test_report_of_a_run_in_passes(run_dir):
    """A several-pass run (``erase --then``): the summary names the model the first pass started from and
    every pass, the names say which pass found them, and each earlier pass shows what it took the concept to be."""
    record = json.loads((run_dir / "diffscrub.json").read_text())
    first = json.loads(json.dumps(record))
    first["conditioning"] = {"mode": "auto", "nearest_words": ["7", "and"]}
    first.update(trainable="full", steps=400, timing={"total_s": 100.0})
    record["timing"] = {"total_s": 50.5}
    first["config"].update(model="toy-unet", lr=2e-4)
    record["config"].update(model=str(run_dir.parent / "run.pass1"), lr=2.5e-4, names=["7"])
    record.update(trainable="text-kv", steps=300, earlier_passes=[first])
    record["conditioning"] = {"mode": "auto", "given_names": ["7"], "names_from_pass": 1}
    (run_dir / "diffscrub.json").write_text(json.dumps(record))

    page = render_report(run_dir)
    summary = page[page.index("<h2>Summary</h2>"):page.index("<h2>Evaluation</h2>")]
    assert "<td>model</td><td>toy-unet</td>" in summary and "run.pass1" not in summary
    assert "tss on full, 400 steps, lr 0.0002, tss on text-kv, 300 steps, lr 0.00025" in summary
    assert "<td>total time (s), all passes</td><td>150.5</td>" in summary
    concept = page[page.index("<h2>The concept</h2>"):page.index("<h2>Detector masks")]
    assert "Names carried over from pass 1: <b>7</b>" in concept
    assert "--names" not in concept
    assert "<h3>Pass 1 of 2: tss on full, 400 steps, lr 0.0002</h3>" in concept
    assert "Your forget folder looks like: <b>7</b>, <b>and</b>" in concept.split("<h3>Pass 1 of 2")[1]
