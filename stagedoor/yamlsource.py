"""YAML loading that remembers line numbers, so every policy error can say ``file:line``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class LinedMap:
    """A YAML mapping with the line (1-based) of the mapping itself and of each key."""

    values: dict[str, Any]
    line: int
    key_lines: dict[str, int] = field(default_factory=dict)

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


@dataclass
class LinedList:
    items: list[Any]
    line: int
    item_lines: list[int] = field(default_factory=list)


@dataclass
class LinedScalar:
    value: Any
    line: int


class YamlSyntaxError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class DuplicateKeyError(YamlSyntaxError):
    pass


#: Nodes one document may expand to. Aliases are expanded in place, so a few hundred bytes of
#: nested aliases ("billion laughs") would otherwise become billions of objects.
MAX_NODES = 100_000


def _convert(node: yaml.Node, loader: yaml.SafeLoader, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise YamlSyntaxError(node.start_mark.line + 1,
                              f"document too large: more than {MAX_NODES} values "
                              "(nested aliases?)")
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result = LinedMap({}, line)
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                key = str(key)
            if key in result.values:
                raise DuplicateKeyError(key_node.start_mark.line + 1, f"duplicate key '{key}'")
            result.values[key] = _convert(value_node, loader, budget)
            result.key_lines[key] = key_node.start_mark.line + 1
        return result
    if isinstance(node, yaml.SequenceNode):
        items = [_convert(child, loader, budget) for child in node.value]
        return LinedList(items, line, [child.start_mark.line + 1 for child in node.value])
    return LinedScalar(loader.construct_object(node, deep=True), line)


def load_lined(text: str) -> Any:
    """Parse one YAML document into Lined* wrappers. Raises :class:`YamlSyntaxError`."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        return _convert(node, loader, [MAX_NODES])
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise YamlSyntaxError(line, f"invalid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(1, f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def plain(value: Any) -> Any:
    """Strip the line wrappers, giving ordinary dicts, lists and scalars."""
    if isinstance(value, LinedMap):
        return {k: plain(v) for k, v in value.values.items()}
    if isinstance(value, LinedList):
        return [plain(v) for v in value.items]
    if isinstance(value, LinedScalar):
        return value.value
    return value
