"""The ``diffscrub`` command: parse, build the config, call the library. Nothing else lives here.

Flags are generated from the config dataclasses (their help text included), so the CLI,
config files and the library can never disagree on a name or a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import typing

from .config import EraseConfig, _unwrap_optional, build, merge, read_config_file
from .errors import run_command

SECTION_SEP = "."


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, *, section: str | None = None,
                        skip: tuple[str, ...] = (), taken: set[str] | None = None) -> None:
    """One flag per field of ``cls``; values land in ``dest = [section.]field`` only when given."""
    hints = typing.get_type_hints(cls)
    taken = taken if taken is not None else set()
    group = parser.add_argument_group(f"{section} options" if section else None)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = f.metadata.get("cli") or _flag(f.name)
        if flag in taken:  # the same option name in two methods: prefix with the method name
            flag = _flag(f"{section}_{f.name}")
        taken.add(flag)
        dest = f"{section}{SECTION_SEP}{f.name}" if section else f.name
        tp, _ = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, "", []):
            help_text += f" (default: {default})"
        if tp is bool:
            group.add_argument(flag, dest=dest, action="store_const", const=True, default=argparse.SUPPRESS,
                               help=help_text)
            if default is True:  # an option that is on by default needs a way to turn it off
                off = "--no-" + flag[2:]
                taken.add(off)
                group.add_argument(off, dest=dest, action="store_const", const=False, default=argparse.SUPPRESS,
                                   help=f"turn off {flag}")
        else:
            group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def split_sections(ns: argparse.Namespace) -> dict:
    """``{"tau": .., "tss.tau": ..}`` -> nested ``{"tss": {"tau": ..}}``."""
    out: dict = {}
    for key, value in vars(ns).items():
        if key.startswith("_"):
            continue
        if SECTION_SEP in key:
            section, name = key.split(SECTION_SEP, 1)
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return out


def values_from_args(ns: argparse.Namespace) -> dict:
    """The given flags over the ``--config`` file's values, if one was given (flags win)."""
    flags = split_sections(ns)
    config_file = flags.pop("config", None)
    return merge(read_config_file(config_file), flags) if config_file else flags


def config_from_args(ns: argparse.Namespace):
    """Merge ``--config`` file and flags (flags win) into ``(EraseConfig, method options dict)``."""
    return config_from_values(values_from_args(ns))


def config_from_values(values: dict):
    """``{"steps": .., "tss": {..}}`` -> ``(EraseConfig, method options dict)``."""
    from .methods import METHODS

    values = dict(values)
    method = values.get("method", "tss")
    METHODS.get(method)  # unknown method: a clear error before anything else
    sections = {name: values.pop(name) for name in METHODS.names() if isinstance(values.get(name), dict)}
    config = build(EraseConfig, values)
    return config, sections.get(config.method, {})


def add_erase_flags(parser: argparse.ArgumentParser) -> None:
    """Every ``EraseConfig`` field and every method's options, as flags."""
    from .methods import METHODS

    taken = {"--config", "--then"}
    add_dataclass_flags(parser, EraseConfig, taken=taken)
    for name, cls in METHODS.items():
        add_dataclass_flags(parser, cls.config_class, section=name, taken=taken)


def later_pass(first: EraseConfig, text: str, k: int):
    """``--then "FLAGS"`` -> the ``(EraseConfig, method config)`` of pass ``k``, validated now."""
    from .core.passes import later_pass_values
    from .errors import ConfigError
    from .methods import METHODS

    where = f"--then (pass {k})"
    parser = argparse.ArgumentParser(prog=f"diffscrub erase {where}", add_help=False, exit_on_error=False)
    parser.add_argument("--config", default=argparse.SUPPRESS)
    add_erase_flags(parser)
    try:
        ns, unknown = parser.parse_known_args(shlex.split(text))
    except (argparse.ArgumentError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc} (give the pass's flags with their values, quoted as one string: "
                          "--then \"--lr 2e-4\")") from None
    if unknown:
        raise ConfigError(f"{where}: unknown option {unknown[0]!r}: see `diffscrub erase --help`")
    try:
        # this pass's own flags over its own --config file, then over what the first pass hands on
        config, options = config_from_values(later_pass_values(first, values_from_args(ns), where))
        return config, build(METHODS.get(config.method).config_class, options, where=config.method)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None


def _quiet_libraries() -> None:
    import warnings

    import diffusers
    import transformers

    # torchmetrics warns about its own deprecated re-exports when imported; nothing a user can act on
    warnings.filterwarnings("ignore", message=r"Importing `.*` from `torchmetrics", category=FutureWarning)

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:  # "Writing model shards" / download bars
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


# ----------------------------------------------------------------------------- commands
def cmd_erase(ns) -> int:
    from .core.trainer import erase

    then = list(getattr(ns, "then", None) or [])
    ns.__dict__.pop("then", None)
    config, method_options = config_from_args(ns)
    passes = [(config, method_options)] + [later_pass(config, text, k) for k, text in enumerate(then, start=2)]
    _quiet_libraries()
    if len(passes) > 1:
        from .core.passes import erase_in_passes

        result = erase_in_passes(passes)
    else:
        result = erase(config, method_options)
    if int(os.environ.get("RANK", "0")) != 0:  # several processes: the main one speaks for the run
        return 0
    timing = result.record["timing"]
    print(f"erased with {config.method} on {result.record['family']} in {timing['total_s']:.1f}s "
          f"({timing['step_s'] * 1000:.0f} ms/step): {result.out}")
    return 0


def cmd_demo(ns) -> int:
    from .demo import run_demo

    _quiet_libraries()
    run_demo(out=ns.out, steps=ns.steps, overwrite=ns.overwrite, quiet=ns.quiet,
             **({"concept": ns.concept} if ns.concept else {}))
    return 0


def cmd_bench_speed(ns) -> int:
    from .bench.speed import bench_speed, write_json

    _quiet_libraries()
    modes = ["with retain", "without retain"] if ns.retain == "both" else [f"{ns.retain} retain"]
    resolution = ns.resolution
    if resolution is None:
        from .bench.architectures import architecture

        resolution = architecture(ns.arch).native_resolution if ns.arch else 32
    results = []
    for mode in modes:
        results.append(bench_speed(ns.model, batch_size=ns.batch_size, steps=ns.steps, resolution=resolution,
                                   retain=mode.startswith("with "), trainable=ns.trainable,
                                   lora_rank=ns.lora_rank, device=ns.device, family=ns.family, arch=ns.arch,
                                   mixed_precision=ns.mixed_precision,
                                   gradient_checkpointing=ns.gradient_checkpointing, compile=ns.compile))
    if ns.json:
        write_json(results if len(results) > 1 else results[0], ns.json)
    return 0


def cmd_bench(ns) -> int:
    from .bench.compare import run_bench

    _quiet_libraries()
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    extra = [f"--lr={ns.lr}"] if ns.lr is not None else []
    extra += [f"--batch-size={ns.batch_size}"] if ns.batch_size is not None else []
    extra += shlex.split(ns.erase_args or "")
    run_bench(ns.concept, ns.out, model=ns.model, methods=methods, retrained=ns.retrained, steps=ns.steps, n=ns.n,
              n_null=ns.n_null, overwrite=ns.overwrite, extra_args=extra, then=ns.then, sample_cache=ns.sample_cache,
              sample_seed=ns.sample_seed, log=(lambda m: None) if ns.quiet else (lambda m: print(m, file=sys.stderr)))
    print((__import__("pathlib").Path(ns.out) / "bench.txt").read_text(), end="")
    return 0


def cmd_list(ns) -> int:
    from .adapters import ADAPTERS
    from .methods import METHODS

    if ns.what == "families":
        for name, cls in ADAPTERS.items():
            print(f"{name:8s} {cls.description}")
    else:
        for name, cls in METHODS.items():
            print(f"{name:10s} {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffscrub", description="Erase a visual concept from a latent diffusion "
                                     "model using only a folder of unlabeled images.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("erase", help="erase the concept shown in --forget from --model and write --out")
    p.add_argument("--config", default=argparse.SUPPRESS, help="YAML or TOML file of options (flags win)")
    p.add_argument("--then", action="append", default=argparse.SUPPRESS, metavar='"FLAGS"',
                   help="another pass on this pass's output, with these erase flags (quoted; repeat for more "
                        "passes; --then=\"--flag\" for a single flag; --config FILE works there too). It takes --forget, --retain, --steps, --batch-size, --seed, --device and the other "
                        "run settings from this command line, its method options from its own flags, and the "
                        "concept's names from the pass before (unless it gives --names); one output folder")
    add_erase_flags(p)
    p.set_defaults(_run=cmd_erase)

    p = sub.add_parser("demo", help="erase the brick background from the shipped toy model and show before/after")
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's tuned value)")
    p.add_argument("--concept", default=None, help="concept to erase: a background name or a digit 0-9 "
                   "(default brick; see README for what the toy model allows)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(_run=cmd_demo)

    p = sub.add_parser("bench-speed", help="seconds per training step, diffscrub's against the seed's, as a ratio")
    p.add_argument("--model", default="toy-unet", help="pipeline to measure on (default: toy-unet)")
    p.add_argument("--family", default=None, help="force a denoiser family")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=12, help="timed steps of each kind (after 2 warm-up steps)")
    p.add_argument("--arch", default=None, choices=("sd15", "sdxl", "sd3-medium", "flux-dev"),
                   help="instead of --model: a randomly initialised full-size architecture (published config)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size in pixels (default: the --arch's native size, else 32)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoisers (both steps use them)")
    p.add_argument("--retain", choices=("with", "without", "both"), default="both")
    p.add_argument("--trainable", choices=("full", "attention", "lora"), default="full")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(_run=cmd_bench_speed)

    p = sub.add_parser("bench", help="original, erased (per method) and retrained toy models side by side")
    p.add_argument("--concept", required=True, help="toy concept: a digit 0-9 or a background name")
    p.add_argument("--model", default="toy-unet", help="toy model to erase from (default: toy-unet)")
    p.add_argument("--methods", default="tss", help="comma-separated methods (default: tss)")
    p.add_argument("--retrained", default=None, help="the model retrained without the concept (default: shipped one)")
    p.add_argument("--steps", type=int, default=200, help="erase steps per method")
    p.add_argument("--lr", type=float, default=None, help="learning rate for every method (default: erase's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size for every method (default: erase's)")
    p.add_argument("--erase-args", default=None, help='more `diffscrub erase` options for every method, quoted: '
                   '"--fingerprint knn" (recorded in bench.json)')
    p.add_argument("--then", action="append", default=None, metavar='"FLAGS"',
                   help="a later pass for every method, as `diffscrub erase --then` (repeat for more passes)")
    p.add_argument("--n", type=int, default=16, help="samples per prompt in the concept and other sets")
    p.add_argument("--n-null", type=int, default=128, help="samples of the null prompt")
    p.add_argument("--sample-seed", type=int, default=0, metavar="K",
                   help="eval's --seed for every model: each K draws samples no other K draws, so K=1, 2, ... "
                        "are independent second readings of the same table (default: 0)")
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    p.add_argument("--sample-cache", default=None, metavar="DIR",
                   help="keep every model's samples here, by its files' contents, prompts, seeds and settings, so "
                        "later runs sample the unchanged original and retrained models from it")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(_run=cmd_bench)

    p = sub.add_parser("list", help="list the supported denoiser families or erasure methods")
    p.add_argument("what", choices=("families", "methods"))
    p.set_defaults(_run=cmd_list)

    from .evaluation.cli import register as register_evaluation
    from .toy.cli import register as register_toy

    register_evaluation(sub)
    register_toy(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    run = getattr(ns, "_run", None) or getattr(ns, "func", None)
    if run is None:  # a command group given without its subcommand
        parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "--help"])
    for key in ("_run", "func", "command"):
        if hasattr(ns, key):
            delattr(ns, key)
    return run_command(run, ns)


if __name__ == "__main__":
    sys.exit(main())
