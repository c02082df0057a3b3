"""Sweep files read as YAML, safely: numbers as everyone writes them, and every duplicate key, recursive alias
or alias bomb refused on the parsed nodes before any value is built (``read_yaml``).

Both the config (``poisonsweep.engine.config``) and the plugins a config names (``poisonsweep.engine.plugins``)
read a sweep file through here.
"""

from __future__ import annotations

import re

import yaml


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when present: 10,000-point grids parse 5x faster
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; read it as the number everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
               r"|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))
# ...but a plain integer stays an int (the float resolver above would take it too)
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:float"]
    + [(tag, regex) for tag, regex in resolvers if tag == "tag:yaml.org,2002:float"]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()}


# What a sweep file may expand to before anything is built from it (issue 22): YAML aliases may add this
# many values to the ones written out (a real config adds tens; an alias bomb, ten levels of ten aliases
# each, adds 10^10). (A grid's bound, ``MAX_TRIALS``, is ``poisonsweep.engine.config``'s.)
MAX_ALIAS_VALUES = 10_000
MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlRefused(yaml.YAMLError):
    """A YAML text we refuse to build: a duplicate key, a recursive alias or an alias expansion over the limit."""


def read_yaml(text: str):
    """Parse ``text`` as YAML; ``YamlRefused`` for duplicate keys and for aliases that expand past
    ``MAX_ALIAS_VALUES``, found on the parsed nodes before any value is built."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_nodes(root) -> None:
    """Refuse duplicate mapping keys and alias expansions over ``MAX_ALIAS_VALUES``. An alias is the
    same node object reached twice, so the walk visits each node once (post-order, without recursion)
    and adds up the size each would have once expanded."""
    expanded: dict[int, int] = {}  # id(node) -> values it stands for once its aliases are expanded
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            on_path.discard(id(node))
            expanded[id(node)] = 1 + sum(expanded[id(child)] for child in _children(node))
            continue
        if id(node) in expanded:
            continue
        if id(node) in on_path:
            raise YamlRefused(f"line {node.start_mark.line + 1}: an alias refers to a value that contains it")
        on_path.add(id(node))
        _check_duplicate_keys(node)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in expanded)
    added = expanded[id(root)] - len(expanded)
    if added > MAX_ALIAS_VALUES:
        raise YamlRefused(f"its aliases (*name) expand to {added:,} more values than are written out, over the "
                          f"limit of {MAX_ALIAS_VALUES:,}; write the values out, or use fewer aliases")


def _check_duplicate_keys(node) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[tuple, int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == MERGE_TAG:
            continue
        line = key.start_mark.line + 1
        if (key.tag, key.value) in first_line:
            raise YamlRefused(f"duplicate key {key.value!r} at line {line} (first at line "
                              f"{first_line[key.tag, key.value]}); keep one")
        first_line[key.tag, key.value] = line
