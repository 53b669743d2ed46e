"""Regex parameter groups: ordered rules -> optimizer groups, frozen parameters, a table.

A rule is ``{pattern, lr_multiplier, weight_decay?}``. Rules are tried in order and the
first whose regex ``re.search``-es a parameter's full name (``model.layers.0.mlp...``)
takes it; parameters no rule takes get ``default_lr_multiplier``. A multiplier of 0
freezes: ``requires_grad`` is set False and the parameter never enters the optimizer,
so it has no optimizer state and stays bit-identical.

Weight decay: a rule's ``weight_decay`` applies to all of its parameters; without one,
tensors of two or more dimensions get the base ``training.weight_decay`` and 1-D tensors
(biases, norm weights) get none.

A rule that takes no parameter is an error: a misspelt pattern must not silently train
nothing, and a rule shadowed by earlier rules does nothing either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from moedistill.config import ParamGroupsConfig
from moedistill.errors import UserError

DEFAULT_LABEL = "(default)"


@dataclass
class GroupRow:
    """One rule (or the default) and the parameters it took."""

    label: str  # the rule's pattern, or "(default)"
    lr_multiplier: float
    weight_decay: float | None  # the rule's own weight decay; None = base for >= 2-D, 0 for 1-D
    names: list[str] = field(default_factory=list)
    numel: int = 0

    @property
    def frozen(self) -> bool:
        return self.lr_multiplier == 0


@dataclass
class ParamGroupPlan:
    """Which row (rule) each parameter belongs to; ``rows[-1]`` is the default row."""

    rows: list[GroupRow]
    row_of: dict[str, int]  # parameter name -> index into rows

    def multiplier(self, name: str) -> float:
        return self.rows[self.row_of[name]].lr_multiplier

    @property
    def trainable(self) -> int:
        return sum(r.numel for r in self.rows if not r.frozen)

    @property
    def frozen(self) -> int:
        return sum(r.numel for r in self.rows if r.frozen)


def assign(model: torch.nn.Module, config: ParamGroupsConfig, *, where: str = "param_groups") -> ParamGroupPlan:
    """Match every named parameter of ``model`` against the rules (first match wins).

    Shared (tied) parameters are visited once, under their first name. ``where`` names the
    config section in error messages (e.g. ``stages[0].param_groups``).
    Raises UserError when a rule takes no parameter.
    """
    patterns = [re.compile(r.pattern) for r in config.rules]
    rows = [GroupRow(r.pattern, r.lr_multiplier, r.weight_decay) for r in config.rules]
    rows.append(GroupRow(DEFAULT_LABEL, config.default_lr_multiplier, None))
    row_of: dict[str, int] = {}
    searched = [0] * len(patterns)  # parameters each pattern matches, won or not
    for name, p in model.named_parameters():
        hits = [i for i, pat in enumerate(patterns) if pat.search(name)]
        for i in hits:
            searched[i] += 1
        i = hits[0] if hits else len(rows) - 1
        row_of[name] = i
        rows[i].names.append(name)
        # ds_numel: under DeepSpeed ZeRO-3 a partitioned parameter's own numel() is 0
        rows[i].numel += int(getattr(p, "ds_numel", p.numel()))
    for i, r in enumerate(config.rules):
        if rows[i].names:
            continue
        example = next(iter(row_of), "?")
        if searched[i]:
            raise UserError(
                f"{where}.rules[{i}] pattern {r.pattern!r} only matches parameters that earlier rules already take; "
                f"move it up or remove it"
            )
        raise UserError(
            f"{where}.rules[{i}] pattern {r.pattern!r} matches no parameter of the student "
            f"(names look like {example!r}); fix the pattern or remove the rule"
        )
    return ParamGroupPlan(rows, row_of)


def freeze(model: torch.nn.Module, plan: ParamGroupPlan) -> None:
    """Set ``requires_grad`` from the plan: False where the multiplier is 0, True elsewhere."""
    for name, p in model.named_parameters():
        p.requires_grad_(not plan.rows[plan.row_of[name]].frozen)


def optimizer_groups(
    model: torch.nn.Module, plan: ParamGroupPlan, *, learning_rate: float, weight_decay: float
) -> list[dict]:
    """Optimizer parameter groups: per rule, lr = learning_rate x multiplier.

    A rule without its own weight decay is split in two groups: >= 2-D tensors with
    ``weight_decay``, 1-D tensors (biases, norm weights) with 0. Frozen rules and empty
    splits are left out. Each group carries ``name`` and ``lr_multiplier`` for logs.
    """
    params = dict(model.named_parameters())
    groups = []
    for row in plan.rows:
        if row.frozen:
            continue
        lr = learning_rate * row.lr_multiplier
        if row.weight_decay is not None:
            splits = [("", row.names, row.weight_decay)]
        else:
            splits = [
                ("", [n for n in row.names if params[n].ndim >= 2], weight_decay),
                (" (1-D, no decay)", [n for n in row.names if params[n].ndim < 2], 0.0),
            ]
        for suffix, names, wd in splits:
            if names:
                groups.append(
                    {
                        "params": [params[n] for n in names],
                        "lr": lr,
                        "weight_decay": wd,
                        "name": row.label + suffix,
                        "lr_multiplier": row.lr_multiplier,
                    }
                )
    return groups


def format_table(plan: ParamGroupPlan, *, learning_rate: float, weight_decay: float, title: str = "") -> str:
    """A plain-text table: rule, lr, weight decay, tensors, parameters (one line per rule)."""
    header = ("rule", "lr", "weight decay", "tensors", "parameters")
    lines = []
    for row in plan.rows:
        if row.frozen:
            lr, wd = "frozen", "-"
        else:
            lr = f"{learning_rate * row.lr_multiplier:.3g} (x{row.lr_multiplier:g})"
            wd = f"{row.weight_decay:g}" if row.weight_decay is not None else f"{weight_decay:g} (1-D: 0)"
        lines.append((row.label, lr, wd, f"{len(row.names):,}", f"{row.numel:,}"))
    total = plan.trainable + plan.frozen
    lines.append(("total", "", "", f"{len(plan.row_of):,}", f"{total:,} ({plan.trainable:,} trainable)"))
    widths = [max(len(str(r[c])) for r in [header, *lines]) for c in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if c == 0 else f"{{:>{w}}}" for c, w in enumerate(widths))
    out = [title] if title else []
    out.append(fmt.format(*header))
    out.append("  ".join("-" * w for w in widths))
    out += [fmt.format(*r) for r in lines]
    return "\n".join(out)
