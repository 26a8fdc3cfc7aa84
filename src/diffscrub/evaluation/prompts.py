"""The three prompt sets of an evaluation: ``null`` (""), ``concept`` and ``other``.

On the toy world they are built from the caption grammar (``"7 on grass"``,
``"7 and 3 on brick"``); otherwise they come from a YAML/JSON file
``{"concept": [...], "other": [...]}``. The null set is always the single null prompt.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

from ..errors import ConfigError, InputError

SET_NAMES = ("null", "concept", "other")
"""Evaluation sets, in the order they are sampled and reported."""

PROMPT_FILE_KEYS = ("concept", "other")


@dataclass
class PromptSets:
    """Prompts per set. ``null`` is always ``[""]``; ``source`` says where the prompts came from."""

    concept: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def null(self) -> list[str]:
        return [""]

    def get(self, name: str) -> list[str]:
        if name not in SET_NAMES:
            raise KeyError(name)
        return list(getattr(self, name))

    def to_dict(self) -> dict:
        return {"null": self.null, "concept": list(self.concept), "other": list(self.other), "source": self.source}


def _first(items: list[str], k: int) -> list[str]:
    return list(dict.fromkeys(items))[:k]


def toy_prompt_sets(concept: str, max_prompts: int = 8) -> PromptSets:
    """Prompt sets for a toy concept (a digit ``"0"``..``"9"`` or a background name).

    Digit ``c``: concept prompts ``"c on bg"`` for every background, then ``"c and d on bg"`` /
    ``"d and c on bg"`` with ``d`` and ``bg`` cycling; other prompts ``"d on bg"`` with ``d != c``,
    cycling digits and backgrounds together so that the first few cover distinct digits and every
    background. Background ``b``: concept prompts alternate ``"d on b"`` and ``"d and e on b"``;
    other prompts ``"d on bg"`` with ``bg != b``. At most ``max_prompts`` per set.
    """
    from ..toy.canvas import BACKGROUNDS, check_concept

    name = check_concept(concept)
    if max_prompts < 1:
        raise ConfigError(f"max_prompts={max_prompts} must be at least 1")
    if name.isdigit():
        c = int(name)
        others = [d for d in range(10) if d != c]
        concept_prompts = [f"{c} on {bg}" for bg in BACKGROUNDS]
        for k in range(len(others) * len(BACKGROUNDS)):
            d, bg = others[k % len(others)], BACKGROUNDS[k % len(BACKGROUNDS)]
            concept_prompts.append(f"{c} and {d} on {bg}" if k % 2 == 0 else f"{d} and {c} on {bg}")
        # 9 digits and 4 backgrounds are coprime: k -> (k mod 9, k mod 4) visits every pair once.
        other_prompts = [f"{others[k % len(others)]} on {BACKGROUNDS[k % len(BACKGROUNDS)]}"
                         for k in range(len(others) * len(BACKGROUNDS))]
    else:
        bgs = [bg for bg in BACKGROUNDS if bg != name]
        concept_prompts = []
        for d in range(10):
            concept_prompts.append(f"{d} on {name}")
            concept_prompts.append(f"{(d + 3) % 10} and {(d + 7) % 10} on {name}")
        # 10 digits and 3 backgrounds are coprime as well.
        other_prompts = [f"{k % 10} on {bgs[k % len(bgs)]}" for k in range(10 * len(bgs))]
    return PromptSets(_first(concept_prompts, max_prompts), _first(other_prompts, max_prompts),
                      source=f"toy caption grammar, concept {name!r}")


def _check_list(path: pathlib.Path, key: str, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"prompts file '{path}': key {key!r} must be a list of strings")
    out = [v.strip() for v in value]
    if any(not v for v in out):
        raise ConfigError(
            f"prompts file '{path}': key {key!r} holds an empty prompt; the null prompt is always "
            "evaluated on its own, so remove it"
        )
    return out


def read_prompts_file(path: str | pathlib.Path, max_prompts: int | None = None) -> PromptSets:
    """Read ``{"concept": [...], "other": [...]}`` from a ``.yaml``/``.yml``/``.json`` file.

    Raises :class:`InputError` if the file is missing or unreadable and :class:`ConfigError`
    for unknown keys, wrong types, or a file with no prompt at all.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError(f"prompts file '{path}' does not exist: pass --prompts with a .yaml or .json file")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise InputError(f"prompts file '{path}' has suffix {suffix!r}: use .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse or decoding error becomes one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"prompts file '{path}' could not be parsed ({first}): fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"prompts file '{path}' must hold a mapping like {{\"concept\": [...], \"other\": [...]}}, "
            f"not {type(data).__name__}"
        )
    unknown = sorted(set(map(str, data)) - set(PROMPT_FILE_KEYS))
    if unknown:
        raise ConfigError(
            f"prompts file '{path}': unknown key {unknown[0]!r}; known keys are {', '.join(PROMPT_FILE_KEYS)} "
            "(the null prompt is always included)"
        )
    concept = _check_list(path, "concept", data.get("concept"))
    other = _check_list(path, "other", data.get("other"))
    if not concept and not other:
        raise ConfigError(f"prompts file '{path}' has no prompt: give at least one under 'concept' or 'other'")
    if max_prompts is not None:
        concept, other = concept[:max_prompts], other[:max_prompts]
    return PromptSets(concept, other, source=str(path))
