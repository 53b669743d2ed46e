"""Teacher cache: encoding, generation against torch references, reader, errors.

Every check compares with an independent reference: ``torch.topk`` / ``log_softmax`` of the
teacher's own logits, the teacher's softmax for the sampled estimate, plain numpy for the
decode example of docs/CACHE_FORMAT.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from moedistill.cache import encode, generate_cache, inspect_cache, open_cache, to_dense
from moedistill.cache.layout import identity_diff
from moedistill.cache.sparsify import batch_targets
from moedistill.data import prepare
from moedistill.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, N_SEQ, BATCH, K, N_DRAWS = 32, 6, 4, 16, 24


@pytest.fixture(scope="module")
def packed(tiny):
    return prepare(tiny[1], "tiny", seq_len=SEQ_LEN, max_samples=20, max_sequences=N_SEQ)


@pytest.fixture(scope="module")
def teacher_logits(tiny, packed):
    with torch.no_grad():
        return tiny[0](input_ids=torch.from_numpy(packed.blocks).long()).logits.float()


def _make(tiny, packed, path, **kw):
    args = dict(mode="topk", top_k=K, num_samples=N_DRAWS, batch_size=BATCH, teacher_name="tiny", seed=3,
                progress=False)
    args.update(kw)
    return generate_cache(tiny[0], tiny[1], packed, path, **args)


@pytest.fixture(scope="module")
def topk_cache(tiny, packed, tmp_path_factory):
    return _make(tiny, packed, tmp_path_factory.mktemp("topk") / "cache")


@pytest.fixture(scope="module")
def sample_cache(tiny, packed, tmp_path_factory):
    return _make(tiny, packed, tmp_path_factory.mktemp("sample") / "cache", mode="sample")


@pytest.fixture(scope="module")
def counts_cache(tiny, packed, tmp_path_factory):
    return _make(tiny, packed, tmp_path_factory.mktemp("counts") / "cache", mode="sample", sample_logprobs=False)


# --------------------------------------------------------------------------- encoding


def test_steps_are_powers_of_two_and_non_decreasing():
    s = encode.logprob_steps(200)
    assert s[0] == 2.0**-8 and s[-1] == 2.0**-3
    assert (np.diff(s) >= 0).all()
    assert np.all(np.log2(s) == np.round(np.log2(s)))


@pytest.mark.parametrize("width", [1, 5, 64])
def test_logprob_roundtrip_within_tolerance(width):
    rng = np.random.default_rng(width)
    lp = -np.sort(rng.exponential(3.0, size=(50, 7, width)), axis=-1).astype(np.float32)
    lp[0, 0, -1] = -np.inf  # stored as the floor, never NaN
    steps = encode.logprob_steps(width)
    d = encode.encode_logprobs(lp, steps)
    assert d.dtype == np.uint16
    back = encode.decode_logprobs(d, steps)
    finite = np.isfinite(lp)
    assert (np.abs(back - lp)[finite] <= np.broadcast_to(encode.tolerance(steps), lp.shape)[finite] + 1e-6).all()
    assert np.isfinite(back).all() and (np.diff(back, axis=-1) <= 0).all()


# --------------------------------------------------------------------------- top-k mode


def test_topk_equals_torch_topk_and_log_softmax(topk_cache, packed, teacher_logits):
    ds = open_cache(topk_cache)
    assert len(ds) == N_SEQ and ds.k == K and ds.mode == "topk"
    ref_lp = torch.log_softmax(teacher_logits, -1)
    _, ref_ids = torch.topk(teacher_logits, K, dim=-1)
    tol = torch.as_tensor(encode.tolerance(encode.logprob_steps(K)), dtype=torch.float32) + 1e-5
    for i in range(N_SEQ):
        item = ds[i]
        assert item["input_ids"].dtype == torch.int64 and item["target_ids"].dtype == torch.int64
        assert item["target_logprobs"].dtype == torch.float32 and item["target_ids"].shape == (SEQ_LEN, K)
        assert torch.equal(item["input_ids"], torch.from_numpy(packed.blocks[i]).long())
        assert torch.equal(item["labels"][:-1], item["input_ids"][1:]) and item["labels"][-1] == -100
        assert torch.equal(item["target_ids"], ref_ids[i])
        err = (item["target_logprobs"] - ref_lp[i].gather(-1, ref_ids[i])).abs()
        assert (err <= tol).all(), err.max()


def test_manifest_and_inspect_statistics(topk_cache, teacher_logits, capsys):
    summary = inspect_cache(topk_cache, verify=True)
    text = capsys.readouterr().out
    for word in ("topk (k=16)", "bytes/token", "mass", "entropy", "verify", "OK"):
        assert word in text
    lp = torch.log_softmax(teacher_logits.double(), -1)
    entropy = -(lp.exp() * lp).sum(-1).mean().item()
    mass = torch.topk(lp, K, -1).values.exp().sum(-1).mean().item()
    assert summary["mean_entropy"] == pytest.approx(entropy, abs=1e-4)
    assert summary["mean_mass"] == pytest.approx(mass, abs=1e-4)
    m = json.loads((topk_cache / "manifest.json").read_text())
    assert m["complete"] and m["num_sequences"] == N_SEQ and m["seq_len"] == SEQ_LEN and m["vocab_size"] == 4096
    assert [(s["seq_start"], s["seq_end"], s["rows"]) for s in m["shards"]] == [(0, N_SEQ, N_SEQ)]
    assert not (topk_cache / "parts").exists() and not list(topk_cache.glob("*.tmp*"))


def test_docs_decode_example_matches_reader(tiny, topk_cache, sample_cache, counts_cache, tmp_path):
    """The plain h5py + numpy example of docs/CACHE_FORMAT.md decodes what open_cache returns
    (every mode, and a version 1 sample cache)."""
    doc = (ROOT / "docs" / "CACHE_FORMAT.md").read_text()
    code = re.search(r"## Decode in plain h5py.*?```python\n(.*?)```", doc, re.S).group(1)
    for path in (topk_cache, sample_cache, counts_cache, _as_version_1(tiny, sample_cache, tmp_path / "v1")):
        ns = {"path": str(path)}
        exec(compile(code, "CACHE_FORMAT.md", "exec"), ns)  # defines ids, logprobs, counts of row 1 of shard 0
        item = open_cache(path)[1]
        k = item["target_ids"].shape[1]
        np.testing.assert_array_equal(ns["input_ids"], item["input_ids"].numpy())
        np.testing.assert_array_equal(ns["ids"][:, :k], item["target_ids"].numpy())
        np.testing.assert_array_equal(ns["logprobs"][:, :k], item["target_logprobs"].numpy())


def test_to_dense_rebuilds_teacher_distribution(topk_cache):
    item = open_cache(topk_cache)[0]
    dense = to_dense(item["target_ids"], item["target_logprobs"], 4096)
    assert dense.shape == (SEQ_LEN, 4096)
    renorm = torch.softmax(item["target_logprobs"], -1)
    assert torch.allclose(torch.softmax(dense, -1).gather(-1, item["target_ids"]), renorm, atol=1e-6)
    tail = to_dense(item["target_ids"], item["target_logprobs"], 4096, fill="tail")
    assert torch.allclose(tail.exp().sum(-1), torch.ones(SEQ_LEN), atol=1e-4)
    # padding (-1) never overwrites id 0
    pad = to_dense(torch.tensor([[0, -1]]), torch.tensor([[-0.5, float("-inf")]]), 8)
    assert pad[0, 0] == -0.5


# --------------------------------------------------------------------------- sample mode


def test_sample_mode_items(sample_cache, teacher_logits, capsys):
    assert inspect_cache(sample_cache, verify=True)["mean_distinct"] > 1
    assert "sample (N=24 draws" in capsys.readouterr().out
    ds = open_cache(sample_cache)
    assert ds.mode == "sample" and 1 <= ds.k <= N_DRAWS
    ref_lp = torch.log_softmax(teacher_logits, -1)
    for i in range(N_SEQ):
        it = ds[i]
        ids, lp, c = it["target_ids"], it["target_logprobs"], it["target_counts"]
        valid = ids >= 0
        assert torch.equal(valid, c > 0) and torch.equal(valid, torch.isfinite(lp))
        assert (c.sum(-1) == N_DRAWS).all()
        for t in range(SEQ_LEN):
            u = ids[t][valid[t]]
            assert len(set(u.tolist())) == len(u)  # distinct
            # half the coarsest step at width 24
            assert (lp[t][valid[t]] - ref_lp[i, t, u]).abs().max() <= 2.0**-5 + 1e-5
            assert (torch.diff(lp[t][valid[t]]) <= 1e-6).all()  # sorted descending


def test_sampling_is_deterministic_per_sequence(tiny, packed):
    x = torch.from_numpy(packed.blocks[:2]).long()
    a = batch_targets(tiny[0], x, mode="sample", width=N_DRAWS, seed=5, first_index=10)
    b = batch_targets(tiny[0], x, mode="sample", width=N_DRAWS, seed=5, first_index=10)
    c = batch_targets(tiny[0], x, mode="sample", width=N_DRAWS, seed=6, first_index=10)
    assert np.array_equal(a["ids"], b["ids"]) and np.array_equal(a["counts"], b["counts"])
    assert not np.array_equal(a["ids"], c["ids"])


def test_sample_estimate_converges_to_teacher(tiny, packed, teacher_logits):
    """counts / N is an unbiased estimate of the teacher distribution p: its squared error
    has expectation (1 - sum p^2) / N, and the entropy estimate converges."""
    x = torch.from_numpy(packed.blocks[:2]).long()
    p = torch.softmax(teacher_logits[:2].double(), -1)  # [2, L, V]
    entropy = -(p * p.log()).sum(-1)
    for n in (16, 1024):
        r = batch_targets(tiny[0], x, mode="sample", width=n, seed=1)
        ids, counts = torch.from_numpy(r["ids"]), torch.from_numpy(r["counts"]).double()
        est = torch.zeros_like(p).scatter_add_(-1, ids.clamp(min=0), counts / n * (ids >= 0))
        assert torch.allclose(est.sum(-1), torch.ones_like(entropy))
        sq = ((est - p) ** 2).sum(-1).mean().item()
        expected = ((1 - (p**2).sum(-1)) / n).mean().item()
        assert 0.7 < sq / expected < 1.4, (n, sq, expected)
    est_entropy = -(est * p.log()).sum(-1)  # E_p[-log p] from the draws, N = 1024
    assert (est_entropy - entropy).abs().mean() < 0.1


# --------------------------------------------------------------------------- reader


def test_dataloader_workers_return_the_same_items(topk_cache):
    from torch.utils.data import DataLoader

    ds = open_cache(topk_cache)
    ds[0]  # open a handle in the parent before forking: workers must open their own
    a = list(DataLoader(ds, batch_size=2, num_workers=0))
    b = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert len(a) == len(b) == N_SEQ // 2
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_fingerprint_mismatch_names_both_values(topk_cache, packed, tiny):
    ok = {"teacher": "tiny", "tokenizer": tiny[1], "data": packed, "seq_len": SEQ_LEN}
    open_cache(topk_cache, expect=ok)
    for key, wrong in (("teacher", "Qwen/Qwen3-30B-A3B"), ("tokenizer", "ab" * 32), ("data", "cd" * 32),
                       ("seq_len", 4096)):
        with pytest.raises(UserError) as e:
            open_cache(topk_cache, expect={**ok, key: wrong})
        msg = str(e.value)
        assert key in msg and str(wrong) in msg and "\n" not in msg
    with pytest.raises(UserError, match=packed.stream_hash):
        open_cache(topk_cache, expect={"data": "cd" * 32})


def _copy_cache(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupted_or_truncated_shard_names_the_file(topk_cache, tmp_path):
    import h5py

    bad = _copy_cache(topk_cache, tmp_path / "flipped")
    shard = bad / "shard-00000.h5"
    with h5py.File(shard, "r") as f:  # flip one byte inside the compressed chunk of row 2
        info = f["target_deltas"].id.get_chunk_info(2)
    raw = bytearray(shard.read_bytes())
    raw[info.byte_offset + info.size // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"shard-00000\.h5 is corrupted"):
        open_cache(bad)
    # without the whole-file checksum, the per-chunk fletcher32 still catches it on read
    ds = open_cache(bad, verify=False)
    with pytest.raises(UserError, match=r"shard-00000\.h5"):
        for i in range(len(ds)):
            ds[i]
    cut = _copy_cache(topk_cache, tmp_path / "cut")
    shard = cut / "shard-00000.h5"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(UserError, match=r"shard-00000\.h5 is truncated"):
        open_cache(cut, verify=False)


def test_shards_are_checksummed_once_then_by_size_and_mtime_and_inspect_rechecks(topk_cache, tmp_path, monkeypatch):
    """The completed cache records its shards as verified: later opens (any process: the record is
    a file, read here with the process's own memory cleared) hash nothing; without the record the
    first open hashes each shard once and writes it again; a shard changed in place is hashed
    again; `inspect --verify` hashes every shard whatever the record says."""
    import os

    from moedistill.cache import reader

    hashed = []
    real = reader.checksum_matches
    monkeypatch.setattr(reader, "checksum_matches", lambda f, c: hashed.append(Path(f).name) or real(f, c))
    monkeypatch.setattr(reader, "_verified", set())
    d = _copy_cache(topk_cache, tmp_path / "c")  # copytree keeps mtimes: the copied record still holds
    shards = [s["file"] for s in json.loads((d / "manifest.json").read_text())["shards"]]
    record = json.loads((d / "verified.json").read_text())["shards"]
    assert [[r[0], r[1], r[2]] for r in record] == [
        [f, (d / f).stat().st_size, (d / f).stat().st_mtime_ns] for f in shards]
    open_cache(d)
    assert hashed == []
    (d / "verified.json").unlink()
    open_cache(d)
    open_cache(d)  # the same process: remembered
    assert hashed == shards and json.loads((d / "verified.json").read_text())["shards"] == record
    reader._verified.clear()
    open_cache(d)  # another process: the record
    assert hashed == shards
    # one byte flipped in place, size and mtime put back (what bit rot looks like): the record is
    # trusted at open, the full check and the per-chunk fletcher32 catch it
    shard = d / shards[0]
    st = shard.stat()
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    open_cache(d)
    assert hashed == shards
    with pytest.raises(UserError, match=r"shard-00000\.h5 is corrupted"):
        inspect_cache(d, verify=True)
    # written without putting the mtime back: hashed again at open
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"shard-00000\.h5 is corrupted"):
        open_cache(d)


def test_partial_cache_is_never_accepted(topk_cache, tmp_path):
    part = _copy_cache(topk_cache, tmp_path / "partial")
    m = json.loads((part / "manifest.json").read_text())
    m["complete"] = False
    (part / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="incomplete"):
        open_cache(part)
    with pytest.raises(UserError, match="not a teacher cache"):
        open_cache(tmp_path)


# --------------------------------------------------------------------------- generation errors


def test_config_mismatch_refused_unless_overwrite(tiny, packed, topk_cache, tmp_path):
    d = _copy_cache(topk_cache, tmp_path / "c")
    assert _make(tiny, packed, d) == d  # same config: complete, nothing to do
    with pytest.raises(UserError, match=r"top_k: cache has 16, this run has 8.*--overwrite"):
        _make(tiny, packed, d, top_k=8)
    _make(tiny, packed, d, top_k=8, overwrite=True)
    assert open_cache(d).k == 8
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        _make(tiny, packed, tmp_path / "foreign")


@pytest.mark.parametrize("k", [0, 4097])
def test_top_k_outside_vocabulary_is_a_user_error(tiny, packed, tmp_path, k):
    with pytest.raises(UserError, match="top_k"):
        _make(tiny, packed, tmp_path / "c", top_k=k)


class _NaNTeacher(torch.nn.Module):
    """The tiny teacher with NaN logits at one position of sequence 5."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, **kw):
        out = self.inner(input_ids=input_ids, **kw)
        if input_ids.shape[0] == 2:  # the second batch (sequences 4..5)
            out.logits[1, 3, 7] = float("nan")
        return out


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_nan_logits_name_the_batch(tiny, packed, tmp_path, mode):
    with pytest.raises(UserError, match=r"NaN/inf logits in the batch of sequences 4\.\.5"):
        generate_cache(_NaNTeacher(tiny[0]), tiny[1], packed, tmp_path / "c", mode=mode, top_k=K,
                       num_samples=4, batch_size=BATCH, progress=False)
    assert not json.loads((tmp_path / "c" / "manifest.json").read_text())["complete"]


def test_identity_diff_lists_changes():
    a = {"mode": "topk", "fingerprints": {"data": "x"}}
    b = {"mode": "sample", "fingerprints": {"data": "y"}}
    diff = identity_diff(a, b)
    assert ("mode: cache has topk, this run has sample" in diff
            and "fingerprints.data: cache has x, this run has y" in diff)


@pytest.mark.parametrize("edit, needle", [
    ({"k": 3}, "k=3 does not match the stored targets"),  # would silently keep 3 of the stored ids
    ({"k": 10**6}, "k=1000000 does not match the stored targets"),
    ({"width": "64"}, "'width' is \"64\", not a int"),
    ({"shards": None}, "'shards' is null, not a list"),
])
def test_hand_edited_manifest_is_refused_in_one_line(topk_cache, tmp_path, edit, needle):
    import shutil

    d = shutil.copytree(topk_cache, tmp_path / "cache")
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, **edit}))
    for call in (lambda: open_cache(d), lambda: inspect_cache(d)):
        with pytest.raises(UserError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- packed sample layout (version 2)


def _padded_reference(seed: int, n: int, W: int, L: int, lengths_fn):
    """Rank-major [n, W, L] values, zero after each position's length, and the lengths."""
    rng = np.random.default_rng(seed)
    lengths = lengths_fn(rng, (n, L)).astype(np.uint8)
    full = rng.integers(1, 60000, size=(n, W, L)).astype(np.uint32)
    full[np.arange(W)[None, :, None] >= lengths[:, None, :]] = 0
    return full, lengths


@pytest.mark.parametrize("case", ["ragged", "all_full", "all_one"])
def test_pack_unpack_against_padded_representation(case):
    n, W, L = 3, 7, 5
    fn = {"ragged": lambda r, s: r.integers(1, W + 1, size=s),  # 1..W distinct ids
          "all_full": lambda r, s: np.full(s, W),  # k = V (or N): no padding at all
          "all_one": lambda r, s: np.ones(s, np.int64)}[case]  # one distinct id everywhere
    full, lengths = _padded_reference(0, n, W, L, fn)
    packed = encode.pack(full, lengths)
    assert packed.shape == (n, W * L)
    for i in range(n):  # reference: rank-major walk over the valid entries, then zeros
        ref = [full[i, j, t] for j in range(W) for t in range(L) if j < lengths[i, t]]
        np.testing.assert_array_equal(packed[i, : len(ref)], ref)
        assert not packed[i, len(ref):].any()
    np.testing.assert_array_equal(encode.unpack(packed, lengths, W), full)
    k = int(lengths.max())  # the reader's width: only the ranks some position uses
    np.testing.assert_array_equal(encode.unpack(packed, lengths, k), full[:, :k])


def _as_version_1(tiny, cache: Path, out: Path) -> Path:
    """A copy of the sample ``cache`` in format version 1 (padded [rows, W, L] targets), written
    from the teacher's own sparse targets (``batch_targets``) with plain h5py, not from the packed shard."""
    import shutil

    import h5py

    from moedistill import files

    shutil.copytree(cache, out)
    (out / "verified.json").unlink(missing_ok=True)
    m = json.loads((out / "manifest.json").read_text())
    shard = out / m["shards"][0]["file"]
    with h5py.File(shard, "r") as f:
        attrs = {k: v for k, v in f.attrs.items() if k not in ("packed", "sample_logprobs")}
        input_ids = f["input_ids"][...]
    teacher = tiny[0]
    r = batch_targets(teacher, torch.from_numpy(input_ids.astype(np.int64)), mode="sample", width=m["width"],
                      seed=m["seed"])
    arrays = encode.encode_targets(r["ids"], r["logprobs"], encode.logprob_steps(m["width"]), r["counts"],
                                   m["num_samples"])
    shard.unlink()
    with h5py.File(shard, "w") as f:
        f.create_dataset("input_ids", data=input_ids, chunks=(1, input_ids.shape[1]),
                         **encode.compression_kwargs("input_ids"))
        for name, a in arrays.items():
            a = np.swapaxes(a, 1, 2)
            f.create_dataset(name, data=a, chunks=(1, *a.shape[1:]), **encode.compression_kwargs(name))
        f.attrs.update(dict(attrs, format_version=1))
    m["format_version"] = 1
    del m["sample_logprobs"], m["encoding"]["packed"]
    m["shards"][0].update(bytes=shard.stat().st_size, checksum=files.file_checksum(shard))
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def test_packed_sample_cache_reads_as_the_version_1_layout(tiny, packed, sample_cache, tmp_path, capsys):
    """Version 2's packed sample shard gives exactly the items of a version 1 (padded) cache of the
    same draws, which this moedistill still reads -- and reuses when only the version differs."""
    import h5py

    with h5py.File(sample_cache / "shard-00000.h5", "r") as f:
        W = int(f.attrs["width"])
        assert f.attrs["packed"] and f["target_ids"].shape == (N_SEQ, W * SEQ_LEN)
        assert f["target_lengths"].shape == (N_SEQ, SEQ_LEN) and f["target_lengths"][...].min() >= 1
    v1 = _as_version_1(tiny, sample_cache, tmp_path / "v1")
    new, old = open_cache(sample_cache), open_cache(v1)
    assert old.k == new.k
    for i in range(N_SEQ):
        a, b = new[i], old[i]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    inspect_cache(v1, verify=True)
    assert "complete (format 1)" in capsys.readouterr().out
    _make(tiny, packed, v1, mode="sample")  # the same configuration: used as it is, nothing rewritten
    assert "is complete; nothing to do" in capsys.readouterr().err
    assert json.loads((v1 / "manifest.json").read_text())["format_version"] == 1


def test_counts_only_cache_holds_the_same_draws(tiny, packed, sample_cache, counts_cache, tmp_path):
    import h5py

    with h5py.File(counts_cache / "shard-00000.h5", "r") as f:
        assert "target_deltas" not in f and not f.attrs["sample_logprobs"]
    assert json.loads((counts_cache / "manifest.json").read_text())["sample_logprobs"] is False
    full, co = open_cache(sample_cache), open_cache(counts_cache)
    for i in range(N_SEQ):
        a, b = full[i], co[i]
        assert torch.equal(a["input_ids"], b["input_ids"])
        # the same (id, count) pairs at every position, ordered by count
        da = torch.zeros(SEQ_LEN, 4097).scatter_(-1, a["target_ids"].clamp(min=-1) % 4097, a["target_counts"])
        db = torch.zeros(SEQ_LEN, 4097).scatter_(-1, b["target_ids"].clamp(min=-1) % 4097, b["target_counts"])
        assert torch.equal(da[:, :4096], db[:, :4096])
        assert (torch.diff(b["target_counts"], dim=-1) <= 0).all()
        valid = b["target_ids"] >= 0
        ref = torch.log(b["target_counts"].double() / N_DRAWS).float()
        assert torch.equal(b["target_logprobs"][valid], ref[valid])
        assert torch.isneginf(b["target_logprobs"][~valid]).all()
    with pytest.raises(UserError, match="sample_logprobs: cache has false, this run has true"):
        _make(tiny, packed, counts_cache, mode="sample")  # a config that wants log-probs is not served


def test_counts_only_loss_at_t1_has_the_same_gradient(sample_cache, counts_cache):
    """At T = 1 the sample estimate weighs draws by count alone: the gradient is the one from the
    cache with log-probs; the value differs by sum_S (c/N)(lp - log(c/N)) per counted position."""
    from moedistill.losses import distillation_loss

    full, co = open_cache(sample_cache), open_cache(counts_cache)
    a = {k: torch.stack([full[i][k] for i in range(2)]) for k in full[0]}
    b = {k: torch.stack([co[i][k] for i in range(2)]) for k in co[0]}
    logits = torch.randn(2, SEQ_LEN, 4096, generator=torch.Generator().manual_seed(0))
    outs, grads = [], []
    for d in (a, b):
        x = logits.clone().requires_grad_(True)
        out = distillation_loss(x, d["labels"], d["target_ids"], d["target_logprobs"], alpha=0.7, temperature=1.0,
                                tail="sample", target_counts=d["target_counts"])
        out.total.backward()
        outs.append(out)
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-7)
    torch.testing.assert_close(outs[0].ce, outs[1].ce, rtol=0, atol=0)
    valid, w = a["target_counts"] > 0, a["target_counts"].double() / N_DRAWS
    gap = torch.where(valid, w * (a["target_logprobs"].double() - torch.log(w)), 0.0).sum(-1)
    expected = gap[a["labels"] != -100].mean()
    torch.testing.assert_close(outs[0].kl.double() - outs[1].kl.double(), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("overrides, needle", [
    (["loss.temperature=2.0", "loss.tail=sample"], "stages[0].temperature=2.0"),  # tiny.yaml has stages
    (["loss.temperature=1.0", "loss.tail=tail"], "stages[0].tail=tail"),
    (["loss.temperature=1.0", "loss.tail=sample", "loss.divergence=jsd"], "loss.divergence=jsd"),
    (["loss.temperature=1.0", "loss.tail=sample"], None),
])
def test_counts_only_cache_refused_where_the_loss_needs_logprobs(overrides, needle):
    from moedistill.config import check_counts_only, load_config

    cfg = load_config("tiny", ["cache.mode=sample", "cache.sample_logprobs=false", *overrides])
    if needle is None:
        check_counts_only(cfg, "c")
        check_counts_only(load_config("tiny", ["loss.temperature=2.0"]), "c", {"alpha": 0.0})  # CE only
        return
    with pytest.raises(UserError) as e:
        check_counts_only(cfg, "c")
    msg = str(e.value)
    assert needle in msg and "cache.sample_logprobs=true" in msg and "\n" not in msg
