"""``diffscrub toy ...``: make-sets, train, oracle-check, quality.

``register(subparsers)`` adds the ``toy`` command to the main CLI's argparse
subparsers; ``python -m diffscrub.toy.cli ...`` runs it on its own. The handlers only
parse arguments and call library functions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from diffscrub.errors import DiffscrubError, InputError


def _cmd_make_sets(args: argparse.Namespace) -> int:
    from diffscrub.toy.sets import make_sets

    if args.concept and args.concept_pos and args.concept != args.concept_pos:
        raise InputError(f"two concepts given ({args.concept_pos!r} and --concept {args.concept!r}): give one")
    args.concept = args.concept or args.concept_pos
    if not args.concept:
        raise InputError("no concept given: pass --concept 7 (a digit 0-9 or a background name)")
    res = make_sets(args.concept, args.out, n=args.n, seed=args.seed, n_retain=args.n_retain)
    print(f"wrote {len(res['forget'])} forget and {len(res['retain'])} retain PNGs for concept "
          f"{args.concept!r} under {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from diffscrub.toy.train import train_toy

    t0 = time.time()
    written = train_toy(
        model=args.model,
        out_dir=args.out,
        exclude=args.exclude,
        steps=args.steps,
        seed=args.seed,
        vae_dir=args.vae,
        n_canvases=args.canvases,
        batch_size=args.batch_size,
        time_limit_s=args.time_limit,
        init_dir=args.init,
        device=args.device,
        workers=args.workers,
        log=None if args.quiet else (lambda m: print(m, flush=True)),
    )
    for name, path in written.items():
        print(f"{name}: {path}")
    print(f"wall time {time.time() - t0:.1f}s")
    return 0


def _cmd_oracle_check(args: argparse.Namespace) -> int:
    from diffscrub.toy.oracle import Oracle, format_oracle_check, oracle_check

    res = oracle_check(Oracle.load(args.weights), n=args.n, seed=args.seed)
    print(json.dumps(res) if args.json else format_oracle_check(res))
    return 0


def _cmd_quality(args: argparse.Namespace) -> int:
    from diffscrub.toy.quality import format_quality, measure_quality

    res = measure_quality(
        args.model,
        guidance=args.guidance,
        steps=args.steps,
        per_prompt=args.per_prompt,
        n_null=args.n_null,
        seed=args.seed,
        device=args.device,
    )
    print(json.dumps(res) if args.json else format_quality(res))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``toy`` command (with its subcommands) to an argparse ``subparsers`` object."""
    from diffscrub.toy.canvas import CONCEPTS
    from diffscrub.toy.recipes import DEFAULT_STEPS
    from diffscrub.toy.train import MODEL_CHOICES

    toy = subparsers.add_parser("toy", help="the built-in toy world: data sets, toy models, oracle")
    sub = toy.add_subparsers(dest="toy_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("make-sets", help="write forget/ and retain/ PNG folders for a concept")
    p.add_argument("concept_pos", nargs="?", metavar="CONCEPT", help="the concept (same as --concept)")
    p.add_argument("--concept", default=None, help=f"a digit 0-9 or a background ({', '.join(CONCEPTS[10:])})")
    p.add_argument("--out", required=True, help="output folder (gets forget/ and retain/)")
    p.add_argument("--n", type=int, default=64, help="forget images (default 64)")
    p.add_argument("--n-retain", type=int, default=None, help="retain images (default: same as --n)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_sets)

    p = sub.add_parser("train", help="train toy models from scratch (seeded)")
    p.add_argument("--model", default="all", choices=MODEL_CHOICES)
    p.add_argument("--exclude", default=None, help="leave this concept out of every training canvas")
    p.add_argument("--steps", type=int, default=None, help="denoiser steps (small values also shrink the run)")
    p.add_argument("--out", default="toy-models", help="output folder (default ./toy-models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default=None, help="reuse this trained VAE folder instead of training one")
    p.add_argument("--canvases", type=int, default=None, help="number of training canvases")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--time-limit", type=float, default=None, help="stop each denoiser after this many seconds")
    p.add_argument("--init", default=None, help="continue training from this saved pipeline folder")
    p.add_argument("--device", default="cpu", help="where the denoiser trains: cpu (default) or cuda")
    p.add_argument("--workers", type=int, default=1, help="processes that build the training canvases")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("oracle-check", help="score the oracle on canvases from held-out handwriting")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--weights", default=None, help="oracle .safetensors (default: the shipped one)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_oracle_check)

    p = sub.add_parser("quality", help="oracle-measured quality bars of a toy model")
    p.add_argument("--model", required=True, help="toy-unet, toy-mmdit or a pipeline folder")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's recorded one)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--per-prompt", type=int, default=8, help="samples per single-digit prompt (40 prompts)")
    p.add_argument("--n-null", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to sample: cpu (default) or cuda")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_quality)
    return toy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffscrub")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    register(subparsers)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DiffscrubError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
