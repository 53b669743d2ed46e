"""``moedistill <command> [options] [key=value ...]`` — thin glue over the library.

Every command takes Hydra-style overrides (``loss.alpha=0.7``) on top of a config from
``conf/distillation`` (``--config-name``, default ``tiny``: the embedded default).
``-m/--multirun`` sweeps comma-separated values (``loss.alpha=0.3,0.7``), one run per
combination, each in ``<output_dir>/sweep/<key=value,...>`` (the swept keys); checkpoint-0 and the teacher
caches stay in ``<output_dir>`` and are shared by every point when the sweep varies none of
their settings (``SHARED_ARTIFACTS``).

Errors a user can cause print one line (``error: ...``) and exit with code 2; so does a
full disk (``ENOSPC``), after which the same command resumes.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import itertools
import shlex
import signal
import sys
import time
from pathlib import Path

from moedistill import signals
from moedistill.dist import launched_rank, launched_world, shutdown
from moedistill.errors import UserError
from moedistill.files import DiskFullError, is_disk_full

COMMANDS = {
    "run": "compress -> cache (top-k and sampled) -> distill -> evaluate -> report, on one config",
    "prepare": "tokenise and pack the train and eval splits once into memory-mapped token stores",
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
        if name == "prepare":
            sp.add_argument("--split", action="append", default=None,
                            help="prepare only this split (repeatable; default: data.split and data.eval_split)")
        if name == "cache":
            sp.add_argument("--overwrite", action="store_true",
                            help="replace a cache of another configuration in the way (same as cache.overwrite=true)")
        if name in ("train", "run"):
            sp.add_argument("--overwrite", action="store_true",
                            help="replace an earlier run's checkpoints and final/ (same as overwrite=true); "
                                 "matching caches and checkpoint-0 are still reused")
        if name == "train":
            sp.add_argument("--resume", default=None, nargs="?", const="latest",
                            help="resume from a checkpoint directory, or the latest one with no value")
        if name == "run":
            sp.add_argument("--resume", action="store_true",
                            help="go on after an interrupt: each training from its latest checkpoint")
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


# what each shared artefact of a sweep depends on (config key prefixes): a sweep that varies
# none of them reuses the base output_dir's artefact at every point
SHARED_ARTIFACTS = {  # config key -> (its directory under the base output_dir, what it depends on)
    "compress.dir": ("compressed", ("teacher.", "compress.", "data.", "seed", "cache.batch_size", "eval.batch_size")),
    "cache.root": ("cache", ("teacher.", "cache.", "data.", "seed")),
    "data.store": ("data", ("teacher.", "data.")),
}


def swept_keys(runs: list[list[str]]) -> set[str]:
    """The keys whose value is not the same at every point of a sweep."""
    points = [{ov.partition("=")[0].lstrip("+~"): ov.partition("=")[2] for ov in overrides} for overrides in runs]
    keys = set().union(*points) if points else set()
    return {k for k in keys if len({p.get(k) for p in points}) > 1 or any(k not in p for p in points)}


def share_artifacts(cfg, base: str, swept: set[str]) -> None:
    """Point a sweep point's checkpoint-0 (``compress.dir``) and default caches (``cache.root``)
    at the base output_dir's when the sweep varies nothing they depend on, so that a sweep over
    e.g. ``loss.alpha`` compresses the teacher and runs it over the data once, not per point.
    A setting the user gave explicitly is kept."""
    for key, (dirname, inputs) in SHARED_ARTIFACTS.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) is None and not any(k.startswith(inputs) for k in swept):
            setattr(getattr(cfg, section), name, str(Path(base) / dirname))


def sweep_dir_name(overrides: list[str], swept: set[str] | None = None) -> str:
    """The directory of one sweep point: its overrides of the ``swept`` keys (all of them if
    None), so that no two points share one (list values such as ``compress.report_ranks=[1,2]``
    included). A name too long for a file system keeps its start and ends in a hash of the whole."""
    keep = [o.lstrip("+~") for o in overrides if swept is None or o.partition("=")[0].lstrip("+~") in swept]
    name = (",".join(keep) or "base").replace("/", "_")
    if len(name.encode()) > 200:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = name.encode()[:180].decode(errors="ignore") + "-" + digest
    return name


# the commands that split their work over the processes of torchrun / accelerate launch
MULTI_PROCESS = ("cache", "train", "config", "inspect", "prepare")


def _check_launch(cmd: str) -> None:
    world = launched_world()
    if world > 1 and cmd not in MULTI_PROCESS:
        raise UserError(
            f"`moedistill {cmd}` runs in one process, but this is one of {world} launched processes (each would "
            f"redo the whole job into the same files); run it without torchrun / accelerate launch "
            f"(for a teacher larger than one GPU set teacher.device_map=auto)"
        )


def _check_output_dir(cfg) -> None:
    """An output_dir (or cache.dir) that is a file stops a command at once, not at its first write."""
    for key, path in (("output_dir", cfg.output_dir), ("cache.dir", cfg.cache.dir)):
        for p in [Path(path), *Path(path).parents] if path else []:
            if p.exists():
                if not p.is_dir():
                    raise UserError(f"{key}={path}: {p} is a file, not a directory; choose another {key}")
                break


def _dispatch(args, cfg):
    # Each verb's module is imported only when that verb runs: importing them all would load
    # torch and transformers (seconds) before `moedistill --help` or a config error could print.
    cmd = args.command
    _check_launch(cmd)
    if cmd != "config":
        _check_output_dir(cfg)
    if cmd == "config":
        from moedistill.config import dump_yaml

        print(dump_yaml(cfg), end="")
    elif cmd == "run":
        from moedistill.commands.run import run

        run(cfg, resume=args.resume)
    elif cmd == "prepare":
        from moedistill.commands.prepare import prepare_from_config

        prepare_from_config(cfg, args.split)
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
    with signals.handling():  # SIGTERM / SIGINT: stop at a clean point and say how to go on (moedistill.signals)
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    current = (getattr(args, "overrides", []), None)  # the overrides and config of the run in progress
    started = time.time()
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
        if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
            # `--resume key=value ...`: the optional value took the first override; it is one
            args.resume, args.overrides = "latest", [resume, *args.overrides]
        if getattr(args, "overwrite", False):
            flag = "cache.overwrite=true" if args.command == "cache" else "overwrite=true"
            args.overrides = [*args.overrides, flag]
        runs = expand_sweep(args.overrides) if args.multirun else [args.overrides]
        swept = swept_keys(runs)
        for overrides in runs:
            cfg = load_config(args.config_name, overrides)
            if args.multirun:
                share_artifacts(cfg, cfg.output_dir, swept)
                cfg.output_dir = f"{cfg.output_dir}/sweep/{sweep_dir_name(overrides, swept)}"
                print(f"[multirun] {' '.join(overrides)} -> {cfg.output_dir}", file=sys.stderr)
            current = (overrides, cfg)
            _dispatch(args, cfg)
        shutdown()
    except UserError as e:
        signals.end_progress_bars()  # closed now, not redrawn below the error line when collected
        print(f"error: {e}", file=sys.stderr)
        shutdown(wait=False)
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C, and signals.Interrupted (SIGTERM, SIGINT)
        if not (getattr(e, "everywhere", False) and launched_rank() != 0):  # said once for all processes
            print(signals.fresh_line() + _interrupted_line(e, args, *current, started), file=sys.stderr, flush=True)
        shutdown(wait=False)
        return getattr(e, "exit_code", signals.exit_code(signal.SIGINT))
    except Exception as e:  # a full disk, whichever library was writing (files.is_disk_full); else our bug
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            signals.end_progress_bars()
            where = f" {e.filename}" if e.filename else ""
            print(f"error: cannot write{where}: {e.strerror}; choose an output_dir (or cache.dir) you can write to",
                  file=sys.stderr)
            shutdown(wait=False)
            return 2
        if not is_disk_full(e):
            raise
        # writes are atomic (temporary file + rename, completion records last): what was cut short is not used
        signals.end_progress_bars()
        print(f"error: {DiskFullError.from_exception(e)}", file=sys.stderr)
        shutdown(wait=False)
        return 2
    return 0


def _interrupted_line(e: KeyboardInterrupt, args, overrides: list[str], cfg, started: float) -> str:
    """``interrupted by SIGTERM <what was kept>; <the command that goes on from there>``.

    ``started``: when this command started (a checkpoint older than that is an earlier run's)."""
    signum = getattr(e, "signum", signal.SIGINT)
    what = getattr(e, "what", "")  # set where the work stopped at a clean point (training, cache loop)
    head = f"interrupted by {signals.signal_name(signum)}" + (f" {what}" if what else "")
    cmd = args.command
    if cmd not in ("train", "run", "cache"):
        return f"{head}; nothing half-written is kept: rerun the same command"
    checkpoint = getattr(e, "checkpoint", None)
    if cmd == "train" and checkpoint is None and cfg is not None and not what:
        from moedistill.stages import list_checkpoints  # stopped outside the training loop: the latest one

        found = [p for _, p in list_checkpoints(Path(cfg.output_dir) / "train" / "topk")
                 if (p / "checkpoint.json").stat().st_mtime >= started]
        checkpoint = found[-1] if found else None
    launch = " (launched as this one was, by torchrun or accelerate launch)" if launched_world() > 1 else ""
    again = _continue_command(args, overrides, cfg, checkpoint, clean=bool(what))
    if cmd == "train" and checkpoint is not None:
        return f"{head}; resume{launch} with: {again}"
    if cmd == "run":
        return f"{head}; go on{launch} with: {again}"
    return f"{head}; rerun{launch} to go on from there: {again}"


def _continue_command(args, overrides: list[str], cfg, checkpoint=None, clean: bool = False) -> str:
    """The command line that continues ``args`` after an interrupt: ``train --resume <checkpoint>``,
    ``run --resume``, or the same command; for one point of a ``-m`` sweep, that point alone.
    Without the overwrite settings that would now restart what resumes: ``cache.overwrite`` once
    the work had begun (``clean``: it stopped in a training or cache loop), ``overwrite`` for a
    training resumed from a checkpoint."""
    line = ["moedistill", args.command]
    if args.config_name != "tiny":
        line += ["--config-name", args.config_name]
    resume = str(checkpoint) if checkpoint is not None else getattr(args, "resume", None)
    if args.command == "run":
        line.append("--resume")
    elif args.command == "train" and resume not in (None, "latest"):
        line += ["--resume", resume]
    if args.multirun and cfg is None:
        line.append("-m")
    drop = {"cache.overwrite"} if clean else set()
    if args.command == "train" and checkpoint is not None:
        drop |= {"overwrite", "cache.overwrite"}
    line += [o for o in overrides if o.lstrip("+~").split("=")[0] not in drop]
    if args.multirun and cfg is not None:
        line.append(f"output_dir={cfg.output_dir}")
    if args.command == "train" and resume == "latest":
        line.append("--resume")  # after the overrides: a bare --resume would take the first one as its value
    return shlex.join(line)


if __name__ == "__main__":
    sys.exit(main())
