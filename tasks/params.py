"""params: merge an overlay such as configs/gpu.yaml into params.yaml, validated, comments kept.

    python -m tasks.params configs/gpu.yaml              # then `dvc repro` reruns what changed
    python -m tasks.params configs/gpu.yaml --dry-run    # list the changes, write nothing

An overlay holds only the keys it changes (see lmforge.config.merge_overlay): a key params.yaml
has no place for is an error naming it, and the merged file is validated before it is written,
so a bad overlay leaves params.yaml as it was. params.yaml keeps its comments and layout; only
the changed values are rewritten (and a section the overlay adds where params.yaml had null)."""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import yaml

from lmforge.atomic import atomic_path, locked
from lmforge.config import ConfigError, parse_yaml, validate_params
from lmforge.config.overrides import merge_overlay
from tasks._common import fail
from tasks.layout import PARAMS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overlay", help="a YAML file holding only the keys to change, e.g. configs/gpu.yaml")
    parser.add_argument("--params", default=str(PARAMS), help="the params file to update (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="list the changes and write nothing")
    args = parser.parse_args()
    try:
        changes = apply_overlay(Path(args.params), Path(args.overlay), write=not args.dry_run)
    except ConfigError as err:
        fail(str(err))
    verb = "would change" if args.dry_run else "changed"
    print(f"{args.params}: {verb} {len(changes)} key(s) from {args.overlay}")
    for line in changes:
        print(f"  {line}")


def apply_overlay(params_path: Path, overlay_path: Path, *, write: bool = True) -> list[str]:
    """Merge the overlay into the params file; return the changed keys as `dotted: old -> new`.

    A write holds a lock beside the params file from its read to its rename: two edits at once run
    one after the other, each merging into what the other wrote, so neither change is lost."""
    if not write:
        return _merge(params_path, overlay_path)[0]
    _require_file(params_path)  # before the lock, which is made in its folder
    with locked(params_path):
        changes, text = _merge(params_path, overlay_path)
        if changes:
            _write_keeping_mode(params_path, text)
    return changes


def _merge(params_path: Path, overlay_path: Path) -> tuple[list[str], str]:
    """The changed keys and the params file's new text (validated)."""
    base_text, overlay_text = _read_text(params_path), _read_text(overlay_path)
    base, overlay = _mapping(base_text, params_path), _mapping(overlay_text, overlay_path)
    merged = merge_overlay(base, overlay, where=str(params_path))
    validate_params(merged)
    changes = changed_keys(base, merged)
    return changes, (overlaid_text(base_text, overlay_text, merged) if changes else base_text)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"{path} not found")


def _read_text(path: Path) -> str:
    _require_file(path)
    return path.read_text()


def _mapping(text: str, path: Path) -> dict:
    tree = parse_yaml(text, str(path))
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(tree).__name__}")
    return tree


def changed_keys(before: dict, after: dict, path: tuple[str, ...] = ()) -> list[str]:
    """`dotted: old -> new` for every leaf whose value differs (a key new in `after` reads old None)."""
    lines = []
    for key, new in after.items():
        dotted = (*path, str(key))
        old = before.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += changed_keys(old, new, dotted)
        elif old != new or type(old) is not type(new):
            lines.append(f"{'.'.join(dotted)}: {old!r} -> {new!r}")
    return lines


def overlaid_text(base_text: str, overlay_text: str, merged: dict) -> str:
    """The params file's text with the overlay's values set in place. A round trip through
    ruamel.yaml (installed with dvc) keeps every comment, quote and flow list of the file; the
    result is checked to read back as exactly the validated `merged` tree."""
    from ruamel.yaml import YAML

    round_trip = YAML()
    round_trip.preserve_quotes = True
    round_trip.width = 4096  # never fold a long line
    # ruamel writes None as an empty value; params.yaml spells it null
    round_trip.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = round_trip.load(base_text)
    _set_values(document, round_trip.load(overlay_text))
    out = io.StringIO()
    round_trip.dump(document, out)
    text = out.getvalue()
    if yaml.safe_load(text) != merged:
        raise RuntimeError("the rewritten params text does not read back as the merged params (a bug in tasks/params.py)")
    return text


def _set_values(node, overlay) -> None:
    # The same rule as merge_overlay: mappings merge key by key, anything else replaces the value.
    for key, value in overlay.items():
        if isinstance(node.get(key), dict) and isinstance(value, dict):
            _set_values(node[key], value)
        else:
            node[key] = value


def _write_keeping_mode(path: Path, text: str) -> None:
    """Write beside the file, then rename over it: an interrupted write never leaves half a
    params.yaml. The temporary file is created private (0600); it gets the old file's mode."""
    mode = path.stat().st_mode
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        os.chmod(tmp, mode)


if __name__ == "__main__":
    main()
