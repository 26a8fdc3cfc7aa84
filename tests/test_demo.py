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
    record = json.loads((out / "erased" / "diffscrub.json").read_text())
    erase_config = record["config"]
    # the demo's recipe reaches the erase, where the test does not shrink it
    assert {k: record["tss"][k] for k in demo.DEMO_TSS_OPTIONS} == demo.DEMO_TSS_OPTIONS
    assert {k: erase_config[k] for k in demo.DEMO_OPTIONS if k != "inversion_steps"} == {
        k: v for k, v in demo.DEMO_OPTIONS.items() if k != "inversion_steps"}
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


@pytest.mark.parametrize("concept, fingerprint", [("brick", "prototypes"), ("grass", "prototypes"), ("7", "knn")])
def test_demo_picks_the_recipe_for_the_kind_of_concept(concept, fingerprint, tmp_path, monkeypatch):
    """A background is erased with brick's recipe (the prototypes' mask, anchors); a digit with the 7 recipe's
    first pass (a small neighbour mask, no anchors). A run that stops leaves no output folder behind."""
    from diffscrub import demo

    seen = {}

    class Stop(Exception):
        pass

    def fake_erase(config, tss_options, log=None):
        seen.update(config=config, tss=tss_options)
        raise Stop

    monkeypatch.setattr(demo, "erase", fake_erase)
    with pytest.raises(Stop):
        demo.run_demo(out=str(tmp_path / "d"), quiet=True, concept=concept, set_size=4)
    assert seen["tss"].get("fingerprint", "prototypes") == fingerprint and seen["tss"]["blind_fill"] == "contrast"
    assert seen["tss"].get("knn_area") == (0.15 if concept.isdigit() else None)
    assert seen["config"].lr == 1e-4 and seen["config"].steps == demo.DEMO_STEPS
    assert ("vocab_anchors" in seen["tss"]) == (not concept.isdigit())
    assert seen["config"].leave_out_candidates == (not concept.isdigit())
    assert list(tmp_path.iterdir()) == []
