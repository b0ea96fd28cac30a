"""Reading YAML a user hands in (search spaces, exported configs) without letting the file decide the cost.

`yaml.safe_load` constructs no arbitrary objects, but a 500-byte file of nested aliases ("billion laughs")
expands to billions of nodes as soon as anything walks it (validation, hashing, an error message). Here a
file is refused when it is larger than a space or config ever is, or when its nodes, aliases expanded,
exceed a bound; the count is made on the composed node graph with each shared node counted once per use but
computed once, so the check itself costs time linear in the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a search space or exported config is a few KB
MAX_NODES = 100_000  # scalars, sequences and mappings once aliases are expanded


class YamlError(ValueError):
    """A YAML file refused or unreadable; the message names the file and why."""


def short(value: Any, limit: int = 80) -> str:
    """repr() cut to `limit` characters: user input is never echoed whole into a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _expanded_size(node: yaml.Node, memo: dict[int, int], limit: int) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = limit + 1  # a node reached again while being counted is a cycle: refuse it
    size = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            size += _expanded_size(child, memo, limit)
            if size > limit:
                break
    elif isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            size += _expanded_size(key_node, memo, limit) + _expanded_size(value_node, memo, limit)
            if size > limit:
                break
    memo[key] = size
    return size


def load_yaml(path: Path | str, what: str, max_bytes: int = MAX_BYTES, max_nodes: int = MAX_NODES) -> Any:
    """Parse a user's YAML file safely (plain data only), refusing oversized or alias-bombed input."""
    path = Path(path)
    if not path.is_file():
        raise YamlError(f"{path}: {what} not found" + (" (it is a folder)" if path.is_dir() else ""))
    size = path.stat().st_size
    if size > max_bytes:
        raise YamlError(f"{path}: {size:,} bytes; a {what} of over {max_bytes:,} bytes is refused")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise YamlError(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from None
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters: may raise already
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, max_nodes) > max_nodes:
            raise YamlError(f"{path}: more than {max_nodes:,} values once its aliases (*name) are expanded; a "
                            f"{what} needs a few hundred. Refused")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise YamlError(f"{path}: not valid YAML ({str(exc)[:500]})") from None
    except RecursionError:
        raise YamlError(f"{path}: nested too deeply to be a {what}") from None
    finally:
        if loader is not None:
            loader.dispose()
