"""Regex parameter groups: first match wins, freezing, weight decay, errors, the table."""

import pytest
import torch
from torch import nn

from moedistill.config import ParamGroupRule, ParamGroupsConfig
from moedistill.errors import UserError
from moedistill.param_groups import assign, format_table, freeze, optimizer_groups


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared_core = nn.Parameter(torch.randn(4, 6))
        self.wrapper_a = nn.Linear(6, 2, bias=True)  # weight 2-D, bias 1-D
        self.norm = nn.LayerNorm(6)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 6)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed_tokens.weight  # tied: one parameter, two names


def rules(*triples, default=1.0):
    return ParamGroupsConfig(
        default_lr_multiplier=default,
        rules=[ParamGroupRule(p, m, wd) for p, m, wd in triples],
    )


def test_first_match_wins_and_default_takes_the_rest():
    model = Toy()
    plan = assign(model, rules((r"layers\.0\.", 0.5, None), (r"wrapper", 2.0, None), default=0.1))
    assert plan.multiplier("layers.0.wrapper_a.weight") == 0.5  # rule 0 wins over rule 1
    assert plan.multiplier("layers.1.wrapper_a.weight") == 2.0
    assert plan.multiplier("layers.1.shared_core") == 0.1
    assert plan.multiplier("embed_tokens.weight") == 0.1
    names = [n for n, _ in model.named_parameters()]
    assert sorted(plan.row_of) == sorted(names)  # every parameter exactly once
    assert "head.weight" not in plan.row_of  # the tied copy is the embedding, counted once
    assert plan.trainable + plan.frozen == sum(p.numel() for p in model.parameters())


def test_zero_multiplier_freezes_and_leaves_the_optimizer():
    model = Toy()
    plan = assign(model, rules((r"shared_core", 0.0, None), (r"embed", 0.0, None)))
    freeze(model, plan)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"embed_tokens.weight", "layers.0.shared_core", "layers.1.shared_core"}
    groups = optimizer_groups(model, plan, learning_rate=1e-3, weight_decay=0.1)
    in_opt = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) not in in_opt for n, p in model.named_parameters() if n in frozen)
    assert len(in_opt) == sum(1 for p in model.parameters() if p.requires_grad)
    # a later stage with other rules unfreezes them again
    freeze(model, assign(model, rules()))
    assert all(p.requires_grad for p in model.parameters())


def test_learning_rates_and_weight_decay():
    model = Toy()
    plan = assign(model, rules((r"wrapper", 3.0, None), (r"norm", 0.5, 0.01)))
    groups = {g["name"]: g for g in optimizer_groups(model, plan, learning_rate=2e-3, weight_decay=0.1)}
    assert groups["wrapper"]["lr"] == pytest.approx(6e-3)
    assert groups["wrapper"]["weight_decay"] == 0.1
    assert groups["wrapper (1-D, no decay)"]["weight_decay"] == 0.0  # biases
    assert {p.ndim for p in groups["wrapper (1-D, no decay)"]["params"]} == {1}
    assert groups["norm"]["weight_decay"] == 0.01  # a rule's own weight decay covers 1-D tensors too
    assert groups["norm"]["lr"] == pytest.approx(1e-3)
    assert groups["(default)"]["lr"] == pytest.approx(2e-3)
    for g in groups.values():
        assert g["lr"] == pytest.approx(2e-3 * g["lr_multiplier"])
    # the groups build a real optimizer
    torch.optim.AdamW(list(groups.values()), lr=2e-3)


def test_rule_matching_nothing_is_an_error():
    with pytest.raises(UserError, match=r"rules\[1\].*'\.\*wraper\.\*' matches no parameter"):
        assign(Toy(), rules((r"norm", 1.0, None), (r".*wraper.*", 1.0, None)))


def test_rule_shadowed_by_earlier_rules_is_an_error():
    with pytest.raises(UserError, match=r"stages\[0\]\.param_groups\.rules\[1\].*earlier rules"):
        assign(Toy(), rules((r"layers", 1.0, None), (r"layers\.1", 2.0, None)), where="stages[0].param_groups")


def test_table_lists_every_rule():
    model = Toy()
    plan = assign(model, rules((r"wrapper", 2.0, None), (r"embed", 0.0, None)))
    table = format_table(plan, learning_rate=1e-3, weight_decay=0.0)
    lines = table.splitlines()
    assert lines[0].split() == ["rule", "lr", "weight", "decay", "tensors", "parameters"]
    wrapper = next(line for line in lines if line.startswith("wrapper"))
    assert "0.002 (x2)" in wrapper and " 4 " in wrapper  # 2 weights + 2 biases
    assert "frozen" in next(line for line in lines if line.startswith("embed"))
    assert lines[-1].startswith("total")
