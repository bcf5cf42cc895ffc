"""Stage `register`: log the fine-tuned classifier, the pretrained LM and the chat model to MLflow and register them.

    python -m tasks.register [--only sentiment|lm|chat]

Each model of MODELS below becomes a pyfunc (lmforge/registry/serving.py) with a
signature and an input example, registered under its name from params.yaml (register.<model>.name)
with the alias `challenger`, its key lineage as tags (git commit and dirty flag, the dvc.lock hashes
of its data and outputs, the params' digest, the gate's figure and the baseline's it must beat,
the training run's id) and a description to read first; the whole lineage (every dep's hash
from tasks/lineage.py, params, metrics) is the register run's lineage.json. The datasets
(mlflow.log_input) carry the DVC hash of their folder, and the training run's plots are copied
onto the register run. Rerunning on unchanged
inputs registers nothing new. A version carries the pyfunc's code and pinned requirements: it
loads and serves where lmforge is not installed.
Writes reports/register.json (names, versions, aliases, run ids). `lmforge promote` moves
`champion`; this stage never does.

Tracking URI: MLFLOW_TRACKING_URI, else register.tracking_uri, else sqlite:///<repo>/mlflow.db.
"""

from __future__ import annotations

import argparse
import sys

from lmforge.atomic import write_json
from lmforge.errors import UserError
from lmforge.redaction import redact
from lmforge.registry.registration import DataInput, ModelSpec, RunLink
from tasks import layout, lineage
from tasks._common import fail, params_or_exit, timed

RUN_REPORTS = "reports"  # the artifact folder of their MLflow runs that pretrain and evaluate log their reports to

# The models this stage files, each with the stages and params sections that made it.
MODELS = {
    "sentiment": ModelSpec(
        key="sentiment", kind="classifier", folder=str(layout.FINETUNED), metrics=str(layout.FINETUNE_METRICS),
        params_sections=("seed", "clean.task", "split.task", "tune", "finetune", "register.sentiment",
                         "register.serving"),
        datasets=str(layout.TASK_SPLIT), rebuild=("finetune",), build_hint="run `dvc repro finetune` first",
        max_length_key="finetune.max_length",
        # finetune scores a TF-IDF + logistic regression baseline beside the model: promotion needs
        # the model to beat it (lmforge/registry/registration.py, the gate)
        baseline="baseline_tfidf", baseline_name="TF-IDF baseline",
        # its training run is the finetune run that logged this metrics.json (the confusion matrix is there)
        training_runs=(RunLink("finetune", layout.FINETUNE_METRICS.name, str(layout.FINETUNE_METRICS)),)),
    "lm": ModelSpec(
        key="lm", kind="generator", folder=str(layout.PRETRAINED), metrics=str(layout.EVALUATE_METRICS),
        params_sections=("seed", "clean.corpus", "split.corpus", "tokenize", "pretrain", "evaluate", "register.lm",
                         "register.serving"),
        datasets=str(layout.CORPUS_SPLIT), rebuild=("pretrain", "evaluate"),
        build_hint="run `dvc repro pretrain evaluate` first", benchmarks=str(layout.EVALUATE_BENCHMARKS),
        training_runs=(RunLink("pretrain", f"{RUN_REPORTS}/{layout.EVALUATE_METRICS.name}",
                               str(layout.PRETRAIN_REPORTS / layout.EVALUATE_METRICS.name)),
                       RunLink("evaluate", f"{RUN_REPORTS}/{layout.EVALUATE_METRICS.name}", str(layout.EVALUATE_METRICS)))),
    "chat": ModelSpec(
        key="chat", kind="chat", folder=str(layout.CHAT_MODEL), metrics=str(layout.SFT_METRICS),
        params_sections=("seed", "clean.chat", "split.chat", "sft", "register.chat", "register.serving"),
        datasets=str(layout.CHAT_SPLIT), rebuild=("sft",), build_hint="run `dvc repro sft` first",
        # sft scores the base model on the same held-out conversations: promotion needs the chat
        # model's loss to beat it
        baseline="base", baseline_name="base model", benchmarks=str(layout.SFT_BENCHMARKS),
        training_runs=(RunLink("sft", layout.SFT_METRICS.name, str(layout.SFT_METRICS)),)),
}


def data_inputs(lineage_tags: dict[str, str]) -> list[DataInput]:
    """The data folders among a model's dvc.dep.* tags, for MLflow where no split files are at
    hand: named by their path below data/ ("data/tokens" -> "tokens"), digested by their DVC md5."""
    found = []
    for key, md5 in sorted(lineage_tags.items()):
        path = key.removeprefix(lineage.DEP_TAG)
        if key.startswith(lineage.DEP_TAG) and path.startswith(layout.DATA):
            name = path.removeprefix(layout.DATA).replace("/", "-")
            found.append(DataInput(name=name, path=path, digest=md5.removesuffix(".dir")[:36]))
    return found


def key_lineage(lineage_tags: dict[str, str], spec: ModelSpec) -> dict[str, str]:
    """The lineage tags a version carries: whether dvc.lock was there, the data hashes (deps below
    data/) and the model folder's hash; the code deps' and the reports' hashes and the stages stay
    in the register run's lineage.json (and tags), where `lmforge trace` reads them."""
    model = f"{lineage.OUT_TAG}{spec.folder}"
    return {key: value for key, value in lineage_tags.items()
            if key in (lineage.LINEAGE_STATUS, model)
            or key.startswith(lineage.DEP_TAG) and key.removeprefix(lineage.DEP_TAG).startswith(layout.DATA)}


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.register", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(layout.PARAMS), help="the params file (default: %(default)s)")
    parser.add_argument("--only", choices=list(MODELS), action="append",
                        help="register only this model (repeatable; default: all)")
    parser.add_argument("--report", default=str(layout.REGISTER_REPORT), help="where to write the report (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    params = params_or_exit(args.params)
    from lmforge.registry import registration as registry

    root = layout.repo_root()
    uri = registry.resolve_tracking_uri(params, root)
    keys = args.only or list(MODELS)
    report: dict = {"tracking_uri": redact(uri), "models": {}}  # git-tracked: never a password
    with timed("register"), registry.using(uri):
        for key in keys:
            spec = MODELS[key]
            built_by = lineage.model_lineage(root, [spec.folder, spec.metrics])
            for path, recorded, now in lineage.changed_outputs(root, built_by):
                fail(f"register {key}: {path} is not what dvc.lock says its stage built (md5 {recorded} there, "
                     f"{now} here): it changed after `dvc repro` wrote it, so its lineage would be false. "
                     f"Run `dvc repro {' '.join(spec.rebuild)}` to rebuild it, or `dvc checkout {path}` to restore it.")
            try:
                report["models"][key] = registry.register_model(spec, params, root, lineage=built_by,
                                                                version_lineage=key_lineage(built_by, spec),
                                                                data_inputs=data_inputs(built_by))
            except registry.NotServable as err:
                print(f"warning: register {key}: skipped: {err}", file=sys.stderr)
                report["models"][key] = {"skipped": str(err)}
            except UserError as err:
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
