"""The shipped oracle reads canvases from held-out handwriting."""

import numpy as np
import pytest
import torch

from diffscrub.toy.oracle import Oracle, default_oracle_path, oracle_check, to_float_images

pytestmark = pytest.mark.skipif(not default_oracle_path().is_file(), reason="oracle weights not shipped yet")


@pytest.fixture(scope="module")
def oracle():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return Oracle.load()


def test_oracle_bars_on_heldout(oracle):
    # the `diffscrub toy oracle-check` draw; per-digit F1 on 1,024 canvases moves by about
    # +-0.008 from draw to draw (256 canvases give too few of each digit for a 0.97 bar)
    res = oracle_check(oracle, n=1024, seed=12345)
    assert res["min_digit_f1"] >= 0.97, res["digit_f1"]
    assert res["background_accuracy"] >= 0.98


def test_predict_and_features_shapes(oracle):
    from diffscrub.toy.canvas import sample_canvases

    imgs, _ = sample_canvases(5, np.random.default_rng(0), split="heldout")
    p = oracle.predict(imgs)
    assert p["digits"].shape == (5, 10) and p["digits"].dtype == torch.bool
    assert p["background"].shape == (5,)
    assert oracle.features(imgs).shape == (5, 192)
    # the same images as uint8 NHWC, float NCHW in [0, 1] and float NHWC numpy agree
    f = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(oracle.logits(imgs), oracle.logits(f), atol=1e-5)
    assert torch.allclose(oracle.logits(imgs), oracle.logits(imgs.astype(np.float32) / 255), atol=1e-5)
    assert to_float_images(imgs[0]).shape == (1, 3, 32, 32)
