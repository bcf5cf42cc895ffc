"""The one flattener: nested mappings to dotted keys, for params, metrics and reports.

    flatten({"val": {"loss": 1.2}, "seed": 3})   -> {"val.loss": 1.2, "seed": 3}
    flatten({"loss": 1.2}, prefix="val")         -> {"val.loss": 1.2}

Leaves (numbers, strings, lists, None) are kept as they are; what a caller wants of them (only
numbers, text cut to a length) is the caller's to pick.
"""

from __future__ import annotations

from typing import Any, Mapping


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat
