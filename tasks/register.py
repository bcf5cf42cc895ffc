"""Stage `register`: log the fine-tuned classifier and the pretrained LM to MLflow and register them.

    python -m tasks.register [--only sentiment|lm]

Each model becomes a pyfunc (lmforge/registry/serving.py) with a signature and an input example, registered
under its name from params.yaml (register.<model>.name) with the alias `challenger`, and with its
lineage as tags: git commit and dirty flag, the dvc.lock hashes of its stages' inputs, params,
metrics and the datasets (mlflow.log_input). Rerunning on unchanged inputs registers nothing new.
Writes reports/register.json (names, versions, aliases, run ids). `lmforge promote` moves
`champion`; this stage never does.

Tracking URI: MLFLOW_TRACKING_URI, else register.tracking_uri, else sqlite:///<repo>/mlflow.db.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmforge.atomic import write_json
from tasks._common import fail, params_or_exit, timed

REPORT = Path("reports/register.json")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.register", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="the params file (default: %(default)s)")
    parser.add_argument("--only", choices=["sentiment", "lm"], action="append",
                        help="register only this model (repeatable; default: both)")
    parser.add_argument("--report", default=str(REPORT), help="where to write the report (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    params = params_or_exit(args.params)
    from lmforge.registry import registration as registry

    root = Path.cwd()
    uri = registry.resolve_tracking_uri(params, root)
    keys = args.only or list(registry.SPECS)
    report: dict = {"tracking_uri": uri, "models": {}}
    with timed("register"), registry.using(uri):
        for key in keys:
            try:
                report["models"][key] = registry.register_model(registry.SPECS[key], params, root)
            except registry.NotServable as err:
                print(f"warning: register {key}: skipped: {err}", file=sys.stderr)
                report["models"][key] = {"skipped": str(err)}
            except registry.RegistryError as err:
                fail(f"register {key}: {err}")
    write_json(args.report, report)
    for key, entry in report["models"].items():
        if "skipped" in entry:
            print(f"register {key}: skipped ({entry['skipped']})")
            continue
        state = "registered" if entry["registered"] else "unchanged"
        aliases = " ".join("@" + a for a in entry["aliases"]) or "no alias"
        print(f"register {key}: {entry['name']} version {entry['version']} ({state}, {aliases})")


if __name__ == "__main__":
    main()
