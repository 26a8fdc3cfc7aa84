"""``diffscrub bench``: original, erased (one row per method) and retrained models side by side.

On the toy world, for one concept: make the forget/retain sets, erase with each method in its
own process (so wall time and peak memory belong to that run alone), evaluate every model
against the original on the same seeds with the oracle, and print one table. The retrained
model (the same recipe trained without the concept) is the target: erasure should bring the
concept rate down to its level, not to zero.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

from ..core.output import atomic_dir, check_output_dir, write_json
from ..config import check_range
from ..errors import ConfigError, InputError

def _retrained_folder(model: str, concept: str, retrained: str | None) -> pathlib.Path | None:
    if retrained:
        path = pathlib.Path(retrained)
        if not (path / "model_index.json").is_file():
            raise InputError(f"retrained model '{path}' has no model_index.json: pass a pipeline folder")
        return path
    from ..toy.models import WEIGHTS_DIR

    shipped = WEIGHTS_DIR / f"{model}-without-{concept}"
    return shipped if (shipped / "model_index.json").is_file() else None


def _row(name: str, metrics: dict | None, *, wall_s=None, peak_mb=None, reference: bool = False) -> dict:
    """Headline figures of one model from an eval's metrics.json (``reference``: its reference side)."""
    side = "reference" if reference else "erased"
    row = {"model": name, "wall_s": wall_s, "peak_rss_mb": peak_mb}
    if metrics is None:
        return row
    sets = metrics["sets"]
    for key, set_name in (("null_rate", "null"), ("concept_rate", "concept")):
        cr = sets.get(set_name, {}).get("concept_rate")
        row[key] = cr[side]["rate"] if cr else None
    other = sets.get("other", {})
    pa = other.get("prompt_adherence")
    row["adherence"] = pa[side]["rate"] if pa else None
    ba = other.get("background_adherence")
    row["background"] = ba[side]["rate"] if ba else None
    fd = other.get("frechet_distance")
    row["fd"] = fd[side]["value"] if fd else None
    row["fd_ci"] = fd[side].get("ci") if fd else None
    row["concept_by_prompt"] = {r["prompt"]: [r[side]["k"], r[side]["n"]]
                                for r in sets.get("concept", {}).get("concept_rate_by_prompt", [])}
    return row


def format_table(rows: list[dict], concept: str) -> str:
    def pct(x):
        return "   -  " if x is None else f"{100 * x:5.1f}%"

    def num(x, fmt):
        return "   -   " if x is None else format(x, fmt)

    head = (f"{'model':<18}{'concept ' + concept + ' (null)':>18}{'(prompts naming it)':>21}"
            f"{'adherence (other)':>19}{'asked bg':>10}{'FD (other)':>12}{'wall s':>9}{'peak MB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<18}{pct(r.get('null_rate')):>18}{pct(r.get('concept_rate')):>21}"
                     f"{pct(r.get('adherence')):>19}{pct(r.get('background')):>10}{num(r.get('fd'), '12.2f')}"
                     f"{num(r.get('wall_s'), '9.0f')}"
                     f"{num(r.get('peak_rss_mb'), '9.0f')}")
    # at a few dozen samples the Frechet distance's own spread is wide (toy-mmdit, 64 samples: 563.8-762.2 around
    # 614.9); a bar like "within 15% of the original's" is read against it
    spread = [f"{r['model']} {r['fd_ci'][0]:.1f}-{r['fd_ci'][1]:.1f}" for r in rows if r.get("fd_ci")]
    if spread:
        lines += ["", "FD (other), 95% bootstrap interval: " + "; ".join(spread)]
    # the naming column, prompt by prompt: a set's rate can hide one prompt form that still draws it
    prompts = list(dict.fromkeys(p for r in rows for p in r.get("concept_by_prompt") or {}))
    if prompts:
        lines += ["", f"prompts naming {concept}, samples that show it:",
                  f"{'model':<18}" + "".join(f"{p:>{len(p) + 2}}" for p in prompts)]
        for r in rows:
            counts = r.get("concept_by_prompt") or {}
            lines.append(f"{r['model']:<18}" + "".join(
                f"{(f'{counts[p][0]}/{counts[p][1]}' if p in counts else '-'):>{len(p) + 2}}" for p in prompts))
    return "\n".join(lines)


def _run_models(concept: str, work: pathlib.Path, *, model: str, methods: list[str], retrained_folder, steps: int,
                n: int, n_null: int, max_prompts: int, set_size: int, extra_args, then, cache, sample_seed: int,
                log) -> list[dict]:
    """Make the sets in ``work``, erase with each method (its own process), evaluate every model; the table's rows."""
    from ..evaluation import EvalConfig, evaluate
    from ..evaluation.readers import has_prototypes
    from ..toy.sets import make_sets

    sets = work / "sets"
    make_sets(concept, sets, n=set_size, seed=0)
    forget, retain = sets / "forget", sets / "retain"
    rows, evals = [], {}

    def evaluate_model(name: str, folder) -> dict:
        metrics = evaluate(EvalConfig(model=str(folder), reference=model, forget=str(forget), retain=str(retain),
                                      toy_concept=concept, out=str(work / f"eval-{name}"), n=n, n_null=n_null,
                                      max_prompts=max_prompts, device="cpu", quiet=True, seed=sample_seed,
                                      # only TSS runs leave prototypes for the detector
                                      artifacts=str(folder) if has_prototypes(folder) else None),
                           sample_cache=cache)
        evals[name] = metrics
        return metrics

    for method in methods:
        folder = work / f"erased-{method}"
        cmd = [sys.executable, "-m", "diffscrub", "erase", "--model", model, "--forget", str(forget),
               "--retain", str(retain), "--out", str(folder), "--method", method, "--steps", str(steps), "--quiet",
               "--device", "cpu", "--concept-prompt", concept, *(extra_args or []),
               *(f"--then={text}" for text in then or [])]
        log(f"erasing with {method} ...")
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise ConfigError(f"bench: erasing with {method} failed: {tail}")
        record = json.loads((folder / "diffscrub.json").read_text())
        log(f"evaluating {method} ...")
        metrics = evaluate_model(method, folder)
        peak = max(r["memory"]["cpu_peak_rss_mb"] for r in [record, *record.get("earlier_passes", [])])
        label = f"{method} ({1 + len(then)} passes)" if then else method
        rows.append(_row(label, metrics, wall_s=wall, peak_mb=peak))
    rows.insert(0, _row("original", evals[methods[0]], reference=True))
    if retrained_folder is not None:
        log("evaluating the retrained model ...")
        rows.append(_row("retrained", evaluate_model("retrained", retrained_folder)))
    else:
        log(f"no retrained model for {concept!r}: pass --retrained DIR (from `diffscrub toy train --exclude {concept}`)")
    return rows


def run_bench(concept: str, out: str, *, model: str = "toy-unet", methods: list[str] | None = None,
              retrained: str | None = None, steps: int = 200, n: int = 16, n_null: int = 128, max_prompts: int = 8,
              set_size: int = 64, overwrite: bool = False, extra_args: list[str] | None = None,
              then: list[str] | None = None, sample_cache: str | None = None, sample_seed: int = 0,
              log=print) -> dict:
    """Run the comparison into ``out``; returns ``{"rows": [...], "table": str}``.

    ``then``: later passes for every method (each a string of erase flags, as ``erase --then``); the
    row's wall time covers all passes and its peak memory is the highest of them.
    ``sample_seed``: eval's ``--seed`` for every model (each value an independent reading; 0 is the one
    every recorded table was read with).
    ``sample_cache``: a folder that keeps every model's samples by its files' contents, prompts, seeds
    and sampler settings; the original and the retrained model are then sampled once, here and in later
    runs (a sweep over erase seeds samples only the erased models). Without it they are still sampled
    once per run."""
    from ..evaluation.config import SAMPLE_SEED_END
    from ..evaluation.cache import SampleCache
    from ..methods import METHODS
    from ..toy.canvas import check_concept

    concept = check_concept(concept)
    methods = methods or ["tss"]
    for m in methods:
        METHODS.get(m)
    # before anything is erased or written: a wrong --retrained is a one-line error, not one after the runs
    retrained_folder = _retrained_folder(model, concept, retrained)
    check_range("sample_seed", sample_seed, 0, SAMPLE_SEED_END, high_open=True)
    cache = SampleCache(sample_cache)
    out_path = check_output_dir(out, overwrite=overwrite)
    # everything is written into a temporary sibling and renamed into place when complete: with --overwrite a
    # failed or interrupted bench leaves the previous one as it was
    with atomic_dir(out_path, overwrite=overwrite) as work:
        rows = _run_models(concept, work, model=model, methods=methods, retrained_folder=retrained_folder,
                           steps=steps, n=n, n_null=n_null, max_prompts=max_prompts, set_size=set_size,
                           extra_args=extra_args, then=then, cache=cache, sample_seed=sample_seed, log=log)
        table = format_table(rows, concept)
        log(f"sample cache: {cache.hits} sampling calls read back, {cache.misses} drawn"
            + (f" (kept in {cache.root})" if cache.root else ""))
        write_json(work / "bench.json", {"concept": concept, "model": model, "methods": methods, "steps": steps,
                                         "erase_args": list(extra_args or []), "then": list(then or []),
                                         "sample_seed": sample_seed,
                                         "rows": rows, "retrained": str(retrained_folder) if retrained_folder else None})
        (work / "bench.txt").write_text(table + "\n")
    log(table)
    return {"rows": rows, "table": table}
