"""The deployments: the pipeline (nightly, paused until someone turns it on in the UI), tuning
workers and promotion. `python -m flows.deployments` serves them from this process; for workers
of the process pool lmforge-process, `prefect deploy --all` reads the same definitions from
prefect.yaml at the repository root (tests/test_flows.py keeps the two alike)."""

from __future__ import annotations

from prefect import serve

from flows.actions import promote, tune_worker
from flows.pipeline import pipeline

NIGHTLY = "0 2 * * *"


def build_deployments() -> list:
    return [
        pipeline.to_deployment(
            name="nightly", cron=NIGHTLY, paused=True, tags=["lmforge", "pipeline"],
            description="Rebuild whatever changed in the DVC graph; paused until switched on.",
        ),
        pipeline.to_deployment(name="on-demand", tags=["lmforge", "pipeline"],
                               description="Run the pipeline with targets and param overrides."),
        tune_worker.to_deployment(name="tune-worker", tags=["lmforge", "tune"],
                                  description="One Optuna worker; start several against an RDB storage."),
        promote.to_deployment(name="promote", tags=["lmforge", "registry"],
                              description="Gated promotion of challenger to champion."),
    ]


if __name__ == "__main__":
    serve(*build_deployments())
