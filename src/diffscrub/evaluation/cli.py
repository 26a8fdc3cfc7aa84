"""``diffscrub eval`` and ``diffscrub report``: argparse glue only; the work is in the library.

The main CLI calls :func:`register` with its subparsers; each subcommand sets ``_run`` to a
function of the parsed namespace returning an exit code. Errors a user can cause are raised
as ``DiffscrubError`` and printed as one line by the main CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from ..config import _unwrap_optional, build
from .config import EvalConfig

#: EvalConfig fields given as positional/short forms or not exposed as flags.
_SKIP = ()


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.default not in (None, "", dataclasses.MISSING) and tp is not bool:
            help_text += f" (default: {f.default})"
        if tp is bool:
            p.add_argument(flag, dest=f.name, action="store_const", const=True, default=argparse.SUPPRESS,
                           help=help_text)
        else:
            p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def cmd_eval(ns: argparse.Namespace) -> int:
    from .run import evaluate, preflight

    values = {k: v for k, v in vars(ns).items() if not k.startswith("_") and k != "command"}
    config = build(EvalConfig, values)
    preflight(config)  # cheap checks first: a typo fails in a second, before any model loads
    _quiet_libraries()
    result = evaluate(config)
    print(format_summary(result))
    print(f"wrote {config.out}")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from ..report import build_report

    path = build_report(ns.dir, eval_dir=ns.eval, out=ns.out)
    print(f"wrote {path}")
    return 0


def _quiet_libraries() -> None:
    try:
        import diffusers
        import transformers
    except ImportError:  # pragma: no cover
        return
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _fmt_rate(summary: dict | None) -> str:
    if not summary or summary.get("rate") is None:
        return "-"
    lo, hi = summary["ci"]
    return f"{summary['rate']:.3f} [{lo:.3f}, {hi:.3f}]"


def _fmt_mean(summary: dict | None, key: str = "mean", digits: int = 4) -> str:
    if not summary or summary.get(key) is None:
        return "-"
    lo, hi = summary["ci"]
    return f"{summary[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _count(summary: dict) -> str:
    return f"{summary['k']} of {summary['n']}"


def format_summary(result: dict) -> str:
    """A short plain-text table of the headline figures (reference beside erased)."""
    lines = [f"{'set':<8}{'figure':<26}{'reference':>30}{'erased':>30}"]
    order = {"null": 0, "concept": 1, "other": 2}
    for name, figures in sorted(result.get("sets", {}).items(), key=lambda kv: order.get(kv[0], 3)):
        if "skipped" in figures:
            lines.append(f"{name:<8}skipped: {figures['skipped']}")
            continue
        cr = figures.get("concept_rate")
        if cr:
            lines.append(f"{name:<8}{'concept rate (' + cr['reader'] + ')':<26}{_fmt_rate(cr['reference']):>30}"
                         f"{_fmt_rate(cr['erased']):>30}")
        if name == "concept":  # the prompts that name the concept, one by one: k of n
            for row in figures.get("concept_rate_by_prompt", []):
                label = "  " + (row["prompt"] if len(row["prompt"]) <= 22 else row["prompt"][:21] + "…")
                lines.append(f"{name:<8}{label:<26}{_count(row['reference']):>30}{_count(row['erased']):>30}")
        for key, label in (("prompt_adherence", "prompt adherence"), ("background_adherence", "asked background")):
            pa = figures.get(key)
            if pa:
                lines.append(f"{name:<8}{label:<26}{_fmt_rate(pa['reference']):>30}{_fmt_rate(pa['erased']):>30}")
        ch = figures.get("preservation") or figures.get("change") or {}
        if ch:
            lines.append(f"{name:<8}{'pixel diff vs reference':<26}{'0':>30}{_fmt_mean(ch.get('pixel_diff')):>30}")
            lines.append(f"{name:<8}{'SSIM vs reference':<26}{'1':>30}{_fmt_mean(ch.get('ssim')):>30}")
        fd = figures.get("frechet_distance")
        if fd:
            # distances run to the thousands: one decimal keeps the columns apart
            ref = _fmt_mean(fd.get("reference"), "value", digits=1)
            era = _fmt_mean(fd.get("erased"), "value", digits=1)
            lines.append(f"{name:<8}{'Fréchet dist. to retain':<26}{ref:>30}{era:>30}")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def register(subparsers) -> None:
    """Add the ``eval`` and ``report`` subcommands to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "eval", help="measure an erased model against its reference on the same seeds",
        description="Sample the erased and the reference model with the same seeds on three prompt sets "
                    "(null, concept, other) and write metrics.json (with confidence intervals), samples.json "
                    "and before/after PNG grids to --out.",
    )
    _add_eval_flags(p)
    p.set_defaults(_run=cmd_eval)

    p = subparsers.add_parser(
        "report", help="render one self-contained HTML page of an erase run and its evaluation",
        description="Render DIR (an erase run's output folder) and its evaluation folder as one HTML file "
                    "with every image embedded: no network, no JavaScript.",
    )
    p.add_argument("dir", metavar="DIR", help="erase run output folder (holding diffscrub.json)")
    p.add_argument("--eval", default=None, metavar="DIR",
                   help="evaluation folder written by diffscrub eval (default: DIR/eval if it exists)")
    p.add_argument("--out", default=None, metavar="FILE", help="HTML file to write (default: DIR/report.html)")
    p.set_defaults(_run=cmd_report)


def main(argv: list[str] | None = None) -> int:
    """Run ``eval``/``report`` on their own (the main CLI normally does this)."""
    from ..errors import run_command

    parser = argparse.ArgumentParser(prog="diffscrub")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    ns = parser.parse_args(argv)
    run = ns._run
    del ns._run
    return run_command(run, ns)


if __name__ == "__main__":
    sys.exit(main())
