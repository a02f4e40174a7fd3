"""The one YAML reader of metamtl: config files, ``key=value`` overrides and YAML-valued CLI options.

PyYAML's ``safe_load`` follows YAML 1.1, which reads ``1e-3`` as the *string* ``'1e-3'`` (a float
needs a dot there) and ``010`` as the octal integer 8.  :func:`load` reads numbers by YAML 1.2
rules instead:

* ``1e-3``, ``1E5``, ``.5``, ``2.``, ``-1.5e+2``, ``.inf``, ``.nan`` are floats;
* ``010`` is the decimal integer 10 (a leading zero never means octal); write ``0o17`` for octal
  and ``0x1F`` for hexadecimal;
* ``1:30`` is the string ``'1:30'`` (no base-60 numbers) and ``1_000`` is a string.

Everything else (``true``/``false``/``yes``/``no``, ``null``, lists, mappings) is read as by
``yaml.safe_load``.  :func:`dump` writes YAML that :func:`load` reads back to the same values
(strings that would read as numbers are quoted).
"""
from __future__ import annotations

import re
from typing import Any

import yaml

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_INT_RE = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_RE = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


def _yaml12_resolvers() -> dict:
    """SafeLoader's implicit resolvers with the YAML 1.1 int/float rules replaced by YAML 1.2's."""
    table = {first: [(tag, rx) for tag, rx in rules if tag not in (_INT, _FLOAT)]
             for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for tag, regexp, firsts in ((_INT, _INT_RE, "-+0123456789"), (_FLOAT, _FLOAT_RE, "-+0123456789.")):
        for first in firsts:  # ints first: "10" matches both patterns and is an int
            table.setdefault(first, []).append((tag, regexp))
    return table


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """A YAML 1.2 integer: decimal (leading zeros allowed, never octal), ``0o..``, ``0x..``."""
    text = str(loader.construct_scalar(node))
    digits = text.lstrip("+-")
    try:
        if len(digits) > 1 and digits[0] == "0" and digits[1] in "oOxXbB":
            return int(text, 0)
        return int(text, 10)
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer",
                                                node.start_mark) from None


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` reading numbers by YAML 1.2 rules (see the module docstring) and refusing
    a key given twice in one mapping (PyYAML would keep the last silently)."""

    yaml_implicit_resolvers = _yaml12_resolvers()

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged in by `<<: *anchor` may be overridden
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first.setdefault(key, key_node)
            except TypeError:  # an unhashable key: refused by SafeLoader below
                continue
            if earlier is not key_node:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {key!r} twice (first on line {earlier.start_mark.line + 1}); "
                    "give each key once", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


Loader.add_constructor(_INT, _construct_int)


class Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes every string :class:`Loader` would read as something else."""

    yaml_implicit_resolvers = _yaml12_resolvers()


def load(text: str) -> Any:
    """``text`` parsed as YAML with YAML 1.2 numbers; raises ``yaml.YAMLError`` when invalid."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def load_strings(text: str) -> Any:
    """``text`` parsed as YAML with every scalar a string (``2024``, ``010``, ``no`` as written):
    for settings that can only be text.  Raises ``yaml.YAMLError`` when invalid."""
    return yaml.load(text, Loader=yaml.BaseLoader)  # noqa: S506 - builds only str, list and dict


def dump(data: Any, **kwargs: Any) -> str:
    """``data`` as YAML text that :func:`load` reads back unchanged."""
    return yaml.dump(data, Dumper=Dumper, **kwargs)
