"""The rule registry is data: every rule is documented, listed by ``bnfold patterns``, and well formed."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
from click.testing import CliRunner

from bnfold import Reason
from bnfold.cli.commands import main
from bnfold.fold.affine import AFFINE_OPS
from bnfold.fold.channels import LAYOUT_OPS
from bnfold.fold.rules import REGISTRY, Rule, Side

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_registry_is_an_immutable_tuple_of_frozen_rules() -> None:
    assert isinstance(REGISTRY, tuple) and REGISTRY
    for r in REGISTRY:
        assert isinstance(r, Rule)
        with pytest.raises(dataclasses.FrozenInstanceError):
            r.name = "x"  # type: ignore[misc]


def test_rule_names_are_unique_and_name_their_ops() -> None:
    names = [r.name for r in REGISTRY]
    assert len(names) == len(set(names))
    for r in REGISTRY:
        ops = r.name.split("+")
        assert r.target in ops, r.name
        assert set(r.affine) <= set(AFFINE_OPS) and r.affine
        assert set(r.through) <= set(LAYOUT_OPS)
        # the name is the pattern with its first absorbed op, in data-flow order
        first = "BatchNormalization" if "BatchNormalization" in r.affine else r.affine[0]
        assert ops[-1 if r.side is Side.PRODUCER else 0] == first, r.name


@pytest.mark.parametrize("rule", REGISTRY, ids=lambda r: r.name)
def test_every_rule_is_documented_in_the_readme_pattern_tables(rule: Rule) -> None:
    tables = [line for line in readme().splitlines() if line.startswith("|")]
    assert any(f"`{rule.name}`" in line for line in tables), f"{rule.name} is not in a README pattern table"


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.value)
def test_every_reason_code_is_documented_and_named_as_its_value(reason: Reason) -> None:
    assert reason.name == reason.value.upper()
    assert re.search(rf"^\| `{reason.value}` \|", readme(), re.M), f"{reason.value} is not in the README's table"


def test_patterns_command_lists_the_registry() -> None:
    r = CliRunner().invoke(main, ["patterns"])
    assert r.exit_code == 0, r.output
    for rule in REGISTRY:
        assert rule.name in r.output
    r = CliRunner().invoke(main, ["patterns", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert [p["name"] for p in doc["patterns"]] == [rule.name for rule in REGISTRY]
    assert {p["side"] for p in doc["patterns"]} == {"producer", "consumer"}
    conv = next(p for p in doc["patterns"] if p["name"] == "Conv+BatchNormalization")
    assert conv["target"] == "Conv" and "Transpose" in conv["through"] and "Mul" in conv["affine"]
