"""Flows for the actions around the graph: a tuning worker that joins the shared Optuna study,
and the gated promotion of a registered model. Each runs the same command a person would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger


def _run(command: list[str], root: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, cwd=Path(root).resolve(), capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    output = (result.stdout + result.stderr).strip()
    get_run_logger().info("%s", output)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{output}")
    return output


@flow(name="lmforge-tune-worker", log_prints=True)
def tune_worker(storage: str | None = None, root: str = ".") -> str:
    """Add trials to the study. Start one per machine; with an RDB `storage` (PostgreSQL) they
    all join the same study, since the study name and search space come from params.yaml."""
    env = {"LMFORGE_OPTUNA_STORAGE": storage} if storage else None
    return _run([sys.executable, "-m", "tasks.tune"], root, env)


@flow(name="lmforge-promote", log_prints=True)
def promote(model_name: str = "lmforge-sentiment", force: bool = False, reason: str = "", root: str = ".") -> str:
    """Move `champion` to `challenger` when the gate in params.yaml passes (or when forced)."""
    command = [sys.executable, "-m", "tasks.cli", "promote", model_name]
    if force:
        command += ["--force", "--reason", reason or "forced from Prefect"]
    return _run(command, root)
