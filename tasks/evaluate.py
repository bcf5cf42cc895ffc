"""Stage `evaluate`: score models/pretrained on val and test against a unigram baseline.

    python -m tasks.evaluate

Writes reports/evaluate/metrics.json (per split: loss, perplexity, bits per byte and the unigram
baseline's; masked loss and accuracy for a masked LM), reports/evaluate/loss_by_position.csv
(a DVC plot: mean loss at each position of the context), reports/evaluate/samples.md, and one
MLflow run. The loading, scoring and sampling, and the report files, are
lmforge/evaluation/saved_model.py's; this module takes the paths (tasks/layout.py) and records
the MLflow run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks import layout


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(layout.PARAMS))
    parser.add_argument("--tokens", default=str(layout.TOKENS))
    parser.add_argument("--model", default=str(layout.PRETRAINED))
    parser.add_argument("--reports", default=str(layout.EVALUATE_REPORTS))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from lmforge.config import load_params

    params = load_params(args.params)
    from lmforge.evaluation import saved_model
    from lmforge.registry import tracking
    from tasks.lineage import input_hashes

    lineage = input_hashes([args.tokens, args.model])
    with tracking.stage_run("evaluate", {"seed": params.seed, "evaluate": params.evaluate.model_dump()},
                            tags=lineage) as run:
        try:
            # pretrain.context: for a model folder whose lmforge.json records no context
            result = saved_model.evaluate(params.evaluate, params.seed, Path(args.tokens), Path(args.model),
                                          default_context=params.pretrain.context)
        except saved_model.NoModelError as err:
            raise saved_model.NoModelError(f"{err}: run the pretrain stage first") from None
        paths = saved_model.write_reports(Path(args.reports), result)
        flat = {f"{split}_{k}": v for split in params.evaluate.splits for k, v in result.metrics[split].items()
                if isinstance(v, (int, float))}
        if "base" in result.metrics:  # continued pretraining: the base model's figures beside
            flat.update({f"base_{split}_{k}": v for split in params.evaluate.splits
                         for k, v in result.metrics["base"][split].items() if isinstance(v, (int, float))})
        run.log_metrics(flat)
        for path in paths:
            run.log_artifact(path, "reports")
    for split in params.evaluate.splits:
        print(f"[evaluate] {saved_model.split_line(split, result.metrics[split], result.masked)}", flush=True)
        if against_base := saved_model.base_line(split, result.metrics, result.masked):
            print(f"[evaluate] {against_base}", flush=True)
    return 0


if __name__ == "__main__":
    from tasks._common import run_main

    run_main("evaluate", main)
