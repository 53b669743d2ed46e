"""Loading, packing and fingerprints, checked against hand-built expectations."""

import json

import numpy as np
import pytest

from moedistill.data import load_texts, pack, prepare, shifted_labels, stream_hash, tokenizer_hash
from moedistill.errors import UserError


def test_pack_crosses_block_boundaries_with_eos_between_documents():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    blocks = pack(docs, seq_len=4, eos_id=0)
    # stream: 1 2 3 0 | 4 5 0 6 | 7 8 9 0 -> three full blocks, nothing dropped
    np.testing.assert_array_equal(blocks, [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]])
    assert blocks.dtype == np.int32


def test_pack_drops_incomplete_tail_only():
    blocks = pack([[1, 2, 3, 4, 5]], seq_len=4, eos_id=0)  # stream 1 2 3 4 5 0
    np.testing.assert_array_equal(blocks, [[1, 2, 3, 4]])


def test_shifted_labels_line_up_with_next_token():
    x = np.array([[5, 6, 7, 8]])
    np.testing.assert_array_equal(shifted_labels(x), [[6, 7, 8, -100]])
    import torch

    t = torch.tensor([[5, 6, 7]])
    assert shifted_labels(t).tolist() == [[6, 7, -100]]


def test_txt_documents_split_on_blank_lines(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text("first doc\nsecond line\n\n\nsecond doc\n\nthird\n")
    assert load_texts(str(p)) == ["first doc\nsecond line", "second doc", "third"]


def test_jsonl_and_parquet_and_directory_splits(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "alpha beta"}, {"text": "gamma"}, {"text": ""}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.table({"content": ["one", "two", "three"]}), tmp_path / "validation.parquet")
    with pytest.raises(UserError, match="train.jsonl:3: the 'text' field is an empty document"):
        load_texts(str(tmp_path), split="train")
    assert load_texts(str(tmp_path), split="train", bad_records="skip") == ["alpha beta", "gamma"]
    assert load_texts(str(tmp_path), split="validation", text_field="content", max_samples=2) == ["one", "two"]
    with pytest.raises(UserError, match="no 'test' split"):
        load_texts(str(tmp_path), split="test")
    with pytest.raises(UserError, match="no column 'text'"):
        load_texts(str(tmp_path / "validation.parquet"))


def test_missing_and_empty_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_texts(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="holds no text"):
        load_texts(str(tmp_path / "empty.txt"))


def test_prepare_is_deterministic_and_fingerprints_track_text_and_tokenizer(tmp_path, tiny_tokenizer):
    p = tmp_path / "a.txt"
    p.write_text("In the beginning God created the heaven and the earth.\n\nAnd the earth was without form.\n")
    a = prepare(tiny_tokenizer, str(p), seq_len=8)
    b = prepare(tiny_tokenizer, str(p), seq_len=8)
    np.testing.assert_array_equal(a.blocks, b.blocks)
    assert a.fingerprint == b.fingerprint
    # the packed stream is exactly tokenize(doc1)+eos+tokenize(doc2)+eos, cut into blocks
    eos = tiny_tokenizer.eos_token_id
    ids = [tiny_tokenizer(d, add_special_tokens=False)["input_ids"] for d in load_texts(str(p))]
    stream = ids[0] + [eos] + ids[1] + [eos]
    np.testing.assert_array_equal(a.blocks.reshape(-1), stream[: a.blocks.size])

    p.write_text("In the end God created the heaven and the earth.\n\nAnd the earth was without form.\n")
    c = prepare(tiny_tokenizer, str(p), seq_len=8)
    assert c.stream_hash != a.stream_hash

    # a different tokenizer (one extra token) changes the tokenizer hash
    import copy

    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["<extra>"])
    assert tokenizer_hash(other) != tokenizer_hash(tiny_tokenizer)
    assert stream_hash(a.blocks) != stream_hash(a.blocks[:1])


def test_seq_len_too_long_for_data_is_user_error(tmp_path, tiny_tokenizer):
    p = tmp_path / "short.txt"
    p.write_text("tiny\n")
    with pytest.raises(UserError, match="no full block"):
        prepare(tiny_tokenizer, str(p), seq_len=512)


def test_embedded_corpus_loads_both_splits():
    train = load_texts("tiny", split="train")
    val = load_texts("tiny", split="validation")
    assert len(train) > 1000 and len(val) >= 50
    assert not set(val) & set(train)


def test_max_sequences_equals_truncating_the_full_packing(tiny_tokenizer):
    full = prepare(tiny_tokenizer, "tiny", split="validation", seq_len=64)
    part = prepare(tiny_tokenizer, "tiny", split="validation", seq_len=64, max_sequences=10)
    np.testing.assert_array_equal(part.blocks, full.blocks[:10])
    assert part.stream_hash == stream_hash(full.blocks[:10])


def test_bad_records_are_one_line_errors_or_counted_skips(tmp_path):
    from moedistill.sources import resolve_split

    (tmp_path / "null.jsonl").write_text('{"text": "in the beginning"}\n{"text": null}\n{"text": "and the earth"}\n')
    cases = {
        "null.jsonl": (None, "null.jsonl:2: the 'text' field is null", "null text"),
        "list.jsonl": (b'{"text": "a"}\n["a"]\n', "list.jsonl:2 is a JSON list, not an object", "non-object JSON"),
        "number.jsonl": (b'{"text": "a"}\n{"text": 7}\n', "number.jsonl:2: the 'text' field holds int",
                         "non-string text"),
        "empty.jsonl": (b'{"text": "a"}\n{"text": "  "}\n', "empty.jsonl:2: the 'text' field is an empty document",
                        "empty document"),
        "broken.jsonl": (b'{"text": "a"}\n{"text": \n', "broken.jsonl:2 is not valid JSON", "invalid JSON"),
        "latin1.txt": (b"first\n\ncaf\xe9\n", "latin1.txt:3 is not UTF-8 text", "non-UTF-8 line"),
    }
    for name, (raw, needle, kind) in cases.items():
        if raw is not None:
            (tmp_path / name).write_bytes(raw)
        with pytest.raises(UserError) as e:
            load_texts(str(tmp_path / name))
        assert needle in str(e.value) and "data.bad_records=skip" in str(e.value) and "\n" not in str(e.value)
        src = resolve_split(str(tmp_path / name), "train", bad_records="skip")
        docs = list(src.documents())
        assert "None" not in docs and docs[0] in ("a", "in the beginning", "first")
        assert dict(src.skipped) == {kind: 1}
