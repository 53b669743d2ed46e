"""DistillationTrainer and stages on tiny random Qwen3-MoE models (CPU, seconds).

Targets are computed from a tiny random teacher directly (an in-memory dataset with the
cache's item contract), so these tests do not depend on the cache or compression code.
"""

import json
import shutil

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, TrainerCallback, TrainingArguments

from moedistill.config import Config, LossConfig, ParamGroupRule, ParamGroupsConfig, StageConfig
from moedistill.data import shifted_labels
from moedistill.errors import UserError
from moedistill.stages import plan_stages, run_stages
from moedistill.trainer import DistillationTrainer, collate

VOCAB = 64


def tiny_moe(seed: int, **overrides) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=32, **({"tie_word_embeddings": True} | overrides),
    )
    return Qwen3MoeForCausalLM(cfg).eval()


class Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_items(teacher, n=8, seq_len=12, k=8, seed=1, targets=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq_len), generator=g)
    labels = shifted_labels(ids)
    labels[0, : seq_len // 2] = -100  # uneven masks: micro-batches hold different target counts
    labels[3, 2:5] = -100
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
    top = logprobs.topk(k, -1)
    items = []
    for i in range(n):
        item = {"input_ids": ids[i], "labels": labels[i]}
        if targets:
            item |= {"target_ids": top.indices[i], "target_logprobs": top.values[i]}
        items.append(item)
    return Items(items)


@pytest.fixture(scope="module")
def teacher():
    return tiny_moe(0)


@pytest.fixture(scope="module")
def data(teacher):
    return make_items(teacher)


def targs(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], per_device_train_batch_size=4,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, max_grad_norm=0.0,
    )
    return TrainingArguments(**(base | kw))


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- trainer pieces


def test_collate_stacks_and_pads_sampled_targets():
    a = {"input_ids": torch.arange(3), "target_ids": torch.tensor([[1, 2], [3, -1], [4, 5]]),
         "target_logprobs": torch.zeros(3, 2), "target_counts": torch.ones(3, 2), "note": "x"}
    b = {"input_ids": torch.arange(3), "target_ids": torch.tensor([[1, 2, 3]] * 3),
         "target_logprobs": torch.zeros(3, 3), "target_counts": torch.ones(3, 3), "note": "y"}
    batch = collate([a, b])
    assert "note" not in batch and batch["input_ids"].shape == (2, 3)
    assert batch["target_ids"].shape == (2, 3, 3) and (batch["target_ids"][0, :, 2] == -1).all()
    assert torch.isneginf(batch["target_logprobs"][0, :, 2]).all()
    assert (batch["target_counts"][0, :, 2] == 0).all()


def test_num_items_counts_every_shifted_label(tmp_path, data):
    trainer = DistillationTrainer(tiny_moe(1), targs(tmp_path), train_dataset=data)
    assert trainer.args.remove_unused_columns is False
    batches = [collate([data[i] for i in range(4)]), collate([data[i] for i in range(4, 8)])]
    got, n = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    expected = sum(int(b["labels"].ne(-100).sum()) for b in batches)  # position 0 included
    assert len(got) == 2 and int(n) == expected


class GradTap(TrainerCallback):
    """Records every parameter's gradient just before the optimizer step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def test_gradient_accumulation_equals_one_big_batch(tmp_path, data):
    taps, losses = [], []
    for bs, ga in ((8, 1), (4, 2)):  # 2 micro-batches of 4 with uneven masks vs one batch of 8
        tap = GradTap()
        trainer = DistillationTrainer(
            tiny_moe(1), targs(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1),
            train_dataset=data, callbacks=[tap], loss=LossConfig(alpha=0.5, temperature=2.0),
        )
        trainer.train()
        taps.append(tap.grads[0])
        losses.append([trainer.state.log_history[0][k] for k in ("loss", "ce_loss", "kl_loss")])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert taps[1].keys() == taps[0].keys()
    for name in taps[0]:
        torch.testing.assert_close(taps[1][name], taps[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_training_freezes_scales_lr_and_logs_parts(tmp_path, data):
    student = tiny_moe(1)
    before = params(student)
    rules = ParamGroupsConfig(
        default_lr_multiplier=1.0,
        rules=[ParamGroupRule(r"embed_tokens", 0.0), ParamGroupRule(r"norm", 0.5), ParamGroupRule(r"experts", 2.0)],
    )
    loss = LossConfig(alpha=0.3, temperature=2.0)
    trainer = DistillationTrainer(
        student, targs(tmp_path, max_steps=3, warmup_steps=0, weight_decay=0.1), train_dataset=data,
        eval_dataset=data, loss=loss, param_groups=rules,
    )
    trainer.train()
    after = params(student)
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # frozen: bit-identical
    assert not torch.equal(after["model.layers.0.mlp.experts.gate_up_proj"],
                           before["model.layers.0.mlp.experts.gate_up_proj"])
    groups = trainer.optimizer.param_groups
    in_opt = {id(p) for g in groups for p in g["params"]}
    assert id(student.model.embed_tokens.weight) not in in_opt
    assert {g["name"] for g in groups} == {"norm (1-D, no decay)", "experts", "(default)"}  # Qwen3 has no biases
    for g in groups:  # per-group lr = base x multiplier (the scheduler scales them all alike)
        assert g["initial_lr"] == pytest.approx(1e-2 * g["lr_multiplier"])
        assert g["lr"] == pytest.approx(groups[0]["lr"] / groups[0]["lr_multiplier"] * g["lr_multiplier"])
        assert g["weight_decay"] == (0.0 if "1-D" in g["name"] else 0.1)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3
    assert logs[0]["learning_rate"] == pytest.approx(1e-2)  # the base lr, whatever the first group's multiplier
    for e in logs:
        assert e["loss"] == pytest.approx((1 - loss.alpha) * e["ce_loss"] + loss.alpha * 4.0 * e["kl_loss"], rel=1e-5)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_ce", "eval_kl_lower_bound", "eval_perplexity"} <= metrics.keys()
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_ce"]).exp().item(), rel=1e-6)
    assert metrics["eval_tokens"] == sum(int(data[i]["labels"].ne(-100).sum()) for i in range(len(data)))


def test_router_aux_loss_is_added_and_logged(tmp_path, data):
    student = tiny_moe(1, output_router_logits=True, router_aux_loss_coef=0.5)
    loss = LossConfig(alpha=0.5, temperature=1.0)
    trainer = DistillationTrainer(student, targs(tmp_path, max_steps=2), train_dataset=data, loss=loss)
    trainer.train()
    for e in [e for e in trainer.state.log_history if "loss" in e]:
        assert e["router_aux_loss"] > 0
        assert e["loss"] == pytest.approx(0.5 * e["ce_loss"] + 0.5 * e["kl_loss"] + e["router_aux_loss"], rel=1e-5)


def test_nonfinite_loss_stops_naming_the_step(tmp_path, data):
    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))

    trainer = DistillationTrainer(tiny_moe(1), targs(tmp_path, max_steps=3), train_dataset=data, callbacks=[Poison()])
    with pytest.raises(UserError, match=r"loss is nan at step 2"):
        trainer.train()


def _reference_kl(teacher, student, data):
    """KL(teacher || student) at T=1 over counted positions, dense float64."""
    batch = collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits.double(), -1)
        s = torch.log_softmax(student(input_ids=batch["input_ids"]).logits.double(), -1)
    kl = (t.exp() * (t - s)).sum(-1)
    mask = batch["labels"].ne(-100)
    return (kl[mask].sum() / mask.sum()).item()


def test_eval_kl_online_and_offline_full_vocab_match_dense_reference(tmp_path, teacher):
    student = tiny_moe(1)
    full = make_items(teacher, k=VOCAB)  # k = V: the stored targets are the whole distribution
    ref = _reference_kl(teacher, student, full)
    offline = DistillationTrainer(student, targs(tmp_path), eval_dataset=full).evaluate()
    plain = make_items(teacher, targets=False)
    online = DistillationTrainer(student, targs(tmp_path), teacher=teacher, eval_dataset=plain).evaluate()
    assert offline["eval_kl_lower_bound"] == pytest.approx(ref, rel=1e-4)  # k = V: the bound is exact
    assert online["eval_kl_exact"] == pytest.approx(ref, rel=1e-4)
    assert online["eval_ce"] == pytest.approx(offline["eval_ce"], rel=1e-6)


def test_online_teacher_trains_without_a_cache(tmp_path, teacher):
    student = tiny_moe(1)
    plain = make_items(teacher, targets=False)
    trainer = DistillationTrainer(student, targs(tmp_path, max_steps=2), teacher=teacher, train_dataset=plain)
    trainer.train()
    assert all("kl_loss" in e for e in trainer.state.log_history if "loss" in e)
    with pytest.raises(UserError, match="no teacher targets"):
        DistillationTrainer(tiny_moe(1), targs(tmp_path, max_steps=1), train_dataset=plain).train()


# --------------------------------------------------------------------------- stages


class Kill(Exception):
    pass


class KillAfterSave(TrainerCallback):
    def __init__(self, stage_dir: str, step: int):
        self.stage_dir, self.step = stage_dir, step

    def on_save(self, args, state, control, **kw):
        if args.output_dir.endswith(self.stage_dir) and state.global_step == self.step:
            raise Kill()


class KillAtLog(TrainerCallback):
    def __init__(self, stage_dir: str, step: int):
        self.stage_dir, self.step = stage_dir, step

    def on_log(self, args, state, control, logs=None, **kw):
        if args.output_dir.endswith(self.stage_dir) and state.global_step == self.step and "loss" in (logs or {}):
            raise Kill()


class StageTap(TrainerCallback):
    """Snapshots the optimizer's groups at each stage's start and the weights at its end."""

    def __init__(self):
        self.groups, self.weights, self.state_params = [], [], []

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        self.groups.append([(g["name"], {id(p) for p in g["params"]}) for g in optimizer.param_groups])

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kw):
        self.weights.append(params(model))
        self.state_params.append({id(p) for p in optimizer.state})


def _two_stage_config():
    stage1 = ParamGroupsConfig(default_lr_multiplier=0.0, rules=[ParamGroupRule(r"mlp\.experts", 1.0)])
    return Config(
        stages=[
            StageConfig(name="experts", max_steps=4, param_groups=stage1, alpha=1.0),
            StageConfig(name="full", max_steps=4, learning_rate=5e-3),
        ],
        param_groups=ParamGroupsConfig(rules=[ParamGroupRule(r"embed_tokens", 0.1)]),
    )


def _run(data, run_dir, tmp_path, resume=None, callbacks=(), cfg=None, **args_kw):
    cfg = cfg or _two_stage_config()
    args = targs(tmp_path, **{"save_strategy": "steps", "save_steps": 2, "warmup_steps": 1, **args_kw})
    student = tiny_moe(1)
    stages = plan_stages(cfg, args, len(data))
    out = run_stages(student, stages, args, run_dir, train_dataset=data, resume=resume, callbacks=list(callbacks))
    return student, out


def test_plan_stages_lengths_and_overrides(tmp_path):
    args = targs(tmp_path, per_device_train_batch_size=4, max_steps=7)
    cfg = Config(stages=[StageConfig(name="a", num_train_epochs=1.5, alpha=0.7, temperature=1.0),
                         StageConfig(name="b", max_steps=3, learning_rate=1e-4)])
    a, b = plan_stages(cfg, args, num_examples=10)  # 3 steps per epoch
    assert (a.start_step, a.end_step, b.start_step, b.end_step) == (0, 5, 5, 8)
    assert (a.loss.alpha, a.loss.temperature, b.loss.alpha, b.loss.temperature) == (0.7, 1.0, 0.5, 2.0)
    assert (a.learning_rate, b.learning_rate) == (1e-2, 1e-4)
    a, b = plan_stages(cfg, args, num_examples=10, loss_overrides={"alpha": 0.0})  # e.g. the CE baseline
    assert a.loss.alpha == b.loss.alpha == 0.0
    (only,) = plan_stages(Config(), args, num_examples=10)  # no stages: one from training.max_steps
    assert (only.name, only.max_steps, only.param_groups_key) == ("train", 7, "param_groups")
    with pytest.raises(UserError, match="no checkpoint to resume"):
        run_stages(tiny_moe(1), [only], args, tmp_path / "empty", train_dataset=Items([]), resume="latest")


def test_two_stages_switch_groups_at_the_boundary(tmp_path, data):
    tap = StageTap()
    start = params(tiny_moe(1))
    student, out = _run(data, tmp_path / "run", tmp_path, callbacks=[tap])
    run = tmp_path / "run"
    plan = json.loads((run / "stages.json").read_text())["stages"]
    assert [(s["name"], s["start_step"], s["end_step"], s["done"]) for s in plan] == [
        ("experts", 0, 4, True), ("full", 4, 8, True)]
    assert plan[0]["alpha"] == 1.0 and plan[1]["alpha"] == 0.5 and plan[1]["learning_rate"] == 5e-3
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    train_logs = [e for e in log if "loss" in e]
    assert [(e["step"], e["stage"]) for e in train_logs] == [(s, 0 if s <= 4 else 1) for s in range(1, 9)]
    assert all("ce_loss" in e and "kl_loss" in e for e in train_logs)
    # checkpoints at each stage's end, marked with their stage
    for d, step in (("01-experts/checkpoint-4", 4), ("02-full/checkpoint-4", 8)):
        assert json.loads((run / d / "stage.json").read_text())["global_step"] == step
    assert (run / "final" / "model.safetensors").is_file() and out["final_model"] == str(run / "final")
    # optimizer: stage 1 holds only the experts, stage 2 everything (embeddings at 0.1x)
    names = {id(p): n for n, p in student.named_parameters()}
    (g1,), g2 = tap.groups
    assert g1[0] == "mlp\\.experts" and {names[i] for i in g1[1]} == {n for n in names.values() if "mlp.experts" in n}
    assert sum(len(ids) for _, ids in g2) == len(names)
    assert {names[i] for i in tap.state_params[0]} == {names[i] for i in g1[1]}  # no state for frozen params
    # frozen in stage 1: bit-identical through it, trained in stage 2
    w1, w2 = tap.weights
    for n in start:
        assert torch.equal(w1[n], start[n]) == ("mlp.experts" not in n), n
        assert not torch.equal(w2[n], w1[n]), n


def test_resume_from_any_checkpoint_gives_identical_weights(tmp_path, data):
    reference, _ = _run(data, tmp_path / "a", tmp_path)
    ref = params(reference)
    # killed right after the mid-stage checkpoint of stage 1, then resumed from the latest
    with pytest.raises(Kill):
        _run(data, tmp_path / "b", tmp_path, callbacks=[KillAfterSave("01-experts", 2)])
    resumed, out = _run(data, tmp_path / "b", tmp_path, resume="latest")
    assert out["final_model"]
    for n, p in params(resumed).items():
        assert torch.equal(p, ref[n]), n
    steps = [e["step"] for e in map(json.loads, (tmp_path / "b" / "log.jsonl").read_text().splitlines()) if "loss" in e]
    assert steps == list(range(1, 9))  # no duplicated entries from the interrupted run
    # from a mid-stage checkpoint of stage 2 (stage 1 skipped) of a copy of the finished run
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    resumed, _ = _run(data, tmp_path / "c", tmp_path, resume=str(tmp_path / "c" / "02-full" / "checkpoint-2"))
    for n, p in params(resumed).items():
        assert torch.equal(p, ref[n]), n


@pytest.mark.parametrize("ckpt", ["01-experts/checkpoint-3", "02-full/checkpoint-3"])
def test_resume_from_a_stage_end_checkpoint_is_exact_with_a_constant_lr(tmp_path, data, ckpt):
    """A checkpoint written at a stage's end, mid-epoch (3 steps of 2 per epoch): the stage is
    over (a cosine schedule hides one extra step at lr 0; a constant one does not). The next
    stage, or just final/, follows."""
    cfg = _two_stage_config()
    cfg.stages[0].max_steps = cfg.stages[1].max_steps = 3
    kw = dict(lr_scheduler_type="constant", warmup_steps=0, cfg=cfg)
    reference, _ = _run(data, tmp_path / "a", tmp_path, **kw)
    ref = params(reference)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "final")
    resumed, out = _run(data, tmp_path / "b", tmp_path, resume=str(tmp_path / "b" / ckpt), **kw)
    for n, p in params(resumed).items():
        assert torch.equal(p, ref[n]), n
    assert out["final_model"] and (tmp_path / "b" / "final" / "model.safetensors").is_file()
    steps = [e["step"] for e in map(json.loads, (tmp_path / "b" / "log.jsonl").read_text().splitlines()) if "loss" in e]
    assert steps == list(range(1, 7))  # each step logged once: no extra step of the finished stage


def test_resume_with_another_schedule_is_refused(tmp_path, data):
    _run(data, tmp_path / "a", tmp_path)
    before = sorted(p.name for p in (tmp_path / "a").rglob("*"))
    cfg = _two_stage_config()
    cfg.stages[1].max_steps = 6
    with pytest.raises(UserError, match=r"another schedule \(stage 2: end_step was 8, now 10"):
        _run(data, tmp_path / "a", tmp_path, resume="latest", cfg=cfg)
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == before


class SnapshotAtSave(TrainerCallback):
    """The student's weights at every checkpoint, taken in memory (independent of any loading)."""

    def __init__(self, model):
        self.model, self.at = model, {}

    def on_save(self, args, state, control, **kwargs):
        self.at[state.global_step] = params(self.model)


def test_load_best_model_at_end_restores_the_expert_weights_too(tmp_path, data):
    """transformers 5 reloads the best checkpoint with a plain load_state_dict that skips the
    fused expert tensors; the trainer reloads it through from_pretrained instead."""
    student = tiny_moe(1)
    snap = SnapshotAtSave(student)
    # the loss here (lr 1e-2, CE and KL blended) drives the validation KL up after the first
    # steps: the best checkpoint by KL is not the last weights
    args = targs(tmp_path, max_steps=4, per_device_train_batch_size=4, eval_strategy="steps", eval_steps=1,
                 save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                 metric_for_best_model="eval_kl_lower_bound",
                 greater_is_better=False)
    trainer = DistillationTrainer(student, args, train_dataset=data, eval_dataset=data, callbacks=[snap])
    trainer.train()
    best = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert best < 4
    expert = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(snap.at[best][expert], snap.at[4][expert])
    for n, p in params(student).items():
        assert torch.equal(p, snap.at[best][n]), n


# --------------------------------------------------------------------------- train_from_config


def test_train_from_config_end_to_end(tmp_path):
    """Caches generated on demand, tiny.yaml's two stages on a compressed student, KL goes down."""
    from moedistill.commands.train import train_from_config
    from moedistill.compression import compress_model
    from moedistill.config import load_config
    from moedistill.models import TINY_TEACHER, load_tokenizer

    tok = load_tokenizer("tiny")
    teacher_dir = tmp_path / "teacher"
    torch.manual_seed(0)
    cfg_t = Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
        initializer_range=0.5,  # a peaked teacher, so its compressed student is measurably off
    )
    teacher = Qwen3MoeForCausalLM(cfg_t)
    teacher.save_pretrained(teacher_dir)
    for f in TINY_TEACHER.glob("tokenizer*"):
        shutil.copy(f, teacher_dir / f.name)
    cfg = load_config("tiny", [
        f"output_dir={tmp_path / 'out'}", f"teacher.name={teacher_dir}", "data.seq_len=16", "data.max_sequences=16",
        "data.eval_max_sequences=8", "cache.top_k=8", "cache.batch_size=8", "stages.0.max_steps=3",
        "stages.1.max_steps=3", "training.per_device_train_batch_size=4", "training.logging_steps=1",
        "training.save_steps=2", "training.report_to=[]", "training.warmup_steps=0", "training.learning_rate=1e-2",
    ])
    student = compress_model(teacher.eval(), rank=1)
    out = train_from_config(cfg, student=student)
    run = tmp_path / "out" / "train" / "topk"
    assert out["run_dir"] == str(run) and (run / "final" / "config.json").is_file()
    assert (tmp_path / "out" / "cache" / "topk" / "manifest.json").is_file()
    assert (tmp_path / "out" / "cache" / "topk-validation" / "manifest.json").is_file()
    assert out["final_eval"]["eval_kl_lower_bound"] < out["initial_eval"]["eval_kl_lower_bound"]
    assert [s["name"] for s in out["stages"]] == ["wrappers", "full"]
    train_logs = [e for e in out["log_history"] if "loss" in e]
    assert [e["stage"] for e in train_logs] == [0, 0, 0, 1, 1, 1] and all("kl_loss" in e for e in train_logs)
    assert json.loads((run / "metrics.json").read_text())["final_dir"] == str(run / "final")
    # resuming the finished run from its mid-stage-2 checkpoint ends where it ended
    again = train_from_config(cfg, resume=str(run / "02-full" / "checkpoint-2"),
                              student=compress_model(teacher, rank=1))
    assert again["initial_eval"] == pytest.approx(out["initial_eval"])
    assert again["final_eval"]["eval_kl_lower_bound"] == pytest.approx(
        out["final_eval"]["eval_kl_lower_bound"], rel=1e-6
    )


def test_training_arguments_pass_through(tmp_path):
    from moedistill.commands.train import training_arguments
    from moedistill.config import load_config

    cfg = load_config("tiny", ["training.bf16=true", "training.gradient_accumulation_steps=4", "seed=7"])
    args = training_arguments(cfg, tmp_path / "run")
    assert args.bf16 and args.gradient_accumulation_steps == 4 and args.seed == 7
    assert args.remove_unused_columns is False and args.output_dir == str(tmp_path / "run")
    assert args.per_device_eval_batch_size == cfg.eval.batch_size


# --------------------------------------------------------------------------- loss.fused_linear


def _fused_pair(tmp_path, data, *, student_kw=None, rules=None, teacher=None, **args_kw):
    """The same training run with and without loss.fused_linear -> [(log, grads of step 1, eval)] x 2."""
    out = []
    for fused in (False, True):
        tap = GradTap()
        student = tiny_moe(1, **(student_kw or {}))
        shapes = set()  # the shapes of what the lm_head returns
        student.lm_head.register_forward_hook(lambda m, i, o: shapes.add(tuple(o.shape[2:])))
        trainer = DistillationTrainer(
            student, targs(tmp_path, max_steps=2, **args_kw), train_dataset=data,
            eval_dataset=data, callbacks=[tap], teacher=teacher,
            loss=LossConfig(alpha=0.6, temperature=2.0, tail="tail", chunk_size=5, fused_linear=fused),
            param_groups=rules,
        )
        trainer.train()
        assert shapes == ({()} if fused else {(VOCAB,)})  # fused: the lm_head's call returns the loss
        logs = [e[k] for e in trainer.state.log_history if "loss" in e for k in ("loss", "ce_loss", "kl_loss")]
        out.append((logs, tap.grads[0], trainer.evaluate(), trainer))
    return out


def _assert_same_run(plain, fused, rel=1e-5):
    assert fused[0] == pytest.approx(plain[0], rel=rel, abs=1e-6)
    assert fused[1].keys() == plain[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], rtol=rel, atol=1e-7, msg=name)
    for key in ("eval_loss", "eval_ce", "eval_kl_lower_bound", "eval_kl_exact", "eval_perplexity"):
        if key in plain[2]:
            assert fused[2][key] == pytest.approx(plain[2][key], rel=rel), key


def test_fused_linear_trains_like_the_unfused_loss_with_tied_embeddings(tmp_path, data):
    """Tied embeddings (the tiny Qwen3-MoE ties them): the shared weight gets both gradients;
    two micro-batches with uneven masks accumulate like the unfused loss; the logits are never made."""
    plain, fused = _fused_pair(tmp_path, data, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    _assert_same_run(plain, fused)
    trainer = fused[3]
    assert trainer._lm_head is trainer.model.lm_head and trainer.model.lm_head.weight is \
        trainer.model.model.embed_tokens.weight
    batch = collate([data[i] for i in range(2)])
    _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)  # what predict() uses
    with torch.no_grad():
        torch.testing.assert_close(outputs["logits"], trainer.model(input_ids=batch["input_ids"]).logits)
    assert "forward" not in trainer.model.lm_head.__dict__  # the lm_head is itself again


def test_fused_linear_untied_frozen_head_and_online_teacher(tmp_path, teacher, data):
    rules = ParamGroupsConfig(rules=[ParamGroupRule(r"lm_head", 0.0)])
    plain, fused = _fused_pair(tmp_path, data, student_kw=dict(tie_word_embeddings=False), rules=rules)
    _assert_same_run(plain, fused)
    assert "lm_head.weight" not in fused[1]  # frozen: no gradient at all
    plain, fused = _fused_pair(tmp_path, make_items(teacher, targets=False), teacher=teacher)
    _assert_same_run(plain, fused)


def test_fused_linear_with_router_aux_loss_and_bf16_autocast(tmp_path, data):
    plain, fused = _fused_pair(tmp_path, data, student_kw=dict(output_router_logits=True, router_aux_loss_coef=0.5))
    _assert_same_run(plain, fused)
    plain, fused = _fused_pair(tmp_path, data, bf16=True)  # CPU autocast: matmuls in bf16 on both paths
    assert fused[0] == pytest.approx(plain[0], rel=2e-2)
    for name in plain[1]:
        g, r = fused[1][name], plain[1][name]
        assert (g - r).norm() <= 5e-2 * r.norm() + 1e-8, name


def test_fused_linear_refuses_what_it_cannot_do(tmp_path, data):
    student = tiny_moe(1, tie_word_embeddings=False)
    student.lm_head = torch.nn.Sequential(student.lm_head)
    fused = LossConfig(fused_linear=True)
    with pytest.raises(UserError, match="output layer is an nn.Linear, got Sequential"):
        DistillationTrainer(student, targs(tmp_path), train_dataset=data, loss=fused)
    student = tiny_moe(1)
    student.config.final_logit_softcapping = 30.0
    with pytest.raises(UserError, match="final_logit_softcapping"):
        DistillationTrainer(student, targs(tmp_path), train_dataset=data, loss=fused)
    # an lm_head offloaded by accelerate (its weight lives on "meta" between calls): its hook
    # still brings the weight in before the fused loss runs, so the loss is the unfused one
    from accelerate import cpu_offload

    batch = collate([data[i] for i in range(4)])
    losses = []
    for fused in (False, True):
        student = tiny_moe(1, tie_word_embeddings=False)
        trainer = DistillationTrainer(student, targs(tmp_path), train_dataset=data,
                                      loss=LossConfig(alpha=0.6, temperature=2.0, fused_linear=fused))
        cpu_offload(student.lm_head, execution_device=torch.device("cpu"))
        assert student.lm_head.weight.device.type == "meta"
        with torch.no_grad():
            losses.append(float(trainer.compute_loss(trainer.model, batch)))
        assert "_old_forward" in student.lm_head.__dict__  # the hook is intact afterwards
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    trainer = DistillationTrainer(tiny_moe(1), targs(tmp_path), train_dataset=data)
    trainer.is_fsdp_enabled = True  # what accelerate's FSDP plugin sets (no plugin here: FSDP1's default)
    with pytest.raises(UserError, match="not supported under FSDP1 yet.*loss.fused_linear=false or use FSDP2"):
        trainer._fused_head(trainer.model)


_DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
from test_trainer import make_items, targs, tiny_moe
from pathlib import Path
from moedistill.config import LossConfig
from moedistill.trainer import DistillationTrainer

fused = sys.argv[1] == "1"
data = make_items(tiny_moe(0))
args = targs(Path(sys.argv[2]), per_device_train_batch_size=2, max_steps=3)  # no gradient checkpointing:
trainer = DistillationTrainer(tiny_moe(1, tie_word_embeddings=False), args, train_dataset=data,  # DDP looks for
                              loss=LossConfig(alpha=0.6, temperature=2.0, fused_linear=fused))  # unused parameters
trainer.train()
if int(os.environ["RANK"]) == 0:
    logs = [e for e in trainer.state.log_history if "loss" in e]
    Path(sys.argv[2], "log.json").write_text(json.dumps(logs))
"""


def test_fused_linear_under_ddp_with_an_untied_head(tmp_path):
    """2 processes (gloo), an untied lm_head and no gradient checkpointing, so transformers
    sets DDP's find_unused_parameters: the lm_head's weight must be seen as used by the
    forward (the fused loss runs inside its call) and the run equals the unfused one."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    logs = []
    for fused in ("0", "1"):
        out = tmp_path / f"fused{fused}"
        r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script), fused, str(out)],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-6000:]
        logs.append(json.loads((out / "log.json").read_text()))
    assert len(logs[1]) == len(logs[0]) == 3
    for a, b in zip(logs[1], logs[0]):
        for k in ("loss", "ce_loss", "kl_loss", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_tensorboard_holds_one_run_with_global_steps_across_stages(tmp_path, data):
    """report_to tensorboard: the two stages' events are one run (one directory) whose steps
    increase monotonically across the boundary, with the stage as a scalar; a resume from a
    mid-stage checkpoint drops the events logged after it, so no step shows twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(run):
        dirs = {p.parent for p in (run / "tensorboard").rglob("events.out.tfevents.*")}
        assert dirs == {run / "tensorboard"}  # one run, not one per stage
        acc = EventAccumulator(str(run / "tensorboard"))
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in ("train/loss", "train/stage")}

    _run(data, tmp_path / "run", tmp_path, report_to=["tensorboard"])
    got = scalars(tmp_path / "run")
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    want = [(e["step"], e["loss"]) for e in log if "loss" in e]
    assert [s for s, _ in got["train/loss"]] == list(range(1, 9))  # global steps, across the boundary
    assert [v for _, v in got["train/loss"]] == pytest.approx([v for _, v in want], rel=1e-6)
    # (the stage's closing summary logs its stage too, at its last step)
    assert dict(got["train/stage"]) == {s: 0.0 if s <= 4 else 1.0 for s in range(1, 9)}
    assert [s for s, _ in got["train/stage"]] == sorted(s for s, _ in got["train/stage"])
    # killed after logging global step 7, past the stage-2 checkpoint at global step 6; resumed from it:
    # step 7 (logged by both runs) and 8 once each
    with pytest.raises(Kill):
        _run(data, tmp_path / "b", tmp_path, callbacks=[KillAtLog("02-full", 3)], report_to=["tensorboard"])
    _run(data, tmp_path / "b", tmp_path, resume="latest", report_to=["tensorboard"])
    again = scalars(tmp_path / "b")
    assert [s for s, _ in again["train/loss"]] == list(range(1, 9))
    assert [v for _, v in again["train/loss"]] == pytest.approx([v for _, v in got["train/loss"]], rel=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, data, fused):
    """training.gradient_checkpointing=true (default.yaml) on a compressed student: the layers'
    forward is recomputed in the backward (the grouped experts' autograd node included), and
    one training step's gradients equal those without it within 1e-6 (fp32)."""
    from moedistill.compression import compress_model

    def grads(checkpointing: bool) -> dict:
        student = compress_model(tiny_moe(3), rank=2)
        args = targs(tmp_path, gradient_checkpointing=checkpointing, max_steps=1, per_device_train_batch_size=4)
        trainer = DistillationTrainer(student, args, train_dataset=data, loss=LossConfig(alpha=0.5, fused_linear=fused))
        batch = trainer._prepare_inputs(collate([data[i] for i in range(4)]))
        if checkpointing:
            trainer.model.gradient_checkpointing_enable(args.gradient_checkpointing_kwargs)
            assert trainer.model.is_gradient_checkpointing
        trainer.model.train()
        calls = []
        for m in trainer.model.modules():
            if type(m).__name__ == "CompressedExperts":  # counted in forward itself: hooks skip the recompute
                m.forward = lambda *a, _f=m.forward, **k: calls.append(1) or _f(*a, **k)
        n = batch["labels"].ne(-100).sum()
        trainer.compute_loss(trainer.model, batch, num_items_in_batch=n).backward()
        assert len(calls) == 2 * (2 if checkpointing else 1)  # 2 layers; recomputed in the backward
        return {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and any("wrapper" in k for k in plain)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-6, atol=1e-7, msg=k)
