"""Reliability: crashes, full disks, bad input, two processes, long runs (docs/RELIABILITY.md).

The world of these tests (built once, ~10 s): a tiny random Qwen3-MoE teacher (hidden 32,
2 layers, 4 experts, the embedded tokenizer, a context of 64 tokens), its rank-1
compressed student, and one reference run of ``moedistill train`` on them: both caches,
two stages (4 + 3 steps, checkpoints every 2 steps), on one thread so that reruns are
bit-for-bit comparable. Every bad input is run through the CLI against the reference's
output directory, which must come out untouched (every path, size, mtime and hash).

Kept small for CI (2 shared CPU cores): the whole file takes about two minutes.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from moedistill.cli import main
from moedistill.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
RUN = Path("train") / "topk"  # the run directory inside an output_dir
STEPS = [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1), (7, 1)]  # (global step, stage) of the reference run


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", **extra)
    e["PYTHONPATH"] = str(SRC) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def overrides(w, out, *extra) -> list[str]:
    return [
        f"output_dir={out}", f"teacher.name={w.teacher}", f"student.name={w.student}",
        "data.seq_len=16", "data.max_sequences=16", "data.eval_max_sequences=5",
        "cache.top_k=8", "cache.batch_size=8", "eval.batch_size=4",
        "stages.0.max_steps=4", "stages.1.max_steps=3",
        "training.per_device_train_batch_size=4", "training.logging_steps=1", "training.save_steps=2",
        "training.report_to=[]", "training.warmup_steps=0", "training.learning_rate=1e-2", *extra,
    ]


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with (size, mtime, sha256) for files: any change shows."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file():
            st = p.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[rel] = "dir"
    return out


def error_line(stderr: str) -> str:
    """The one ``error:`` line, which is the last line, and no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in stderr, stderr
    return errors[0]


def refused(capsys, argv, watch: Path) -> str:
    """Run the CLI in this process: exit code 2, one error line, ``watch`` untouched."""
    capsys.readouterr()
    before = snapshot(watch)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    line = error_line(err)
    assert snapshot(watch) == before, f"{argv[0]} changed files under {watch}"
    return line


def weights(out: Path) -> dict:
    return load_file(out / RUN / "final" / "model.safetensors")


def assert_same_weights(out: Path, ref: Path):
    a, b = weights(out), weights(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def train_log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / RUN / "log.jsonl").read_text().splitlines()]


def with_caches(w, out: Path) -> Path:
    """A fresh output dir holding copies of the reference caches (so no teacher runs)."""
    out.mkdir(parents=True)
    shutil.copytree(w.ref / "cache", out / "cache")
    return out


# --------------------------------------------------------------------------- the world


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Like the subprocesses (OMP_NUM_THREADS=1): sums in the same order, bit-equal runs."""
    import transformers

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()
    torch.set_num_threads(n)


def _teacher(vocab: int, seed: int = 0, **kw):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, tie_word_embeddings=True, eos_token_id=0, initializer_range=0.5, **kw,
    )
    return Qwen3MoeForCausalLM(cfg).eval()


def _save(model, path: Path, tokenizer=True) -> Path:
    from moedistill.models import TINY_TEACHER

    model.save_pretrained(path)
    if tokenizer:
        for f in TINY_TEACHER.glob("tokenizer*"):
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from moedistill.compression import compress_model
    from moedistill.models import load_tokenizer

    root = tmp_path_factory.mktemp("world")
    V = len(load_tokenizer("tiny"))
    teacher = _teacher(V)
    w = SimpleNamespace(root=root, vocab=V)
    w.teacher = _save(teacher, root / "teacher")
    w.student = _save(compress_model(teacher, rank=1), root / "student", tokenizer=False)
    w.teacher2 = _save(_teacher(V, seed=1), root / "teacher2")  # another teacher, same shapes
    w.small_student = _save(_teacher(V // 4, seed=2), root / "small-student", tokenizer=False)
    nan = _teacher(V)
    with torch.no_grad():
        nan.model.norm.weight.fill_(float("nan"))
    w.nan_teacher = _save(nan, root / "nan-teacher")
    w.data_dir = root / "data"
    w.data_dir.mkdir()
    (w.data_dir / "train.txt").write_text("In the beginning God created the heaven and the earth.\n")
    (w.data_dir / "empty.txt").write_text("\n\n")
    (w.root / "foreign").mkdir()
    (w.root / "foreign" / "notes.txt").write_text("not a cache")
    w.ref = root / "ref"
    assert main(["train", *overrides(w, w.ref)]) == 0  # the uninterrupted reference run
    return w


# --------------------------------------------------------------------------- crash safety


KILL_IN_SAVE = r"""
import os, signal, sys
from pathlib import Path
import moedistill.integrity as integrity
real = integrity.mark_checkpoint
def mark(ckpt, info=None):  # every file of the checkpoint is written; its completion record is not
    if Path(ckpt).parent.name == "01-wrappers" and Path(ckpt).name == "checkpoint-4":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(ckpt, info)
integrity.mark_checkpoint = mark
from moedistill.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_while_saving_a_checkpoint_then_resume_gives_the_same_weights(world, tmp_path):
    from moedistill.stages import list_checkpoints

    out = with_caches(world, tmp_path / "out")
    r = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, "train", *overrides(world, out)], env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    run = out / RUN
    half = run / "01-wrappers" / "checkpoint-4"
    # all that the Trainer writes is there -- a plain `get_last_checkpoint` would take it -- but not the record
    assert (half / "model.safetensors").is_file() and (half / "trainer_state.json").is_file()
    assert not (half / "checkpoint.json").exists()
    assert [p.relative_to(run).as_posix() for _, p in list_checkpoints(run)] == ["01-wrappers/checkpoint-2"]
    assert main(["train", "--resume", *overrides(world, out)]) == 0
    assert_same_weights(out, world.ref)
    log = [(e["step"], e["stage"]) for e in train_log(out) if "loss" in e]
    assert log == STEPS  # every step once, in the right stage (entries after the checkpoint dropped)


def test_disk_full_while_saving_a_checkpoint_is_never_resumed_from(world, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils as mu

    from moedistill.stages import list_checkpoints

    out = with_caches(world, tmp_path / "out")
    real = mu.safe_save_file

    def half_then_full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if "02-full" in filename and "checkpoint-2" in filename:
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(mu, "safe_save_file", half_then_full)
    assert main(["train", *overrides(world, out)]) == 2
    assert "no space left on the device" in error_line(capsys.readouterr().err)
    monkeypatch.undo()
    run = out / RUN
    half = run / "02-full" / "checkpoint-2"
    assert (half / "model.safetensors").is_file() and not (half / "checkpoint.json").exists()
    assert list_checkpoints(run)[-1][1] == run / "01-wrappers" / "checkpoint-4"
    assert not (run / "final").exists()
    line = refused(capsys, ["train", "--resume", str(half), *overrides(world, out)], out)
    assert f"checkpoint {half} is incomplete" in line
    assert main(["train", "--resume", *overrides(world, out)]) == 0  # the latest complete checkpoint
    assert_same_weights(out, world.ref)


def test_disk_full_while_writing_the_cache_is_never_accepted(world, tmp_path, capsys, monkeypatch):
    from moedistill import files
    from moedistill.cache import open_cache

    out = tmp_path / "out"
    cache = out / "cache" / "topk"
    argv = ["cache", *overrides(world, out)]
    real_fsync, real_json = files.fsync_path, files.atomic_write_json

    def full_at_shard(path):
        if Path(path).name.startswith("shard-"):  # the merged shard is written, not yet renamed into place
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_fsync(path)

    def full_at_complete_manifest(path, obj):
        if obj.get("complete"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_json(path, obj)

    for name, fault in (("fsync_path", full_at_shard), ("atomic_write_json", full_at_complete_manifest)):
        with monkeypatch.context() as m:
            m.setattr(files, name, fault)
            assert main(argv) == 2
        assert "no space left on the device" in error_line(capsys.readouterr().err)
        with pytest.raises(UserError, match="is incomplete"):
            open_cache(cache)
    assert main(argv) == 0  # the same command finishes it
    got, ref = open_cache(cache), open_cache(world.ref / "cache" / "topk")
    assert len(got) == len(ref) == 16
    for i in range(len(ref)):
        for k, v in ref[i].items():
            assert torch.equal(got[i][k], v), (i, k)


@pytest.mark.parametrize("where", ["student-logits", "teacher-targets"])
def test_nan_stops_the_run_naming_step_and_batch(world, tmp_path, where):
    """NaN in the loss (student logits of the batch holding sequence 5) or in the targets of
    sequence 5 (which the loss alone would count as padding): the run stops at that step."""
    from transformers import TrainingArguments

    from moedistill.cache import open_cache
    from moedistill.models import get_model
    from moedistill.trainer import DistillationTrainer, NonFiniteLossError

    BAD = 5

    class Poisoned(torch.utils.data.Dataset):
        def __init__(self, ds):
            self.ds, self.vocab_size = ds, ds.vocab_size

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            item = self.ds[i]
            if i == BAD and where == "teacher-targets":
                item["target_logprobs"] = torch.full_like(item["target_logprobs"], float("nan"))
            return item

    cache = open_cache(world.ref / "cache" / "topk")
    bad_ids = cache[BAD]["input_ids"]
    student, _ = get_model(str(world.student), with_tokenizer=False)
    if where == "student-logits":
        def poison(module, args, kwargs, out):
            if (kwargs["input_ids"] == bad_ids).all(-1).any():
                out.logits = out.logits * float("nan")
            return out

        student.register_forward_hook(poison, with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[],
                             per_device_train_batch_size=2,
                             max_steps=16, save_strategy="steps", save_steps=1, disable_tqdm=True, logging_steps=1)
    trainer = DistillationTrainer(student, args, train_dataset=Poisoned(cache))
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    msg = str(e.value)
    step = trainer.state.global_step + 1
    assert "\n" not in msg
    assert (f"loss is nan at step {step}" if where == "student-logits"
            else f"NaN/+inf log-probabilities at step {step}") in msg
    batch = json.loads(msg.split("batch of training sequences ")[1].split("]")[0] + "]")
    assert BAD in batch and len(batch) == 2
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*"))
    assert saved == list(range(1, step))  # it stopped: nothing saved at or after the bad step


def test_two_processes_that_would_each_train_alone_are_refused(world, tmp_path):
    """torchrun without GPUs and with training.use_cpu=false: transformers would train each
    process on its own, all writing one run dir. Every process stops at once, one line."""
    out = with_caches(world, tmp_path / "out")
    before = snapshot(out)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "moedistill.cli", "train",
           *overrides(world, out, "training.use_cpu=false")]
    r = subprocess.run(cmd, env=env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    # both processes stop at the check; torchrun may kill the second before it prints
    assert 1 <= len(errors) <= 2 and all("launched as 2 processes but transformers set up training for 1" in e and
                                    "set training.use_cpu=true" in e for e in errors), r.stderr[-3000:]
    assert snapshot(out) == before


def test_torchrun_train_from_scratch_compresses_once_and_shards_the_caches(world, tmp_path):
    """No checkpoint-0 and no caches yet: under torchrun process 0 compresses the teacher
    while the other waits, each process writes its shard of both caches, then both train.
    A one-process command under torchrun is refused."""
    out = tmp_path / "out"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    small = ["student.name=null", "compress.rank=1", "compress.calibration_sequences=4", "compress.report_ranks=[]",
             *TWO_PROCESSES]
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "moedistill.cli", "train",
           *overrides(world, out, *small)]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-12000:]
    assert (r.stdout + r.stderr).count("[compress] wrote") == 1
    assert (out / "compressed" / "checkpoint-0" / "model.safetensors").is_file()
    for cache in ("topk", "topk-validation"):
        manifest = json.loads((out / "cache" / cache / "manifest.json").read_text())
        assert manifest["complete"] and len(manifest["shards"]) == 2
    assert [e["step"] for e in train_log(out) if "loss" in e] == [s for s, _ in STEPS]
    before = snapshot(out)
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "moedistill.cli", "compress", *overrides(world, out)]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert r.returncode != 0 and errors and all("`moedistill compress` runs in one process" in e for e in errors)
    assert snapshot(out) == before


_NAN_DRIVER = """
import sys, torch
from transformers import TrainingArguments
from moedistill.cache import open_cache
from moedistill.models import get_model
from moedistill.trainer import DistillationTrainer

cache_path, student_path, out, bad = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cache = open_cache(cache_path)
bad_ids = cache[bad]["input_ids"]
student, _ = get_model(student_path, with_tokenizer=False)

def poison(module, args, kwargs, output):
    if (kwargs["input_ids"] == bad_ids).all(-1).any():
        output.logits = output.logits * float("nan")
    return output

student.register_forward_hook(poison, with_kwargs=True)
args = TrainingArguments(output_dir=out, use_cpu=True, report_to=[], per_device_train_batch_size=2, max_steps=4,
                         save_strategy="steps", save_steps=1, disable_tqdm=True, logging_steps=1)
DistillationTrainer(student, args, train_dataset=cache).train()
"""


def test_nan_on_one_of_two_processes_stops_the_whole_run(world, tmp_path):
    """NaN in the batch of one process only: that process raises naming itself, the step and
    the batch; torchrun stops the other one (no hang in a collective); nothing is marked
    complete at or after the bad step."""
    from moedistill.integrity import is_complete

    driver = tmp_path / "driver.py"
    driver.write_text(_NAN_DRIVER)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "run"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", str(driver), str(world.ref / "cache" / "topk"),
           str(world.student), str(out), "5"]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    line = next(x for x in r.stderr.splitlines() if "NonFiniteLossError:" in x)
    m = re.search(r"loss is nan at step (\d+), batch of training sequences (\[[\d, ]+\]) on process (\d+) ", line)
    assert m, line
    step, batch, proc = int(m[1]), json.loads(m[2]), int(m[3])
    assert 5 in batch and proc in (0, 1) and 1 <= step <= 4
    complete = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if is_complete(p))
    assert complete == list(range(1, step))


# --------------------------------------------------------------------------- bad input


def _cases(w):
    """(id, command, extra overrides, what the error line must say); output_dir is the reference's."""
    return [
        ("alpha", "train", ["loss.alpha=1.5"], "loss.alpha=1.5 is outside [0, 1]"),
        ("temperature", "train", ["loss.temperature=0"], "loss.temperature=0.0 must be > 0"),
        ("top_k<1", "cache", ["cache.top_k=0"], "cache.top_k=0 must be >= 1"),
        ("top_k>vocab", "cache", ["cache.top_k=5000"],
         f"top_k=5000 must be between 1 and the teacher's vocabulary size {w.vocab}"),
        ("regex", "train", ["param_groups.rules=[{pattern: '(['}]"], "is not a valid regex"),
        ("rule-matches-nothing", "train", ["param_groups.rules=[{pattern: no_such_param, lr_multiplier: 1.0}]"],
         "param_groups.rules[0] pattern 'no_such_param' matches no parameter"),
        ("unknown-key", "train", ["+loss.alpah=0.3"], "unknown key 'loss.alpah'"),
        ("missing-file", "cache", ["data.dataset=/nonexistent/corpus.txt"], "does not exist"),
        ("missing-split", "cache", [f"data.dataset={w.data_dir}", "data.split=nope"], "no 'nope' split"),
        ("missing-hub-dataset", "cache", ["data.dataset=nobody/no-such-dataset"],
         "cannot load dataset 'nobody/no-such-dataset'"),
        ("empty-dataset", "cache", [f"data.dataset={w.data_dir / 'empty.txt'}"], "holds no text"),
        ("seq_len>context(cache)", "cache", ["data.seq_len=128"], "data.seq_len=128 is longer than the teacher"),
        ("seq_len>context(train)", "train", ["data.seq_len=128"], "data.seq_len=128 is longer than the student"),
        ("cache-of-another-teacher", "cache", [f"teacher.name={w.teacher2}"],
         f"fingerprints.teacher.name: cache has {w.teacher}, this run has {w.teacher2}"),
        ("cache-of-another-seq_len", "train", ["data.seq_len=8"], "seq_len: cache has 16, this run has 8"),
        ("cache-of-other-data", "cache", ["data.max_sequences=12"], "holds a different teacher cache"),
        ("cache-of-another-tokenizer", "cache", [f"teacher.name={w.root / 'other-tokenizer'}"],
         "fingerprints.tokenizer"),
        ("no-overwrite", "cache", ["cache.top_k=4"], "pass cache.overwrite=true (`moedistill cache --overwrite`)"),
        ("dir-holds-other-files", "cache", [f"cache.dir={w.root / 'foreign'}"],
         "is not empty and holds no teacher cache"),
        ("student-lacks-ids", "train", [f"student.name={w.small_student}"],
         f"has a vocabulary of {w.vocab} ids but the student {w.small_student} only {w.vocab // 4}"),
        # the values that once passed validation and failed after the earlier run was cleared
        ("seed<0", "train", ["seed=-1"], "seed=-1 must be in [0, 2**32)"),
        ("temperature=inf", "train", ["loss.temperature=inf"], "loss.temperature=inf must be > 0 and finite"),
        ("learning_rate=inf", "train", ["training.learning_rate=inf"], "training.learning_rate=inf must be finite"),
        ("max_steps-with-stages", "train", ["+training.max_steps=3"], "training.max_steps does not apply"),
        ("eval.max_sequences<1", "train", ["eval.max_sequences=-1"], "eval.max_sequences=-1 must be >= 1"),
        ("earlier-run", "train", ["overwrite=false"],
         "holds an earlier run (final/ and 4 checkpoint(s)); pass --resume"),
        # eval --cache is checked like train's caches: here the training split's cache, not the eval split's
        ("eval-cache-of-train-split", "eval", ["--cache", str(w.ref / "cache" / "topk"), "--model",
                                               str(w.ref / RUN / "final")], "holds other data (tiny::train)"),
        # a mistyped output_dir: stops before compression and caching (nothing appears under it)
        ("resume-in-empty-dir", "train", ["--resume"], "no checkpoint to resume from in"),
        # launched by `accelerate launch` with an FSDP1 config (the variables it sets): stops
        # before checkpoint-0 and the caches are made
        ("fused-under-fsdp1", "train", ["loss.fused_linear=true"],
         "loss.fused_linear=true is not supported under FSDP1 yet"),
    ]


CASE_IDS = [c[0] for c in _cases(SimpleNamespace(vocab=0, data_dir=Path(), teacher="", teacher2="", root=Path(),
                                                  ref=Path(), small_student=""))]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_is_one_line_exit_2_nothing_touched(world, capsys, monkeypatch, case):
    if case == "fused-under-fsdp1":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.setenv("FSDP_VERSION", "1")
    if case == "cache-of-another-tokenizer" and not (world.root / "other-tokenizer").exists():
        # the teacher's weights, config and name pattern with a tokenizer that has one more token
        from moedistill.models import load_tokenizer

        d = shutil.copytree(world.teacher, world.root / "other-tokenizer")
        tok = load_tokenizer(str(d))
        tok.add_tokens(["<extra-token>"])
        tok.save_pretrained(d)
    _, command, extra, needle = next(c for c in _cases(world) if c[0] == case)
    # every train case but one overwrites the reference run: each check must fire before anything is cleared
    flag = ["--overwrite"] if command == "train" and case not in ("earlier-run", "resume-in-empty-dir") else []
    out = world.root / "typo" if case == "resume-in-empty-dir" else world.ref
    argv = [command, *flag, *overrides(world, out, *extra)]
    if case == "cache-of-another-teacher" or case == "cache-of-another-tokenizer":
        argv.append(f"cache.dir={world.ref / 'cache' / 'topk'}")  # the name alone would pick another directory
    line = refused(capsys, argv, world.root)
    assert needle in line, line


def test_nan_teacher_outputs_name_the_batch_and_leave_no_usable_cache(world, tmp_path, capsys):
    from moedistill.cache import open_cache

    out = tmp_path / "out"
    rc = main(["cache", *overrides(world, out, f"teacher.name={world.nan_teacher}")])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "the teacher produced NaN/inf logits in the batch of sequences 0..7" in line
    with pytest.raises(UserError, match="incomplete"):
        open_cache(out / "cache" / "topk")


def test_truncated_or_corrupted_shard_stops_train_and_inspect(world, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(world.ref, out)
    shard = out / "cache" / "topk" / "shard-00000.h5"
    good = shard.read_bytes()
    shard.write_bytes(good[:-100])
    assert "shard-00000.h5 is truncated" in refused(capsys, ["train", "--overwrite", *overrides(world, out)], out)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    assert "shard-00000.h5 is corrupted" in refused(capsys, ["train", "--overwrite", *overrides(world, out)], out)
    assert "shard-00000.h5 is corrupted" in refused(capsys, ["inspect", str(shard.parent), "--verify"], out)


def test_truncated_corrupted_or_incomplete_checkpoint_is_refused_on_resume(world, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(world.ref, out)
    run = out / RUN
    argv = ["train", *overrides(world, out)]
    cut = run / "02-full" / "checkpoint-2" / "model.safetensors"
    cut.write_bytes(cut.read_bytes()[:-64])
    assert f"checkpoint file {cut} is truncated" in refused(
        capsys, [*argv[:1], "--resume", str(cut.parent), *argv[1:]], out
    )
    opt = run / "01-wrappers" / "checkpoint-4" / "optimizer.pt"
    raw = bytearray(opt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    opt.write_bytes(bytes(raw))
    assert f"checkpoint file {opt} is corrupted" in refused(
        capsys, [*argv[:1], "--resume", str(opt.parent), *argv[1:]], out
    )
    (run / "01-wrappers" / "checkpoint-2" / "checkpoint.json").unlink()
    ckpt = run / "01-wrappers" / "checkpoint-2"
    assert f"checkpoint {ckpt} is incomplete" in refused(capsys, [*argv[:1], "--resume", str(ckpt), *argv[1:]], out)
    last = run / "02-full" / "checkpoint-3" / "scheduler.pt"  # --resume alone: the latest, checked likewise
    last.write_bytes(last.read_bytes() + b"\0")
    assert f"checkpoint file {last} is truncated or altered" in refused(capsys, [*argv[:1], "--resume", *argv[1:]], out)


def test_trainer_refuses_a_cache_with_ids_the_student_lacks(world, tmp_path):
    from transformers import TrainingArguments

    from moedistill.cache import open_cache
    from moedistill.models import get_model
    from moedistill.trainer import DistillationTrainer

    small, _ = get_model(str(world.small_student), with_tokenizer=False)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    with pytest.raises(UserError, match=f"vocabulary of {world.vocab} ids but the student only {world.vocab // 4}"):
        DistillationTrainer(small, args, train_dataset=open_cache(world.ref / "cache" / "topk"))


@pytest.mark.parametrize("case", ["alpha", "missing-file", "truncated-checkpoint"])
def test_bad_input_through_a_real_process(world, tmp_path, case):
    """The same promises from `python -m moedistill.cli`: stderr is exactly one line."""
    out = world.ref
    extra = {"alpha": ["loss.alpha=-0.1"], "missing-file": ["data.dataset=/nonexistent/corpus.txt"]}.get(case, [])
    argv = ["cache" if case == "missing-file" else "train", *overrides(world, out, *extra)]
    if case == "truncated-checkpoint":
        out = tmp_path / "out"
        shutil.copytree(world.ref, out)
        f = out / RUN / "02-full" / "checkpoint-2" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
        argv = ["train", "--resume", str(f.parent), *overrides(world, out)]
    before = snapshot(out)
    r = subprocess.run([sys.executable, "-m", "moedistill.cli", *argv], env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert {"alpha": "loss.alpha=-0.1 is outside [0, 1]", "missing-file": "does not exist",
            "truncated-checkpoint": "is truncated"}[case] in lines[0]
    assert snapshot(out) == before


# --------------------------------------------------------------------------- multi-process and long runs


TWO_PROCESSES = ("training.per_device_train_batch_size=1", "training.gradient_accumulation_steps=2")


def test_torchrun_two_processes_train_like_one(world, tmp_path):
    """2 CPU processes (gloo), each accumulating 2 micro-batches of 1 sequence, against the
    reference (1 process, batches of 4 sequences): the same global batches, so the same loss
    curve and weights up to float summation order. The 2 processes also run the fused lm_head
    (``loss.fused_linear=true``; the reference does not): DDP gets the tied embedding's
    gradient from the loss, and the curve is still the reference's.
    Then the same 2-process run crashed after a checkpoint and resumed under torchrun."""
    out = with_caches(world, tmp_path / "out")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    fused_two = (*TWO_PROCESSES, "loss.fused_linear=true")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "moedistill.cli", "train",
           *overrides(world, out, *fused_two)]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-12000:]
    ref = {e["step"]: e for e in train_log(world.ref) if "loss" in e}
    two = {e["step"]: e for e in train_log(out) if "loss" in e}
    assert [(s, e["stage"]) for s, e in two.items()] == STEPS
    for s, e in ref.items():
        for k in ("loss", "ce_loss", "kl_loss", "grad_norm"):
            assert two[s][k] == pytest.approx(e[k], rel=1e-4), (s, k)
    # 5 validation sequences on 2 processes: each counted once (no repeated sequence to even the batches)
    evals = [[(e["eval_kl_lower_bound"], e["eval_tokens"]) for e in train_log(d) if "eval_kl_lower_bound" in e]
             for d in (world.ref, out)]
    # 15 labels per 16-token sequence
    assert [t for _, t in evals[1]] == [t for _, t in evals[0]] == [5 * 15] * len(evals[0])
    assert [kl for kl, _ in evals[1]] == pytest.approx([kl for kl, _ in evals[0]], rel=1e-5)
    a, b = weights(out), weights(world.ref)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # the checkpoint records both processes' RNG state, and is complete
    files = json.loads((out / RUN / "02-full" / "checkpoint-2" / "checkpoint.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "optimizer.pt"} <= files.keys()
    # a crash after that checkpoint (step 6), then `--resume` under torchrun: the same weights
    # and log as the uninterrupted 2-process run
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    shutil.rmtree(crashed / RUN / "final")
    shutil.rmtree(crashed / RUN / "02-full" / "checkpoint-3")
    with open(crashed / RUN / "log.jsonl", "a") as f:  # what the crashed run logged after its checkpoint
        f.write(json.dumps({"step": 7, "stage": 1, "loss": 99.0}) + "\n")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "moedistill.cli", "train", "--resume",
           *overrides(world, crashed, *fused_two)]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-12000:]
    assert_same_weights(crashed, out)
    assert [e for e in train_log(crashed) if "loss" in e] == [e for e in train_log(out) if "loss" in e]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_stays_flat_over_many_passes_of_the_cache(world, tmp_path):
    """96 steps of 2 sequences = 12 passes over a 16-sequence, one-shard cache, read through the
    real HDF5 reader: resident memory after warm-up does not grow with the steps."""
    from transformers import TrainerCallback, TrainingArguments

    from moedistill.cache import open_cache
    from moedistill.models import get_model
    from moedistill.trainer import DistillationTrainer

    class Rss(TrainerCallback):
        def __init__(self):
            self.rss = []

        def on_step_end(self, args, state, control, **kw):
            self.rss.append(_rss())

    student, _ = get_model(str(world.student), with_tokenizer=False)
    data = open_cache(world.ref / "cache" / "topk")
    assert len(data.manifest["shards"]) == 1
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                             max_steps=96, save_strategy="no", logging_steps=8, disable_tqdm=True, learning_rate=1e-3)
    tap = Rss()
    DistillationTrainer(student, args, train_dataset=data, callbacks=[tap]).train()
    n = len(tap.rss)
    assert n == 96
    growth = max(tap.rss[n // 2 :]) - tap.rss[n // 4]
    assert growth < 16 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB from step {n // 4} to the end"


def test_accelerate_configs_load_and_name_their_backend():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    conf = SRC / "moedistill" / "conf" / "accelerate"
    want = {"ddp.yaml": "multi_gpu", "fsdp.yaml": "use_fsdp", "deepspeed_zero3.yaml": "use_deepspeed"}
    assert {p.name for p in conf.glob("*.yaml")} == set(want)
    for name, flag in want.items():
        text = (conf / name).read_text()
        assert f"accelerate launch --config_file src/moedistill/conf/accelerate/{name}" in text  # documented launch
        args = launch_command_parser().parse_args(["--config_file", str(conf / name), "-m", "moedistill.cli", "train"])
        args, _, _ = _validate_launch_command(args)
        assert getattr(args, flag) and args.module and args.mixed_precision == "bf16", name
    args, _, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(conf / "deepspeed_zero3.yaml"), "x.py"]))
    assert int(args.zero_stage) == 3 and args.zero3_init_flag not in (True, "true")
    args, _, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(conf / "fsdp.yaml"), "x.py"]))
    assert str(args.fsdp_version) == "2" and args.fsdp_state_dict_type == "FULL_STATE_DICT"


def test_a_sweep_compresses_and_caches_once_and_trains_each_point(world, tmp_path):
    """`train -m loss.alpha=0.5,0.9` with no checkpoint-0 and no caches: the teacher is compressed
    once and each cache (training, eval) written once, in the base output_dir; each point trains
    in its own directory from those. Counted from what the processes print."""
    out = tmp_path / "out"
    ov = [o for o in overrides(world, out, "stages.0.max_steps=1", "stages.1.max_steps=1",
                               "compress.rank=1", "training.save_steps=5")
          if not o.startswith("student.name=")]
    r = subprocess.run([sys.executable, "-m", "moedistill.cli", "train", "-m", *ov, "loss.alpha=0.5,0.9"],
                       env=env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-6000:]
    text = r.stdout + r.stderr
    assert text.count("[compress] wrote ") == 1, text[-4000:]  # the second point loads that checkpoint-0
    written = re.findall(r"^teacher cache (\S+): \d+ sequences", r.stderr, re.M)
    reused = re.findall(r"^teacher cache (\S+) is complete", r.stderr, re.M)
    assert sorted(written) == sorted(reused) == [str(out / "cache" / "topk"), str(out / "cache" / "topk-validation")]
    for alpha in ("0.5", "0.9"):
        point = out / "sweep" / next(p.name for p in (out / "sweep").iterdir() if f"loss.alpha={alpha}" in p.name)
        metrics = json.loads((point / RUN / "metrics.json").read_text())
        assert metrics["cache"] == str(out / "cache" / "topk") and metrics["final_eval"]
        assert metrics["student"] == str(out / "compressed" / "checkpoint-0")
        assert not (point / "cache").exists() and not (point / "compressed").exists()
        assert json.loads((point / RUN / "stages.json").read_text())["stages"][1]["alpha"] == float(alpha)


HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENGINES = {  # shipped accelerate config -> (mixed precision on CPU, engine recorded, tolerance vs the fp32 reference)
    "ddp.yaml": ("bf16", "ddp", 3e-2),
    "deepspeed_zero3.yaml": ("no", "deepspeed-zero3", 1e-4),  # DeepSpeed's CPU path has no autocast
    "fsdp.yaml": ("bf16", "fsdp2", 3e-2),
}


@pytest.mark.parametrize("config", list(ENGINES))
def test_accelerate_launch_two_processes_train_like_one_resume_and_export(world, tmp_path, config):
    """`accelerate launch --config_file conf/accelerate/<config>` with 2 CPU processes (gloo;
    DeepSpeed with DS_ACCELERATOR=cpu; FSDP2 through tests/accelerate_fsdp_cpu.py, which makes
    accelerate choose FSDP for CPU processes as it does for GPUs): the wrappers-only stage (everything in front of the
    experts frozen) and the full stage train like the 1-process fp32 reference with the same
    global batches (bf16 autocast within bf16 tolerance); metrics.json names the engine; a crash
    after a mid-stage checkpoint resumed under the same launch ends with the same weights as the
    uninterrupted run; the exported final/ loads in plain transformers and gives its logits."""
    if config.startswith("deepspeed") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed: pip install -e .[deepspeed] (.ci/run does)")
    from transformers import AutoModelForCausalLM

    from moedistill.models import get_model

    precision, engine, tol = ENGINES[config]
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    conf = SRC / "moedistill" / "conf" / "accelerate" / config
    # accelerate turns FSDP on for GPUs only; this launcher makes the same choice for CPU processes
    entry = ([str(Path(__file__).parent / "accelerate_fsdp_cpu.py")] if config == "fsdp.yaml"
             else ["-m", "moedistill.cli"])
    # default.yaml's setting for a large vocabulary, the fused lm_head, under FSDP2
    fused = ["loss.fused_linear=true"] if config == "fsdp.yaml" else []

    def launch(out, *extra):
        cmd = [accelerate, "launch", "--config_file", str(conf), "--num_processes", "2", "--mixed_precision",
               precision, "--main_process_port", str(_free_port()), *entry, "train", *extra,
               *overrides(world, out, *TWO_PROCESSES, f"training.bf16={precision == 'bf16'}", *fused)]
        r = subprocess.run(cmd, env=env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-12000:]

    out = with_caches(world, tmp_path / "out")
    launch(out)
    metrics = json.loads((out / RUN / "metrics.json").read_text())
    assert metrics["engine"] == {"engine": engine, "world_size": 2, "mixed_precision": precision, "dtype": "float32"}
    ref = {e["step"]: e for e in train_log(world.ref) if "loss" in e}
    got = {e["step"]: e for e in train_log(out) if "loss" in e}
    assert [(s, e["stage"]) for s, e in got.items()] == STEPS
    for s, e in ref.items():
        for k in ("loss", "ce_loss", "kl_loss"):
            assert got[s][k] == pytest.approx(e[k], rel=tol), (s, k)
    a, b = weights(out), weights(world.ref)
    if engine == "fsdp2":  # FSDP gathers the tied lm_head as its own tensor, so save_pretrained keeps both names
        assert torch.equal(a.pop("lm_head.weight"), a["model.embed_tokens.weight"])
    assert a.keys() == b.keys()
    for k in b:  # relative to each tensor's norm: a bf16 step moves small entries by more than their size
        assert float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) < tol, k
    # crashed after the stage-2 checkpoint at its step 2 (the engine's own optimizer state is resumed)
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    shutil.rmtree(crashed / RUN / "final")
    shutil.rmtree(crashed / RUN / "02-full" / "checkpoint-3")
    if engine.startswith("deepspeed"):
        assert (crashed / RUN / "02-full" / "checkpoint-2" / "global_step2").is_dir()  # ZeRO's partitioned state
    launch(crashed, "--resume")
    assert_same_weights(crashed, out)
    # export the run's final/ and load it with plain transformers
    plain = tmp_path / "plain"
    r = subprocess.run([sys.executable, "-m", "moedistill.cli", "export", str(out / RUN / "final"), str(plain)],
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    dense = AutoModelForCausalLM.from_pretrained(plain).eval()
    student, _ = get_model(str(out / RUN / "final"), with_tokenizer=False)
    x = torch.arange(16).reshape(1, 16) % world.vocab
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=x).logits, student.eval()(input_ids=x).logits, rtol=1e-4,
                                   atol=1e-4)


def test_fsdp2_two_processes_step_like_one_and_resume_exactly(tmp_path):
    """FSDP2 itself (torch's fully_shard, each decoder layer one unit) on 2 CPU processes (gloo):
    accelerate enables FSDP only on GPUs (on CPU its state is MULTI_CPU, so conf/accelerate/fsdp.yaml
    runs as DDP there: see docs/DISTILLATION.md), so this drives fully_shard directly with the
    compressed student, frozen parameters, the regex parameter groups and the loss:
    two AdamW steps equal one process's on the same global batches, and a sharded checkpoint
    (torch.distributed.checkpoint, model + optimizer) resumes bit-exactly (tests/fsdp2_step.py)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    here = Path(__file__).parent
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(here / "fsdp2_step.py"), str(here),
                        str(tmp_path / "dcp")],
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-6000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["dtensor_params"] == got["params"] > 0  # every parameter sharded
    assert got["losses"] == pytest.approx(got["ref_losses"], rel=1e-6)
    assert got["worst_rel"] < 1e-4 and got["frozen_unchanged"]
    assert got["resume_exact"]  # sharded checkpoint after step 1, fresh sharded student, step 2: bit-identical
