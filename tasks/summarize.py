"""summarize: gather the run's figures into reports/summary.md (and log it to MLflow).

Not a DVC stage: it reports the registry as it is now (after `lmforge promote` moved aliases),
so `make run` and the pipeline flow call it last. Safe to run at any time. Each registered
model's challenger is judged as `lmforge promote` would judge it (the gates of params.yaml):
its figure beside the champion's and its baseline's, and in words whether it beats its baseline
and whether it was or would be promoted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.registry import tracking
from lmforge.atomic import atomic_path
from tasks import layout
from tasks.summary import build_summary


def standing_entry(found) -> dict:
    """A registration.Standing as the plain figures tasks/summary.py:verdict words."""
    figure = lambda pair: pair[1] if pair else None  # noqa: E731
    return {
        "metric": found.challenger_figure[0] if found.challenger_figure else found.metric,
        "challenger": found.challenger.version, "challenger_value": figure(found.challenger_figure),
        "champion": found.champion.version if found.champion is not None else None,
        "champion_value": figure(found.champion_figure),
        "baseline_name": found.baseline[0] if found.baseline else None, "baseline_value": figure(found.baseline),
        "beats_baseline": found.beats_baseline, "passed": found.passed, "is_champion": found.is_champion,
        "forced": found.is_champion and found.champion.tags.get("forced") == "true",
    }


def standings(report: Path, params_path: Path) -> dict[str, dict] | None:
    """Model name -> its challenger's standing under the gate of params.yaml (register.<key>.gate),
    judged now as `lmforge promote` would, for the models in reports/register.json."""
    import json

    if not report.exists() or not params_path.exists() or not tracking.enabled():
        return None
    from lmforge.config import load_params
    from lmforge.registry import registration as registry

    params = load_params(params_path)
    registered = json.loads(report.read_text())
    client = registry_client(registered, params_path)
    found = {}
    for key, entry in registered.get("models", {}).items():
        model = getattr(params.register_, key, None)
        if "name" not in entry or model is None:
            continue
        try:
            found[entry["name"]] = standing_entry(registry.standing(client, entry["name"], model.gate))
        except registry.RegistryError:
            continue  # no challenger (a registry since cleared): the table above says what there is
    return found


def registry_client(registered: dict, params_path: Path):
    """A client on the registry that reports/register.json names. The report keeps the URI with its
    password masked; such a URI is resolved again as register resolved it (MLFLOW_TRACKING_URI,
    else register.tracking_uri of the params)."""
    from mlflow import MlflowClient

    from lmforge.config import load_params
    from lmforge.redaction import MASK
    from lmforge.registry import registration as registry

    uri = registered.get("tracking_uri")
    if not uri or MASK in uri:
        uri = registry.resolve_tracking_uri(load_params(params_path) if params_path.exists() else None, Path.cwd())
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def current_aliases(report: Path, params_path: Path = layout.PARAMS) -> dict[str, dict[str, str]] | None:
    """Model name -> alias -> version, from the registry named in reports/register.json."""
    import json

    if not report.exists() or not tracking.enabled():
        return None
    registered = json.loads(report.read_text())
    client = registry_client(registered, params_path)
    aliases = {}
    for entry in registered.get("models", {}).values():
        if "name" in entry:
            model = client.get_registered_model(entry["name"])
            aliases[entry["name"]] = dict(model.aliases)
    return aliases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reports", default=str(layout.REPORTS), help="the reports folder (default: %(default)s)")
    parser.add_argument("--params", default=str(layout.PARAMS), help="the params file, for the gates (default: %(default)s)")
    args = parser.parse_args()
    reports = Path(args.reports)
    report = reports / "register.json"
    text = build_summary(reports, current_aliases(report, Path(args.params)), standings(report, Path(args.params)))
    with atomic_path(reports / "summary.md") as tmp:
        tmp.write_text(text)
    if (reports / "register.json").exists():  # a tracking store exists: keep the page beside the models
        with tracking.stage_run("summary") as run:
            run.log_artifact(reports / "summary.md")
    print(f"summary: {reports / 'summary.md'}")


if __name__ == "__main__":
    main()
