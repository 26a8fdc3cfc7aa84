"""Feature extractors and concept readers: models that turn images into tensors.

Metrics (:mod:`diffscrub.evaluation.metrics`) never see a model; the things here never compute
a figure. A *concept reader* maps float images ``[N, 3, H, W]`` in [0, 1] to ``(present, score)``:
a bool tensor ``[N]`` and a float tensor ``[N]``. Three kinds exist:

* :class:`OracleReader` - the toy world's oracle (ground truth stand-in for toy concepts);
* :class:`PrototypeDetector` - the scrubber's own detector: the erase run's prototypes, applied
  to the *reference* model's teacher features of the VAE-encoded sample at a semantic timestep;
* :class:`CallableReader` - any user classifier (a Python callable or ``module.path:callable``).

A *feature extractor* for the Fréchet distance is an ``nn.Module`` mapping float images in [0, 1]
to ``[N, D]`` with a ``num_features`` attribute, as torchmetrics' ``FrechetInceptionDistance``
accepts for its ``feature`` argument.
"""

from __future__ import annotations

import importlib
import json
import pathlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InputError

ARTIFACTS_FILE = "diffscrub_artifacts.safetensors"
RECORD_FILE = "diffscrub.json"
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


# ----------------------------------------------------------------------------- readers
class CallableReader:
    """Wrap a classifier ``fn(images [N,3,H,W] in [0,1]) -> bool or float tensor [N]``.

    Float outputs are read as probabilities: present when above 0.5.
    """

    name = "classifier"

    def __init__(self, fn: Callable[[torch.Tensor], Any], label: str | None = None, batch_size: int = 64):
        if not callable(fn):
            raise ConfigError(f"classifier {fn!r} is not callable: pass a function of images")
        self.fn = fn
        self.label = label or getattr(fn, "__qualname__", type(fn).__name__)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images on the CPU, in batches of ``batch_size``; the callable moves them where it needs them."""
        parts = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start:start + self.batch_size]
            got = torch.as_tensor(self.fn(batch)).detach().cpu().reshape(-1)
            if got.numel() != batch.shape[0]:
                raise InputError(
                    f"classifier {self.label} returned {got.numel()} values for {batch.shape[0]} images: "
                    "it must return one bool or probability per image"
                )
            parts.append(got)
        out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
        if out.dtype == torch.bool:
            return out, out.float()
        score = out.float()
        return score > 0.5, score


def load_callable(spec: str) -> Callable:
    """Import ``"module.path:callable"`` (``callable`` may be dotted: ``module:Class.method``)."""
    if ":" not in spec:
        raise ConfigError(f"classifier {spec!r} must look like 'module.path:callable'")
    module_name, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError or anything the module raises on import
        raise InputError(
            f"cannot import classifier module {module_name!r} ({type(exc).__name__}: {exc}): check --classifier "
            "and that the module is on PYTHONPATH"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"classifier module {module_name!r} has no {attr!r}: check --classifier")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"classifier {spec!r} is not callable: point --classifier at a function")
    return obj


class OracleReader:
    """The toy oracle reading one toy concept: a digit's presence or the canvas's background."""

    name = "oracle"

    def __init__(self, oracle, concept: str):
        from ..toy.canvas import BACKGROUNDS

        self.oracle = oracle
        self.concept = concept
        self.digit = int(concept) if concept.isdigit() else None
        self.background = None if self.digit is not None else BACKGROUNDS.index(concept)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred = self.oracle.predict(images)
        if self.digit is not None:
            return pred["digits"][:, self.digit].bool(), pred["digit_probs"][:, self.digit].float()
        return (pred["background"] == self.background), pred["background_probs"][:, self.background].float()

    @torch.no_grad()
    def read_prompts(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """What one oracle pass says of each sample against its prompt, bool ``[N]`` each: ``adherent`` (every
        asked digit and the asked background found), ``background_asked`` (the prompt asks for a background) and
        ``background_found`` (that one is found). Why the background apart: a model that ignores which digit is
        asked for (toy-mmdit) reads near 0 adherent whatever an erasure does, while the background it draws can
        still be lost."""
        from ..toy.canvas import BACKGROUNDS, parse_caption

        pred = self.oracle.predict(images)
        adherent, asked, found = [], [], []
        for i, prompt in enumerate(prompts):
            digits, bg = parse_caption(prompt)
            bg_found = bg is not None and int(pred["background"][i]) == BACKGROUNDS.index(bg)
            adherent.append(all(bool(pred["digits"][i, d]) for d in digits) and (bg is None or bg_found))
            asked.append(bg is not None)
            found.append(bg_found)
        return {key: torch.tensor(values, dtype=torch.bool) for key, values in
                (("adherent", adherent), ("background_asked", asked), ("background_found", found))}

    def adherence(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Bool ``[N]``: the oracle finds every digit the prompt asked for and the asked background."""
        return self.read_prompts(images, prompts)["adherent"]

    def background_adherence(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(asked [N], found [N])``, bool: whether the prompt asks for a background, and whether the oracle
        finds that one."""
        reading = self.read_prompts(images, prompts)
        return reading["background_asked"], reading["background_found"]


def read_run_record(folder: str | pathlib.Path) -> dict:
    path = pathlib.Path(folder) / RECORD_FILE
    if not path.is_file():
        raise InputError(f"'{folder}' has no {RECORD_FILE}: pass an erase run's output folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"'{path}' could not be read ({type(exc).__name__}): re-run the erase") from None


def detector_settings(record: dict) -> dict:
    """``tau``, ``alpha``, ``t_low``, ``t_high`` of a run record's method section (TSS defaults otherwise)."""
    from ..methods.tss.config import TSSConfig

    section = record.get(record.get("method", "tss"), {}) or {}
    base = TSSConfig()
    return {k: section.get(k, getattr(base, k)) for k in ("tau", "alpha", "t_low", "t_high")}


def has_prototypes(folder: str | pathlib.Path) -> bool:
    """Whether ``folder`` holds an erase run's prototypes (TSS runs do; other methods' runs do not)."""
    from safetensors import safe_open

    path = pathlib.Path(folder) / ARTIFACTS_FILE
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        return "prototypes" in f.keys()


class PrototypeDetector:
    """The scrubber's detector as a concept reader, on the *reference* model.

    Each sample is VAE-encoded (posterior mean), noised to the middle of the run's semantic band
    ``t = (t_low + t_high) // 2`` with seeded noise, passed through the reference denoiser at the
    null prompt, and its tapped features compared with the prototypes: ``mask = sigmoid(alpha *
    (max_k cos - tau))``. The score is the mask's mean area, averaged over ``draws`` noise draws;
    the concept is present when the score exceeds ``area``.
    """

    name = "detector"

    def __init__(self, adapter, prototypes: torch.Tensor, *, tau: float, alpha: float, t_low: int, t_high: int,
                 area: float = 0.05, draws: int = 2, seed: int = 0, batch_size: int = 16, device=None):
        self.adapter = adapter
        self.prototypes = prototypes.float()
        self.tau, self.alpha = float(tau), float(alpha)
        self.t = int((int(t_low) + int(t_high)) // 2)
        self.area, self.draws, self.seed, self.batch_size = float(area), int(draws), int(seed), int(batch_size)
        self.device = device if device is not None else next(adapter.denoiser.parameters()).device
        self._null = None

    @classmethod
    def from_run(cls, folder: str | pathlib.Path, adapter, **kwargs) -> PrototypeDetector:
        """Prototypes from ``folder/diffscrub_artifacts.safetensors``, settings from its ``diffscrub.json``."""
        from safetensors.torch import load_file

        folder = pathlib.Path(folder)
        path = folder / ARTIFACTS_FILE
        if not path.is_file():
            raise InputError(f"'{folder}' has no {ARTIFACTS_FILE}: pass --artifacts with the erase run's output folder")
        tensors = load_file(str(path))
        if "prototypes" not in tensors:
            raise InputError(f"'{path}' holds no 'prototypes': it was not written by a prototype method (tss)")
        settings = detector_settings(read_run_record(folder))
        return cls(adapter, tensors["prototypes"], **settings, **kwargs)

    def settings(self) -> dict:
        return {"tau": self.tau, "alpha": self.alpha, "t": self.t, "area": self.area, "draws": self.draws,
                "num_prototypes": int(self.prototypes.shape[0])}

    @torch.no_grad()
    def areas(self, images: torch.Tensor) -> torch.Tensor:
        from ..concept import concept_mask

        adapter = self.adapter
        model = adapter.denoiser
        schedule = adapter.schedule()
        if self._null is None:
            self._null = adapter.encode_prompts([""], tuple(images.shape[-2:])).to(self.device)
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        with adapter.eval_mode(model):
            for start in range(0, images.shape[0], self.batch_size):
                x = images[start:start + self.batch_size].to(self.device) * 2.0 - 1.0
                z0, _ = adapter.encode_moments(x)
                b = z0.shape[0]
                t = torch.full((b,), self.t, dtype=torch.long, device=self.device)
                cond = self._null.take(torch.zeros(b, dtype=torch.long))
                total = torch.zeros(b)
                for _ in range(self.draws):
                    eps = torch.randn(z0.shape, generator=gen).to(z0.device, z0.dtype)
                    z_t = schedule.add_noise(z0, eps, t)
                    _, feats = adapter.predict(model, z_t, t, cond, features=True)
                    mask = concept_mask(feats, self.prototypes.to(self.device), self.tau, self.alpha, z0.shape[-2:])
                    total += mask.float().flatten(1).mean(dim=1).cpu()
                out.append(total / self.draws)
        return torch.cat(out)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = self.areas(images)
        return score > self.area, score


# ----------------------------------------------------------------------------- feature extractors
class OracleFeatures(nn.Module):
    """The toy oracle's penultimate layer as a torchmetrics FID feature module: [0, 1] images -> [N, 192]."""

    def __init__(self, oracle):
        super().__init__()
        self.net = oracle.net
        self.num_features = int(self.net.fc.out_features)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from ..toy.oracle import to_float_images

        x = to_float_images(images).to(next(self.net.parameters()).device)
        return self.net.features(x)


class _InceptionFeatures(nn.Module):
    """torchmetrics' Inception (torch-fidelity weights) taking float images in [0, 1]."""

    num_features = 2048

    def __init__(self, weights: str):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=weights)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.clamp(0, 1) * 255).to(torch.uint8)).float()


def inception_features(weights: str | None) -> tuple[nn.Module | None, str]:
    """An Inception feature module if its weights are on this machine, else ``(None, why not)``.

    Looks at ``weights`` (``--fd-weights``), then torch-fidelity's file in the torch hub cache.
    Never downloads.
    """
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return None, ("Fréchet distance skipped: the Inception extractor needs torch-fidelity "
                      "(pip install torch-fidelity) and its weights (--fd-weights)")
    candidates = [pathlib.Path(weights)] if weights else [
        pathlib.Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME
    ]
    for path in candidates:
        if path.is_file():
            try:
                return _InceptionFeatures(str(path)), f"Inception v3 (torch-fidelity weights {path})"
            except Exception as exc:  # noqa: BLE001 - wrong file, incompatible version
                return None, f"Fréchet distance skipped: Inception weights '{path}' could not be loaded ({type(exc).__name__})"
    where = weights or str(candidates[0])
    return None, f"Fréchet distance skipped: no Inception weights at '{where}' (pass --fd-weights with torch-fidelity's {INCEPTION_WEIGHTS_NAME})"


class FeatureRecorder(nn.Module):
    """Wraps a feature module and keeps a CPU copy of every output (so features are computed once)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.num_features = int(module.num_features)
        self.recorded: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.module(images)
        self.recorded.append(out.detach().float().cpu())
        return out

    def take(self) -> torch.Tensor:
        out = torch.cat(self.recorded) if self.recorded else torch.empty(0, self.num_features)
        self.recorded = []
        return out
