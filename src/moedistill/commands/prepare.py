"""``moedistill prepare``: tokenise and pack the config's splits once, into their token stores.

Every other verb maps the same stores (``common.prepare_split``) and builds one only when it is
absent or its fingerprint differs, so running ``prepare`` first is optional; it is the way to do
the tokenising up front (one process, worker processes for the tokenizer, a progress bar), e.g.
before a torchrun launch. A store that is already complete is reused, not rebuilt.
"""

from __future__ import annotations

import json

from moedistill.commands import common  # called qualified, so patching common.X reaches every verb
from moedistill.config import Config


def prepare_from_config(cfg: Config, splits: list[str] | None = None) -> dict:
    """Build (or reuse) the token store of each of ``splits`` (default: ``data.split`` and
    ``data.eval_split``); prints and returns ``{split: summary}``."""
    common.setup_logging()
    splits = splits or list(dict.fromkeys([cfg.data.split, cfg.data.eval_split]))
    for split in splits:  # every split's source resolves (the split rules) before any is tokenised
        common.split_source(cfg, split)
    tokenizer = common.teacher_tokenizer(cfg)
    out = {}
    for split in splits:
        packed = common.prepare_split(cfg, tokenizer, split)
        m = json.loads((common.store_dir(cfg, split) / "manifest.json").read_text())
        out[split] = {k: m[k] for k in ("source", "num_documents", "num_tokens", "num_blocks", "seq_len",
                                        "dtype", "dropped_tail_tokens", "skipped_records", "stream_hash")}
        out[split]["store"] = packed.store
    print(json.dumps(out, indent=2))
    return out
