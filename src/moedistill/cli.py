"""``moedistill <command> [options] [key=value ...]`` — thin glue over the library.

Every command takes Hydra-style overrides (``loss.alpha=0.7``) on top of a config from
``conf/distillation`` (``--config-name``, default ``tiny``: the embedded default).
``-m/--multirun`` sweeps comma-separated values (``loss.alpha=0.3,0.7``), one run per
combination, each in ``<output_dir>/sweep/<key=value,...>``.

Errors a user can cause print one line (``error: ...``) and exit with code 2; so does a
full disk (``ENOSPC``), after which the same command resumes.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import sys
from pathlib import Path

from moedistill.dist import launched_world, shutdown
from moedistill.errors import UserError

COMMANDS = {
    "run": "compress -> cache (top-k and sampled) -> distill -> evaluate -> report, on one config",
    "cache": "generate the offline teacher-logit cache (HDF5 shards + manifest)",
    "inspect": "summarise a cache directory; --verify checks every shard",
    "compress": "build the shared-core + wrapper student (checkpoint-0) from the teacher",
    "train": "distill a student from the cache (stages, regex learning rates)",
    "eval": "perplexity, agreement, KL and calibration of a model against the teacher",
    "export": "write a compressed checkpoint back as a plain HF checkpoint",
    "config": "print the resolved configuration",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moedistill",
        description="Knowledge distillation for compressed Mixture-of-Experts LLMs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {k:<9} {v}" for k, v in COMMANDS.items())
        + "\n\nexamples:\n  moedistill run\n  moedistill train loss.alpha=0.7 loss.temperature=1.0\n"
        "  moedistill inspect outputs/tiny/cache/topk --verify\n",
    )
    sub = p.add_subparsers(dest="command", metavar="command")
    for name, help_ in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if name == "inspect":
            sp.add_argument("path", help="cache directory")
            sp.add_argument("--verify", action="store_true", help="check checksums, decode every row, look for NaN/inf")
            continue
        if name == "export":
            sp.add_argument("checkpoint", help="compressed checkpoint directory (e.g. .../checkpoint-0)")
            sp.add_argument("output", help="where to write the plain HF checkpoint")
            sp.add_argument("--dtype", default=None, help="save dtype (float32, bfloat16, float16, auto)")
            continue
        sp.add_argument("--config-name", "-c", default="tiny",
                        help="config in conf/distillation or a YAML path (default: tiny)")
        sp.add_argument("--multirun", "-m", action="store_true", help="sweep comma-separated override values")
        if name == "eval":
            sp.add_argument("--model", default=None, help="model to evaluate (default: the trained student)")
            sp.add_argument("--cache", default=None, help="teacher cache of the eval split (default: built as needed)")
            sp.add_argument("--output", default=None, help="write the metrics JSON here")
        if name in ("cache", "train", "run"):
            sp.add_argument("--overwrite", action="store_true",
                            help="replace a cache of another configuration in the way (same as cache.overwrite=true)")
        if name == "train":
            sp.add_argument("--resume", default=None, nargs="?", const="latest",
                            help="resume from a checkpoint directory, or the latest one with no value")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.alpha=0.7")
    return p


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """``["a=1,2", "b=x"]`` -> ``[["a=1","b=x"], ["a=2","b=x"]]`` using Hydra's override grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # lazy: only for -m sweeps

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot parse overrides: {str(e).splitlines()[0]}") from None
    choices = []
    for ov in parsed:
        key = ov.get_key_element()
        if ov.is_sweep_override():
            choices.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            choices.append([ov.input_line])
    return [list(c) for c in itertools.product(*choices)] if choices else [[]]


# the commands that split their work over the processes of torchrun / accelerate launch
MULTI_PROCESS = ("cache", "train", "config", "inspect")


def _check_launch(cmd: str) -> None:
    world = launched_world()
    if world > 1 and cmd not in MULTI_PROCESS:
        raise UserError(
            f"`moedistill {cmd}` runs in one process, but this is one of {world} launched processes (each would "
            f"redo the whole job into the same files); run it without torchrun / accelerate launch "
            f"(for a teacher larger than one GPU set teacher.device_map=auto)"
        )


def _dispatch(args, cfg):
    # Each verb's module is imported only when that verb runs: importing them all would load
    # torch and transformers (seconds) before `moedistill --help` or a config error could print.
    cmd = args.command
    _check_launch(cmd)
    if cmd == "config":
        from moedistill.config import dump_yaml

        print(dump_yaml(cfg), end="")
    elif cmd == "run":
        from moedistill.commands.run import run

        run(cfg)
    elif cmd == "cache":
        from moedistill.commands.cache import generate_from_config

        generate_from_config(cfg)
    elif cmd == "compress":
        from moedistill.commands.compress import compress_from_config

        compress_from_config(cfg)
    elif cmd == "train":
        from moedistill.commands.train import train_from_config

        train_from_config(cfg, resume=args.resume)
    elif cmd == "eval":
        from moedistill.commands.eval import eval_from_config

        eval_from_config(cfg, model=args.model, cache=args.cache, output=args.output)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    try:
        if args.command == "inspect":  # lazy for start-up time, as in _dispatch
            from moedistill.cache import inspect_cache

            inspect_cache(args.path, verify=args.verify)
            return 0
        if args.command == "export":
            _check_launch("export")
            from moedistill.compression.export import export_checkpoint

            export_checkpoint(args.checkpoint, args.output, dtype=args.dtype)
            return 0
        from moedistill.config import load_config  # lazy: hydra/omegaconf are not needed for --help

        resume = getattr(args, "resume", None)
        if resume and "=" in resume and not Path(resume).exists():
            # `--resume key=value ...`: the optional value took the first override; it is one
            args.resume, args.overrides = "latest", [resume, *args.overrides]
        if getattr(args, "overwrite", False):
            args.overrides = [*args.overrides, "cache.overwrite=true"]
        runs = expand_sweep(args.overrides) if args.multirun else [args.overrides]
        for overrides in runs:
            cfg = load_config(args.config_name, overrides)
            if args.multirun:
                tag = ",".join(o.lstrip("+~") for o in overrides if "," not in o) or "base"
                cfg.output_dir = f"{cfg.output_dir}/sweep/{tag.replace('/', '_')}"
                print(f"[multirun] {' '.join(overrides)} -> {cfg.output_dir}", file=sys.stderr)
            _dispatch(args, cfg)
        shutdown()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        shutdown(wait=False)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # writes are atomic (temporary file + rename, completion records last): what was cut short is not used
        where = f" writing {e.filename}" if e.filename else ""
        print(f"error: no space left on the device{where}; free space and rerun the same command "
              f"(caches resume, training resumes with --resume)", file=sys.stderr)
        shutdown(wait=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
