"""Stage `sft`: chat fine-tuning of a decoder on the chat split's conversations.

    python -m tasks.sft            # what dvc.yaml runs; resumes a killed run

Trains with TRL's SFTTrainer inside lmforge's contract (sft.engine: trl, lmforge/training/chat_trl.py)
or lmforge's own loop (engine: lmforge, lmforge/training/chat_tuning.py); auto picks TRL on a GPU and
the own loop on the CPU, where each was measured faster. Both are scored, checkpointed and saved alike. Reads params.yaml (seed, sft) and data/split/<sft.dataset>/{train,val,test}.parquet. Writes
models/chat/ (a transformers folder whose tokenizer carries its chat template; a LoRA run's
adapters also on their own in models/chat/adapter), models/sft-checkpoints/ (kept between runs,
for resuming), reports/sft/ (metrics.json with the base model's held-out loss beside the chat
model's, history.csv for dvc.yaml's loss chart, samples.md: replies of the base model and the
chat model to sft.sample_prompts; benchmarks.json: the harness tasks of sft.benchmarks scored
on both, side by side) and one MLflow run with the loss curves.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

from tasks import layout

STARTED = time.perf_counter()


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.sft", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(layout.PARAMS))
    parser.add_argument("--data", default=None, help=f"the chat split folder (default: {layout.SPLIT}/<sft.dataset>)")
    parser.add_argument("--out", default=str(layout.CHAT_MODEL))
    parser.add_argument("--checkpoints", default=str(layout.SFT_CHECKPOINTS))
    parser.add_argument("--reports", default=str(layout.SFT_REPORTS))
    return parser.parse_args(argv)


def write_history(path: Path, history: list[dict]) -> None:
    """One row per evaluation: the sft loss chart of dvc.yaml's plots."""
    from lmforge.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "epoch", "train_loss", "val_loss", "lr", "tokens"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def sample_replies(base_folder: Path, result, section) -> list[dict[str, str]]:
    """Greedy replies of the base model and of the chat model to each sample prompt, the base
    model rendered with the same chat template."""
    from lmforge.generation import Sampling, load_causal_lm, stream

    sampling = Sampling(max_new_tokens=section.sample_tokens, temperature=0.0)
    base_model, base_tokenizer = load_causal_lm(base_folder, device="cpu")
    base_tokenizer.chat_template = result.tokenizer.chat_template
    chat_model = result.model
    samples = []
    for prompt in section.sample_prompts:
        messages = [{"role": "user", "content": prompt}]
        samples.append({"prompt": prompt,
                        "base": "".join(stream(base_model, base_tokenizer, messages, sampling)).strip(),
                        "chat": "".join(stream(chat_model, result.tokenizer, messages, sampling)).strip()})
    return samples


def write_samples(path: Path, samples: list[dict[str, str]], base_model: str) -> None:
    from lmforge.atomic import atomic_path

    lines = ["# Sample replies (greedy)", "", f"The base model ({base_model}) and the chat model, each given "
             "one user message through the same chat template.", ""]
    for sample in samples:
        lines += [f"## {sample['prompt']}", "", f"**base:** {sample['base'] or '(nothing)'}", "",
                  f"**chat:** {sample['chat'] or '(nothing)'}", ""]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines))


def benchmarks_side_by_side(base_folder: Path, chat_folder: Path, section, log) -> dict:
    """The harness's scores of the base model and of the chat model on the same documents, and the
    change in points: fine-tuning that forgets shows as a drop, not silently. Both are scored in
    float32, whatever dtype each was saved in, so the change is the fine-tuning's alone."""
    if not section.benchmarks:
        return {"tasks": {}, "skipped": "sft.benchmarks is empty"}
    from lmforge.evaluation.benchmarks import run_benchmarks

    runs = {side: run_benchmarks(folder, section.benchmarks, batch_size=section.benchmark_batch_size,
                                 device=section.device, dtype="float32")
            for side, folder in (("base", base_folder), ("chat", chat_folder))}
    tasks = {}
    for name, base in runs["base"]["tasks"].items():
        chat = runs["chat"]["tasks"][name]
        change = {metric: round(100 * (chat[metric] - base[metric]), 2)
                  for metric in ("acc", "acc_norm") if isinstance(base.get(metric), float)}
        tasks[name] = {"base": base, "chat": chat, "change_points": change}
        figures = ", ".join(f"{metric} {base[metric]:.3f} -> {chat[metric]:.3f} ({points:+.1f} points)"
                            for metric, points in change.items())
        log(f"sft: {name} ({chat['examples']} documents): {figures}")
    return {"harness": runs["chat"]["harness"], "data": runs["chat"]["data"], "tasks": tasks}


def with_engine(section):
    """The sft section with `engine: auto` decided: TRL on a GPU (1.38x lmforge's loop on one H100,
    bench/results/2026-12-06-h100-sft-trl.json), lmforge's own loop on the CPU (about 2x TRL's
    speed on 2 cores, docs/post-training.md)."""
    if section.engine != "auto":
        return section
    import torch

    gpu = section.device != "cpu" and torch.cuda.is_available()
    return section.model_copy(update={"engine": "trl" if gpu else "lmforge"})


def run(args: argparse.Namespace) -> dict:
    from lmforge.atomic import atomic_dir, write_json
    from lmforge.config import load_params
    from lmforge.registry import tracking
    from lmforge.training.base_models import resolve_base_model
    from lmforge.training.chat_tuning import chat_finetune, read_conversations, save_chat_model

    params = load_params(args.params)
    section = with_engine(params.sft)
    base = resolve_base_model(section.base_model, pretrained_dir=layout.PRETRAINED, key="sft.base_model")
    data = read_conversations(args.data or layout.SPLIT / section.dataset)
    reports = Path(args.reports)
    reports.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    with tracking.stage_run("sft", {"seed": params.seed, "sft": section.model_dump()},
                            tags={"base_model": section.base_model, "method": section.method,
                                  "engine": section.engine}) as mlrun:
        finetune = chat_finetune
        if section.engine == "trl":
            from lmforge.training.chat_trl import trl_finetune as finetune
        result = finetune(base, data, section, seed=params.seed, checkpoint_dir=args.checkpoints,
                          on_metrics=lambda step, values: mlrun.log_metrics(values, step=step), log=log)
        log("sft: sample replies of the base and the chat model")
        samples = sample_replies(base, result, section)
        with atomic_dir(Path(args.out)) as tmp:
            save_chat_model(result, tmp)
        log("sft: benchmarks of the base and the chat model")
        bench = benchmarks_side_by_side(base, Path(args.out), section, log)
        metrics = {
            "base_model": section.base_model,
            "method": section.method,
            "engine": section.engine,
            "base": result.base,
            "val": result.val,
            "test": result.test,
            # how much lower the chat model's held-out loss is than the base model's (nats per assistant token)
            "vs_base": {split: round(result.base[split]["loss"] - scores["loss"], 6)
                        for split, scores in (("val", result.val), ("test", result.test)) if scores and split in result.base},
            "best_step": result.best_step,
            "train": result.stats,
            "conversations": {name: len(split) for name, split in data.items()},
            "seconds": round(time.perf_counter() - STARTED, 1),
        }
        write_json(reports / "metrics.json", metrics)
        write_history(reports / "history.csv", result.history)
        write_samples(reports / "samples.md", samples, section.base_model)
        write_json(reports / "benchmarks.json", bench)
        flat = {f"{split}_{k}": v for split in ("val", "test") for k, v in (metrics[split] or {}).items()
                if k in ("loss", "perplexity")}
        flat.update({f"base_{split}_loss": result.base[split]["loss"] for split in result.base})
        flat.update({"train_tokens_per_second": result.stats["tokens_per_second"] or 0.0,
                     "train_seconds": result.stats["train_seconds"]})
        flat.update({f"bench_{task}_{metric}_{side}": scores[side][metric]
                     for task, scores in bench["tasks"].items() for metric in scores["change_points"]
                     for side in ("base", "chat")})
        mlrun.log_metrics(flat)
        for name in ("metrics.json", "history.csv", "samples.md", "benchmarks.json"):
            mlrun.log_artifact(reports / name)

    # A finished run leaves nothing to resume: its best weights are in models/chat.
    shutil.rmtree(args.checkpoints, ignore_errors=True)
    Path(args.checkpoints).mkdir(parents=True, exist_ok=True)
    return metrics


def main(argv: list[str] | None = None) -> None:
    metrics = run(_args(argv))
    base, test = metrics["base"].get("test"), metrics["test"]
    if test and base:
        print(f"[sft] test loss on the assistant's tokens: base model {base['loss']:.4f} -> chat model "
              f"{test['loss']:.4f}; {metrics['train']['tokens_per_second']} tokens/s", file=sys.stderr)
    print(json.dumps({"test_loss": test["loss"] if test else None}))


if __name__ == "__main__":
    from tasks._common import run_main

    # A UserError (bad data, params or base model): one clear message, exit 2, no retry.
    run_main("sft", main)
