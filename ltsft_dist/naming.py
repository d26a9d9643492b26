"""How parameter names map to module types and layers (for readable summaries), and which name the shared body."""

from __future__ import annotations

import re

def body_prefix(model) -> str:
    """The prefix of the body's parameter names ("bert."): a model's `base_model_prefix`, when its parameters sit
    under it; else "" and the whole model is body (a bare BertModel, a plain module). What is not body is head."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and any(name.startswith(prefix + ".") for name, _ in model.named_parameters()):
        return prefix + "."
    return ""


_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def module_type_and_layer(name: str) -> tuple[str, int | None]:
    """'bert.encoder.layer.3.attention.self.query.weight' -> ('attention.self.query', 3)."""
    module = name.rsplit(".", 1)[0]
    match = _LAYER.search(module + ".")
    if match is None:
        return module, None
    return module[match.end() :] or module, int(match.group(1))
