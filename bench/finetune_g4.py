"""G4 (BENCHMARKS.md): fine-tune all-MiniLM-L6 for IMDB sentiment on one GPU; lmforge's loop
against transformers' Trainer on the same card, batch, length and data. One JSON line per case.

    python bench/finetune_g4.py --data DIR --model DIR --cases trainer,lmforge --out OUT

DIR for --data holds {train,val,test}.jsonl.gz (one {"text", "label"} object a line, the seeded
80/10/10 IMDB split) or the split stage's parquet files; --model a transformers folder.
Needs torch and transformers (and the Trainer's accelerate); no mlflow, dvc or optuna.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.finetuning import FinetuneConfig, LabelledTexts, finetune, read_split  # noqa: E402

CASES = {
    # name: (runner, settings)
    "trainer": ("trainer", {"max_length": 512, "batch_size": 32, "learning_rate": 5e-5, "epochs": 1}),
    "lmforge-eager": ("lmforge", {"max_length": 512, "batch_size": 32, "learning_rate": 1e-4, "epochs": 1,
                                  "compile": False}),
    "lmforge": ("lmforge", {"max_length": 512, "batch_size": 32, "learning_rate": 1e-4, "epochs": 3}),
    "lmforge-headtail": ("lmforge", {"max_length": 512, "batch_size": 32, "learning_rate": 1e-4, "epochs": 3,
                                     "truncation": "head_tail"}),
    # accuracy levers, eager (a cold compile costs about 70 s, more than these runs gain from it)
    "headtail-5e-5-x4": ("lmforge", {"max_length": 512, "batch_size": 32, "learning_rate": 5e-5, "epochs": 4,
                                     "truncation": "head_tail", "compile": False}),
    "headtail-1e-4-x4": ("lmforge", {"max_length": 512, "batch_size": 32, "learning_rate": 1e-4, "epochs": 4,
                                     "truncation": "head_tail", "compile": False}),
    "headtail-16-5e-5-x3": ("lmforge", {"max_length": 512, "batch_size": 16, "learning_rate": 5e-5, "epochs": 3,
                                        "truncation": "head_tail", "compile": False}),
}


def load(folder: Path) -> dict[str, LabelledTexts]:
    if (folder / "train.parquet").exists():
        return read_split(folder)
    out = {}
    for split in ("train", "val", "test"):
        texts, labels = [], []
        with gzip.open(folder / f"{split}.jsonl.gz", "rt") as fh:
            for line in fh:
                row = json.loads(line)
                texts.append(row["text"])
                labels.append(str(row["label"]))
        out[split] = LabelledTexts(texts, labels)
    return out


def run_lmforge(model: Path, data, settings: dict, seed: int) -> dict:
    cfg = FinetuneConfig(seed=seed, eval_batch_size=256, log_every=100, early_stopping_patience=2, **settings)
    start = time.perf_counter()
    result = finetune(model, data, cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    wall = time.perf_counter() - start
    later = [h for h in result.history[1:]]
    steady = (sum(h["train_samples"] for h in later) / sum(h["train_seconds"] for h in later)) if later else None
    return {
        "test_accuracy": result.test["accuracy"], "test_macro_f1": result.test["macro_f1"],
        "val_accuracy": result.val["accuracy"], "best_epoch": result.best_epoch,
        "train_samples_per_second": result.stats["samples_per_second"],
        "steady_samples_per_second": round(steady, 1) if steady else None,
        "train_seconds": result.stats["train_seconds"], "wall_seconds": round(wall, 1),
        "history": result.history, "compiled": result.stats["compiled"], "precision": result.stats["precision"],
    }


def run_trainer(model: Path, data, settings: dict, seed: int) -> dict:
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments)

    labels = sorted(set(data["train"].labels))
    lid = {name: i for i, name in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(model)
    net = AutoModelForSequenceClassification.from_pretrained(
        model, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=lid, dtype=torch.float32)

    def encode(split):
        enc = tok(split.texts, truncation=True, max_length=settings["max_length"])
        return [{"input_ids": ids, "attention_mask": m, "labels": lid[y]}
                for ids, m, y in zip(enc["input_ids"], enc["attention_mask"], split.labels)]

    train, test = encode(data["train"]), encode(data["test"])
    import inspect

    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio).
    known = inspect.signature(TrainingArguments.__init__).parameters
    warmup = {"warmup_ratio": 0.1} if "warmup_ratio" in known else {"warmup_steps": 0.1}
    args = TrainingArguments(
        output_dir="/tmp/g4-trainer", per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=256, learning_rate=settings["learning_rate"],
        num_train_epochs=settings["epochs"], bf16=torch.cuda.is_available(), eval_strategy="no", save_strategy="no",
        logging_strategy="no", report_to="none", seed=seed, weight_decay=0.01, **warmup,
    )
    trainer = Trainer(model=net, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok),
                      processing_class=tok)
    out = trainer.train()
    pred = trainer.predict(test)
    acc = float(np.mean(pred.predictions.argmax(-1) == pred.label_ids))
    return {"test_accuracy": acc, "train_samples_per_second": round(out.metrics["train_samples_per_second"], 1),
            "train_seconds": round(out.metrics["train_runtime"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--cases", default="trainer,lmforge")
    parser.add_argument("--out", default=None)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later cases are skipped past it")
    args = parser.parse_args()
    import torch
    import transformers

    started = time.perf_counter()
    data = load(Path(args.data))
    facts = {"card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
             "torch": torch.__version__, "transformers": transformers.__version__,
             "rows": {k: len(v) for k, v in data.items()}}
    print(json.dumps({"case": "facts", **facts}), flush=True)
    lines = []
    for name in args.cases.split(","):
        if time.perf_counter() - started > args.budget:
            row = {"case": name, "skipped": "over the time budget"}
        else:
            runner, settings = CASES[name]
            try:
                fn = run_trainer if runner == "trainer" else run_lmforge
                row = {"case": name, "settings": settings, **fn(Path(args.model), data, settings, args.seed)}
            except Exception as err:  # noqa: BLE001 - one broken case must not lose the others
                row = {"case": name, "error": f"{type(err).__name__}: {err}"}
        print(json.dumps(row), flush=True)
        lines.append(row)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "g4.jsonl").write_text("\n".join(json.dumps(r) for r in [facts, *lines]) + "\n")


if __name__ == "__main__":
    main()
