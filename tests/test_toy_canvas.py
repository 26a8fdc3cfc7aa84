"""The digit-canvas builder: labels match pixels, captions match labels, splits are disjoint."""

import numpy as np
import pytest

from diffscrub.errors import InputError
from diffscrub.toy import canvas as C


def _boxes_mask(boxes):
    mask = np.zeros((C.SIZE, C.SIZE), bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize("background", C.BACKGROUNDS)
def test_labels_match_pixels(background):
    for seed in range(12):
        digits = [int(d) for d in np.random.default_rng(seed).choice(10, size=1 + seed % 3, replace=False)]
        img, lab = C.make_canvas(np.random.default_rng(seed), digits, background)
        bg = C.make_background(np.random.default_rng(seed), background)  # same first draws
        bg8 = np.clip(np.rint(bg), 0, 255).astype(np.uint8)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert lab.digits == digits and lab.background == background
        assert len(lab.boxes) == len(digits)
        outside = ~_boxes_mask(lab.boxes)
        # every pixel outside all boxes is the untouched background
        assert np.array_equal(img[outside], bg8[outside])
        for x0, y0, x1, y1 in lab.boxes:
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            diff = np.abs(img[y0:y1, x0:x1].astype(int) - bg8[y0:y1, x0:x1].astype(int)).sum(-1) > 30
            # ink covers a good share of the box and touches all four sides
            assert diff.mean() > 0.15
            assert diff[0].any() or diff[1].any()
            assert diff[:, 0].any() or diff[:, 1].any()


def test_boxes_do_not_overlap():
    rng = np.random.default_rng(1)
    _, labels = C.sample_canvases(300, rng, n_digits=3)
    for lab in labels:
        for i, a in enumerate(lab.boxes):
            for b in lab.boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_captions_list_exactly_the_labels():
    rng = np.random.default_rng(2)
    _, labels = C.sample_canvases(200, rng)
    for lab in labels:
        text = C.caption(lab)
        digits, background = C.parse_caption(text)
        assert digits == lab.digits
        assert background == lab.background
        assert text.endswith(f" on {lab.background}")
    one = C.CanvasLabels(digits=[7], boxes=[(0, 0, 1, 1)], background="brick")
    assert C.caption(one) == "7 on brick"
    two = C.CanvasLabels(digits=[7, 3], boxes=[(0, 0, 1, 1)] * 2, background="grass")
    assert C.caption(two) == "7 and 3 on grass"


def test_handwriting_split_is_disjoint_and_respected():
    split = C.handwriting_split()
    train, held = set(split["train"].tolist()), set(split["heldout"].tolist())
    assert not train & held
    assert len(train) + len(held) == 1797
    assert 0.75 < len(train) / 1797 < 0.85
    for name, allowed in (("train", train), ("heldout", held)):
        _, labels = C.sample_canvases(100, np.random.default_rng(3), split=name)
        used = {i for lab in labels for i in lab.sample_indices}
        assert used <= allowed


def test_deterministic_given_seed():
    a, la = C.sample_canvases(20, np.random.default_rng(5))
    b, lb = C.sample_canvases(20, np.random.default_rng(5))
    assert np.array_equal(a, b) and [x.to_dict() for x in la] == [x.to_dict() for x in lb]


def test_exclude_and_include():
    rng = np.random.default_rng(4)
    _, labels = C.sample_canvases(100, rng, exclude="7")
    assert all(7 not in lab.digits for lab in labels)
    _, labels = C.sample_canvases(100, rng, include="grass")
    assert all(lab.background == "grass" for lab in labels)
    _, labels = C.sample_canvases(100, rng, exclude="brick", include="3")
    assert all(3 in lab.digits and lab.background != "brick" for lab in labels)


def test_backgrounds_are_distinguishable():
    means = {}
    for bg in C.BACKGROUNDS:
        means[bg] = np.mean([C.make_background(np.random.default_rng(s), bg).mean(axis=(0, 1)) for s in range(20)], axis=0)
    names = list(means)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(means[a] - means[b]).max() > 25, (a, b)


def test_unknown_concept_is_an_input_error():
    with pytest.raises(InputError, match="unknown toy concept"):
        C.check_concept("cat")
    with pytest.raises(InputError):
        C.make_canvas(np.random.default_rng(0), [1, 1], "flat")
