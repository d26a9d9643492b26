"""How parameter names map to module types and layers, for readable summaries."""

from __future__ import annotations

import re

_LAYER = re.compile(r"\.(\d+)\.")


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def module_type(name: str) -> str:
    """`bert.encoder.layer.3.attention.self.query.weight` -> `encoder.layer.*.attention.self.query.weight`
    with the model prefix kept off, so the same module in every layer shares one row."""
    return _LAYER.sub(".*.", name, count=1)
