"""G4 (docs/performance.md): fine-tune all-MiniLM-L6 for IMDB sentiment on one GPU; lmforge's loop
against transformers' Trainer on the same card, batch, length and data. One JSON line per case.

The `-fair` pair decides whether lmforge keeps its own loop: the Trainer with every lever
lmforge's loop uses (length-grouped batches, padding to a multiple of 8, bf16, torch.compile)
against lmforge's loop with the Trainer's one truncation (head), same batch, lr and epochs.

    python bench/finetune_g4.py --data DIR --model DIR --cases trainer,lmforge --out OUT
    python bench/finetune_g4.py ... --cases smollm2-trainer-fair --against OUT/g4.jsonl   # the other side, later
    python bench/finetune_g4.py --data DIR --model - --cases none --budget 0 --against A/g4.jsonl --against B/g4.jsonl

Every case records what tells two models apart, not only their accuracy: a sha256 of the scored
weights (the same digest means the same weights), each test row's predicted class (`test_predicted`,
class ids in label order), the confusion counts, the mean test loss and a digest of the test
probabilities. A closing `pairs` line counts, for each two cases of this call (and of --against's
file, when its test split has the same digest), the test rows on which they predict differently;
--budget 0 trains nothing, so the last line above only compares two earlier calls' files.
Records made before 2026-12-07 hold the fair Trainer's predictions in its length-grouped order
(transformers 5 groups evaluation by length too); `--restore-order FILE` puts them back first.

DIR for --data holds {train,val,test}.jsonl.gz (one {"text", "label"} object a line, the seeded
80/10/10 IMDB split) or the split stage's parquet files; --model a transformers folder.
Needs torch and transformers (and the Trainer's accelerate); no mlflow, dvc or optuna.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.config.finetune import FinetuneParams  # noqa: E402

from lmforge.config.overrides import parse_override  # noqa: E402
from lmforge.training.finetuning import LabelledTexts, finetune, read_split  # noqa: E402

CASES = {
    # name: (runner, settings)
    "trainer": ("trainer", {"max_length": 512, "batch_size": 32, "learning_rate": 5e-5, "num_train_epochs": 1}),
    "lmforge-eager": ("lmforge", {"max_length": 512, "batch_size": 32, "learning_rate": 1e-4, "num_train_epochs": 1,
                                  "compile": False}),
    "lmforge": ("lmforge", {"max_length": 512, "batch_size": 32, "learning_rate": 1e-4, "num_train_epochs": 3}),
    "lmforge-headtail": ("lmforge", {"max_length": 512, "batch_size": 32, "learning_rate": 1e-4, "num_train_epochs": 3,
                                     "truncation": "head_tail"}),
    # accuracy levers, eager (a cold compile costs about 70 s, more than these runs gain from it)
    "headtail-5e-5-x4": ("lmforge", {"max_length": 512, "batch_size": 32, "learning_rate": 5e-5, "num_train_epochs": 4,
                                     "truncation": "head_tail", "compile": False}),
    "headtail-1e-4-x4": ("lmforge", {"max_length": 512, "batch_size": 32, "learning_rate": 1e-4, "num_train_epochs": 4,
                                     "truncation": "head_tail", "compile": False}),
    "headtail-16-5e-5-x3": ("lmforge", {"max_length": 512, "batch_size": 16, "learning_rate": 5e-5, "num_train_epochs": 3,
                                        "truncation": "head_tail", "compile": False}),
    # G4 in one configuration: the batch-16 accuracy config above, compiled (the speed lever).
    # A "seed" key overrides --seed for that case.
    "headtail-16-5e-5-x3-compiled": ("lmforge", {"max_length": 512, "batch_size": 16, "learning_rate": 5e-5,
                                                 "num_train_epochs": 3, "truncation": "head_tail", "compile": True}),
    "headtail-16-5e-5-x3-compiled-s2": ("lmforge", {"max_length": 512, "batch_size": 16, "learning_rate": 5e-5,
                                                    "num_train_epochs": 3, "truncation": "head_tail", "compile": True,
                                                    "seed": 2}),
    "headtail-16-5e-5-x3-compiled-s3": ("lmforge", {"max_length": 512, "batch_size": 16, "learning_rate": 5e-5,
                                                    "num_train_epochs": 3, "truncation": "head_tail", "compile": True,
                                                    "seed": 3}),
    # the Trainer on the same batch as the batch-16 configs (its speed reference at that batch)
    "trainer-16": ("trainer", {"max_length": 512, "batch_size": 16, "learning_rate": 5e-5, "num_train_epochs": 1}),
    # The fair pair (issue #20): the same knobs on both sides, compile included in both.
    "trainer-fair": ("trainer", {"max_length": 512, "batch_size": 16, "learning_rate": 5e-5, "num_train_epochs": 2,
                                 "fair": True}),
    "lmforge-fair": ("lmforge", {"max_length": 512, "batch_size": 16, "learning_rate": 5e-5, "num_train_epochs": 2,
                                 "truncation": "head", "compile": True}),
    # SmolLM2-135M (--model: the packaged smollm2 folder): the fair pair at G4's recipe (lr 3e-5, 2 epochs),
    # then G4 itself, compiled (head and tail kept; run it once per seed).
    "smollm2-trainer-fair": ("trainer", {"max_length": 512, "batch_size": 16, "learning_rate": 3e-5,
                                         "num_train_epochs": 2, "fair": True}),
    "smollm2-lmforge-fair": ("lmforge", {"max_length": 512, "batch_size": 16, "learning_rate": 3e-5,
                                         "num_train_epochs": 2, "truncation": "head", "compile": True}),
    "smollm2-g4": ("lmforge", {"max_length": 512, "batch_size": 16, "learning_rate": 3e-5, "num_train_epochs": 2,
                               "truncation": "head_tail", "compile": True}),
}


def load(folder: Path, limit: int | None = None) -> dict[str, LabelledTexts]:
    """The split; with limit, the first `limit` train rows and limit // 4 val and test rows (smoke tests)."""
    if (folder / "train.parquet").exists():
        out = read_split(folder)
    else:
        out = {}
        for split in ("train", "val", "test"):
            texts, labels = [], []
            with gzip.open(folder / f"{split}.jsonl.gz", "rt") as fh:
                for line in fh:
                    row = json.loads(line)
                    texts.append(row["text"])
                    labels.append(str(row["label"]))
            out[split] = LabelledTexts(texts, labels)
    if limit:
        out = {k: LabelledTexts(v.texts[: n], v.labels[: n])
               for k, v in out.items() for n in [limit if k == "train" else max(8, limit // 4)]}
    return out


def split_sha256(split: LabelledTexts) -> str:
    """sha256 of a split's texts and labels, in order: two calls scored the same rows when it matches."""
    digest = hashlib.sha256()
    for text, label in zip(split.texts, split.labels):
        digest.update(text.encode("utf-8", "replace") + b"\x00" + label.encode() + b"\x01")
    return digest.hexdigest()


def weights_sha256(net) -> str:
    """sha256 over the model's state dict (each name, dtype, shape and the bytes), in name order:
    the scored weights, compared across cases and calls (the same digest means the same model)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_evidence(logits, truth, labels: list[str]) -> dict:
    """From a model's test logits (rows in test order): what tells it apart from another model
    beyond its accuracy. test_predicted: each row's class id (one digit each up to 10 labels)."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    truth = np.asarray(truth)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    pred = logits.argmax(-1)
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(confusion, (truth, pred), 1)
    return {
        "test_correct": int((pred == truth).sum()), "test_rows": len(truth),
        "test_confusion": confusion.tolist(),  # rows: true label, columns: predicted, in label order
        "test_loss": round(float(-logp[np.arange(len(truth)), truth].mean()), 6),
        "test_probs_sha256": hashlib.sha256(np.round(np.exp(logp), 4).astype(np.float32).tobytes()).hexdigest(),
        "test_predicted": "".join(map(str, pred)) if len(labels) <= 10 else pred.tolist(),
    }


def disagreements(rows: list[dict]) -> list[dict]:
    """For each two rows with test predictions: on how many test rows they predict differently,
    and whether they scored the same weights."""
    scored = [r for r in rows if "test_predicted" in r]
    out = []
    for i, a in enumerate(scored):
        for b in scored[i + 1 :]:
            pa, pb = list(a["test_predicted"]), list(b["test_predicted"])
            if len(pa) != len(pb):
                continue
            out.append({"a": a["case"], "b": b["case"], "a_seed": a.get("seed"), "b_seed": b.get("seed"),
                        "disagree": sum(x != y for x, y in zip(pa, pb)), "rows": len(pa),
                        "same_weights": a.get("weights_sha256") == b.get("weights_sha256")})
    return out


def table(rows: list[dict]) -> str:
    """The cases side by side; samples/s all = every train epoch (first-epoch compile included)."""
    head = ("case", "seed", "bs", "lr", "ep", "compiled", "test_acc", "test_loss", "val_acc", "best_ep",
            "samples/s all", "steady (ep 2..)", "epoch s", "weights")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "settings" not in r:
            lines.append(f"{r['case']} | " + (r.get("error") or r.get("skipped") or ""))
            continue
        st = r["settings"]
        hist = r.get("history") or []
        lines.append(" | ".join(str(x) for x in (
            r["case"], r.get("seed"), st["batch_size"], st["learning_rate"], st["num_train_epochs"], r.get("compiled", "-"),
            round(r["test_accuracy"], 4), r.get("test_loss", "-"),
            round(r["val_accuracy"], 4) if "val_accuracy" in r else "-",
            r.get("best_epoch", "-"), r["train_samples_per_second"], r.get("steady_samples_per_second", "-"),
            "/".join(str(round(h["train_seconds"], 1)) for h in hist) or "/".join(map(str, r.get("epoch_seconds") or []))
            or r.get("train_seconds"),
            r.get("weights_sha256", "-")[:12])))
    return "\n".join(lines)


def run_lmforge(model: Path, data, settings: dict, seed: int) -> dict:
    params = FinetuneParams(eval_batch_size=256, logging_steps=100, early_stopping_patience=2, **settings)
    start = time.perf_counter()
    result = finetune(model, data, params, seed=seed, log=lambda m: print(m, file=sys.stderr, flush=True))
    wall = time.perf_counter() - start
    later = [h for h in result.history[1:]]
    steady = (sum(h["train_samples"] for h in later) / sum(h["train_seconds"] for h in later)) if later else None
    evidence = lmforge_evidence(result, data, params)
    return {
        "test_accuracy": result.test["accuracy"], "test_macro_f1": result.test["macro_f1"], **evidence,
        "val_accuracy": result.val["accuracy"], "best_epoch": result.best_epoch,
        "train_samples_per_second": result.stats["samples_per_second"],
        "steady_samples_per_second": round(steady, 1) if steady else None,
        "train_seconds": result.stats["train_seconds"], "wall_seconds": round(wall, 1),
        "history": result.history, "compiled": result.stats["compiled"], "precision": result.stats["precision"],
    }


def lmforge_evidence(result, data, params) -> dict:
    """test_evidence of the weights lmforge scored (result.model: the best epoch's, back on the CPU),
    their logits taken as finetune's predict takes its classes (same encoding, batches and autocast),
    and the weights' digest. scored_mismatch: rows whose class here differs from finetune's own
    test predictions (0, or a near-tie or two: anything more means this is not the model it scored)."""
    import numpy as np
    import torch

    from lmforge.training import runtime
    from lmforge.training.finetuning import collate, encode_split

    device = runtime.pick_device(params.device, "finetune.device")
    dtype = runtime.compute_dtype(params.precision, device)
    net = result.model.to(device).eval()
    encoded = encode_split(result.tokenizer, data["test"], params)
    order = np.argsort([len(e) for e in encoded], kind="stable")
    pad_id = int(result.tokenizer.pad_token_id)
    parts = []
    with torch.inference_mode():
        for start in range(0, len(order), params.eval_batch_size):
            ids, mask = collate(encoded, order[start : start + params.eval_batch_size], pad_id, params.pad_multiple,
                                params.max_length)
            with runtime.autocast(device, dtype):
                parts.append(net(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu())
    net.to("cpu")
    logits = np.empty((len(encoded), len(result.labels)), dtype=np.float32)
    logits[order] = torch.cat(parts).numpy()
    lid = {name: i for i, name in enumerate(result.labels)}
    evidence = test_evidence(logits, [lid[y] for y in data["test"].labels], result.labels)
    scored = [lid[y] for y in result.test_predictions]
    evidence["scored_mismatch"] = int(sum(a != b for a, b in zip(logits.argmax(-1), scored)))
    return {"weights_sha256": weights_sha256(result.model), **evidence}


def epoch_clock():
    """A Trainer callback noting each epoch's seconds, so the Trainer has a steady rate (epochs 2..,
    after its compile) to set beside lmforge's, as well as its rate over all epochs."""
    from transformers import TrainerCallback

    class EpochClock(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self._start = 0.0

        def on_epoch_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            self.seconds.append(round(time.perf_counter() - self._start, 1))

        def steady(self, rows: int) -> float | None:
            later = self.seconds[1:]
            return round(rows * len(later) / sum(later), 1) if later and sum(later) > 0 else None

    return EpochClock()


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
    if tok.pad_token is None:  # a causal LM (SmolLM2): pad with eos, as lmforge's loop does
        tok.pad_token = tok.eos_token
    net.config.pad_token_id = tok.pad_token_id
    if settings.get("fair"):
        net.config.use_cache = False  # as lmforge's loop: a classifier fills no KV cache

    def encode(split):
        enc = tok(split.texts, truncation=True, max_length=settings["max_length"])
        return [{"input_ids": ids, "attention_mask": m, "labels": lid[y]}
                for ids, m, y in zip(enc["input_ids"], enc["attention_mask"], split.labels)]

    train, test = encode(data["train"]), encode(data["test"])
    import inspect

    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio), and
    # group_by_length into train_sampling_strategy.
    known = inspect.signature(TrainingArguments.__init__).parameters
    warmup = {"warmup_ratio": 0.1} if "warmup_ratio" in known else {"warmup_steps": 0.1}
    fair = {}
    if settings.get("fair"):
        grouped = {"group_by_length": True} if "group_by_length" in known else {"train_sampling_strategy": "group_by_length"}
        fair = {**grouped, "torch_compile": torch.cuda.is_available()}
    args = TrainingArguments(
        output_dir="/tmp/g4-trainer", per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=256, learning_rate=settings["learning_rate"],
        num_train_epochs=settings["num_train_epochs"], bf16=torch.cuda.is_available(), eval_strategy="no", save_strategy="no",
        logging_strategy="no", report_to="none", seed=seed, weight_decay=0.01, **warmup, **fair,
    )
    collator = DataCollatorWithPadding(tok, pad_to_multiple_of=8 if settings.get("fair") else None)
    epochs = epoch_clock()
    trainer = Trainer(model=net, args=args, train_dataset=train, data_collator=collator, processing_class=tok,
                      callbacks=[epochs])
    out = trainer.train()
    pred = trainer.predict(test)
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    order = trainer_test_order(trainer, test)
    logits = in_test_order(logits, pred.label_ids, order, [row["labels"] for row in test])
    truth = np.asarray([row["labels"] for row in test])
    acc = float(np.mean(logits.argmax(-1) == truth))
    evidence = test_evidence(logits, truth, labels)
    c = np.asarray(evidence["test_confusion"])
    both = c.sum(0) + c.sum(1)  # per class: predicted + true (F1 = 2 TP / both, 0 where both is 0, as sklearn)
    macro_f1 = float(np.mean(np.where(both > 0, 2 * np.diag(c) / np.maximum(both, 1), 0.0)))
    # net: the model the Trainer trained and scored (trainer.model_wrapped may be its compiled wrapper)
    return {"test_accuracy": acc, "test_macro_f1": macro_f1, "weights_sha256": weights_sha256(net),
            **evidence, "train_samples_per_second": round(out.metrics["train_samples_per_second"], 1),
            "steady_samples_per_second": epochs.steady(len(train)),
            "train_seconds": round(out.metrics["train_runtime"], 1), "epoch_seconds": epochs.seconds}


def trainer_test_order(trainer, test) -> list[int] | None:
    """The order in which trainer.predict() visits the test rows, or None for their own order.
    transformers 5 applies train_sampling_strategy="group_by_length" to evaluation as well, so
    the fair Trainer's predictions come back grouped by length (its sampler is seeded, so a fresh
    one gives the same order)."""
    from torch.utils.data import SequentialSampler

    sampler = trainer._get_eval_sampler(test)
    return None if sampler is None or isinstance(sampler, SequentialSampler) else list(sampler)


def length_grouped_order(lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """The order of the Trainer's length-grouped sampler for these lengths, batch and seed: how
    an older record's Trainer predictions (made before trainer_test_order) are put back in order."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    return list(LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed)))


def in_test_order(values, visited_labels, order: list[int] | None, truth: list[int]):
    """`values` (one row per test row, in the order visited) back in test order; the labels that
    came with them must then equal the test labels, or the order is not the one predict() used."""
    import numpy as np

    values, visited_labels = np.asarray(values), np.asarray(visited_labels)
    if order is not None:
        restored, labels = np.empty_like(values), np.empty_like(visited_labels)
        restored[order], labels[order] = values, visited_labels
        values, visited_labels = restored, labels
    if not np.array_equal(visited_labels, np.asarray(truth)):
        raise RuntimeError("the Trainer's test predictions could not be put back in test order: "
                           "their labels disagree with the test split's")
    return values


def restore_trainer_order(path: Path, data, model: Path, seed: int, eval_batch: int = 256) -> list[dict]:
    """An older g4.jsonl's rows with its fair Trainer rows' test_predicted put back in test order
    (the check: the restored classes against the test labels give the recorded test_correct)."""
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    labels = sorted(set(data["train"].labels))
    truth = [labels.index(y) for y in data["test"].labels]
    tok = AutoTokenizer.from_pretrained(model)
    for row in rows:
        settings = row.get("settings") or {}
        if not (settings.get("fair") and "test_predicted" in row) or row.get("test_order_restored"):
            continue
        lengths = [len(ids) for ids in tok(data["test"].texts, truncation=True,
                                           max_length=settings["max_length"])["input_ids"]]
        order = length_grouped_order(lengths, eval_batch, row.get("seed", seed))
        visited = [int(c) for c in row["test_predicted"]]
        restored = in_test_order(visited, [truth[i] for i in order], order, truth)
        if sum(int(a == b) for a, b in zip(restored, truth)) != row["test_correct"]:
            raise RuntimeError(f"{path}: restoring {row['case']}'s order does not give its test_correct")
        row.update(test_predicted="".join(map(str, restored)), test_order_restored=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--cases", default="trainer,lmforge")
    parser.add_argument("--out", default=None)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later cases are skipped past it")
    parser.add_argument("--limit", type=int, default=None, help="train rows (val/test: a quarter); smoke tests")
    parser.add_argument("--against", action="append", default=[], metavar="G4_JSONL",
                        help="an earlier call's g4.jsonl (repeatable): its cases join the closing pairs line "
                             "(same test split only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting in every case (smoke tests: --set compile=false --set num_train_epochs=1)")
    parser.add_argument("--restore-order", action="append", default=[], metavar="G4_JSONL",
                        help="put an older record's fair Trainer predictions back in test order (written to "
                             "--out as restored-N.jsonl, then compared like --against)")
    args = parser.parse_args()
    overrides = dict(parse_override(item) for item in args.set)
    import torch
    import transformers

    started = time.perf_counter()
    data = load(Path(args.data), args.limit)
    facts = {"card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
             "torch": torch.__version__, "transformers": transformers.__version__,
             "rows": {k: len(v) for k, v in data.items()}, "test_sha256": split_sha256(data["test"])}
    print(json.dumps({"case": "facts", **facts}), flush=True)
    earlier = []
    for n, older in enumerate(args.restore_order):
        rows = restore_trainer_order(Path(older), data, Path(args.model), args.seed)
        fixed = Path(args.out or ".") / f"restored-{n}.jsonl"
        fixed.parent.mkdir(parents=True, exist_ok=True)
        fixed.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        args.against.append(str(fixed))
    for against in args.against:
        before = [json.loads(line) for line in Path(against).read_text().splitlines() if line.strip()]
        if before and before[0].get("test_sha256") == facts["test_sha256"]:
            earlier += [{**r, "case": f"{r['case']} ({against})"} for r in before[1:] if "test_predicted" in r]
        else:
            print(f"--against {against}: another test split (or no test_sha256); not compared", file=sys.stderr)
    lines = []
    for name in args.cases.split(","):
        if time.perf_counter() - started > args.budget:
            row = {"case": name, "skipped": "over the time budget"}
        else:
            runner, settings = CASES[name]
            settings = {**settings, **overrides}
            seed = settings.pop("seed", args.seed)
            if runner == "trainer":
                settings = {k: settings[k] for k in ("max_length", "batch_size", "learning_rate", "num_train_epochs", "fair")
                            if k in settings}
            try:
                fn = run_trainer if runner == "trainer" else run_lmforge
                if torch.cuda.is_available():
                    torch._dynamo.reset()  # each case compiles afresh (the on-disk inductor cache stays)
                row = {"case": name, "seed": seed, "settings": settings,
                       **fn(Path(args.model), data, settings, seed)}
            except Exception as err:  # noqa: BLE001 - one broken case must not lose the others
                row = {"case": name, "error": f"{type(err).__name__}: {err}"}
        print(json.dumps(row), flush=True)
        lines.append(row)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "g4.jsonl").write_text("\n".join(json.dumps(r) for r in [facts, *lines]) + "\n")
    pairs = {"case": "pairs", "pairs": disagreements(earlier + lines)}
    print(json.dumps(pairs), flush=True)
    if args.out:
        (Path(args.out) / "g4.jsonl").write_text("\n".join(json.dumps(r) for r in [facts, *lines, pairs]) + "\n")
    print(table(lines), flush=True)
    for p in pairs["pairs"]:
        print(f"{p['a']} vs {p['b']}: {p['disagree']} of {p['rows']} test rows predicted differently, "
              f"{'the same' if p['same_weights'] else 'different'} weights", flush=True)


if __name__ == "__main__":
    main()
