"""Stage `evaluate`: score models/pretrained on val and test against a unigram baseline.

    python -m tasks.evaluate

Writes reports/evaluate/metrics.json (per split: loss, perplexity, bits per byte and the unigram
baseline's; masked loss and accuracy for a masked LM), reports/evaluate/benchmarks.json (the
lm-evaluation-harness tasks of evaluate.benchmarks: acc, acc_norm and their stderr, on local copies
of the validation sets), reports/evaluate/loss_by_position.csv
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


def benchmark_scores(settings, model: Path, masked: bool) -> dict:
    """The harness's benchmark scores of the model, or why there are none (the file is written
    either way: DVC expects it)."""
    if not settings.benchmarks:
        return {"tasks": {}, "skipped": "evaluate.benchmarks is empty"}
    if masked:
        return {"tasks": {}, "skipped": "a masked LM: the benchmarks score causal LMs"}
    from lmforge.evaluation import benchmarks

    return benchmarks.run_benchmarks(model, settings.benchmarks, batch_size=settings.benchmark_batch_size,
                                     device=settings.device)


def benchmark_line(name: str, task: dict) -> str:
    figures = ", ".join(f"{metric} {task[metric]:.3f} ± {task.get(metric + '_stderr') or 0:.3f}"
                        for metric in ("acc", "acc_norm") if isinstance(task.get(metric), float))
    passed = f"; {len(task['too_long'])} passed over: an answer longer than the model" if task.get("too_long") else ""
    return f"{name} ({task['examples']} of {task['documents']}, {task['num_fewshot']}-shot{passed}): {figures}"


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from lmforge.atomic import write_json
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
        bench = benchmark_scores(params.evaluate, Path(args.model), result.masked)
        write_json(Path(args.reports) / "benchmarks.json", bench)
        paths.append(Path(args.reports) / "benchmarks.json")
        flat = {f"{split}_{k}": v for split in params.evaluate.splits for k, v in result.metrics[split].items()
                if isinstance(v, (int, float))}
        if "base" in result.metrics:  # continued pretraining: the base model's figures beside
            flat.update({f"base_{split}_{k}": v for split in params.evaluate.splits
                         for k, v in result.metrics["base"][split].items() if isinstance(v, (int, float))})
        flat.update({f"bench_{name}_{k}": v for name, task in bench["tasks"].items() for k, v in task.items()
                     if k.startswith("acc") and isinstance(v, float)})
        run.log_metrics(flat)
        for path in paths:
            run.log_artifact(path, "reports")
    for split in params.evaluate.splits:
        print(f"[evaluate] {saved_model.split_line(split, result.metrics[split], result.masked)}", flush=True)
        if against_base := saved_model.base_line(split, result.metrics, result.masked):
            print(f"[evaluate] {against_base}", flush=True)
    for name, task in bench["tasks"].items():
        print(f"[evaluate] {benchmark_line(name, task)}", flush=True)
    return 0


if __name__ == "__main__":
    from tasks._common import run_main

    run_main("evaluate", main)
