"""What the default run's fine-tune should be: a sweep of the options on the default task split.

The default `make run` fine-tunes the packaged MiniLM on data/split/task (3,000 IMDB rows:
2,400 / 300 / 300) on 2 CPU cores, and reports a TF-IDF + logistic-regression baseline beside it.
This script measures which settings make the fine-tune beat that baseline inside the C1 budget:
rows, max_length, truncation, epochs, learning rate, and a frozen-encoder warm-up (a linear probe
of the head before full fine-tuning). Accuracy does not depend on the device, so the sweep runs in
fp32 on a GPU in minutes; the CPU cost of a case is estimated from the tokens it trains on
(rows x epochs x max_length, relative to 2,400 x 1 x 128, which takes ~135 s on the 2 cores).

Besides the 300-row test split it scores a large held-out set (IMDB rows of the full split that
are in none of the default split's train / val rows), so a difference of 0.01 is not noise.

    python bench/finetune_default.py --split data/split/task --full .gpu/g4/data --model .gpu/g4/minilm \
        --cases grid --seeds 1337,1,2 --out $OUT
    python bench/finetune_default.py --split data/split/task --full .gpu/g4/data --baseline   # CPU: TF-IDF
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.config.finetune import FinetuneParams  # noqa: E402
from lmforge.training.finetuning import LabelledTexts, read_split  # noqa: E402

EPOCHS_KEY = "num_train_epochs" if "num_train_epochs" in FinetuneParams.model_fields else "epochs"
REFERENCE_TOKENS = 2400 * 1 * 128


def read_jsonl(path: Path) -> LabelledTexts:
    rows = [json.loads(line) for line in gzip.open(path, "rt")]
    return LabelledTexts([r["text"] for r in rows], [r["label"] for r in rows])


def datasets(split_dir: str, full_dir: str) -> dict[str, LabelledTexts]:
    """The default split, a pool of extra train rows and the large held-out set."""
    split = read_split(split_dir)
    seen = set(split["train"].texts) | set(split["val"].texts)
    full = {name: read_jsonl(Path(full_dir) / f"{name}.jsonl.gz") for name in ("train", "val", "test")}
    held_texts, held_labels = [], []
    for name in ("val", "test"):
        for text, label in zip(full[name].texts, full[name].labels):
            if text not in seen:
                held_texts.append(text)
                held_labels.append(label)
    taken = seen | set(split["test"].texts) | set(held_texts)
    extra = [(t, y) for t, y in zip(full["train"].texts, full["train"].labels) if t not in taken]
    return {**split, "held_out": LabelledTexts(held_texts, held_labels),
            "extra_train": LabelledTexts([t for t, _ in extra], [y for _, y in extra])}


def train_rows(data: dict[str, LabelledTexts], rows: int, seed: int) -> LabelledTexts:
    """The first `rows` of train: a seeded subsample of the default train, topped up from extra."""
    base = data["train"]
    if rows <= len(base):
        return base.sample(rows, seed)
    more = data["extra_train"].sample(rows - len(base), seed)
    return LabelledTexts(base.texts + more.texts, base.labels + more.labels)


CASES = [
    # (rows, max_length, truncation, epochs, learning_rate, probe), most telling first
    (2400, 128, "head", 1, 1e-4, False),       # the default before this sweep
    (2400, 128, "head", 1, 5.5e-5, False),     # ... with the lr tune picked from a trial at chance
    (2400, 128, "head_tail", 1, 1e-4, False),
    (1200, 256, "head_tail", 2, 1e-4, False),
    (800, 256, "head_tail", 3, 1e-4, False),
    (2400, 256, "head_tail", 1, 1e-4, False),
    (1200, 384, "head_tail", 1, 1e-4, False),
    (1200, 512, "head_tail", 1, 1e-4, False),
    (800, 512, "head_tail", 2, 1e-4, False),
    (2400, 128, "head_tail", 2, 1e-4, False),
    (1200, 256, "head_tail", 1, 1e-4, False),
    (800, 256, "head_tail", 2, 1e-4, False),
    (1200, 256, "head_tail", 2, 5e-5, False),
    (1200, 256, "head_tail", 2, 2e-4, False),
    (2400, 128, "head_tail", 1, 5e-5, False),
    (2400, 128, "head_tail", 1, 2e-4, False),
    (2400, 256, "head_tail", 1, 2e-4, False),
    (1200, 256, "head_tail", 2, 1e-4, True),
    (2400, 128, "head_tail", 1, 1e-4, True),
    (4800, 128, "head_tail", 1, 1e-4, False),
    # tune-sized trials: above chance?
    (400, 128, "head_tail", 1, 1e-4, False),
    (400, 128, "head_tail", 1, 3e-4, False),
    (800, 128, "head_tail", 1, 1e-4, False),
    (800, 128, "head_tail", 1, 3e-4, False),
    (400, 256, "head_tail", 2, 1e-4, False),
    (400, 256, "head_tail", 2, 3e-4, False),
    (600, 256, "head_tail", 1, 1e-4, False),
    (600, 256, "head_tail", 1, 3e-4, False),
]
# The second round, around the first round's winner (fewer rows, 256 tokens, head + tail, 2-3 epochs)
CASES_2 = [(rows, 256, "head_tail", epochs, lr, probe)
           for rows, epochs in [(600, 3), (800, 2), (800, 3), (1000, 2), (1200, 2)]
           for lr in (7e-5, 1e-4, 1.5e-4) for probe in (False, True)]
CASES_2 += [(rows, 256, "head_tail", 2, lr, False, 8) for rows in (600, 800) for lr in (5e-5, 1e-4)]
# tune trials shaped like the run they tune (256 tokens, 2 epochs), on fewer rows
CASES_2 += [(rows, 256, "head_tail", 2, lr, False) for rows in (300, 400) for lr in (5e-5, 1e-4, 2e-4)]


def case_name(rows, length, trunc, epochs, lr, probe, batch=16) -> str:
    return f"{rows}-{length}-{trunc}-{epochs}ep-{lr:g}{'-probe' if probe else ''}{f'-bs{batch}' if batch != 16 else ''}"


# The third round: tune's trials cut to 64 tokens (half the cost), 800 rows, 1 epoch
CASES_3 = [(800, 64, "head_tail", 1, lr, False) for lr in (5e-5, 7e-5, 1e-4, 1.4e-4, 2e-4)]

GRID = {case_name(*case): case for case in CASES}
GRID_2 = {case_name(*case): case for case in CASES_2}
GRID_3 = {case_name(*case): case for case in CASES_3}


def params_for(rows: int, length: int, trunc: str, epochs: int, lr: float, device: str, batch: int) -> FinetuneParams:
    return FinetuneParams.model_validate({
        "max_length": length, "truncation": trunc, EPOCHS_KEY: epochs, "learning_rate": lr,
        "batch_size": batch, "warmup_ratio": 0.1, "weight_decay": 0.01, "device": device,
        "precision": "fp32", "compile": False, "use_tuned": False,
    })


def linear_probe(model_dir: str, train: LabelledTexts, params: FinetuneParams, seed: int, out: Path) -> Path:
    """Train only the classification head (encoder frozen) for one epoch; save as a new base."""
    import torch

    from lmforge.training.finetuning import label_names, load_model
    labels = label_names({"train": train})
    model, tokenizer = load_model(model_dir, labels, params)
    device = torch.device("cuda" if params.device != "cpu" and torch.cuda.is_available() else "cpu")
    model.to(device)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("classifier", "bert.pooler", "pooler"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator).tolist()
    label_id = {name: i for i, name in enumerate(labels)}
    model.train()
    for start in range(0, len(order), 16):
        rows = order[start:start + 16]
        batch = tokenizer([train.texts[i] for i in rows], truncation=True, max_length=params.max_length,
                          padding=True, return_tensors="pt").to(device)
        target = torch.tensor([label_id[train.labels[i]] for i in rows], device=device)
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_case(name: str, spec: tuple, seed: int, data: dict, model_dir: str, device: str, tmp: Path) -> dict:
    import torch

    from lmforge.training.classification_scores import classification_metrics
    from lmforge.training.finetuning import encode_texts, finetune, predict

    rows, length, trunc, epochs, lr, probe, *rest = spec
    batch = rest[0] if rest else 16
    params = params_for(rows, length, trunc, epochs, lr, device, batch)
    train = train_rows(data, rows, seed)
    val = data["val"]
    base = model_dir
    start = time.perf_counter()
    if probe:
        base = str(linear_probe(model_dir, train, params, seed, tmp / f"probe-{name}-{seed}"))
    result = finetune(base, {"train": train, "val": val, "test": data["test"]}, params, seed=seed,
                      log=lambda msg: None)
    seconds = time.perf_counter() - start
    model = result.model.to("cuda" if torch.cuda.is_available() and device != "cpu" else "cpu")
    held = data["held_out"]
    encoded = encode_texts(result.tokenizer, held.texts, length, trunc)
    ids = predict(model, encoded, pad_id=result.tokenizer.pad_token_id, batch_size=256,
                  device=next(model.parameters()).device, dtype=None, pad_multiple=8, max_length=length)
    held_acc = classification_metrics(held.labels, [result.labels[i] for i in ids], result.labels)["accuracy"]
    return {"case": name, "seed": seed, "rows": rows, "max_length": length, "truncation": trunc,
            "epochs": epochs, "learning_rate": lr, "probe": probe, "batch_size": batch,
            "val_accuracy": round(result.val["accuracy"], 4), "val_n": len(val),
            "test_accuracy": round(result.test["accuracy"], 4), "held_out_accuracy": round(held_acc, 4),
            "held_out_n": len(held), "seconds": round(seconds, 1),
            "cpu_cost_vs_default": round(rows * epochs * length / REFERENCE_TOKENS * (1.33 if probe else 1), 2)}


def baselines(data: dict, seed: int) -> list[dict]:
    from lmforge.evaluation.baseline import tfidf_baseline

    out = []
    for rows in (160, 300, 400, 600, 800, 1000, 1200, 2400, 4800):
        train = train_rows(data, rows, seed)
        scores = tfidf_baseline(train.texts, train.labels, {"test": (data["test"].texts, data["test"].labels),
                                                            "held_out": (data["held_out"].texts,
                                                                         data["held_out"].labels)},
                                c=4.0, seed=seed)
        out.append({"rows": rows, "test_accuracy": round(scores["test"]["accuracy"], 4),
                    "held_out_accuracy": round(scores["held_out"]["accuracy"], 4)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="data/split/task")
    parser.add_argument("--full", default=".gpu/g4/data")
    parser.add_argument("--model", default=".gpu/g4/minilm")
    parser.add_argument("--cases", default="grid", help="grid, or comma-separated case names")
    parser.add_argument("--seeds", default="1337")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--baseline-seed", type=int, default=1337)
    parser.add_argument("--baseline", action="store_true", help="only the TF-IDF baselines (CPU, sklearn)")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds after which no new case starts")
    parser.add_argument("--held-limit", type=int, default=None, help="score only this many held-out rows (smoke)")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    data = datasets(args.split, args.full)
    print(f"rows: train {len(data['train'])} val {len(data['val'])} test {len(data['test'])} "
          f"held-out {len(data['held_out'])} extra {len(data['extra_train'])}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.baseline:
        for row in baselines(data, args.baseline_seed):
            print(json.dumps(row))
        return
    if args.held_limit:
        data["held_out"] = data["held_out"].sample(args.held_limit, 0)
    scratch = Path(tempfile.mkdtemp())  # probe models: not under --out, which travels back
    grids = {"grid": GRID, "grid2": GRID_2, "grid3": GRID_3}
    cases = {**GRID, **GRID_2, **GRID_3}
    names = list(grids[args.cases]) if args.cases in grids else args.cases.split(",")
    started = time.perf_counter()
    with open(out / "finetune_default.jsonl", "a") as fh:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for name in names:
                if time.perf_counter() - started > args.budget:
                    print(f"budget spent; stopped before {name} seed {seed}", file=sys.stderr)
                    return
                try:
                    row = run_case(name, cases[name], seed, data, args.model, args.device, scratch)
                except Exception as err:  # noqa: BLE001 - one broken case must not lose the sweep
                    row = {"case": name, "seed": seed, "error": repr(err)[:300]}
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
