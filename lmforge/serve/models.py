"""What the server serves, and how it names it.

A registered version is served under the id NAME/VERSION (lmforge-chat/3), whatever alias it was
asked by, so every answer names the exact version that produced it; its card (/v1/models/{id})
carries that version's lineage: commit, DVC hashes of its data and inputs, a digest of its params,
its metrics, and the `lmforge trace` command that shows the rest. A folder is served under its
own name with no lineage.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ServedModel:
    id: str
    folder: Path
    created: int
    lineage: dict[str, Any] = field(default_factory=dict)

    def card(self) -> dict[str, Any]:
        """The OpenAI model object, with lmforge's lineage beside its fields."""
        card: dict[str, Any] = {"id": self.id, "object": "model", "created": self.created, "owned_by": "lmforge"}
        if self.lineage:
            card["lineage"] = self.lineage
        return card


def from_folder(folder: Path | str) -> ServedModel:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        from lmforge.registry.registration import RegistryError

        raise RegistryError(f"{folder} is neither a registry URI (models:/NAME@ALIAS) nor a transformers folder")
    return ServedModel(id=folder.resolve().name, folder=folder, created=int((folder / "config.json").stat().st_mtime))


def from_registry(uri: str, scratch: Path, client) -> ServedModel:
    """Download the version `uri` names (call inside registration.using) and read its lineage."""
    from mlflow.exceptions import MlflowException

    from lmforge.registry import registration as registry

    name, alias, number = registry.parse_model_uri(uri)
    try:
        version = registry.by_alias(client, name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as err:
        raise registry.RegistryError(f"{uri}: {err.message}") from None
    if version is None:
        raise registry.RegistryError(f"{uri}: {name} has no alias @{alias} (or no such model)")
    folder = registry.model_folder(f"models:/{name}/{version.version}", scratch)  # the version, not the alias: it may move
    tags = dict(version.tags)
    aliases = sorted(a for a, v in client.get_registered_model(name).aliases.items() if str(v) == str(version.version))
    lineage = {
        "registered_model": name,
        "version": int(version.version),
        "aliases": aliases,
        "requested_as": uri,
        "run_id": version.run_id,
        "commit": tags.get("git_commit", "unknown"),
        "dirty": tags.get("git_dirty", "unknown"),
        "fingerprint": tags.get(registry.FINGERPRINT),
        # versions registered before the digest tag carry the params themselves
        "params_sha256": tags.get(registry.PARAMS_DIGEST)
        or (hashlib.sha256(tags["params"].encode()).hexdigest() if "params" in tags else None),
        "inputs": {key[len("dvc."):]: value for key, value in sorted(tags.items()) if key.startswith("dvc.")},
        "metrics": registry.version_metrics(client, version),
        "trace": f"lmforge trace models:/{name}/{version.version}",
    }
    created = int(version.creation_timestamp / 1000) if version.creation_timestamp else int(time.time())
    return ServedModel(id=f"{name}/{version.version}", folder=folder, created=created, lineage=lineage)


def check_causal(served: ServedModel) -> None:
    """Only a causal LM generates; the classifier keeps MLflow's /invocations (make serve)."""
    import json

    from lmforge.evaluation.benchmarks import is_causal_lm
    from lmforge.registry.registration import RegistryError

    architectures = json.loads((served.folder / "config.json").read_text()).get("architectures") or []
    if not is_causal_lm(architectures):
        raise RegistryError(f"{served.id} is a {', '.join(architectures) or 'model of unknown kind'}: `lmforge serve` serves "
                            "causal language models; serve a classifier with `make serve` (MLflow's /invocations)")
