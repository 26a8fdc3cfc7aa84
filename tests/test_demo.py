"""The README's main job, end to end on the shipped toy model, at a small size."""

from __future__ import annotations

import json

import pytest

from diffscrub.toy import resolve_toy_model


def _toy_unet_shipped() -> bool:
    try:
        return resolve_toy_model("toy-unet") is not None
    except Exception:
        return False


@pytest.mark.skipif(not _toy_unet_shipped(), reason="toy-unet weights are not in this checkout")
def test_demo_small(tmp_path, capsys):
    from diffscrub import demo
    from diffscrub.cli import main

    out = tmp_path / "demo-out"
    summary = demo.run_demo(
        out=str(out), steps=2, quiet=True, set_size=6, eval_n=2, eval_n_null=4, max_prompts=2,
        erase_options={"inversion_steps": 2},
        tss_options={"num_prototypes": 3, "vectors_per_image": 32, "fit_draws": 1, "mask_draws": 1})
    for name in ("report.html", "demo.json", "eval/metrics.json", "erased/model_index.json",
                 "erased/diffscrub.json", "sets/forget", "sets/retain"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert {"null", "concept", "other"} <= set(metrics["sets"])
    rate = metrics["sets"]["null"]["concept_rate"]
    assert 0 <= rate["erased"]["rate"] <= 1 and rate["reader"] == "oracle"
    assert summary["concept"] == demo.DEMO_CONCEPT and summary["nearest_words"] is not None
    # the run was written in a temporary sibling and renamed: its records and report name the folder it now is in,
    # so the saved erase config can be run again as it stands
    erase_config = json.loads((out / "erased" / "diffscrub.json").read_text())["config"]
    assert erase_config["forget"] == str(out / "sets" / "forget") and erase_config["out"] == str(out / "erased")
    assert metrics["config"]["model"] == str(out / "erased")
    for name in ("erased/diffscrub.json", "eval/metrics.json", "report.html"):
        assert ".tmp-" not in (out / name).read_text(), name
    printed = capsys.readouterr().out
    assert "concept rate (oracle)" in printed and "report.html" in printed
    # A second run refuses to overwrite the result unless asked, and leaves it intact.
    assert main(["demo", "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "report.html").exists()
