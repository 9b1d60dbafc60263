"""Reading a PruneJob YAML as kubectl would, and refusing what it (or the API server) would refuse.

PyYAML alone reads YAML 1.1: `5e-3` becomes a string where kubectl (YAML 1.2) reads a number,
duplicate keys silently keep the last one (kubectl refuses them), an alias bomb expands into
billions of nodes once anything walks the result, deep nesting overflows the stack, and `.nan`,
`.inf`, integers past int64 and a list or mapping as a key (`? [a, b]`) load fine but cannot be
sent to the API server. Each of these is one line here, naming where it is.
"""

from __future__ import annotations

import math
import re

import yaml

from .errors import UserError

MAX_NODES = 100_000  # after alias expansion: a PruneJob has a few hundred
MAX_DEPTH = 64  # a PruneJob nests 6 deep
INT64 = (-(2 ** 63), 2 ** 63 - 1)
# YAML 1.2 core schema floats (what kubectl reads): an exponent without a dot is a number too
FLOAT_12 = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_12, list("-+0123456789."))


def _no_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):  # `? [a, b]`: JSON, and so Kubernetes, has none
            kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
            raise UserError(f"line {key_node.start_mark.line + 1}: a mapping key is a {kind}; a PruneJob's keys "
                            "are field names (plain strings)")
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise UserError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first on line "
                            f"{seen[key] + 1}); kubectl refuses it too: keep one")
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _size(node, depth: int, memo: dict) -> int:
    """Nodes after alias expansion (an alias counts its whole target again), refusing deep nesting."""
    if depth > MAX_DEPTH:
        raise UserError(f"line {node.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep; "
                        "a PruneJob is a few levels deep")
    if id(node) in memo:
        return memo[id(node)]
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_size(child, depth + 1, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_size(k, depth + 1, memo) + _size(v, depth + 1, memo) for k, v in node.value)
    memo[id(node)] = total
    if total > MAX_NODES:
        raise UserError(f"line {node.start_mark.line + 1}: expands to more than {MAX_NODES} values "
                        "(YAML aliases?); a PruneJob has a few hundred")
    return total


def load_all(text: str, where: str) -> list:
    """The documents of `text`, checked; UserError (one line) otherwise."""
    try:
        nodes = list(yaml.compose_all(text, Loader=_Loader))
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to read; a PruneJob is a few levels deep") from None
    except yaml.YAMLError as e:
        raise UserError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None
    docs = []
    for node in nodes:
        if node is None:
            continue
        try:
            _size(node, 0, {})
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        loader = _Loader("")
        try:
            doc = loader.construct_document(node)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        except yaml.YAMLError as e:
            raise UserError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None
        if doc is not None:
            docs.append(doc)
    for doc in docs:
        problems = list(_unsendable(doc, ""))
        if problems:
            raise UserError(f"{where}: " + "; ".join(problems[:5]))
    return docs


def _unsendable(value, path: str):
    """Values JSON and the API server refuse: NaN, infinities, integers past int64."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        yield f"{path or '(document)'}: {value} is not a number Kubernetes accepts; give a finite number"
    elif isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        yield f"{path or '(document)'}: {value} is past the 64-bit integer range"
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _unsendable(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _unsendable(v, f"{path}[{i}]")
