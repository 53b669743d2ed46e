"""Configuration: Hydra YAML in, validated dataclasses out.

``load_config(name, overrides)`` composes ``conf/distillation/<name>.yaml`` with Hydra
overrides (``loss.alpha=0.7``), then ``from_dict`` turns the result into ``Config``.
Validation happens here, before any model loads: an unknown key, a value out of range,
an invalid regex each raise one ``UserError`` naming the key, the value and the fix.

The YAML files are the single source of truth for default hyper-parameters; the
dataclass defaults below only fill keys a YAML leaves out.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moedistill.errors import UserError

CONF_DIR = Path(__file__).resolve().parent / "conf"
DISTILLATION_DIR = CONF_DIR / "distillation"


# --------------------------------------------------------------------------- sections


@dataclass
class TeacherConfig:
    name: str = "tiny"  # hub id, local dir, or "tiny" (the embedded teacher)
    dtype: str | None = None  # float32 | bfloat16 | float16 | auto; None = as saved
    device_map: str | None = None  # e.g. "auto" for a teacher larger than one GPU
    trust_remote_code: bool = False


@dataclass
class StudentConfig:
    name: str | None = None  # None: <output_dir>/compressed/checkpoint-0, built by `compress`
    dtype: str | None = None
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    dataset: str = "tiny"  # "tiny", local .txt/.jsonl/.parquet (file, dir, glob), or an HF dataset name
    dataset_config: str | None = None
    split: str = "train"
    eval_split: str = "validation"
    text_field: str = "text"
    seq_len: int = 128
    max_samples: int | None = None  # first N documents of the split
    max_sequences: int | None = None  # first N packed blocks for training
    eval_max_sequences: int | None = None  # first N packed blocks for evaluation
    splits: dict[str, str] = field(default_factory=dict)  # split name -> file / directory / glob
    eval_fraction: float | None = None  # hold out this fraction of the split's documents as eval_split
    bad_records: str = "error"  # error | skip (counted): null / non-string / empty text, non-UTF-8, non-object JSON
    store: str | None = None  # token stores (moedistill prepare); None: <output_dir>/data
    prepare_workers: int | None = None  # tokeniser processes; None: 0 for local data < 32 MB, else one per core


@dataclass
class CacheConfig:
    dir: str | None = None  # None: <root>/<mode>
    root: str | None = None  # where the default caches live; None: <output_dir>/cache (a -m sweep: its base)
    mode: str = "topk"  # topk | sample
    top_k: int = 64
    num_samples: int = 64  # draws per position in sample mode
    sample_logprobs: bool = True  # sample mode: store log-probs too (needed at loss.temperature != 1)
    batch_size: int = 8
    overwrite: bool = False


@dataclass
class LossConfig:
    alpha: float = 0.5  # weight of the KL term; 0 = plain CE
    temperature: float = 2.0
    tail: str = "renormalize"  # renormalize | tail | sample
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd | skew_kl | tvd (moedistill.losses)
    beta: float | None = None  # jsd's mixture weight / skew_kl's skew, in (0, 1); None: 0.5 / 0.1
    chunk_size: int = 1024  # positions per chunk when upcasting student logits
    fused_linear: bool = False  # the lm_head inside the loss: the [B, T, V] logits never exist


@dataclass
class ParamGroupRule:
    pattern: str
    lr_multiplier: float = 1.0
    weight_decay: float | None = None


@dataclass
class ParamGroupsConfig:
    default_lr_multiplier: float = 1.0
    rules: list[ParamGroupRule] = field(default_factory=list)


@dataclass
class StageConfig:
    name: str
    num_train_epochs: float | None = None
    max_steps: int | None = None
    param_groups: ParamGroupsConfig | None = None  # None: the top-level param_groups
    learning_rate: float | None = None  # None: training.learning_rate
    alpha: float | None = None
    temperature: float | None = None
    tail: str | None = None


@dataclass
class CompressConfig:
    rank: int | None = None  # wrapper rank; or give compression_ratio
    compression_ratio: float | None = None  # target expert-parameter ratio (compressed / original)
    core: str = "mean"  # mean | frequency
    svd: str = "plain"  # plain | activation
    rank_allocation: str = "uniform"  # uniform | frequency | frequency_energy: the same parameters spread by need
    calibration_sequences: int = 32
    report_ranks: list[int] = field(default_factory=list)  # extra ranks for the perplexity-vs-ratio report
    dir: str | None = None  # checkpoint-0 and the report; None: <output_dir>/compressed (a -m sweep: its base)


@dataclass
class EvalConfig:
    batch_size: int = 8
    max_sequences: int | None = None
    ece_bins: int = 15


@dataclass
class RunConfig:
    """What `moedistill run` trains besides the top-k student."""

    sample_student: bool = True
    ce_baseline: bool = True


@dataclass
class Config:
    output_dir: str = "outputs/tiny"
    seed: int = 42
    overwrite: bool = False  # a fresh training run may replace an earlier run's results
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    param_groups: ParamGroupsConfig = field(default_factory=ParamGroupsConfig)
    stages: list[StageConfig] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)  # passed to transformers.TrainingArguments
    compress: CompressConfig = field(default_factory=CompressConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- conversion


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, path: str):
    """Convert ``value`` to the annotated type ``tp`` or raise a one-line UserError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config: {path} must be a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin is list:
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config: {path} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise UserError(f"config: {path} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if value is None:
        raise UserError(f"config: {path} must be a {_type_name(tp)}, got null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config: {path} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise UserError(f"config: {path} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"config: {path} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"config: {path} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config: {path} must be a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, d: dict, path: str = ""):
    """Build dataclass ``cls`` from a plain dict; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise UserError(f"config: unknown key '{where}' (known: {', '.join(names)}); fix the spelling or remove it")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            kwargs[f.name] = _coerce(d[f.name], hints[f.name], f"{path}.{f.name}" if path else f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"config: {path or cls.__name__} needs the key '{f.name}'")
    return cls(**kwargs)


# --------------------------------------------------------------------------- validation


def _check(cond: bool, msg: str):
    if not cond:
        raise UserError(f"config: {msg}")


def _check_alpha(alpha, key):
    _check(0.0 <= alpha <= 1.0, f"{key}={alpha} is outside [0, 1]; alpha weighs KL against CE, e.g. {key}=0.5")


def _check_temperature(t, key):
    _check(0 < t < math.inf, f"{key}={t} must be > 0 and finite; use e.g. {key}=2.0")


def _check_rate(lr, key):
    _check(lr is None or (_is_number(lr) and 0 <= lr < math.inf),
           f"{key}={_yaml(lr)} must be >= 0 and finite, e.g. {key}=5e-5")


def _yaml(v) -> str:
    """``v`` as the config spells it (null, true, 'abc')."""
    if v is None or isinstance(v, bool):
        return "null" if v is None else str(v).lower()
    return str(v) if isinstance(v, (int, float)) else repr(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_tail(tail, key):
    _check(tail in ("renormalize", "tail", "sample"), f"{key}={tail!r} must be renormalize, tail or sample")


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")  # = moedistill.losses.DIVERGENCES
BETA_DIVERGENCES = ("jsd", "skew_kl")  # the ones that take loss.beta (losses.DEFAULT_BETA)


def _check_divergence(divergence, beta, tail, key):
    _check(divergence in DIVERGENCES, f"loss.divergence={divergence!r} must be one of {', '.join(DIVERGENCES)}")
    _check(not (divergence == "reverse_kl" and tail == "renormalize"),
           f"loss.divergence=reverse_kl is infinite with {key}=renormalize (that teacher is 0 outside the stored "
           f"ids); set {key}=tail, or {key}=sample with cache.mode=sample")
    if divergence not in BETA_DIVERGENCES:
        _check(beta is None, f"loss.beta={_yaml(beta)} applies only to jsd and skew_kl, not "
                             f"loss.divergence={divergence}; set loss.beta=null")
    else:
        _check(beta is None or (_is_number(beta) and 0 < beta < 1),
               f"loss.beta={_yaml(beta)} must be in (0, 1) for loss.divergence={divergence}, e.g. loss.beta="
               f"{0.5 if divergence == 'jsd' else 0.1} (null: that default)")


def _check_rules(pg: ParamGroupsConfig, key: str):
    _check(0 <= pg.default_lr_multiplier < math.inf,
           f"{key}.default_lr_multiplier={pg.default_lr_multiplier} must be >= 0 and finite")
    for i, r in enumerate(pg.rules):
        try:
            re.compile(r.pattern)
        except re.error as e:
            raise UserError(
                f"config: {key}.rules[{i}].pattern {r.pattern!r} is not a valid regex ({e}); fix the pattern"
            ) from None
        _check(0 <= r.lr_multiplier < math.inf,
               f"{key}.rules[{i}].lr_multiplier={r.lr_multiplier} must be >= 0 and finite (0 freezes)")
        _check(r.weight_decay is None or 0 <= r.weight_decay < math.inf,
               f"{key}.rules[{i}].weight_decay={r.weight_decay} must be >= 0 and finite")


def check_counts_only(cfg: Config, cache: str, loss_overrides: dict | None = None) -> None:
    """UserError unless every stage's loss can use a sample cache without log-probs (``cache`` names it).

    Such a cache holds ids and counts; its log-probs are the draws' own ``log(count / N)``. The
    ``sample`` estimate of forward KL at T = 1 weighs the draws by count alone (w_i = c_i / N), so
    its gradient is the same as with the teacher's log-probs; at T != 1 the weights
    c_i q_i^(1/T - 1) need them, and so do the other tail modes and divergences."""
    fix = "regenerate it with cache.sample_logprobs=true, or train with loss.temperature=1, loss.tail=sample"
    bad = []
    if cfg.loss.divergence != "forward_kl":
        bad.append(f"loss.divergence={cfg.loss.divergence}")
    stages = [(f"stages[{i}]", st) for i, st in enumerate(cfg.stages)] or [("loss", cfg.loss)]
    over = loss_overrides or {}
    for key, st in stages:
        alpha, t, tail = (over.get(k, getattr(st, k) if getattr(st, k) is not None else getattr(cfg.loss, k))
                          for k in ("alpha", "temperature", "tail"))
        if alpha == 0:  # cross-entropy only: the teacher's targets are not read
            continue
        if t != 1:
            bad.append(f"{key}.temperature={_yaml(t)}")
        if tail != "sample":
            bad.append(f"{key}.tail={tail}")
    if bad:
        raise UserError(f"a sample cache without log-probs ({cache}, cache.sample_logprobs=false) cannot serve "
                        f"the loss: "
                        f"{', '.join(dict.fromkeys(bad))} needs the teacher's log-probs; {fix} and "
                        f"loss.divergence=forward_kl")


def validate(cfg: Config) -> Config:
    """Range and consistency checks; returns ``cfg`` unchanged or raises UserError."""
    # numpy and torch take seeds in [0, 2**32); a bad one would fail only once the run had started
    _check(0 <= cfg.seed < 2**32, f"seed={cfg.seed} must be in [0, 2**32), e.g. seed=42")
    _check_alpha(cfg.loss.alpha, "loss.alpha")
    _check_temperature(cfg.loss.temperature, "loss.temperature")
    _check_tail(cfg.loss.tail, "loss.tail")
    _check_divergence(cfg.loss.divergence, cfg.loss.beta, cfg.loss.tail, "loss.tail")
    _check(cfg.loss.chunk_size >= 1, f"loss.chunk_size={cfg.loss.chunk_size} must be >= 1")
    _check(cfg.cache.mode in ("topk", "sample"), f"cache.mode={cfg.cache.mode!r} must be topk or sample")
    _check(cfg.cache.top_k >= 1, f"cache.top_k={cfg.cache.top_k} must be >= 1, e.g. cache.top_k=64 (default.yaml)")
    _check(cfg.cache.num_samples >= 1, f"cache.num_samples={cfg.cache.num_samples} must be >= 1")
    _check(cfg.cache.batch_size >= 1, f"cache.batch_size={cfg.cache.batch_size} must be >= 1")
    _check(cfg.data.seq_len >= 2, f"data.seq_len={cfg.data.seq_len} must be >= 2")
    for key in ("max_samples", "max_sequences", "eval_max_sequences"):
        v = getattr(cfg.data, key)
        _check(v is None or v >= 1, f"data.{key}={v} must be >= 1 or null")
    _check(cfg.data.eval_fraction is None or 0 < cfg.data.eval_fraction < 1,
           f"data.eval_fraction={cfg.data.eval_fraction} must be in (0, 1) or null, e.g. data.eval_fraction=0.01")
    _check(cfg.data.bad_records in ("error", "skip"),
           f"data.bad_records={cfg.data.bad_records!r} must be error or skip")
    _check(cfg.data.prepare_workers is None or cfg.data.prepare_workers >= 0,
           f"data.prepare_workers={cfg.data.prepare_workers} must be >= 0 or null (0: tokenise in this process)")
    _check_rules(cfg.param_groups, "param_groups")
    names = set()
    for i, st in enumerate(cfg.stages):
        key = f"stages[{i}]"
        _check(st.name not in names, f"{key}.name={st.name!r} is used twice; give each stage its own name")
        names.add(st.name)
        _check(
            (st.num_train_epochs is None) != (st.max_steps is None),
            f"{key} ({st.name}) needs exactly one of num_train_epochs or max_steps",
        )
        _check(st.max_steps is None or st.max_steps >= 1, f"{key}.max_steps={st.max_steps} must be >= 1")
        _check(st.num_train_epochs is None or 0 < st.num_train_epochs < math.inf,
               f"{key}.num_train_epochs={st.num_train_epochs} must be > 0 and finite")
        _check_rate(st.learning_rate, f"{key}.learning_rate")
        if st.alpha is not None:
            _check_alpha(st.alpha, f"{key}.alpha")
        if st.temperature is not None:
            _check_temperature(st.temperature, f"{key}.temperature")
        if st.tail is not None:
            _check_tail(st.tail, f"{key}.tail")
            _check_divergence(cfg.loss.divergence, cfg.loss.beta, st.tail, f"{key}.tail")
        if st.param_groups is not None:
            _check_rules(st.param_groups, f"{key}.param_groups")
    c = cfg.compress
    _check(c.rank is None or c.rank >= 0, f"compress.rank={c.rank} must be >= 0")
    _check(c.calibration_sequences >= 1, f"compress.calibration_sequences={c.calibration_sequences} must be >= 1")
    _check(all(r >= 0 for r in c.report_ranks), f"compress.report_ranks={c.report_ranks} must all be >= 0")
    _check(
        c.compression_ratio is None or 0 < c.compression_ratio <= 1,
        f"compress.compression_ratio={c.compression_ratio} must be in (0, 1]",
    )
    _check(c.core in ("mean", "frequency"), f"compress.core={c.core!r} must be mean or frequency")
    _check(c.svd in ("plain", "activation"), f"compress.svd={c.svd!r} must be plain or activation")
    _check(c.rank_allocation in ("uniform", "frequency", "frequency_energy"),
           f"compress.rank_allocation={c.rank_allocation!r} must be uniform, frequency or frequency_energy")
    _check(cfg.eval.batch_size >= 1, f"eval.batch_size={cfg.eval.batch_size} must be >= 1")
    _check(cfg.eval.ece_bins >= 1, f"eval.ece_bins={cfg.eval.ece_bins} must be >= 1")
    m = cfg.eval.max_sequences
    _check(m is None or m >= 1, f"eval.max_sequences={m} must be >= 1 or null")
    _validate_training(cfg.training)
    # (num_train_epochs is not checked: default.yaml sets it for its one implicit stage)
    _check(not (cfg.stages and "max_steps" in cfg.training),
           "training.max_steps does not apply when stages are set (each stage has its own length); "
           "set stages[i].max_steps or stages[i].num_train_epochs instead")
    return cfg


# keys we set ourselves from other sections; a user setting them in `training` would be ignored
_OWNED_TRAINING_KEYS = {"output_dir", "remove_unused_columns"}
# counts that must be positive integers (transformers accepts 0 or negatives for some and then fails or loops)
_TRAINING_COUNTS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "save_steps", "eval_steps")
# what DistillationTrainer.evaluate reports during `moedistill train` (its eval cache is top-k,
# so the KL is the tail-bucket lower bound; see moedistill.targets.KL_NAMES)
EVAL_METRICS = ("eval_loss", "eval_ce", "eval_kl_lower_bound", "eval_perplexity")


def _validate_training(training: dict):
    from transformers import TrainingArguments  # lazy: the CLI validates before anything heavy loads

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in training:
        if key in _OWNED_TRAINING_KEYS:
            raise UserError(f"config: training.{key} is set by moedistill; use output_dir at the top level instead")
        if key not in known:
            close = [k for k in known if k.startswith(key[:4])][:5]
            raise UserError(
                f"config: unknown key 'training.{key}' (not a transformers.TrainingArguments field"
                f"{'; did you mean ' + ', '.join(sorted(close)) if close else ''}); fix or remove it"
            )
    # transformers takes these untyped and fails mid-run on inf/nan, 0 or a string
    for key, value in training.items():
        if isinstance(value, float):
            _check(math.isfinite(value), f"training.{key}={value} must be finite")
    for key in _TRAINING_COUNTS:
        if key in training:
            v = training[key]
            _check(_is_int(v) and v >= 1, f"training.{key}={_yaml(v)} must be an integer >= 1")
    if training.get("save_total_limit") is not None:
        v = training["save_total_limit"]
        _check(_is_int(v) and v >= 1,
               f"training.save_total_limit={_yaml(v)} must be an integer >= 1 or null (keep all)")
    for key in ("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm"):
        if key in training:
            v = training[key]
            _check(_is_number(v) and 0 <= v < math.inf, f"training.{key}={_yaml(v)} must be a number >= 0")
    best = training.get("metric_for_best_model")
    if best is not None:  # transformers would fail on it only at the first best-model check, mid-run
        name = best if str(best).startswith("eval_") else f"eval_{best}"
        _check(name in EVAL_METRICS, f"training.metric_for_best_model={best} is not a metric the evaluation "
                                     f"reports; use one of {', '.join(EVAL_METRICS)}")


# --------------------------------------------------------------------------- loading


def available_configs() -> list[str]:
    return sorted(p.stem for p in DISTILLATION_DIR.glob("*.yaml"))


def load_config(name: str = "tiny", overrides: list[str] | None = None) -> Config:
    """Compose ``conf/distillation/<name>.yaml`` (or a path to a YAML) with Hydra overrides."""
    from hydra import compose, initialize_config_dir  # lazy: hydra loads only when a config is read (not for --help)
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf  # lazy, as above

    overrides = list(overrides or [])
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"config file {name} does not exist")
        conf_dir, conf_name = path.resolve().parent, path.stem
    else:
        if name not in available_configs():
            raise UserError(f"no config named {name!r} (have: {', '.join(available_configs())}); pass --config-name")
        conf_dir, conf_name = DISTILLATION_DIR, name
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            raw = compose(config_name=conf_name, overrides=overrides)
    except Exception as e:  # noqa: BLE001 - hydra raises several types for bad overrides
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "not in struct" in str(e) or "Could not override" in str(e):
            key = re.search(r"'([^']+)'", str(e))
            msg = f"unknown key '{key.group(1) if key else '?'}' in overrides"
        raise UserError(f"config: {msg}; check the override syntax key=value and the key's spelling") from None
    finally:
        GlobalHydra.instance().clear()
    data = OmegaConf.to_container(raw, resolve=True)
    return validate(from_dict(Config, data))


def dump_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf  # lazy: hydra/omegaconf load only when a config is read

    return OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict()))
