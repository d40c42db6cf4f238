"""The YAML loader of experiment configs: safe, plain, and strict about repeated keys.

::

    yaml.load(text, Loader=ConfigLoader)

A :class:`yaml.SafeLoader` that refuses, while composing and so before anything is built:

- anchors and aliases (``&name``, ``*name``, also in ``<<: *name`` merges): nine levels of
  ten aliases each, 558 bytes of YAML, stand for a billion strings, and a config has no need
  for them;
- a key written twice in one mapping (:class:`DuplicateKeyError`, naming the key and both
  lines), where PyYAML would silently keep the last value.
"""

from __future__ import annotations

from typing import Any

import yaml

from oculi.errors import brief


class DuplicateKeyError(yaml.YAMLError):
    """A key that appears twice in one mapping of a config."""


class ConfigLoader(yaml.SafeLoader):
    """:class:`yaml.SafeLoader` without anchors or aliases, with duplicate keys refused."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if isinstance(event, yaml.AliasEvent) or anchor is not None:
            alias = isinstance(event, yaml.AliasEvent)
            kinds, sign = ("aliases", "*") if alias else ("anchors", "&")
            raise yaml.composer.ComposerError(
                None,
                None,
                f"YAML {kinds} ({sign}{str(anchor)[:40]}) are not allowed in a "
                "config: write each value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader reports it below
                    continue
                if first is not None:
                    raise DuplicateKeyError(
                        f"the key {brief(key, 60)} appears twice (lines {first} and {line}); "
                        "a key may be given once"
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)
