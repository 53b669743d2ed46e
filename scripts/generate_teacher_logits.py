#!/usr/bin/env python
"""Generate the offline teacher cache with the original prototype's command-line flags.

    python scripts/generate_teacher_logits.py --output_dir outputs/teacher_logits
    python scripts/generate_teacher_logits.py --teacher_model Qwen/Qwen3-30B-A3B \\
        --dataset wikitext --dataset_config wikitext-103-raw-v1 --output_dir /data/cache --top_k 64
    torchrun --nproc_per_node=8 scripts/generate_teacher_logits.py --output_dir /data/cache ...
    python scripts/generate_teacher_logits.py --device_map auto ...   # a teacher larger than one GPU

Starts from the embedded default (``conf/distillation/tiny.yaml``: the tiny teacher and
its corpus) and replaces what the flags give. ``--output_dir`` is the cache directory
itself (manifest.json + shard-*.h5 are written there). Rerunning the same command
resumes an interrupted run; a different configuration against an existing cache is
refused unless ``--overwrite``. Same thing as ``moedistill cache cache.dir=DIR ...``.

The flag names are those of the original prototype's cache script (one of the earlier
distillation scripts this project replaces), so its command lines keep working.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher_model", default=None,
                   help="hub id, local directory or 'tiny' (default: the config's teacher)")
    p.add_argument("--dataset", default=None, help="HF dataset name, local .txt/.jsonl/.parquet, or 'tiny'")
    p.add_argument("--dataset_config", default=None, help="HF dataset configuration name")
    p.add_argument("--output_dir", required=True, help="cache directory to write")
    p.add_argument("--top_k", type=int, default=64, help="ids kept per position in topk mode (default 64)")
    p.add_argument("--split", default=None, help="dataset split (default: the config's data.split)")
    p.add_argument("--max_samples", type=int, default=None, help="use the first N documents")
    p.add_argument("--max_sequences", type=int, default=None, help="use the first N packed sequences")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per packed sequence")
    p.add_argument("--batch_size", type=int, default=None, help="sequences per teacher forward")
    p.add_argument("--mode", choices=["topk", "sample"], default=None, help="topk (default) or sample")
    p.add_argument("--num_samples", type=int, default=None, help="draws per position in sample mode")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed of the draws in sample mode (default: the config's seed)")
    p.add_argument("--device_map", default=None,
                   help="'auto' spreads a teacher larger than one GPU over all visible GPUs (one process)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache of another configuration")
    p.add_argument("--config-name", default="tiny",
                   help="base config in conf/distillation or a YAML path (default: tiny)")
    return p.parse_args(argv)


def build_config(args):
    from moedistill.config import load_config, validate

    cfg = load_config(args.config_name)
    cfg.output_dir = args.output_dir
    cfg.cache.dir = args.output_dir
    if cfg.data.store is None:  # the token stores beside the cache directory, not inside it
        cfg.data.store = str(Path(args.output_dir).absolute().parent / "data")
    cfg.cache.top_k = args.top_k
    cfg.cache.overwrite = bool(args.overwrite)
    if args.teacher_model is not None:
        cfg.teacher.name = args.teacher_model
    if args.dataset is not None:
        cfg.data.dataset = args.dataset
        cfg.data.dataset_config = args.dataset_config
        cfg.data.max_sequences = None  # the embedded default's cap is for the embedded corpus
    elif args.dataset_config is not None:
        cfg.data.dataset_config = args.dataset_config
    for flag, section, key in (
        ("split", "data", "split"),
        ("max_samples", "data", "max_samples"),
        ("max_sequences", "data", "max_sequences"),
        ("seq_len", "data", "seq_len"),
        ("batch_size", "cache", "batch_size"),
        ("mode", "cache", "mode"),
        ("num_samples", "cache", "num_samples"),
    ):
        value = getattr(args, flag)
        if value is not None:
            setattr(getattr(cfg, section), key, value)
    if args.seed is not None:
        cfg.seed = args.seed
    if args.device_map is not None:
        cfg.teacher.device_map = args.device_map
    return validate(cfg)


def main(argv=None) -> int:
    from moedistill import signals
    from moedistill.dist import shutdown
    from moedistill.errors import UserError

    args = parse_args(argv)
    try:
        from moedistill.commands.cache import generate_from_config

        with signals.handling():  # SIGTERM / SIGINT: the batches computed are written, then one line
            path = generate_from_config(build_config(args))
        shutdown()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        shutdown(wait=False)
        return e.exit_code
    except signals.Interrupted as e:
        print(f"{signals.fresh_line()}{e}; rerun the same command to go on from there", file=sys.stderr, flush=True)
        shutdown(wait=False)
        return e.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
