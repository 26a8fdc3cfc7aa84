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
    from diffscrub.cli import main

    out = tmp_path / "demo-out"
    from diffscrub import demo

    summary = demo.run_demo(out=str(out), steps=2, quiet=True, set_size=6, measure_n=4, grid_seeds=2,
                            tss_options={"num_prototypes": 3, "vectors_per_image": 32, "fit_draws": 1,
                                         "mask_draws": 1})
    for name in ("before_after.png", "demo.json", "oracle_table.txt", "erased/model_index.json",
                 "erased/diffscrub.json", "sets/forget", "sets/retain"):
        assert (out / name).exists(), name
    record = json.loads((out / "demo.json").read_text())
    assert set(record["before"]) == set(record["after"]) >= {"null_concept_rate", "concept_concept_rate"}
    assert all(0 <= v <= 1 for v in record["before"].values())
    assert "null prompt: concept rate" in capsys.readouterr().out
    assert summary["concept"] == "7"
    # A second run refuses to overwrite the result unless asked.
    assert main(["demo", "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
