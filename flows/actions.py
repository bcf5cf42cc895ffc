"""Flows for the actions around the graph: a tuning worker that joins the shared Optuna study,
and the gated promotion of a registered model. Each runs the same command a person would.

Neither takes a credential or an override of the gate as a parameter: flow parameters show in
the Prefect UI and its API to everyone who can see the deployment. A tuning worker finds its
study's storage URL in a Prefect Secret block named by `storage_secret` (or in the worker's own
LMFORGE_OPTUNA_STORAGE, else tune.storage); a forced promotion is a person's decision, made with
`lmforge promote --force --reason` at a terminal and recorded on the version.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger

from lmforge.redaction import redact


def _run(command: list[str], root: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, cwd=Path(root).resolve(), capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    output = redact((result.stdout + result.stderr).strip())
    get_run_logger().info("%s", output)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{output}")
    return output


@flow(name="lmforge-tune-worker", log_prints=True)
def tune_worker(storage_secret: str | None = None, root: str = ".") -> str:
    """Add trials to the study. Start one per machine; with an RDB storage (PostgreSQL) they all
    join the same study, since the study name and search space come from params.yaml.

    storage_secret: the name of a Prefect Secret block holding the storage URL (the URL itself
    never passes as a parameter); none: LMFORGE_OPTUNA_STORAGE of the worker, else tune.storage."""
    env = None
    if storage_secret:
        from prefect.blocks.system import Secret

        env = {"LMFORGE_OPTUNA_STORAGE": Secret.load(storage_secret).get()}
    return _run([sys.executable, "-m", "tasks.tune"], root, env)


@flow(name="lmforge-promote", log_prints=True)
def promote(model_name: str = "lmforge-sentiment", root: str = ".") -> str:
    """Move `champion` to `challenger` when the gate in params.yaml passes. Forcing past the gate
    is left to `lmforge promote --force --reason TEXT` at a terminal, recorded on the version."""
    return _run([sys.executable, "-m", "tasks.cli", "promote", model_name], root)
