"""make-sets: forget canvases hold the concept, retain canvases do not, only PNGs are written."""

import pytest
from PIL import Image

from diffscrub.errors import InputError
from diffscrub.toy.sets import make_sets


@pytest.mark.parametrize("concept", ["7", "grass"])
def test_forget_and_retain(tmp_path, concept):
    res = make_sets(concept, tmp_path, n=12, seed=3)
    assert len(res["forget"]) == 12 and len(res["retain"]) == 12
    for lab in res["forget"]:
        assert concept in lab.concepts()
        assert lab.split == "train"
        if concept.isdigit():
            assert len(lab.digits) >= 2  # clutter: the concept comes with other digits
    for lab in res["retain"]:
        assert concept not in lab.concepts()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forget", "retain"]
    for sub in ("forget", "retain"):
        files = sorted((tmp_path / sub).iterdir())
        assert len(files) == 12
        for f in files:
            assert f.suffix == ".png"
            with Image.open(f) as im:
                assert im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB"


def test_deterministic(tmp_path):
    a = make_sets("3", tmp_path / "a", n=5, seed=1)
    b = make_sets("3", tmp_path / "b", n=5, seed=1)
    assert [x.to_dict() for x in a["forget"]] == [x.to_dict() for x in b["forget"]]
    assert (tmp_path / "a/forget/0000.png").read_bytes() == (tmp_path / "b/forget/0000.png").read_bytes()


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="unknown toy concept 'dog'"):
        make_sets("dog", tmp_path)
    make_sets("1", tmp_path / "x", n=2)
    with pytest.raises(InputError, match="not empty"):
        make_sets("1", tmp_path / "x", n=2)


def test_cli_make_sets(tmp_path, capsys):
    from diffscrub.toy.cli import main

    assert main(["toy", "make-sets", "brick", "--out", str(tmp_path), "--n", "3"]) == 0
    assert len(list((tmp_path / "forget").glob("*.png"))) == 3
    assert main(["toy", "make-sets", "banana", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown toy concept 'banana'") and err.count("\n") == 1
    assert main(["toy", "make-sets", "--concept", "7", "--out", str(tmp_path / "z"), "--n", "2"]) == 0
    assert len(list((tmp_path / "z" / "forget").glob("*.png"))) == 2
    assert main(["toy", "make-sets", "--out", str(tmp_path / "w")]) == 2
    assert "pass --concept" in capsys.readouterr().err
