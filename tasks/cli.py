"""The `lmforge` command: registry actions that are not pipeline stages.

    lmforge promote lmforge-sentiment                  # @champion <- @challenger if the gate passes
    lmforge promote lmforge-sentiment --force --reason "rollback after incident 12"
    lmforge trace models:/lmforge-sentiment@champion   # commit, data hashes, params, metrics, rebuild

Exit status: 0 done (or nothing to do), 1 the gate refused the promotion, 2 a user error (unknown
name or alias, bad params). The gate (metric, direction, min_gain) is register.<model>.gate of
params.yaml for the model registered under NAME; a challenger that does not beat the baseline
recorded on its version (the classifier's TF-IDF baseline) is refused before any champion is
compared. --force with --reason overrides either refusal, recorded on the version. The registry is MLFLOW_TRACKING_URI, else
register.tracking_uri of params.yaml, else sqlite:///<repo>/mlflow.db.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks import layout


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="lmforge registry actions (promotion and lineage).")
    parser.add_argument("--params", default=str(layout.PARAMS), help="the params file (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    # --params is taken before or after the subcommand
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default=argparse.SUPPRESS, help=f"the params file (default: {layout.PARAMS})")
    promote = sub.add_parser("promote", parents=[common], help="move NAME@champion to NAME@challenger when the gate passes")
    promote.add_argument("name", help="a registered model name (register.<model>.name in params.yaml)")
    promote.add_argument("--force", action="store_true", help="promote even when the gate fails (needs --reason)")
    promote.add_argument("--reason", help="why a forced promotion is made; recorded on the version with the user")
    trace = sub.add_parser("trace", parents=[common], help="print where a registered model came from and how to rebuild it")
    trace.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    return parser


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "promote" and args.force and not (args.reason and args.reason.strip()):
        _parser().error("--force needs --reason TEXT: a forced promotion records why")
    from lmforge.config import ConfigError, load_params
    from lmforge.registry import registration as registry
    from tasks import lineage
    from tasks.register import MODELS

    params = None
    if args.command == "promote" or Path(args.params).exists():
        try:
            params = load_params(args.params)
        except ConfigError as err:
            return _error(str(err))
    uri = registry.resolve_tracking_uri(params, layout.repo_root())
    try:
        with registry.using(uri) as client:
            if args.command == "trace":
                print(registry.trace(args.uri, client=client, inputs=lineage.trace_inputs,
                                     rebuild=lineage.trace_rebuild))
                return 0
            models = {m.name: (key, m) for key, m in ((k, getattr(params.register_, k)) for k in MODELS)}
            if args.name not in models:
                return _error(f"{args.name!r} is not a model of params.yaml (register.*.name: {', '.join(sorted(models))})")
            _, model = models[args.name]
            decision = registry.promote(args.name, model.gate, force=args.force, reason=args.reason, client=client)
    except registry.RegistryError as err:
        return _error(str(err))
    print(decision.message, file=sys.stdout if decision.passed else sys.stderr)
    return 0 if decision.passed else 1


def run() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    run()
