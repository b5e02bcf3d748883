"""The named random streams (multilevel_sde.random_streams): ids fixed, distinct within each seed namespace."""

from __future__ import annotations

import ast
from enum import IntEnum
from pathlib import Path

import pytest

from multilevel_sde import random_streams as rs

PACKAGE = Path(rs.__file__).parent
# The namespaces of their own: each one's members are the ids (or offsets) of one kind of seed.
NAMESPACES = {rs.LearningStream: {"COINS": 0, "DIRECTIONS": 1, "MINIBATCH": 2},
              rs.TrueErrorStream: {"PRIOR": 0, "BROWNIAN": 1, "LADDER": 2, "COINS": 3},
              rs.ToyDemoSeed: {"PATH": 0, "SOLVES": 1}}


def test_module_level_stream_ids_share_one_namespace_without_collisions():
    """Every public integer of the module is a stream id of the shared namespace, listed in ``__all__``."""
    ids = {name: value for name, value in vars(rs).items()
           if name.isupper() and isinstance(value, int) and not isinstance(value, bool)}
    assert set(ids) == {name for name in rs.__all__ if name.isupper()}
    assert len(set(ids.values())) == len(ids), ids


@pytest.mark.parametrize("namespace", list(NAMESPACES), ids=lambda n: n.__name__)
def test_each_namespace_keeps_its_recorded_ids_and_they_are_distinct(namespace):
    assert issubclass(namespace, IntEnum) and namespace.__name__ in rs.__all__
    assert {m.name: m.value for m in namespace} == NAMESPACES[namespace]
    assert len({int(m) for m in namespace}) == len(namespace)


@pytest.mark.parametrize("namespace", list(NAMESPACES), ids=lambda n: n.__name__)
def test_members_derive_the_same_seeds_as_their_integers(namespace):
    """``derive_seed`` and seed offsets see a member as the plain integer it replaced: the numbers do not move."""
    for member in namespace:
        assert rs.derive_seed(12345, member) == rs.derive_seed(12345, int(member))
        assert rs.derive_seed(12345, member, 7) == rs.derive_seed(12345, int(member), 7)
        assert type(12345 + member) is int and 12345 + member == 12345 + int(member)


def _integer_stream_arguments(tree: ast.AST):
    """``(line, source)`` of every ``derive_seed(seed, <integer literal>, ...)`` call, and of every
    ``seed + <integer literal>`` / ``seed - <integer literal>`` expression."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "derive_seed":
            if any(isinstance(a, ast.Constant) and isinstance(a.value, int) for a in node.args[1:]):
                yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            names = [n for n in (node.left, node.right) if isinstance(n, ast.Name) and "seed" in n.id]
            numbers = [n for n in (node.left, node.right) if isinstance(n, ast.Constant) and isinstance(n.value, int)]
            if names and numbers:
                yield node.lineno, ast.unparse(node)


def test_no_module_of_the_package_hard_codes_a_stream_id():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {source}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.name != "random_streams.py"
             for line, source in _integer_stream_arguments(ast.parse(path.read_text(), str(path)))]
    assert not found, "\n".join(found)
