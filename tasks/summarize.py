"""summarize: gather the run's figures into reports/summary.md (and log it to MLflow).

Not a DVC stage: it reports the registry as it is now (after `lmforge promote` moved aliases),
so `make run` and the pipeline flow call it last. Safe to run at any time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.registry import tracking
from lmforge.atomic import atomic_path
from tasks.summary import build_summary

SUMMARY = Path("reports/summary.md")


def current_aliases(report: Path) -> dict[str, dict[str, str]] | None:
    """Model name -> alias -> version, from the registry named in reports/register.json."""
    import json

    if not report.exists() or not tracking.enabled():
        return None
    from mlflow import MlflowClient

    registered = json.loads(report.read_text())
    client = MlflowClient(tracking_uri=registered.get("tracking_uri"), registry_uri=registered.get("tracking_uri"))
    aliases = {}
    for entry in registered.get("models", {}).values():
        if "name" in entry:
            model = client.get_registered_model(entry["name"])
            aliases[entry["name"]] = dict(model.aliases)
    return aliases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reports", default="reports", help="the reports folder (default: %(default)s)")
    args = parser.parse_args()
    reports = Path(args.reports)
    text = build_summary(reports, current_aliases(reports / "register.json"))
    with atomic_path(reports / "summary.md") as tmp:
        tmp.write_text(text)
    if (reports / "register.json").exists():  # a tracking store exists: keep the page beside the models
        with tracking.stage_run("summary") as run:
            run.log_artifact(reports / "summary.md")
    print(f"summary: {reports / 'summary.md'}")


if __name__ == "__main__":
    main()
