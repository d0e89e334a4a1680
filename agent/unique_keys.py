"""YAML and JSON read as decK (Go's yaml.v3) reads them: a key given twice in one mapping is refused, not
quietly resolved to its last value (`username: alice` then `username: mallory` must not bill mallory; in
the agent's own config, `port: 8000` then `port: 8443` must not meter one port of two)."""

from __future__ import annotations

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"


class RepeatedKey(yaml.YAMLError):
    """A mapping gives one key twice; the lines (1-based) of both, when the reader knows them. The key is
    not kept: a file may hold secrets anywhere."""

    def __init__(self, first_line: int = 0, line: int = 0, column: int = 0) -> None:
        super().__init__()
        self.first_line, self.line, self.column = first_line, line, column


class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Safe loading that refuses a key repeated in one mapping; keys given beside a merge (`<<: *base`)
    still override the merged ones."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        # each mapping's own pairs, kept before a merge (`<<`) adds its base's to them: a base merged into a
        # shallower mapping first is flattened in place, so its own turn would see the merged keys again
        self._own_pairs: dict[int, tuple[yaml.MappingNode, list]] = {}

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        self._own_pairs.setdefault(id(node), (node, list(node.value)))
        super().flatten_mapping(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_lines: dict[object, int] = {}
        _, own_pairs = self._own_pairs.get(id(node), (node, node.value))
        for key_node, _ in own_pairs:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            try:
                if key in first_lines:
                    raise RepeatedKey(first_lines[key], line, key_node.start_mark.column + 1)
                first_lines[key] = line
            except TypeError:  # an unhashable key: the constructor below refuses it
                pass
        return super().construct_mapping(node, deep)


def pairs_once(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """`json.loads`'s object_pairs_hook: the object, or RepeatedKey when a key comes twice."""
    document = dict(pairs)
    if len(document) != len(pairs):
        raise RepeatedKey()
    return document
