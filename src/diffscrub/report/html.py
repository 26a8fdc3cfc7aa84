"""One self-contained HTML page per erase run: images as data URIs, inline CSS and SVG, no script.

Sections: summary, evaluation figures (reference beside erased, with intervals), before/after
grids on the same seeds, what the run took the concept to be (its names, the prompts and anchors of
the conditioning pool, the prototypes kept), the detector's masks over a sample of the forget
images, loss curves per term, and the run configuration.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import pathlib
from typing import Any

import torch

from ..errors import DiffscrubError, InputError

RECORD_FILE = "diffscrub.json"
ARTIFACTS_FILE = "diffscrub_artifacts.safetensors"
METRICS_FILE = "metrics.json"
MAX_OVERLAYS = 12
LOSS_TERMS_FIRST = ("total", "forget", "background", "retain", "mask_area")
MASK_OPACITY = 0.6
SET_ORDER = ("null", "concept", "other")


def _in_set_order(mapping: dict) -> list[tuple[str, Any]]:
    """Items of a per-set dict in the evaluation's order (metrics.json stores keys sorted)."""
    rank = {name: i for i, name in enumerate(SET_ORDER)}
    return sorted(mapping.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;max-width:1150px;padding:16px 24px;
color:#1d2330;background:#fff;line-height:1.4}
h1{font-size:1.6em;margin:.2em 0}h2{border-bottom:2px solid #e3e6ee;padding-bottom:4px;margin-top:1.6em}
h3{margin:1.1em 0 .4em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.92em}
th,td{border:1px solid #d5d9e3;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f1f3f8}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.ci{color:#6b7280;font-size:.88em}.note{background:#fff7e0;border-left:4px solid #f0b400;padding:6px 10px;margin:.5em 0}
.missing{background:#fdecec;border-left:4px solid #d33;padding:6px 10px;margin:.5em 0}
.grid img{image-rendering:pixelated;max-width:100%;border:1px solid #d5d9e3}
.overlays{display:flex;flex-wrap:wrap;gap:12px}.overlays figure{margin:0;text-align:center;font-size:.8em}
.overlays img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #d5d9e3}
.charts{display:flex;flex-wrap:wrap;gap:16px}.charts figure{margin:0}.charts figcaption{font-size:.85em;text-align:center}
pre{background:#f6f7fa;border:1px solid #e3e6ee;padding:8px;overflow:auto;font-size:.85em}
.kv td:first-child{color:#4b5563}
.headline{background:#eef4ff;border-left:4px solid #2f6fd6;padding:8px 8px 8px 28px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def png_data_uri(image) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def file_data_uri(path: pathlib.Path) -> tuple[str, int, int]:
    """A PNG file as ``(data URI, width, height)``, re-encoded through PIL so only a valid image is embedded."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
        return png_data_uri(rgb), rgb.width, rgb.height


# ----------------------------------------------------------------------------- loss curves
def svg_line_chart(xs: list[float], ys: list[float], title: str, width: int = 340, height: int = 190) -> str:
    """An inline SVG line chart of one series (polyline), with min/max labels on both axes."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(float(y))]
    left, right, top, bottom = 58, 12, 10, 32
    pw, ph = width - left - right, height - top - bottom
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">'),
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafbfd" stroke="#c9ced9"/>']
    if not pts:
        parts.append(f'<text x="{left + 8}" y="{top + ph / 2}" font-size="12">no finite values</text></svg>')
        return "".join(parts)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    if len(pts) > 1:
        parts.append(f'<polyline fill="none" stroke="#2f6fd6" stroke-width="1.8" points="{coords}"/>')
    for x, y in pts if len(pts) <= 40 else []:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="#2f6fd6"/>')
    fmt = lambda v: f"{v:.3g}"
    parts += [
        f'<text x="{left - 4}" y="{top + 9}" font-size="10" text-anchor="end">{fmt(y1)}</text>',
        f'<text x="{left - 4}" y="{top + ph}" font-size="10" text-anchor="end">{fmt(y0)}</text>',
        f'<text x="{left}" y="{height - 18}" font-size="10" text-anchor="start">{fmt(x0)}</text>',
        f'<text x="{left + pw}" y="{height - 18}" font-size="10" text-anchor="end">{fmt(x1)}</text>',
        f'<text x="{left + pw / 2}" y="{height - 4}" font-size="11" text-anchor="middle">step</text>',
        "</svg>",
    ]
    return "".join(parts)


def loss_section(losses: list[dict]) -> str:
    if not losses:
        return '<p class="note">The run recorded no losses.</p>'
    keys = [k for k in LOSS_TERMS_FIRST if any(k in row for row in losses)]
    keys += sorted({k for row in losses for k in row} - set(keys) - {"step"})
    charts = []
    for key in keys:
        rows = [r for r in losses if key in r and isinstance(r.get(key), (int, float))]
        xs = [r.get("step", i + 1) for i, r in enumerate(rows)]
        ys = [r[key] for r in rows]
        charts.append(f'<figure>{svg_line_chart(xs, ys, key)}<figcaption>{_e(key)} '
                      f'({len(rows)} logged steps)</figcaption></figure>')
    return f'<div class="charts">{"".join(charts)}</div>'


# ----------------------------------------------------------------------------- masks over forget images
def overlay(image: torch.Tensor, mask: torch.Tensor, opacity: float = MASK_OPACITY):
    """Forget image ``[3, H, W]`` in [-1, 1] with ``mask [1, h, w]`` in [0, 1] as a translucent red layer."""
    from PIL import Image

    img = ((image.float().clamp(-1, 1) + 1) / 2)
    m = torch.nn.functional.interpolate(mask.float()[None], size=img.shape[-2:], mode="bilinear",
                                        align_corners=False)[0].clamp(0, 1)
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    a = opacity * m
    out = img * (1 - a) + red * a
    arr = (out * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    plain = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(plain, "RGB"), Image.fromarray(arr, "RGB")


def _spread(n: int, count: int) -> list[int]:
    """Up to ``count`` indices spread evenly over ``range(n)``."""
    count = min(count, n)
    return sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)}) if n else []


def _forget_sample(folder: pathlib.Path, n_masks: int, resolution):
    """``(indices, file names, images [-1, 1], usable image count)`` for a spread sample of the forget folder.

    Images are decoded exactly as the erase run did (``load_image_folder``, same resolution), so index ``i``
    matches mask ``i``. When every image file of the folder is usable (the usual case) only the sampled
    files are decoded, through a temporary folder of links in the same sorted order; otherwise the whole
    folder is decoded so that skipped files shift the indices as they did during the run.
    """
    import tempfile

    from ..data import load_image_folder, scan_image_folder

    quiet = lambda *a, **k: None
    files = scan_image_folder(folder, name="forget")
    if len(files) == n_masks:
        index = _spread(len(files), MAX_OVERLAYS)
        try:
            with tempfile.TemporaryDirectory(prefix="diffscrub-report-") as tmp:
                for k, i in enumerate(index):
                    os.symlink(files[i].resolve(), pathlib.Path(tmp) / f"{k:06d}{files[i].suffix.lower()}")
                subset = load_image_folder(tmp, name="forget", resolution=resolution, warn=quiet)
            if len(subset) == len(index):
                return index, [files[i].name for i in index], list(subset.images), len(files)
        except (OSError, DiffscrubError):
            pass  # no symlinks here, or a file that is not a usable image: decode the whole folder
    images = load_image_folder(folder, name="forget", resolution=resolution, warn=quiet)
    index = _spread(min(len(images), n_masks), MAX_OVERLAYS)
    # only the shown images become floats (``images.images`` would convert the whole folder, per access)
    return index, [images.paths[i].name for i in index], [images.floats(i, i + 1)[0] for i in index], len(images)


def mask_section(record: dict, run_dir: pathlib.Path) -> str:
    from safetensors.torch import load_file

    path = run_dir / ARTIFACTS_FILE
    if not path.is_file():
        return f'<p class="missing">No {ARTIFACTS_FILE} in this run folder: no detector masks to show.</p>'
    tensors = load_file(str(path))
    masks = tensors.get("forget_masks")
    if masks is None:
        return ('<p class="note">This run kept no per-image masks (forget_masks); with mask_mode "online" '
                'masks are drawn at each step and not stored.</p>')
    config = record.get("config", {}) or {}
    drawn = int(((record.get("conditioning") or {}).get("name_samples") or {}).get("count", 0))
    drawn_note = (f'<p class="note">The last {drawn} masks belong to the images the model drew of the prompts naming '
                  f'the concept (--name-samples); those images are not stored, so only the forget folder\'s are '
                  f'shown.</p>') if drawn else ""
    masks = masks[:masks.shape[0] - drawn] if 0 < drawn < masks.shape[0] else masks
    folder = config.get("forget")
    if not folder or not pathlib.Path(folder).is_dir():
        return (f'<p class="missing">The forget folder <code>{_e(folder or "(not recorded)")}</code> is gone, so the '
                f'{masks.shape[0]} stored masks cannot be drawn over their images. Mean mask area: '
                f'{float(masks.mean()):.3f}.</p>')
    try:
        index, names, images, total = _forget_sample(pathlib.Path(folder), masks.shape[0], config.get("resolution"))
    except DiffscrubError as exc:
        return f'<p class="missing">The forget folder could not be read again: {_e(exc)}</p>'
    parts = [drawn_note] if drawn_note else []
    n = min(total, masks.shape[0])
    if total != masks.shape[0]:
        parts.append(f'<p class="note">The forget folder now holds {total} usable images but the run stored '
                     f'{masks.shape[0]} masks: the folder changed since the run, so pairs may not match.</p>')
    figs = []
    for i, name, image in zip(index, names, images):
        plain, over = overlay(image, masks[i])
        area = float(masks[i].mean())
        figs.append(f'<figure><img src="{png_data_uri(plain)}" alt="forget image {i}">'
                    f'<img src="{png_data_uri(over)}" alt="mask over forget image {i}">'
                    f'<figcaption>{_e(name)}<br>mask area {area:.3f}</figcaption></figure>')
    parts.append(f'<p>{len(figs)} of {n} forget images (left), with the detector\'s mask as a red layer (right; '
                 f'opacity {MASK_OPACITY} at mask value 1). Mean mask area over all images: '
                 f'{float(masks.mean()):.3f}.</p>' + _fill_note(record.get(record.get("method", "")) or {}))
    parts.append(f'<div class="overlays">{"".join(figs)}</div>')
    return "".join(parts)


def _fill_note(method_cfg: dict) -> str:
    """What the blinded region held: the teacher's target inside the mask is drawn from it."""
    fill = method_cfg.get("blind_fill")
    if fill == "noise":
        return '<p>Inside the mask the clean latent was replaced by noise (--blind-fill noise).</p>'
    if fill == "contrast":
        return ("<p>Inside the mask the clean latent was replaced by the same places of a contrast image (one "
                "without the concept), drawn for each image and step (--blind-fill contrast).</p>")
    if fill != "surround":
        return ""
    prior = float(method_cfg.get("fill_prior") or 0)
    return ("<p>Inside the mask the clean latent was replaced by the mean colour around it"
            + (f", mixed with the colour of a contrast image, drawn for each image and step, as {_e(prior)} image "
               "areas of extra surround (--fill-prior), so an image the mask covers is filled with the colour of an "
               "image without the concept"
               if prior > 0 else "") + ".</p>")


# ----------------------------------------------------------------------------- the concept
def _words(items) -> str:
    return ", ".join(f"<b>{_e(w)}</b>" for w in items)


def _codes(prompts) -> str:
    return ", ".join(f"<code>{_e(p) if p else '(null prompt)'}</code>" for p in prompts)


def _prototype_table(selection: dict) -> str:
    """One row per k-means prototype: how often it fires on forget and on retain locations, kept or dropped."""
    rows = []
    for i, (f, r, kept) in enumerate(zip(selection.get("forget_rate", []), selection.get("retain_rate", []),
                                         selection.get("kept", []))):
        rows.append(f"<tr><td>{i}</td><td>{100 * f:.1f}%</td><td>{100 * r:.1f}%</td>"
                    f"<td>{'kept' if kept else 'dropped'}</td></tr>")
    return ("<table><tr><th>prototype</th><th>fires on forget locations</th><th>fires on retain locations</th>"
            "<th>contrastive fingerprint</th></tr>" + "".join(rows) + "</table>")


def concept_section(record: dict) -> str:
    """What the run took the concept to be: the words found for it (or the names given), the prompts of the
    conditioning pool and what the model drew of them, the vocabulary anchors, and the prototypes kept."""
    cond = record.get("conditioning") or {}
    config = record.get("config", {}) or {}
    method_cfg = record.get(record.get("method", "")) or {}
    prepare = record.get("prepare") or {}
    parts = []
    if cond.get("nearest_words"):
        names = int(config.get("name_words", 1) or 0)
        fit = cond.get("word_fit")
        if fit:
            scores = ", ".join(f"<b>{_e(w)}</b> ({float(v):+.2%})" for w, v in fit[:8])
            how = (f"Textual inversion learned a token for the forget images; its {len(fit)} nearest words in the text "
                   "encoders' vocabularies were ranked by how much each, alone as the prompt, lowers the frozen "
                   f"model's denoising loss on the forget images (less what it lowers on the retain images): {scores}.")
        else:
            how = ("These are the words of the tokenizer's vocabulary nearest to the token that textual inversion "
                   "learned for the forget images.")
        parts.append(f"<p>Your forget folder looks like: {_words(cond['nearest_words'])}. {how} "
                     f"The first {names} counted as the concept's names.</p>")
    elif cond.get("given_names") and cond.get("names_from_pass"):
        parts.append(f"<p>Names carried over from pass {int(cond['names_from_pass'])}: {_words(cond['given_names'])} "
                     "(textual inversion against an erased model would find the erasure, not the concept).</p>")
    elif cond.get("given_names"):
        parts.append(f"<p>Names given with --names: {_words(cond['given_names'])} (no textual inversion ran).</p>")
    elif cond.get("mode"):
        parts.append(f'<p class="note">No names: conditioning mode {_e(cond["mode"])} (the null prompt'
                     f'{" and the given prompts" if cond["mode"] == "prompts" else ""}).</p>')
    else:
        parts.append('<p class="note">The run recorded no conditioning (the model has no text encoder, or the '
                     "method keeps its own prompts).</p>")
    pool = cond.get("pool")
    if pool:
        more = f" and {len(pool) - 24} more" if len(pool) > 24 else ""
        parts.append(f"<p>Conditioning pool ({len(pool)} prompts): {_codes(pool[:24])}{more}.</p>")
    if cond.get("random_contexts"):
        parts.append(f"<p>The names also went in {len(cond['random_contexts'])} templates drawn from the vocabulary "
                     f"(--random-contexts): {_codes(cond['random_contexts'])}.</p>")
    if cond.get("left_out_candidates"):
        parts.append("<p>Every word the inversion weighed as a name was left out of the drawn templates and anchors "
                     f"(--leave-out-candidates): {_words(cond['left_out_candidates'])}.</p>")
    drawn = cond.get("name_samples")
    if drawn:
        parts.append(f"<p>The model drew {int(drawn['count'])} images of {_codes(drawn.get('prompts', []))} "
                     "before training, and they joined the forget images (--name-samples).</p>")
    anchors = cond.get("vocab_anchors")
    if anchors:
        parts.append(f"<p>{int(anchors['count'])} vocabulary anchors, e.g. {_codes(anchors.get('examples', []))}"
                     + (f"; kept in every template: {_words(anchors['kept_words'])}" if anchors.get("kept_words")
                        else "")
                     + (f"; left out: {_words(anchors['left_out'])}" if anchors.get("left_out") else "") + ".</p>")
    learned = record.get("name_embeddings")
    if learned:
        tokens = [token for encoder in learned.get("tokens", {}).values() for token in encoder]
        parts.append(f"<p>The text encoders learned their input embeddings of {_words(sorted(set(tokens)))} "
                     "(--name-embeddings; largest change "
                     f"{100 * float(learned.get('largest_relative_change', 0)):.0f}% of the row's norm): a prompt "
                     "writing these tokens reads them as the trained rows, in any context; no other prompt "
                     "changed.</p>")
    selection = prepare.get("prototype_selection")
    if selection:
        other = {"knn": "the neighbour fingerprint (--fingerprint knn)",
                 "names": "where naming the concept lowers the teacher's denoising error (--fingerprint names)"}
        other = other.get(method_cfg.get("fingerprint"))
        z = method_cfg.get({"names": "names_z", "knn": "knn_z"}.get(method_cfg.get("fingerprint"), ""))
        if other and float(z or 0) > 0:
            other += f", kept where it exceeds the contrast images' median by {_e(z)} robust standard deviations"
        parts.append(f"<p>Prototypes kept: {prepare.get('prototypes_kept', sum(selection.get('kept', [])))} of "
                     f"{len(selection.get('kept', []))}. A prototype is kept when it fires on forget locations "
                     f"at least {_e(method_cfg.get('contrast_ratio', '?'))} times as often as on retain locations "
                     "(when none does, the one with the highest ratio is kept)."
                     + (f" This run's masks come from {other}; the prototypes are shown for reference." if other
                        else "") + "</p>" + _prototype_table(selection))
    return "".join(parts)


# ----------------------------------------------------------------------------- evaluation tables
def _rate_cell(s: dict | None) -> str:
    if not s or s.get("rate") is None:
        return '<td class="num">-</td>'
    lo, hi = s["ci"]
    return (f'<td class="num">{s["rate"]:.3f} <span class="ci">[{lo:.3f}, {hi:.3f}]</span>'
            f'<br><span class="ci">{s["k"]}/{s["n"]}</span></td>')


def _mean_cell(s: dict | None, key: str = "mean") -> str:
    if not s or s.get(key) is None:
        return '<td class="num">-</td>'
    lo, hi = s["ci"]
    lo_s = "-" if lo is None else f"{lo:.4f}"
    hi_s = "-" if hi is None else f"{hi:.4f}"
    return f'<td class="num">{s[key]:.4f} <span class="ci">[{lo_s}, {hi_s}]</span><br><span class="ci">n={s["n"]}</span></td>'


def _drop_cell(s: dict | None) -> str:
    if not s or s.get("drop") is None:
        return '<td class="num">-</td>'
    lo, hi = s["ci"]
    return f'<td class="num">{s["drop"]:+.3f} <span class="ci">[{lo:+.3f}, {hi:+.3f}]</span></td>'


def _headline(metrics: dict) -> str:
    """A few sentences with the figures most people look for first."""
    sets = metrics.get("sets", {})
    items = []

    def rate(s):
        return f"{s['rate']:.0%}" if s and s.get("rate") is not None else "-"

    for name, what in (("concept", "prompts asking for the concept"), ("null", "the null prompt")):
        cr = sets.get(name, {}).get("concept_rate")
        if cr:
            items.append(f"<li>Concept in samples of {what}: <b>{rate(cr['reference'])}</b> with the reference, "
                         f"<b>{rate(cr['erased'])}</b> after erasure ({_e(cr['reader'])}).</li>")
    pres = sets.get("other", {}).get("preservation") or sets.get("null", {}).get("preservation")
    if pres and pres.get("ssim", {}).get("mean") is not None:
        which = "other" if sets.get("other", {}).get("preservation") else "null"
        items.append(f"<li>Unrelated samples ({which} set) against the reference on the same seeds: SSIM "
                     f"<b>{pres['ssim']['mean']:.3f}</b>, mean |pixel difference| "
                     f"<b>{pres['pixel_diff']['mean']:.4f}</b> (identical models: 1 and 0).</li>")
    pa = sets.get("other", {}).get("prompt_adherence")
    if pa:
        items.append(f"<li>Other prompts drawn as asked: <b>{rate(pa['reference'])}</b> with the reference, "
                     f"<b>{rate(pa['erased'])}</b> after erasure.</li>")
    return f'<ul class="headline">{"".join(items)}</ul>' if items else ""


def metrics_tables(metrics: dict) -> str:
    level = metrics.get("config", {}).get("confidence", 0.95)
    parts = [_headline(metrics),(f'<p>Figures with {level:.0%} intervals: Wilson for rates, seeded bootstrap for means and distances. '
             'Both models were sampled on the same seeds; "change" columns compare them sample by sample.</p>')]
    head = ("<tr><th>set</th><th>figure</th><th>reference</th><th>erased</th><th>reference &minus; erased</th></tr>")
    rows = []
    for set_name, fig in _in_set_order(metrics.get("sets", {})):
        if "skipped" in fig:
            rows.append(f'<tr><td>{_e(set_name)}</td><td colspan="4">skipped: {_e(fig["skipped"])}</td></tr>')
            continue
        for reader, r in fig.get("concept_rate_by_reader", {}).items():
            primary = " (primary)" if fig.get("concept_rate", {}).get("reader") == reader else ""
            rows.append(f'<tr><td>{_e(set_name)}</td><td>concept rate, {_e(reader)}{primary}</td>'
                        f'{_rate_cell(r["reference"])}{_rate_cell(r["erased"])}{_drop_cell(r.get("drop"))}</tr>')
        for key, label in (("prompt_adherence", "prompt adherence (oracle)"),
                           ("background_adherence", "asked background (oracle)")):
            pa = fig.get(key)
            if pa:
                rows.append(f'<tr><td>{_e(set_name)}</td><td>{label}</td>'
                            f'{_rate_cell(pa["reference"])}{_rate_cell(pa["erased"])}{_drop_cell(pa.get("drop"))}</tr>')
        ch = fig.get("preservation") or fig.get("change")
        if ch:
            label = "preservation" if "preservation" in fig else "change"
            rows.append(f'<tr><td>{_e(set_name)}</td><td>{label}: mean |pixel difference|</td>'
                        f'<td class="num">0 (itself)</td>{_mean_cell(ch.get("pixel_diff"))}<td></td></tr>')
            rows.append(f'<tr><td>{_e(set_name)}</td><td>{label}: SSIM to reference</td>'
                        f'<td class="num">1 (itself)</td>{_mean_cell(ch.get("ssim"))}<td></td></tr>')
            cf = ch.get("concept_free")
            if cf:
                rows.append(f'<tr><td>{_e(set_name)}</td><td>{label}: |pixel difference|, samples whose reference '
                            f'shows no concept ({_e(cf.get("reader"))})</td><td class="num">0</td>'
                            f'{_mean_cell(cf.get("pixel_diff"))}<td></td></tr>')
        fd = fig.get("frechet_distance")
        if fd:
            rows.append(f'<tr><td>{_e(set_name)}</td><td>Fréchet distance to {fd.get("real_n")} retain images '
                        f'<span class="ci">({_e(fd.get("features"))})</span></td>'
                        f'{_mean_cell(fd.get("reference"), "value")}{_mean_cell(fd.get("erased"), "value")}<td></td></tr>')
    parts.append(f"<table>{head}{''.join(rows)}</table>")
    by_prompt = [(set_name, row) for set_name, fig in _in_set_order(metrics.get("sets", {}))
                 for row in fig.get("concept_rate_by_prompt", [])]
    if by_prompt:
        reader = next((fig.get("concept_rate", {}).get("reader") for _, fig in
                       _in_set_order(metrics.get("sets", {})) if fig.get("concept_rate")), "")
        parts.append(f"<h3>Concept rate by prompt ({_e(reader)})</h3><p>A set's rate can hide one prompt that "
                     "still draws the concept.</p><table><tr><th>set</th><th>prompt</th><th>reference</th>"
                     "<th>erased</th></tr>"
                     + "".join(f'<tr><td>{_e(set_name)}</td><td><code>{_e(row["prompt"])}</code></td>'
                               f'{_rate_cell(row["reference"])}{_rate_cell(row["erased"])}</tr>'
                               for set_name, row in by_prompt) + "</table>")

    readers = metrics.get("readers", {})
    rrows = []
    for name, info in readers.items():
        if name == "primary" or not isinstance(info, dict):
            continue
        settings = ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("forget_rate", "retain_rate"))
        rrows.append(f'<tr><td>{_e(name)}</td>{_rate_cell(info.get("forget_rate"))}'
                     f'{_rate_cell(info.get("retain_rate"))}<td>{_e(settings)}</td></tr>')
    if rrows:
        parts.append("<h3>Concept readers on real images</h3><p>How often each reader sees the concept in the "
                     "forget images (should be high) and in the retain images (should be low).</p>"
                     "<table><tr><th>reader</th><th>forget images</th><th>retain images</th><th>settings</th></tr>"
                     + "".join(rrows) + "</table>")
    for note in metrics.get("notes", []):
        parts.append(f'<p class="note">{_e(note)}</p>')
    return "".join(parts)


def grids_section(metrics: dict, eval_dir: pathlib.Path) -> str:
    parts = []
    sampling = metrics.get("sampling", {})
    parts.append(f'<p>Rows are prompts, columns are seeds; the reference model on the left, the erased model on '
                 f'the right, from the same initial noise. {_e(sampling.get("steps"))} steps, guidance '
                 f'{_e(sampling.get("guidance"))}, {_e(sampling.get("scheduler"))}.</p>')
    for set_name, grid in _in_set_order(metrics.get("grids", {})):
        path = eval_dir / grid.get("file", "")
        parts.append(f"<h3>{_e(set_name)} prompts</h3>")
        if not path.is_file():
            parts.append(f'<p class="missing">Grid image {_e(grid.get("file"))} is missing from {_e(eval_dir)}.</p>')
            continue
        seeds = grid.get("seeds") or []
        first = seeds[0] if seeds else []
        seed_text = f"seeds of the first row: {', '.join(map(str, first))}" if first else ""
        try:
            uri, w, h = file_data_uri(path)
        except OSError as exc:
            parts.append(f'<p class="missing">Grid image {_e(path.name)} could not be read ({_e(type(exc).__name__)}).</p>')
            continue
        zoom = max(1.0, min(2.0, 1100 / max(w, 1)))  # small grids shown larger, pixel-exact
        parts.append(f'<div class="grid"><img src="{uri}" width="{round(w * zoom)}" height="{round(h * zoom)}" '
                     f'alt="{_e(set_name)} samples, reference and erased"></div><p class="ci">{_e(seed_text)}</p>')
    return "".join(parts)


# ----------------------------------------------------------------------------- page
def _kv_table(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in pairs if v is not None)
    return f'<table class="kv">{rows}</table>'


def _total_time(records: list[dict]) -> str | None:
    """Seconds the run took, summed over its passes (None when a record lacks its time)."""
    times = [(r.get("timing") or {}).get("total_s") for r in records]
    return f"{sum(times):.1f}" if all(isinstance(t, (int, float)) for t in times) else None


def _pass_line(record: dict) -> str:
    """One pass of a several-pass run, in a few words: "tss on text-kv, 400 steps, lr 0.00025"."""
    config = record.get("config") or {}
    return (f"{record.get('method', config.get('method', '?'))} on {record.get('trainable', '?')}, "
            f"{record.get('steps', config.get('steps', '?'))} steps, lr {config.get('lr', '?')}")


def _read_json(path: pathlib.Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{what} '{path}' could not be read ({type(exc).__name__}): re-create it") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} '{path}' does not hold a JSON object: re-create it")
    return data


def render_report(run_dir: str | pathlib.Path, eval_dir: str | pathlib.Path | None = None) -> str:
    """The report page for ``run_dir`` (and its evaluation folder) as an HTML string."""
    run_dir = pathlib.Path(run_dir)
    record_path = run_dir / RECORD_FILE
    if not record_path.is_file():
        raise InputError(f"'{run_dir}' has no {RECORD_FILE}: pass the output folder of a diffscrub erase run")
    record = _read_json(record_path, "run record")
    metrics = None
    eval_note = ""
    if eval_dir is not None:
        eval_dir = pathlib.Path(eval_dir)
        if not (eval_dir / METRICS_FILE).is_file():
            raise InputError(f"'{eval_dir}' has no {METRICS_FILE}: pass --eval with a folder written by diffscrub eval")
        metrics = _read_json(eval_dir / METRICS_FILE, "metrics file")
    elif (run_dir / "eval" / METRICS_FILE).is_file():
        eval_dir = run_dir / "eval"
        metrics = _read_json(eval_dir / METRICS_FILE, "metrics file")
    else:
        eval_note = ("No evaluation folder was given: run <code>diffscrub eval --model DIR --reference ORIGINAL "
                     "--forget FORGET --out DIR/eval ...</code> and render again (or pass --eval).")

    config = record.get("config", {}) or {}
    method = record.get("method", config.get("method", "?"))
    earlier = record.get("earlier_passes") or []
    model = (earlier[0].get("config") or {}).get("model") if earlier else config.get("model")
    summary = _kv_table([
        ("model", model), ("method", method), ("family", record.get("family")),
        ("passes", ", ".join(_pass_line(r) for r in [*earlier, record]) if earlier else None),
        ("pipeline", record.get("pipeline_class")), ("forget folder", config.get("forget")),
        ("forget images", record.get("forget_images")), ("retain images", record.get("retain_images")),
        ("steps", record.get("steps", config.get("steps"))), ("trainable", record.get("trainable")),
        ("device", record.get("device")),
        ("total time (s)" + (", all passes" if earlier else ""), _total_time([*earlier, record])),
        ("evaluation", str(eval_dir) if metrics is not None else "none"),
    ])
    sections = [f"<h2>Summary</h2>{summary}"]
    if metrics is not None:
        sections.append(f"<h2>Evaluation</h2>{metrics_tables(metrics)}")
        sections.append(f"<h2>Before and after, same seeds</h2>{grids_section(metrics, eval_dir)}")
    else:
        sections.append(f'<h2>Evaluation</h2><p class="note">{eval_note}</p>')
        sections.append('<h2>Before and after, same seeds</h2><p class="note">Needs an evaluation folder.</p>')
    sections.append(f"<h2>The concept</h2>{concept_section(record)}")
    for k, earlier_record in enumerate(earlier, start=1):
        sections.append(f"<h3>Pass {k} of {len(earlier) + 1}: {_e(_pass_line(earlier_record))}</h3>"
                        f"{concept_section(earlier_record)}")
    sections.append(f"<h2>Detector masks on forget images</h2>{mask_section(record, run_dir)}")
    sections.append(f"<h2>Loss curves</h2>{loss_section(record.get('losses') or [])}")
    run_config = {"config": config, method: record.get(method)}
    sections.append(f"<h2>Run configuration</h2><pre>{_e(json.dumps(run_config, indent=2, sort_keys=True, default=str))}</pre>")
    if metrics is not None:
        sections.append(f"<h3>Evaluation configuration</h3><pre>{_e(json.dumps(metrics.get('config', {}), indent=2, sort_keys=True))}</pre>"
                        f"<h3>Evaluation run</h3><pre>{_e(json.dumps(metrics.get('run', {}), indent=2, sort_keys=True))}</pre>")
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    title = f"diffscrub report: {run_dir.name}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class=\"ci\">Generated {now} from <code>{_e(run_dir)}</code>.</p>"
            + "".join(sections) + "</body></html>\n")


def build_report(run_dir: str | pathlib.Path, eval_dir: str | pathlib.Path | None = None,
                 out: str | pathlib.Path | None = None) -> pathlib.Path:
    """Write the report of ``run_dir`` to ``out`` (default ``run_dir/report.html``); return its path."""
    page = render_report(run_dir, eval_dir)
    out = pathlib.Path(out) if out is not None else pathlib.Path(run_dir) / "report.html"
    if out.is_dir():
        raise InputError(f"report output '{out}' is a folder: pass --out with a file name such as report.html")
    if not out.parent.is_dir():
        raise InputError(f"folder '{out.parent}' of report output '{out}' does not exist: create it or choose another --out")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write report '{out}' ({exc.strerror or type(exc).__name__}): choose another --out") from None
    return out
