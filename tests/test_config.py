"""Config validation: each bad value stops the CLI with one line and exit code 2."""

import subprocess
import sys

import pytest

from moedistill.config import Config, available_configs, load_config
from moedistill.errors import UserError


def test_both_shipped_configs_validate():
    assert {"default", "tiny"} <= set(available_configs())
    default = load_config("default")
    assert default.loss.alpha == 0.5 and default.loss.temperature == 2.0
    assert default.training["learning_rate"] == 5e-5 and default.training["num_train_epochs"] == 3
    assert [(r.pattern, r.lr_multiplier) for r in default.param_groups.rules] == [
        (".*shared_core.*", 1.0), (".*wrapper.*", 1.0), (".*embed_tokens.*", 0.1), (".*lm_head.*", 0.1),
        (".*norm.*", 0.5),
    ]
    tiny = load_config("tiny")
    assert isinstance(tiny, Config) and tiny.teacher.name == "tiny"


@pytest.mark.parametrize("name", ["tiny", "default"])
def test_every_setting_is_a_key_of_the_shipped_yaml(name):
    """Hydra refuses `key=value` for a key its YAML lacks ("unknown key"), so every field of the
    config dataclasses must be in both shipped YAMLs for the documented overrides to work."""
    import dataclasses
    import typing

    import yaml

    from moedistill.config import DISTILLATION_DIR

    def missing(dc, node, prefix=""):
        hints = typing.get_type_hints(dc)
        for f in dataclasses.fields(dc):
            if not isinstance(node, dict) or f.name not in node:
                yield prefix + f.name
            elif dataclasses.is_dataclass(hints[f.name]):
                yield from missing(hints[f.name], node[f.name], f"{prefix}{f.name}.")

    assert list(missing(Config, yaml.safe_load((DISTILLATION_DIR / f"{name}.yaml").read_text()))) == []
    cfg = load_config(name, ["compress.dir=/x/compressed", "cache.root=/x/cache"])
    assert (cfg.compress.dir, cfg.cache.root) == ("/x/compressed", "/x/cache")


def test_metric_for_best_model_accepts_what_evaluation_reports():
    for name in ("eval_kl_lower_bound", "kl_lower_bound", "eval_loss", "perplexity"):
        cfg = load_config("tiny", [f"+training.metric_for_best_model={name}"])
        assert cfg.training["metric_for_best_model"] == name


def test_overrides_apply():
    cfg = load_config("tiny", ["loss.alpha=0.7", "cache.top_k=8", "data.seq_len=64"])
    assert (cfg.loss.alpha, cfg.cache.top_k, cfg.data.seq_len) == (0.7, 8, 64)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("loss.alpha=1.5", "loss.alpha=1.5 is outside [0, 1]"),
        ("loss.alpha=-0.1", "outside [0, 1]"),
        ("loss.temperature=0", "loss.temperature=0.0 must be > 0"),
        ("loss.temperature=-2", "must be > 0"),
        ("cache.top_k=0", "cache.top_k=0 must be >= 1"),
        ("+loss.alpah=0.3", "unknown key 'loss.alpah'"),
        ("loss.alpah=0.3", "unknown key 'loss.alpah'"),
        ("+training.learnin_rate=1", "training.learnin_rate"),
        ("param_groups.rules=[{pattern: '(['}]", "is not a valid regex"),
        ("loss.tail=bogus", "must be renormalize, tail or sample"),
        ("loss.alpha=abc", "must be a number"),
        ("compress.rank_allocation=frequency-energy", "must be uniform, frequency or frequency_energy"),
        # the pre-rename name of the KL: refused before training, not at the first best-model check
        ("+training.metric_for_best_model=eval_kl", "use one of eval_loss, eval_ce, eval_kl_lower_bound"),
    ],
)
def test_bad_values_raise_one_line(override, needle):
    with pytest.raises(UserError) as e:
        load_config("tiny", [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_stage_needs_exactly_one_length():
    with pytest.raises(UserError, match="exactly one of num_train_epochs or max_steps"):
        load_config("tiny", ["stages=[{name: a}]"])


@pytest.mark.parametrize("override", ["loss.alpha=2", "loss.temperature=0", "cache.top_k=0",
                                      "+loss.alpah=1", "param_groups.rules=[{pattern: '(['}]"])
def test_cli_exits_2_with_one_line(override):
    r = subprocess.run([sys.executable, "-m", "moedistill.cli", "config", override], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: config:"), r.stderr
    assert r.stdout == ""


def test_cli_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "moedistill.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("run", "cache", "inspect", "compress", "train", "eval", "export"):
        assert cmd in r.stdout


def test_multirun_expands_sweeps():
    from moedistill.cli import expand_sweep

    runs = expand_sweep(["loss.alpha=0.3,0.7", "cache.top_k=8"])
    assert runs == [["loss.alpha=0.3", "cache.top_k=8"], ["loss.alpha=0.7", "cache.top_k=8"]]


def test_every_sweep_point_gets_its_own_directory():
    from moedistill.cli import expand_sweep, sweep_dir_name

    points = expand_sweep(["compress.report_ranks=[1,2],[3]", "loss.alpha=0.5"])
    names = [sweep_dir_name(p) for p in points]
    assert len(set(names)) == len(points) == 2 and "compress.report_ranks=[1,2],loss.alpha=0.5" in names
    from moedistill.cli import swept_keys

    swept = swept_keys(points)
    assert swept == {"compress.report_ranks"}
    names = sorted(sweep_dir_name(p, swept) for p in points)
    assert names == ["compress.report_ranks=[1,2]", "compress.report_ranks=[3]"]
    long = [f"output_dir=/{'x' * 300}", "loss.alpha=0.5"]
    assert len(sweep_dir_name(long).encode()) <= 200
    assert sweep_dir_name(long) != sweep_dir_name([*long[:1], "loss.alpha=0.9"])


def test_run_refuses_a_counts_only_sample_cache_before_any_work(tmp_path, capsys):
    """`moedistill run` trains a sampled student after compressing, caching and training the top-k
    one: a loss that cannot use a counts-only sample cache is refused first, with nothing written."""
    from moedistill.cli import main

    out = tmp_path / "out"
    assert main(["run", f"output_dir={out}", "cache.sample_logprobs=false", "loss.temperature=2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("error: ") and "without log-probs" in err[-1] and "temperature=2" in err[-1]
    assert not out.exists()


def test_sharding_engine_reads_fsdp_config_as_transformers_does(tmp_path, monkeypatch):
    """training.fsdp_config is a dict or a JSON file, its keys with or without the "fsdp_" prefix
    (TrainingArguments strips it): the fused-path check must see the same FSDP version."""
    import json

    from moedistill.commands.train import sharding_engine

    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "fsdp.json").write_text(json.dumps({"fsdp_version": 1}))
    for fsdp_config, want in [({"fsdp_version": 1}, "FSDP1"), ({"version": 1}, "FSDP1"), ({}, "FSDP2"),
                              (str(tmp_path / "fsdp.json"), "FSDP1")]:
        cfg = load_config("tiny")
        cfg.training.update(fsdp="full_shard", fsdp_config=fsdp_config)
        assert sharding_engine(cfg) == want, fsdp_config
    cfg.training["fsdp_config"] = str(tmp_path / "missing.json")
    with pytest.raises(UserError, match="training.fsdp_config=.*missing.json: cannot read it as JSON"):
        sharding_engine(cfg)
