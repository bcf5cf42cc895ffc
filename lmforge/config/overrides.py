"""Changing a parsed params tree: `-S dotted.key=value` overrides and overlay files merged over it.

Neither validates values: validate the result (lmforge.config.validate_params).
"""

from __future__ import annotations

import copy
import types
from typing import Annotated, Union, get_args, get_origin

from pydantic import BaseModel

from lmforge.config import ConfigError, parse_yaml, reject_renamed_keys, renamed_key_hint, whole_file_schema


def parse_override(text: str) -> tuple[str, object]:
    """`dotted.key=value` -> (dotted key, value read as YAML: 3 is an int, true a bool, [a, b] a list)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must read dotted.key=value")
    return key.strip(), parse_yaml(value, f"override {text!r}")


def apply_overrides(tree: dict, overrides: list[str], *, where: str = "params") -> dict:
    """Set each `dotted.key=value` in a parsed params mapping (in place, and returned). Only keys
    that already exist can be set, so a typo is an error, not a new knob nobody reads; a knob's
    old name, in the tree or an override, is an error naming its new one."""
    reject_renamed_keys(tree, where)
    for text in overrides:
        dotted, value = parse_override(text)
        if hint := renamed_key_hint(dotted):
            raise ConfigError(f"override {text!r}: {hint}")
        node = tree
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node, dict) or key not in node:
                raise ConfigError(f"override {text!r}: {where} has no section {key!r}")
            node = node[key]
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"override {text!r}: {where} has no key {dotted!r}")
        node[leaf] = value
    return tree


def merge_overlay(base: dict, overlay: dict, *, where: str = "params", schema: type[BaseModel] | None = None) -> dict:
    """`base` with `overlay` merged over it, key by key (neither is changed): a mapping in both is
    merged, any other overlay value replaces the base's (a null section such as near_dedup takes
    the overlay's mapping whole, a list is replaced, not extended).

    A key the base lacks is a ConfigError naming its dotted path, so a typo in an overlay fails
    here instead of adding a knob nobody reads; unless `schema` (default: Params, the whole file)
    has a place for it: a field that the base leaves to its default (finetune.pad_multiple), or a
    new key of a free-form mapping (tune.space, data_engine.slurm.sbatch_args). Validate the
    result (validate_params): the merge checks key paths, not values. A knob's old name in the
    overlay is an error naming its new one."""
    reject_renamed_keys(overlay, "overlay")
    return _merge(copy.deepcopy(base), overlay, (), where, schema or whole_file_schema())


def _merge(base: dict, overlay: dict, path: tuple[str, ...], where: str, schema: type[BaseModel]) -> dict:
    if not isinstance(overlay, dict):
        raise ConfigError(f"overlay{' ' + '.'.join(path) if path else ''}: expected a mapping, got {type(overlay).__name__}")
    for key, value in overlay.items():
        dotted = (*path, str(key))
        if key not in base and not _schema_has(schema, dotted):
            raise ConfigError(f"overlay key {'.'.join(dotted)!r}: {where} has no such key")
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            _merge(base[key], value, dotted, where, schema)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _schema_has(schema: type[BaseModel], dotted: tuple[str, ...]) -> bool:
    """Whether some reading of the schema has a place at this key path: a field of a section
    (by its YAML name), or any key of a free-form mapping (its key type is checked on validation)."""
    places: list = [schema]
    for key in dotted:
        places = [inner for place in places for option in _options(place) for inner in _children(option, key)]
        if not places:
            return False
    return True


def _options(annotation) -> list:
    """The types a value of this annotation may take: Annotated, Optional and unions unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _options(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [option for arg in get_args(annotation) for option in _options(arg)]
    return [annotation]


def _children(option, key: str) -> list:
    """The annotations found under `key` in a value of type `option` (none if it holds no such key)."""
    if isinstance(option, type) and issubclass(option, BaseModel):
        return [field.annotation for name, field in option.model_fields.items() if (field.alias or name) == key]
    if get_origin(option) is dict:
        return [get_args(option)[1]]
    return []
