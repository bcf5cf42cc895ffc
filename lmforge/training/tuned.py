"""What fine-tuning takes from a study: the best trial's values (the best.yaml that
tuning.write_reports writes) merged over the finetune section.

Apart from tuning.py, which runs the study, so that fine-tuning imports neither Optuna's side
nor the tune section's schema: it reads best.yaml, a file, and reruns when that file changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from lmforge.config import ConfigError
from lmforge.config.finetune import FinetuneParams


def with_tuned_values(section: FinetuneParams, overrides: Mapping[str, Any], origin: str) -> FinetuneParams:
    """The finetune section with `overrides` (nested, as a trial or best.yaml holds them) merged in
    and validated again; `origin` names where they came from in the error."""
    from pydantic import ValidationError

    merged = section.model_dump()
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    try:
        return FinetuneParams.model_validate(merged)
    except ValidationError as err:
        # An error on the section itself (an old key name) has an empty location.
        lines = [f"  finetune{''.join('.' + str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{origin} does not fit finetune's schema:\n" + "\n".join(lines)) from None


def read_best_values(path: Path | str) -> dict | None:
    """best.yaml's `params` (nested finetune overrides), or None if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    chosen = raw.get("params") if isinstance(raw, dict) else None
    if not isinstance(chosen, dict):
        raise ConfigError(f"{path}: no `params` mapping")
    return chosen
