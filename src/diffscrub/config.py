"""Configuration dataclasses: help text per field, validation in ``__post_init__``, file + flag merge.

A run's configuration is an :class:`EraseConfig` plus the options dataclass of its method
(``tss``, ...). Both are built from (in increasing priority) the defaults, a YAML/TOML file,
and command-line flags, are checked before any model loads, and are saved as sorted JSON
beside every output and checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


def option(default: Any, help: str, **kw) -> Any:
    """A dataclass field carrying its help text (shown by ``--help`` and in the docs)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# ----------------------------------------------------------------------------- checks
def check_range(name: str, value, low=None, high=None, *, low_open=False, high_open=False) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is a finite number within the bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise ConfigError(f"{name}={value!r} is out of range: it must be {' and '.join(x for x in (lo, hi) if x)}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid: choose one of {', '.join(map(str, choices))}")


# ----------------------------------------------------------------------------- type coercion
def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(name: str, value: Any, tp) -> Any:
    """Convert a file or flag value to the field's declared type, or raise naming the key."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must not be empty: give it a value")
    label = getattr(tp, "__name__", str(tp))
    wrong = ConfigError(f"{name}={value!r} has the wrong type: it must be {label}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise wrong
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise wrong
        try:
            return int(value)
        except (TypeError, ValueError):
            raise wrong from None
    if tp is float:
        if isinstance(value, bool):
            raise wrong
        try:
            return float(value)
        except (TypeError, ValueError):
            raise wrong from None
    if tp is str:
        if not isinstance(value, (str, pathlib.Path)):
            raise wrong
        return str(value)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value else []
        if not isinstance(value, (list, tuple)):
            raise wrong
        return [coerce(name, v, item) for v in value]
    return value


def build(cls, values: dict[str, Any], *, where: str = "config", strict: bool = True):
    """Instantiate dataclass ``cls`` from a plain dict, coercing types.

    Unknown keys raise (``strict``) or warn, naming the key and the known ones, so a typo in a
    config file never silently does nothing.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        norm = key.replace("-", "_")
        if norm not in names:
            msg = f"unknown key {key!r} in {where}: known keys are {', '.join(sorted(names))}"
            if strict:
                raise ConfigError(msg)
            warnings.warn(msg, stacklevel=2)
            continue
        kwargs[norm] = coerce(f"{where}.{norm}" if where != "config" else norm, value, hints[norm])
    return cls(**kwargs)


def to_dict(obj) -> dict[str, Any]:
    return {k: v for k, v in sorted(dataclasses.asdict(obj).items())}


def read_config_file(path: str | pathlib.Path) -> dict[str, Any]:
    """Read a YAML or TOML config file into a dict; errors name the file and the fix."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist: pass --config with a .yaml or .toml file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file '{path}' has suffix {suffix!r}: use .yaml, .yml, .toml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # parse errors from yaml/toml/json, decoding errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config file '{path}' could not be parsed ({first}): fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values, not {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- the run config
TRAINABLE = ("full", "attention", "cross-attention", "text-kv", "lora")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("no", "fp16", "bf16")
CONDITIONING = ("auto", "null", "inversion", "prompts")


@dataclass
class EraseConfig:
    """Everything about an erase run except the method's own options.

    Method options live in the method's dataclass (e.g. ``diffscrub.methods.tss.TSSConfig``)
    under the key named after the method, in files and in ``diffscrub.json``.
    """

    model: str = option("", "diffusers pipeline: local folder, hub id (cached), single .safetensors file, or toy-unet/toy-mmdit", cli="--model")
    forget: str = option("", "folder of images of the concept to erase (no labels needed)")
    out: str = option("", "output folder for the erased pipeline (written to a temporary sibling, then renamed)")
    retain: str | None = option(None, "optional folder of images to keep (anchors the retain loss)")
    method: str = option("tss", "erasure method")
    family: str | None = option(None, "force a denoiser family instead of detecting it from the pipeline class")
    steps: int = option(200, "training steps")
    batch_size: int = option(4, "forget images per step")
    lr: float = option(1e-4, "learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    seed: int = option(0, "seed for every random draw (timesteps, noise, k-means, batch order)")
    device: str = option("auto", "auto, cpu or cuda")
    mixed_precision: str = option("no", "no, fp16 or bf16: frozen parts and teacher stored in half precision, student forward "
                                 "under autocast, trainable weights in fp32; the output is saved in that precision "
                                 "(fp16: GPU only, VAE kept in fp32)")
    trainable: str | None = option(None, "which denoiser parameters train: full, attention, cross-attention (text-to-image "
                            "attention only), text-kv (only the keys and values it computes from the text) or lora (default: the method's own choice, full for tss)")
    lora_rank: int = option(0, "LoRA rank; > 0 selects --trainable lora")
    lora_alpha: float | None = option(None, "LoRA alpha (default: equal to the rank)")
    resolution: int | None = option(None, "resize and center-crop images to this size (needed when sizes differ)")
    conditioning: str = option(
        "auto",
        "conditioning pool of the student: null (the null prompt only, the seed's behaviour); inversion (also the "
        "words textual inversion finds for the forget images, and the learned pseudo-token); prompts (null + "
        "--prompts); auto = inversion when the pipeline has a text encoder, else null",
    )
    inversion_steps: int = option(100, "textual-inversion steps used to name the concept")
    inversion_lr: float = option(5e-3, "textual-inversion learning rate")
    inversion_words: int = option(3, "nearest vocabulary words added to the conditioning pool")
    inversion_rerank: int = option(0, "re-rank the words by fit: take this many nearest words from each text "
                                   "encoder's vocabulary and order them by how much each, alone as the prompt, "
                                   "lowers the frozen model's denoising loss on the forget images (0: by embedding "
                                   "similarity in the first encoder alone)")
    name_words: int = option(1, "how many of those words (best first) are taken as the concept's names; with the "
                             "placeholder they are put in every --name-contexts template")
    name_contexts: list[str] = option(["{}"], "templates the names are put in, '{}' marking the name (comma-separated, "
                                      "e.g. '{},{} on grass'); a filled template's neutral form is the template "
                                      "without the name")
    random_contexts: int = option(0, "this many more name templates, drawn from the first tokenizer's vocabulary "
                                  "per run: the name among 1 to --random-context-words whole words, at a random "
                                  "place ('q {} 4 on'), never beside one of its own names. Prompts name a concept "
                                  "among other words; a student trained on the name alone may still draw it there "
                                  "(toy-mmdit: '5 and 9 on brick')")
    random_context_words: int = option(3, "the most words around the name in a --random-contexts template (each "
                                       "template draws 1 to this many), for prompts that put the name after "
                                       "several words ('3 and 7 on brick'; on toy-mmdit 5 did not hold those better "
                                       "than 3)")
    leave_out_candidates: bool = option(False, "leave every word textual inversion weighed as a name (its nearest "
                                        "words, or all the --inversion-rerank candidates) out of the --random-contexts "
                                        "templates and the vocabulary anchors, not only the names it chose: when the "
                                        "chosen name is not the concept's, a template or anchor holding the concept's "
                                        "word would teach the student to keep drawing it")
    names: list[str] = option([], "the concept's names when you know them (comma-separated, e.g. '7,seven'): they take "
                              "the place of the words textual inversion finds, in every --name-contexts template, and "
                              "no inversion runs (also for a second pass over a model already erased, where the "
                              "inversion no longer finds the concept's name)")
    name_samples: int = option(0, "images the model draws itself of the prompts naming the concept (its names in the "
                               "--name-contexts templates), added to the forget images before the fingerprint: they "
                               "show the concept as those prompts draw it, which the forget folder's clutter may not")
    prompts: list[str] = option([], "extra prompts for the conditioning pool (comma-separated on the command line)")
    concept_prompt: str | None = option(None, "the concept's name, for methods that need one (attention, sfd, esd)")
    anchor_prompt: str = option("", "what to draw instead of the concept, for methods that need one (\"\" = null prompt)")
    gradient_checkpointing: bool = option(False, "recompute student activations in the backward pass to save memory")
    compile: bool = option(False, "torch.compile the student and teacher denoisers (the first steps are slow while "
                           "they compile; on the CPU, inductor needs a C++ compiler)")
    fsdp: bool = option(False, "under a launcher (torchrun, accelerate launch): shard the student's weights, gradients "
                        "and Adam state over the processes (FSDP2) instead of giving each a full copy (DDP); for a "
                        "full or attention fine-tune too big for one device (not with LoRA or --compile)")
    overwrite: bool = option(False, "replace a non-empty --out folder")
    allow_pickle: bool = option(False, "allow loading pickle (.ckpt/.bin/.pt) checkpoints, which can run arbitrary code")
    trust_remote_code: bool = option(False, "allow hub pipelines that need custom code")
    quiet: bool = option(False, "no progress bars")
    log_every: int = option(10, "record losses every N steps")
    checkpoint_every: int = option(50, "save a resumable checkpoint every N steps (0: only on SIGTERM/SIGINT)")
    resume: bool = option(False, "continue from the newest complete checkpoint of an interrupted run with the same --out")

    def __post_init__(self):
        if self.lora_rank and self.trainable in (None, "full"):
            self.trainable = "lora"
        if self.trainable is not None:
            check_choice("trainable", self.trainable, TRAINABLE)
        check_choice("device", self.device, DEVICES)
        check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        check_choice("conditioning", self.conditioning, CONDITIONING)
        check_range("steps", self.steps, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("lr", self.lr, 0, low_open=True)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("log_every", self.log_every, 1)
        check_range("checkpoint_every", self.checkpoint_every, 0)
        check_range("inversion_steps", self.inversion_steps, 1)
        check_range("inversion_lr", self.inversion_lr, 0, low_open=True)
        check_range("inversion_words", self.inversion_words, 0)
        check_range("inversion_rerank", self.inversion_rerank, 0)
        check_range("name_words", self.name_words, 0)
        check_range("random_contexts", self.random_contexts, 0)
        check_range("random_context_words", self.random_context_words, 1)
        for template in self.name_contexts:
            if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.count("}") != 1:
                raise ConfigError(f"name context {template!r} must hold exactly one '{{}}' where the name goes "
                                  "and no other braces: e.g. --name-contexts '{},{} on grass'")
        if not self.name_contexts:
            raise ConfigError("name_contexts is empty: pass at least '{}' (the name alone)")
        check_range("lora_rank", self.lora_rank, 0)
        if self.trainable == "lora" and self.lora_rank < 1:
            raise ConfigError("trainable='lora' needs a rank: pass --lora-rank N (for example 4)")
        # --fsdp shards the student: not with LoRA, whose frozen base is also the teacher (no method defaults
        # to LoRA; --lora-rank selects it), nor through the compiled-callable path.
        if self.fsdp and self.trainable == "lora":
            raise ConfigError("--fsdp shards the student, but with LoRA the frozen base is also the teacher and every "
                              "process needs it whole: drop --fsdp (LoRA's trainable state is small; plain DDP fits)")
        if self.fsdp and self.compile:
            raise ConfigError("--fsdp with --compile is not supported yet: drop one of them")
        if self.lora_alpha is not None:
            check_range("lora_alpha", self.lora_alpha, 0, low_open=True)
        if self.resolution is not None:
            check_range("resolution", self.resolution, 8)
            if self.resolution % 8:
                raise ConfigError(f"resolution={self.resolution} must be a multiple of 8")
        if self.names:
            if self.conditioning not in ("auto", "inversion"):
                raise ConfigError(f"names are put in the conditioning pool of conditioning 'auto' or 'inversion', "
                                  f"not {self.conditioning!r}: drop --names or use --conditioning auto")
            for name in self.names:
                if not name.strip() or "{" in name or "}" in name:
                    raise ConfigError(f"name {name!r} must be a non-empty word or phrase without braces: "
                                      "e.g. --names '7,seven'")
        check_range("name_samples", self.name_samples, 0)
        if self.name_samples and self.conditioning not in ("auto", "inversion"):
            raise ConfigError(f"name samples are drawn from the prompts naming the concept, which conditioning "
                              f"{self.conditioning!r} does not make: drop --name-samples or use --conditioning auto")
        if self.conditioning == "prompts" and not self.prompts:
            raise ConfigError("conditioning='prompts' needs prompts: pass --prompts 'a photo,a drawing'")

    def require_paths(self) -> None:
        """The keys a run cannot start without (checked after file + flags are merged)."""
        for key, flag in (("model", "--model"), ("forget", "--forget"), ("out", "--out")):
            if not getattr(self, key):
                raise ConfigError(f"{key} is not set: pass {flag}")


def merge(file_values: dict[str, Any], flag_values: dict[str, Any]) -> dict[str, Any]:
    """Flags win over the file; nested method sections merge key by key."""
    out = dict(file_values)
    for key, value in flag_values.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out
