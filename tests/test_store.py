"""The token store and its sources, against independent references.

References: ``data.pack(data.tokenize(load_texts(...)))`` (the in-memory packing every earlier
cache was made with) and ``fingerprints.stream_hash``; sources against the documents as written.
Faults are real: a build is killed with SIGKILL in a subprocess and resumed; two torchrun
processes share one build.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moedistill.data import from_store, load_texts, pack, tokenize
from moedistill.errors import UserError
from moedistill.fingerprints import stream_hash, tokenizer_hash
from moedistill.sources import held_out, resolve_split
from moedistill.store import blocks_hash, ensure_store, open_store

ROOT = Path(__file__).resolve().parents[1]


def _reference(tok, docs, seq_len):
    return pack(tokenize(docs, tok), seq_len, tok.eos_token_id)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _builds(caplog) -> int:
    return sum(r.getMessage().startswith(("tokenising", "resuming")) for r in caplog.records)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_store_blocks_equal_the_in_memory_packing_of_the_embedded_corpus(tmp_path, tiny_tokenizer, split):
    ref = _reference(tiny_tokenizer, load_texts("tiny", split=split), 128)
    store = ensure_store(tmp_path / split, resolve_split("tiny", split), tiny_tokenizer, seq_len=128, workers=0)
    assert store.blocks.dtype == np.uint16  # vocabulary 4,096
    np.testing.assert_array_equal(store.blocks, ref)  # same tokens, EOS places and dropped tail
    assert store.manifest["dropped_tail_tokens"] == store.manifest["num_tokens"] - ref.size < 128
    packed = from_store(store, tokenizer_hash(tiny_tokenizer))
    assert packed.stream_hash == stream_hash(ref)  # what existing caches recorded
    assert from_store(store, "", 100).stream_hash == stream_hash(ref[:100]) == blocks_hash(store.tokens, 100, 128)


def test_worker_processes_build_the_same_store(tmp_path, tiny_tokenizer):
    one = ensure_store(tmp_path / "a", resolve_split("tiny", "validation"), tiny_tokenizer, seq_len=64, workers=0)
    two = ensure_store(tmp_path / "b", resolve_split("tiny", "validation"), tiny_tokenizer, seq_len=64, workers=2)
    assert (tmp_path / "a" / "tokens.bin").read_bytes() == (tmp_path / "b" / "tokens.bin").read_bytes()
    assert one.manifest["stream_hash"] == two.manifest["stream_hash"]
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "index.npy"), np.arange(two.num_blocks) * 64)


def test_store_is_reused_and_rebuilt_only_when_its_inputs_change(tmp_path, tiny_tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="moedistill.store")
    f = tmp_path / "corpus.txt"
    f.write_text("In the beginning God created the heaven and the earth.\n\nAnd the earth was without form.\n")
    out = tmp_path / "store" / "train"
    first = ensure_store(out, resolve_split(str(f), "train"), tiny_tokenizer, seq_len=4)
    again = ensure_store(out, resolve_split(str(f), "train"), tiny_tokenizer, seq_len=4)
    assert _builds(caplog) == 1 and again.manifest == first.manifest
    ensure_store(out, resolve_split(str(f), "train"), tiny_tokenizer, seq_len=8)  # another seq_len
    assert _builds(caplog) == 2
    f.write_text("In the end.\n")  # an edited file
    edited = ensure_store(out, resolve_split(str(f), "train"), tiny_tokenizer, seq_len=4)
    assert _builds(caplog) == 3
    np.testing.assert_array_equal(edited.blocks, _reference(tiny_tokenizer, ["In the end."], 4))


def test_commands_map_one_store_per_split_and_tokenise_it_once(tmp_path, tiny_tokenizer, caplog):
    from moedistill.commands import common
    from moedistill.config import load_config

    caplog.set_level(logging.INFO, logger="moedistill.store")
    cfg = load_config("tiny", [f"output_dir={tmp_path}"])
    assert common.open_split(cfg, tiny_tokenizer, "validation") is None and not (tmp_path / "data").exists()
    first = common.prepare_split(cfg, tiny_tokenizer, "validation", max_sequences=10)  # e.g. compress's report
    again = common.prepare_split(cfg, tiny_tokenizer, "validation")  # e.g. eval, later
    assert _builds(caplog) == 1 and isinstance(again.blocks, np.memmap)  # mapped, not read into memory
    np.testing.assert_array_equal(first.blocks, again.blocks[:10])
    assert common.open_split(cfg, tiny_tokenizer, "validation", 10).stream_hash == first.stream_hash


def test_kill_9_during_prepare_resumes_to_the_same_store(tmp_path, tiny_tokenizer, caplog):
    docs = load_texts("tiny", split="train")
    corpus = tmp_path / "big.txt"
    corpus.write_text("\n\n".join(docs) + "\n")  # 4 MB in batches of 20,000 characters
    out = tmp_path / "store" / "train"
    child = (
        "import sys, moedistill.store as s\n"
        "from moedistill.models import load_tokenizer\n"
        "from moedistill.sources import resolve_split\n"
        "s.BATCH_CHARS, s.SAVE_EVERY_S = 20000, 0.0\n"  # many small batches, progress saved after each
        f"s.ensure_store({str(out)!r}, resolve_split({str(corpus)!r}, 'train'), load_tokenizer('tiny', False),"
        " seq_len=128, workers=0, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child], env=_env(), stderr=subprocess.PIPE)
    progress = out.with_name("train.partial") / "progress.json"
    while proc.poll() is None:
        try:
            if json.loads(progress.read_text())["documents"] > 0:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, f"the build ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert open_store(out) is None  # a killed build is never taken for a store
    caplog.set_level(logging.INFO, logger="moedistill.store")
    store = ensure_store(out, resolve_split(str(corpus), "train"), tiny_tokenizer, seq_len=128, workers=0)
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming")]
    assert len(resumed) == 1 and "from document" in resumed[0]
    ref = _reference(tiny_tokenizer, docs, 128)
    np.testing.assert_array_equal(store.blocks, ref)
    assert store.manifest["stream_hash"] == stream_hash(ref) and store.manifest["num_documents"] == len(docs)


def test_two_torchrun_processes_tokenise_once(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "out"
    script = tmp_path / "prepare.py"  # `moedistill prepare`, with every rank's INFO lines shown
    script.write_text("import logging, sys\nfrom moedistill.cli import main\n"
                      "logging.basicConfig(level=logging.INFO)\nsys.exit(main(sys.argv[1:]))\n")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", str(script), "prepare", "--split", "validation",
           f"output_dir={out}"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("tokenising") == 1, r.stderr[-3000:]  # one build; the other rank mapped its files
    assert r.stdout.count('"num_blocks": 366') == 2  # both processes see the whole store


# --------------------------------------------------------------------------- sources and split rules


def test_every_source_kind_streams_the_documents_as_written(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["alpha beta", "gamma\ndelta", "epsilon"]
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
    for name in ("a.txt", "b.jsonl", "c.parquet"):
        assert list(resolve_split(str(tmp_path / name), "train").documents()) == docs
    assert list(resolve_split(str(tmp_path / "*.*"), "train").documents()) == docs * 3  # a glob: sorted files
    d = tmp_path / "dir"
    d.mkdir()
    (d / "train.txt").write_text("t1\n\nt2\n")
    (d / "validation.jsonl").write_text('{"text": "v1"}\n')
    assert list(resolve_split(str(d), "validation").documents()) == ["v1"]
    # save_to_disk: a DatasetDict by split (its metadata files are not splits), a single Dataset as train
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs}),
                               "test": datasets.Dataset.from_dict({"text": ["held"]})})
    dd.save_to_disk(str(tmp_path / "saved"))
    assert list(resolve_split(str(tmp_path / "saved"), "test").documents()) == ["held"]
    with pytest.raises(UserError, match=r"has no 'validation' split \(its splits: train, test\)"):
        resolve_split(str(tmp_path / "saved"), "validation")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "one"))
    assert list(resolve_split(str(tmp_path / "one"), "train").documents()) == docs
    # a hub name is streamed (load_dataset stands in for the network here)
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert list(resolve_split("someone/corpus", "train", dataset_config="v1").documents()) == docs
    assert calls == [("someone/corpus", "v1", "train", True)]


def test_parquet_and_saved_bad_rows_name_the_row(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["ok", None, "fine"]}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match=r"n.parquet row 1: the 'text' field is null"):
        list(resolve_split(str(tmp_path / "n.parquet"), "train").documents())
    datasets.Dataset.from_dict({"text": ["ok", ""]}).save_to_disk(str(tmp_path / "s"))
    src = resolve_split(str(tmp_path / "s"), "train", bad_records="skip")
    assert list(src.documents()) == ["ok"] and dict(src.skipped) == {"empty document": 1}


def test_split_rules_are_explicit(tmp_path):
    (tmp_path / "all.txt").write_text("\n\n".join(f"document number {i}" for i in range(400)) + "\n")
    (tmp_path / "val.txt").write_text("the held-out one\n")
    for spec in (str(tmp_path / "all.txt"), str(tmp_path / "a*.txt")):
        with pytest.raises(UserError) as e:
            resolve_split(spec, "validation")
        msg = str(e.value)
        assert "'train' split only" in msg and "data.splits=" in msg and "data.eval_fraction=" in msg
        assert "\n" not in msg
    named = resolve_split("ignored", "validation", splits={"train": str(tmp_path / "all.txt"),
                                                            "validation": str(tmp_path / "val.txt")})
    assert list(named.documents()) == ["the held-out one"]
    with pytest.raises(UserError, match="data.splits names no 'test' split"):
        resolve_split("ignored", "test", splits={"train": str(tmp_path / "all.txt")})
    # a held-out fraction: disjoint, together all documents, decided by each document's hash
    rules = dict(train_split="train", eval_split="validation", eval_fraction=0.1)
    train = list(resolve_split(str(tmp_path / "all.txt"), "train", **rules).documents())
    val = list(resolve_split(str(tmp_path / "all.txt"), "validation", **rules).documents())
    every = [f"document number {i}" for i in range(400)]
    assert sorted(train + val) == sorted(every) and not set(train) & set(val)
    assert val == [d for d in every if held_out(d, 0.1)] and 10 < len(val) < 80


def test_prepare_command_bad_data_is_one_line_and_leaves_no_store(tmp_path, capsys):
    from moedistill.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": null}\n')
    out = tmp_path / "out"
    assert main(["prepare", "--split", "train", f"data.dataset={bad}", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "bad.jsonl:2" in err[-1] and "data.bad_records=skip" in err[-1]
    assert not (out / "data").exists() or not any((out / "data").iterdir())  # nothing half-written
    assert main(["prepare", f"data.dataset={bad}", f"output_dir={out}"]) == 2  # the eval split of one file
    assert "data.eval_fraction" in capsys.readouterr().err
    assert main(["prepare", "--split", "train", f"data.dataset={bad}", f"output_dir={out}",
                 "data.bad_records=skip", "data.seq_len=2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["skipped_records"] == {"null text": 1} and summary["train"]["num_documents"] == 1


@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 20])
def test_txt_documents_are_those_of_splitlines_over_the_whole_file(tmp_path, monkeypatch, chunk):
    """Reading in pieces gives the documents of the whole-file reading that earlier caches were made from."""
    import moedistill.sources as sources

    def whole_file(text):
        docs, cur = [], []
        for line in text.splitlines():
            if line.strip():
                cur.append(line)
            elif cur:
                docs.append("\n".join(cur))
                cur = []
        return docs + (["\n".join(cur)] if cur else [])

    monkeypatch.setattr(sources, "_CHUNK_BYTES", chunk)
    cases = ["a\nb\n\nc\n", "a\r\nb\r\n\r\nc", "a\x0cb\n\n\nc\u2028d\n\n", "x\r\ry\n\rz", "é\nü\n\nß" * 20]
    for i, text in enumerate(cases):
        p = tmp_path / f"{i}.txt"
        p.write_bytes(text.encode())
        assert list(resolve_split(str(p), "train").documents()) == whole_file(text), text
