"""How parameter names map to module types and layers, for readable summaries."""

from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def module_type_and_layer(name: str) -> tuple[str, int | None]:
    """'bert.encoder.layer.3.attention.self.query.weight' -> ('attention.self.query', 3)."""
    module = name.rsplit(".", 1)[0]
    match = _LAYER.search(module + ".")
    if match is None:
        return module, None
    return module[match.end() :] or module, int(match.group(1))
