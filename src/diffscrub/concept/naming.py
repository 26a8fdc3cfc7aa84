"""A fingerprint from the concept's names: where naming the concept helps the teacher denoise.

The features fingerprints (prototypes, knn) read the teacher's mid-depth features under the null
prompt. When the concept is one object among similar ones, those features carry the kind of thing
(strokes) more than which one it is (a 7 rather than a 3), so the masks also cover the look-alikes.
Once the concept has a name (textual inversion's words, or ``--names``), the teacher itself can say
where it is, in the way the Diffusion Classifier (Li et al., 2023) reads a text-to-image model as a
classifier, here per location rather than per image:

    score(x) = E_{t, eps} [ e(z_t, c_neutral)(x) - e(z_t, c_named)(x) ]

with ``e(z_t, c) = mean_channels (D(z_t, t, c) - target(z0, eps, t))^2`` the teacher's per-location
denoising error, ``c_named`` a prompt that names the concept ("7 on grass") and ``c_neutral`` the same
prompt with the name taken out ("on grass"; the null prompt for a bare name). Where the concept is, the name tells the teacher
what the noise hides and the error drops; elsewhere the two prompts explain the latent equally well.

The per-location error of one draw is noisy, so the scores are averaged over draws and smoothed with
a box filter before the top ``area`` share is kept (:func:`~diffscrub.concept.knn.scores_to_mask`).
On the toy world's digit 7 (toy-unet, 64 forget canvases, t in [300, 700), the five caption
templates cycled, 8 draws, 3 x 3 filter on the 16 x 16 latent), the top 10 % covered 59 % of the 7s'
area against 14 % of the other digits' (knn: 22 % against 12 %); without the filter, 46 % against 22 %.
The default filter is 5 x 5 there: in the soft masks of one run it left 0.10 on the other digits
against 0.15 with 3 x 3, for 0.53 and 0.54 on the 7s.

A fixed area suits an object that takes about the same share of every image; a concept that fills
some images and is absent from others (a texture, a style) needs a threshold that knows what "no
concept" scores look like. :func:`reference_mask` takes it from the same scores on images without the
concept (the retain folder, or samples of the null prompt): their median plus ``z`` robust standard
deviations (1.4826 MAD). Reference locations that do show the concept move the median and MAD little
(a tenth of them at ten sigmas: the threshold rises by under half a sigma, where the mean and standard
deviation would put it at the concept's own scores), so null-prompt samples that sometimes draw it
still serve.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .knn import soft_threshold


def location_error(pred_mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-location squared error, averaged over channels: ``[B, C, H, W]`` x2 -> ``[B, H, W]``."""
    return (pred_mean.float() - target.float()).pow(2).mean(dim=1)


def box_kernel(latent_side: int, share: float) -> int:
    """Odd box-filter width of at most ``share`` of the latent's shorter side, and at least 1 (no filter)."""
    return 2 * int(share * latent_side / 2) + 1


def smooth(scores: torch.Tensor, share: float) -> torch.Tensor:
    """Box-filter ``[B, H, W]`` scores over about ``share`` of the shorter side; borders average what they have.

    Why: an object spans many latent locations, and the error difference at one location of one draw is
    mostly the noise's; averaging neighbours keeps the object's extent and drops the speckle.
    """
    k = box_kernel(min(scores.shape[-2:]), share)
    if k == 1:
        return scores
    return F.avg_pool2d(scores[:, None].float(), k, stride=1, padding=k // 2, count_include_pad=False)[:, 0]


def robust_spread(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(median, 1.4826 * MAD)`` of all values of ``scores``: the centre and standard deviation of a normal
    sample, unmoved by a minority of outliers (the reference locations that do show the concept)."""
    flat = scores.flatten().float()
    median = flat.median()
    return median, 1.4826 * (flat - median).abs().median()


def reference_mask(scores: torch.Tensor, reference: torch.Tensor, z: float, softness: float = 0.25) -> torch.Tensor:
    """Soft mask in [0, 1] of ``scores`` (any shape) above ``z`` robust standard deviations of ``reference``.

    The threshold is ``median + z * sigma`` of the reference scores; ``softness`` sigmas take the mask
    from 0.27 to 0.73, as in :func:`~diffscrub.concept.knn.scores_to_mask`. The kept area follows the
    concept: all of an image it fills, none of one where every score looks like the reference's.
    """
    median, sigma = robust_spread(reference)
    sigma = sigma.clamp_min(1e-8)  # a constant reference: any score above it is kept
    return soft_threshold(scores, median + z * sigma, sigma, softness)
