"""A small, fully labelled text-to-image world that runs offline.

* :mod:`~diffscrub.toy.canvas` - 32x32 "digit canvases" built from scikit-learn's handwritten
  digits on four backgrounds, with captions and ground-truth labels.
* :mod:`~diffscrub.toy.sets` - forget/retain PNG folders for a concept.
* :mod:`~diffscrub.toy.oracle` - a CNN that reads canvases (digit presence, background).
* :mod:`~diffscrub.toy.recipes`, :mod:`~diffscrub.toy.train` - the ``toy-unet``
  (Stable Diffusion layout) and ``toy-mmdit`` (SD3 layout) models and how they are trained.
* :mod:`~diffscrub.toy.quality` - oracle-measured quality bars of a toy model.

Use :func:`resolve_toy_model` wherever a model name is accepted.
"""

from diffscrub.toy.canvas import BACKGROUNDS, CONCEPTS, DIGITS, caption, make_canvas, sample_canvases
from diffscrub.toy.models import load_toy_pipeline, resolve_toy_model
from diffscrub.toy.recipes import MODEL_NAMES

__all__ = [
    "BACKGROUNDS",
    "CONCEPTS",
    "DIGITS",
    "MODEL_NAMES",
    "caption",
    "load_toy_pipeline",
    "make_canvas",
    "resolve_toy_model",
    "sample_canvases",
]
