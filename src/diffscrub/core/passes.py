"""Several erasure passes in one run: each pass erases from the previous pass's output.

The measured recipe for an object that prompts name (README, "Two passes") is a full fine-tune
followed by a pass on the projections that read the text. Run as two commands, the second one
needs the concept's names typed in (textual inversion against an erased model no longer finds
them), which is a label the user was never asked for. Run here, a later pass takes the names the
first pass found from the images, and the run has one output folder, one record and one resume.

Folders: pass k < last writes ``<out>.pass<k>`` beside ``--out``; the last pass writes ``--out``.
The earlier passes' records go into the final ``diffscrub.json`` (``earlier_passes``) and their
pipelines are removed once the last pass is in place. A run that stops keeps the finished passes'
folders, and ``--resume`` skips a pass whose folder is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import sys
from typing import Any, Callable

from ..config import EraseConfig
from ..errors import ConfigError
from .naming import concept_names
from .output import check_output_dir, write_json

# What a later pass takes from the first one unless its own flags say otherwise: the inputs and how
# the run is carried out. What it erases with (method, rate, trainable parameters, fingerprint) is
# its own, at the defaults unless given, so a pass reads the same whether it runs first or later.
INHERITED = ("forget", "retain", "family", "steps", "batch_size", "seed", "device", "mixed_precision", "resolution",
             "gradient_checkpointing", "compile", "quiet", "allow_pickle", "trust_remote_code", "log_every",
             "checkpoint_every", "overwrite", "resume")
# Set once for the whole run, on the first pass's command line.
RUN_ONLY = ("model", "out", "overwrite", "resume")


def pass_folder(out: str | pathlib.Path, k: int) -> pathlib.Path:
    """Where pass ``k`` (1-based, not the last) writes its pipeline."""
    out = pathlib.Path(out)
    return out.parent / f"{out.name}.pass{k}"


def later_pass_values(first: EraseConfig, flags: dict[str, Any], where: str) -> dict[str, Any]:
    """The values of a later pass: the first pass's inputs and run settings, then its own flags."""
    for key in RUN_ONLY:
        if key in flags:
            raise ConfigError(f"{where} sets --{key.replace('_', '-')}, which belongs to the whole run: give it once, "
                              "before --then")
    if flags.get("inversion_rerank") and flags.get("conditioning") != "inversion":
        # a later pass takes the earlier pass's names (see _inherit_names): nothing for it to re-rank
        raise ConfigError(f"{where} sets --inversion-rerank, but a later pass takes the names the pass before found "
                          "(inversion against an erased model finds the erasure, not the concept): give "
                          "--inversion-rerank before --then")
    return {**{key: getattr(first, key) for key in INHERITED}, **flags}


def _inherit_names(config: EraseConfig, method_config, names: list[str], k: int, log,
                   folder: pathlib.Path) -> EraseConfig:
    """A later pass without ``--names`` names the concept as the earlier pass did: textual inversion
    against an erased model finds the erasure, not the concept (on toy-unet's 7: "grass, 1, m"). When every
    name is a word the pass must keep, the run stops before the pass loads anything, for the same reason."""
    from ..methods import METHODS

    if config.names or config.conditioning != "auto" or not names:
        return config
    if not getattr(METHODS.get(config.method), "inversion_pool", True):
        return config  # a method that keeps its pool as the model draws it takes no names
    keep = {w.lower() for w in getattr(method_config, "anchor_words", None) or []}
    kept = [n for n in names if n.lower() not in keep]
    if len(kept) < len(names):
        log(f"pass {k}: {', '.join(n for n in names if n.lower() in keep)} left out of the names (a word to keep)")
    if not kept:
        raise ConfigError(f"--then (pass {k}): the names pass {k - 1} found ({', '.join(names)}) are all "
                          f"--anchor-words, and textual inversion against an erased model finds the erasure, not "
                          f"the concept: give --names in --then, and --resume (pass {k - 1} is complete in "
                          f"'{folder}' and will not run again)")
    log(f"pass {k}: names from the pass before: {', '.join(kept)}")
    return dataclasses.replace(config, names=kept)


def erase_in_passes(passes: list[tuple[EraseConfig, Any]], *, log: Callable[[str], None] | None = None):
    """Run ``passes`` (``(config, method_config)`` each, ``model``/``out`` as the first pass's command
    line gave them) one after the other; returns the last pass's ``EraseResult``.

    Every pass's options have been validated before this is called, and every output folder is
    checked here before the first pass loads anything, so a mistake in a later pass costs nothing.
    """
    from .trainer import erase

    log = log or (lambda msg: print(msg, file=sys.stderr))
    first = passes[0][0]
    final_out = pathlib.Path(first.out)
    n = len(passes)
    folders = [pass_folder(final_out, k) for k in range(1, n)] + [final_out]
    for folder in folders:
        if not (first.resume and (folder / "diffscrub.json").is_file()):
            check_output_dir(folder, overwrite=first.overwrite or first.resume)

    records, result, model = [], None, first.model
    for k, ((config, method_config), folder) in enumerate(zip(passes, folders), start=1):
        config = dataclasses.replace(config, model=str(model), out=str(folder))
        inherited = False
        if records:
            found = concept_names(records[-1].get("conditioning") or {}, passes[k - 2][0].name_words)
            named = _inherit_names(config, method_config, found, k, log, folders[k - 2])
            inherited, config = named is not config, named
        done = folder / "diffscrub.json"
        if k < n and first.resume and done.is_file():
            log(f"pass {k} of {n}: complete in '{folder}', not run again")
            records.append(json.loads(done.read_text()))
        else:
            log(f"pass {k} of {n}: {config.method}, {config.steps} steps, trainable "
                f"{config.trainable or 'default'}, lr {config.lr:g}")
            result = erase(config, method_config, log=log)
            records.append(result.record)
        if inherited:  # the report says where the names came from (not --names)
            records[-1]["conditioning"] = dict(records[-1].get("conditioning") or {}, names_from_pass=k - 1)
        model = folder

    if n > 1 and int(os.environ.get("RANK", "0")) == 0:  # several processes: the main one writes
        record = dict(records[-1], earlier_passes=records[:-1])
        write_json(final_out / "diffscrub.json", record)
        for folder in folders[:-1]:
            shutil.rmtree(folder, ignore_errors=True)  # their records are in the final one
        result = dataclasses.replace(result, record=record)
    return result
