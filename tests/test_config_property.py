"""Every numeric setting, fed random values through the CLI's validation: accepted and usable, or refused.

For each numeric key of tiny.yaml, hypothesis draws values of every awkward kind (0,
negatives, huge numbers, nan, +-inf, fractions for counts, booleans, strings, lists) and
runs ``moedistill config <key>=<value>``. The outcome must be one of:

- exit 2 with exactly one ``error:`` line on stderr (and no traceback), or
- exit 0, and the value the config holds is usable: it meets the key's domain below,
  written here from what each setting means (not copied from the validator), and it is
  the value given (no silent rounding of 2.5 to 2, no ``true`` read as 1).
"""

from __future__ import annotations

import contextlib
import io
import math

import pytest

hypothesis = pytest.importorskip("hypothesis")  # in the dev extra; `make test` installs it
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moedistill.cli import main  # noqa: E402
from moedistill.config import load_config  # noqa: E402


def count(v) -> bool:  # a number of things: an integer >= 1
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


DOMAINS = {
    "seed": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32,
    "data.seq_len": lambda v: count(v) and v >= 2,
    "data.max_sequences": lambda v: v is None or count(v),
    "data.eval_max_sequences": lambda v: v is None or count(v),
    "cache.top_k": count,
    "cache.num_samples": count,
    "cache.batch_size": count,
    "loss.alpha": lambda v: finite(v) and 0 <= v <= 1,
    "loss.temperature": lambda v: finite(v) and v > 0,
    "loss.chunk_size": count,
    "param_groups.default_lr_multiplier": lambda v: finite(v) and v >= 0,
    "stages.0.max_steps": count,
    "stages.1.max_steps": count,
    "compress.rank": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "compress.calibration_sequences": count,
    "eval.batch_size": count,
    "eval.max_sequences": lambda v: v is None or count(v),
    "eval.ece_bins": count,
    "training.learning_rate": lambda v: finite(v) and v >= 0,
    "training.per_device_train_batch_size": count,
    "training.gradient_accumulation_steps": count,
    "training.warmup_steps": lambda v: finite(v) and v >= 0,
    "training.weight_decay": lambda v: finite(v) and v >= 0,
    "training.logging_steps": count,
    "training.save_steps": count,
    "training.save_total_limit": lambda v: v is None or count(v),
}

VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 2**32, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 2.5, -0.0, 1e-300, 1e300, float("nan"), float("inf"), float("-inf")]),
    st.booleans(),
    st.sampled_from(["abc", "''", "[]", "[1, 2]", "{a: 1}", "null"]),
)


def render(v) -> str:
    """The value as the command line spells it (Hydra's override grammar)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else ("-inf" if v == -math.inf else repr(v)))
    return str(v)


def lookup(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[int(part)] if part.isdigit() else (node[part] if isinstance(node, dict) else getattr(node, part))
    return node


def same_value(given, held) -> bool:
    """The config holds what was given (integers as integers, floats equal, null as None)."""
    if isinstance(given, str):
        return given == "null" and held is None
    if isinstance(given, bool) or isinstance(held, bool):
        return False
    if isinstance(given, float) and isinstance(held, int):
        return given.is_integer() and int(given) == held
    if isinstance(given, int) and isinstance(held, float):  # an integer for a float setting
        return held == float(given)
    return given == held


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(sorted(DOMAINS)), value=VALUES)
def test_numeric_settings_are_usable_or_refused_in_one_line(key, value):
    override = f"{key}={render(value)}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["config", override])
    lines = err.getvalue().strip().splitlines()
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), (override, err.getvalue())
        return
    assert rc == 0 and not lines, (override, rc, err.getvalue())
    held = lookup(load_config("tiny", [override]), key)
    assert DOMAINS[key](held), f"{override} accepted, but {held!r} is not usable for {key}"
    assert same_value(value, held), f"{override} accepted as {held!r}"
