"""Fine-tune a transformers encoder or decoder for sequence classification, in a small torch loop.

The loop runs on the training runtime it shares with pretraining (runtime.py: device choice,
autocast, fused AdamW and its parameter groups, the warmup schedule, clipping, checkpoints).
Why not transformers' Trainer: bench/finetune_g4.py measures both, the Trainer configured as
fairly as it goes (length grouping, padding to a multiple of 8, bf16, torch.compile); the
figures and the decision are in docs/performance.md. Here, texts are tokenized once with no
padding, batches are grouped by length and padded only to their own longest row (rounded to a
multiple of `pad_multiple`), the forward runs under bf16 autocast with each block compiled on a GPU,
and the step loop never waits on the host (the loss is read every `logging_steps` steps).

What it does:
- labels: names (str); id2label / label2id come from the sorted distinct labels of the train
  split and are saved in the model config, so any number of classes works unchanged;
- full fine-tuning, or LoRA through peft (merged back into the base weights before saving, so
  the saved folder is a plain transformers model);
- truncation to `max_length` tokens keeping the head, the tail, or head + tail of long texts;
- validation after every epoch, early stopping on the chosen val metric, the best weights kept
  (in memory, or with a checkpoint folder on disk);
- resumable: with a checkpoint folder, weights, optimizer, scheduler, RNG states and the data
  position are saved every `save_steps` steps and at each epoch end, in
  <checkpoint folder>/<run key> like pretraining's; a killed run resumes there and ends where an
  uninterrupted run ends (the batch order of an epoch depends only on the seed and the epoch
  number). A run with other settings or data has another key, so it starts afresh.

Imports at import time: torch, transformers, numpy, safetensors, tqdm, sklearn (through the metrics
module) and the standard library; peft only for LoRA, pyarrow or pandas only to read parquet.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lmforge.errors import UserError
from lmforge.training.classification_scores import classification_metrics
from lmforge.training import runtime

SPLITS = ("train", "val", "test")
# finetune params that change how a run computes or is reported, not the weights it ends with.
OPERATIONAL_KEYS = {"save_steps", "logging_steps", "device", "eval_batch_size", "base_model", "use_tuned",
                    "baseline_c"}
# Knobs added later, at the value that behaves as before: left out of the fingerprint there, so the
# checkpoints of runs started before them still resume.
LATER_KEYS_AT_OLD_BEHAVIOUR = {"layer_lr_decay": 1.0}


class FinetuneError(UserError, RuntimeError):
    """The data or the settings cannot be fine-tuned on (the message says why)."""


# --- data -----------------------------------------------------------------------------------


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise FinetuneError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def sample(self, n: int | None, seed: int) -> LabelledTexts:
        """A seeded random subset of n rows (all rows when n is None or not smaller)."""
        if n is None or n >= len(self):
            return self
        keep = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return LabelledTexts([self.texts[i] for i in keep], [self.labels[i] for i in keep])


def read_split(folder: Path | str, splits: Sequence[str] = SPLITS) -> dict[str, LabelledTexts]:
    """Read {train,val,test}.parquet (columns `text`, `label`) from a split folder."""
    folder = Path(folder)
    out = {}
    for name in splits:
        path = folder / f"{name}.parquet"
        if not path.exists():
            raise FinetuneError(f"{path} not found: a split folder holds train, val and test parquet files")
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            columns = set(table.column_names)
            get = lambda c: table.column(c).to_pylist()  # noqa: E731
        except ImportError:
            import pandas as pd

            frame = pd.read_parquet(path)
            columns = set(frame.columns)
            get = lambda c: frame[c].tolist()  # noqa: E731
        missing = {"text", "label"} - columns
        if missing:
            raise FinetuneError(f"{path} lacks column(s) {', '.join(sorted(missing))}")
        out[name] = LabelledTexts([str(t) for t in get("text")], [str(v) for v in get("label")])
    return out


def label_names(data: Mapping[str, LabelledTexts]) -> list[str]:
    """The sorted distinct train labels; val/test may hold no label unseen in train."""
    labels = sorted(set(data["train"].labels))
    if len(labels) < 2:
        raise FinetuneError(f"the train split holds {len(labels)} distinct label(s); need at least 2")
    for name, split in data.items():
        unseen = sorted(set(split.labels) - set(labels))
        if unseen:
            raise FinetuneError(f"the {name} split holds labels absent from train: {unseen[:5]}")
    return labels


def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence ([CLS] / [SEP] ...)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return list(framed[:start]), list(framed[start + len(plain) :])
    return [], []


def encode_texts(tokenizer, texts: Sequence[str], max_length: int, truncation: str,
                 chunk: int = 2048) -> list[np.ndarray]:
    """Token ids per text, special tokens included, at most max_length long, unpadded.

    head keeps the start of a long text, tail its end, head_tail a quarter from the start and
    the rest from the end (long reviews often conclude at the end)."""
    prefix, suffix = _special_frame(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    if budget < 2:
        raise FinetuneError(f"max_length {max_length} leaves no room for text after special tokens")
    head_part = budget // 4
    out: list[np.ndarray] = []
    for start in range(0, len(texts), chunk):
        batch = list(texts[start : start + chunk])
        ids_list = tokenizer(batch, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        for ids in ids_list:
            if len(ids) > budget:
                if truncation == "head":
                    ids = ids[:budget]
                elif truncation == "tail":
                    ids = ids[len(ids) - budget :]
                elif truncation == "head_tail":
                    ids = ids[:head_part] + ids[len(ids) - (budget - head_part) :]
                else:
                    raise FinetuneError(f"unknown truncation {truncation!r}")
            out.append(np.asarray(prefix + list(ids) + suffix, dtype=np.int64))
    return out


def train_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  group_by_length: bool, megabatch: int = 50) -> list[np.ndarray]:
    """The batches of one epoch, a pure function of (seed, epoch): a resumed run sees the same.

    With group_by_length, a random permutation is cut into megabatches of `megabatch` batches,
    each sorted by length and split into batches, and the batch order shuffled again: similar
    lengths share a batch (little padding) while the epoch stays random."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        size = batch_size * megabatch
        parts = [order[i : i + size] for i in range(0, len(order), size)]
        order = np.concatenate([p[np.argsort(-lengths[p], kind="stable")] for p in parts])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def collate(encoded: Sequence[np.ndarray], rows: np.ndarray, pad_id: int, pad_multiple: int,
            max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the rows to their longest (rounded up to pad_multiple, never past max_length)."""
    longest = max(len(encoded[i]) for i in rows)
    width = min(max(longest, max_length), -(-longest // pad_multiple) * pad_multiple)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, i in enumerate(rows):
        n = len(encoded[i])
        ids[r, :n] = encoded[i]
        mask[r, :n] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


# --- model ----------------------------------------------------------------------------------


def load_model(base: Path | str, labels: Sequence[str], params: Any):
    """The base model with a fresh classification head for `labels`, and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:  # causal LMs ship without one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise FinetuneError(f"the tokenizer of {base} has no pad, eos or unk token to pad with")
    id2label = {i: name for i, name in enumerate(labels)}
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        ignore_mismatched_sizes=True,  # a base that already has another head
        dtype=torch.float32,  # fp32 master weights (transformers 5 defaults to the checkpoint's dtype)
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # A classifier never decodes. With the cache on, a decoder fills a KV cache on every forward, and
    # compiled blocks specialise on it and on their layer index: one recompile per layer, up to the limit.
    model.config.use_cache = False
    if params.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=params.lora.r,
            lora_alpha=params.lora.alpha,
            lora_dropout=params.lora.dropout,
            target_modules=params.lora.target_modules,
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as err:
            raise FinetuneError(f"LoRA: {err} (set finetune.lora.target_modules)") from err
    elif params.method != "full":
        raise FinetuneError(f"unknown method {params.method!r}: full or lora")
    return model, tokenizer


@torch.inference_mode()
def predict(model: torch.nn.Module, encoded: Sequence[np.ndarray], *, pad_id: int, batch_size: int,
            device: torch.device, dtype: torch.dtype | None, pad_multiple: int, max_length: int) -> np.ndarray:
    """Predicted class ids, in input order (batched by length for speed)."""
    was_training = model.training
    model.eval()
    order = np.argsort([len(e) for e in encoded], kind="stable")
    preds = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = collate(encoded, rows, pad_id, pad_multiple, max_length)
        with runtime.autocast(device, dtype):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        preds.append(logits.argmax(-1))
    model.train(was_training)
    flat = torch.cat(preds).cpu().numpy() if preds else np.zeros(0, dtype=np.int64)
    out = np.empty_like(flat)
    out[order] = flat
    return out


# --- the run --------------------------------------------------------------------------------


# A block's index in the parameter names of BERT (encoder.layer.N), Llama (model.layers.N) and GPT-2 (h.N).
BLOCK_INDEX = re.compile(r"\.(?:layer|layers|h)\.(\d+)\.")


def layer_lr_groups(model: torch.nn.Module, lr: float, weight_decay: float, decay: float) -> list[dict[str, Any]]:
    """AdamW's groups with layer-wise lr decay: the head (and anything above the blocks) at `lr`, block i of
    L at lr x decay^(L - i), the embeddings at lr x decay^(L + 1). decay 1 gives runtime.parameter_groups."""
    if decay == 1.0:
        return runtime.parameter_groups(model, weight_decay)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # each tied weight once
    block = {name: int(m.group(1)) for name, _ in named if (m := BLOCK_INDEX.search(name))}
    if not block:
        raise FinetuneError(f"finetune.layer_lr_decay: no numbered blocks in {type(model).__name__}'s parameter "
                            "names; set layer_lr_decay: 1.0")
    top = max(block.values()) + 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named:
        depth = block[name] + 1 if name in block else (0 if "embed" in name else top + 1)
        decays = param.dim() >= 2
        group = groups.setdefault((depth, decays), {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                                    "lr": lr * decay ** (top + 1 - depth)})
        group["params"].append(param)
    return list(groups.values())


def fingerprint(params: Any, seed: int, base: Path | str, labels: Sequence[str], train: LabelledTexts,
                val: LabelledTexts) -> dict[str, Any]:
    """Everything that decides the weights a run ends with: its checkpoint folder's key."""
    digest = hashlib.sha256()
    for split in (train, val):
        for text, label in zip(split.texts, split.labels):
            digest.update(text.encode("utf-8", "replace"))
            digest.update(b"\x00" + label.encode() + b"\x01")
    return {"seed": seed, "base": str(base), "labels": list(labels), "data": digest.hexdigest(),
            **runtime.recorded_knobs("finetune.", params.model_dump(), operational=OPERATIONAL_KEYS,
                                     later_at_old_behaviour=LATER_KEYS_AT_OLD_BEHAVIOUR)}


@dataclass
class FinetuneProgress:
    """Where the run is; a checkpoint carries it across a kill."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    samples: int = 0
    done: bool = False


@dataclass
class FinetuneRun:
    """One fine-tuning run, built by `prepare_run` before its first step."""

    params: Any
    seed: int
    labels: list[str]
    tokenizer: Any
    model: torch.nn.Module
    forward: Callable
    device: torch.device
    dtype: torch.dtype | None
    compiled: bool
    train_ids: list[np.ndarray]
    train_y: torch.Tensor
    val_ids: list[np.ndarray]
    val_labels: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    checkpoints: runtime.RunCheckpoints | None
    say: Callable[[str], None]
    best_in_memory: dict[str, torch.Tensor] | None = None  # without a checkpoint folder
    bar: Any = None  # the tqdm bar over optimizer steps (disabled when not shown)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def encode(self, split: LabelledTexts) -> list[np.ndarray]:
        return encode_split(self.tokenizer, split, self.params)

    def predict(self, encoded: Sequence[np.ndarray]) -> np.ndarray:
        return predict(self.model, encoded, pad_id=self.pad_id, batch_size=self.params.eval_batch_size,
                       device=self.device, dtype=self.dtype, pad_multiple=self.params.pad_multiple,
                       max_length=self.params.max_length)

    def score(self, encoded: Sequence[np.ndarray], truth: Sequence[str]) -> dict:
        return classification_metrics(truth, [self.labels[i] for i in self.predict(encoded)], self.labels)


def encode_split(tokenizer, split: LabelledTexts, params: Any) -> list[np.ndarray]:
    return encode_texts(tokenizer, split.texts, params.max_length, params.truncation)


def prepare_run(base: Path | str, data: Mapping[str, LabelledTexts], params: Any, seed: int,
            checkpoint_dir: Path | str | None, log: Callable[[str], None]) -> FinetuneRun:
    """Labels, model and tokenizer, the encoded splits, optimizer, schedule and checkpoint folder."""
    labels = label_names(data)
    train = data["train"].sample(params.max_train_rows, seed)
    val = data["val"]
    if len(val) == 0:
        raise FinetuneError("the val split is empty: early stopping and model selection need it")
    device = runtime.pick_device(params.device, "finetune.device")
    model, tokenizer = load_model(base, labels, params)
    label_id = {name: i for i, name in enumerate(labels)}
    model.to(device)
    model.train()
    runtime.enable_tf32(device)
    compiled = params.compile is True or (params.compile == "auto" and device.type == "cuda")
    optimizer = runtime.adamw(model, lr=params.learning_rate, weight_decay=params.weight_decay,
                              groups=layer_lr_groups(model, params.learning_rate, params.weight_decay,
                                                     params.layer_lr_decay))
    per_epoch = math.ceil(len(train) / params.batch_size)
    total = (per_epoch * params.num_train_epochs if params.max_steps is None
             else min(params.max_steps, per_epoch * params.num_train_epochs))
    warmup = round(params.warmup_ratio * total)
    scheduler = runtime.lr_scheduler(optimizer, partial(runtime.warmup_linear, warmup=warmup, total=total))
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = runtime.RunCheckpoints(checkpoint_dir, fingerprint(params, seed, base, labels, train, val),
                                             runtime.Dist(device=device))
    return FinetuneRun(params=params, seed=seed, labels=labels, tokenizer=tokenizer, model=model,
               forward=runtime.compile_blocks(model, lambda m: log(f"finetune: {m}")) if compiled else model,
               device=device, dtype=runtime.compute_dtype(params.precision, device), compiled=compiled,
               train_ids=encode_split(tokenizer, train, params),
               train_y=torch.tensor([label_id[v] for v in train.labels], dtype=torch.long),
               val_ids=encode_split(tokenizer, val, params),
               val_labels=val.labels, optimizer=optimizer, scheduler=scheduler, total_steps=total,
               checkpoints=checkpoints, say=log)


def start_or_resume(run: FinetuneRun) -> tuple[FinetuneProgress, int | None]:
    """The progress of the run's last checkpoint (weights, optimizer, RNG restored), or a fresh one."""
    state = run.checkpoints.resume(run.model, run.optimizer, run.scheduler) if run.checkpoints else None
    if state is None:
        return FinetuneProgress(), None
    progress = FinetuneProgress(**state["progress"])
    run.say(f"finetune: resumed from step {progress.global_step} (epoch {progress.epoch})")
    return progress, progress.global_step


def save_checkpoint(run: FinetuneRun, progress: FinetuneProgress) -> None:
    if run.checkpoints is not None:
        runtime.synchronize(run.device)
        run.checkpoints.save(progress.global_step, run.model, run.optimizer, run.scheduler,
                             {"progress": asdict(progress)})


def train_epoch(run: FinetuneRun, progress: FinetuneProgress, on_step: Callable[[int], None] | None) -> float:
    """The rest of the current epoch's steps; returns its mean train loss."""
    p = run.params
    batches = train_batches(np.asarray([len(e) for e in run.train_ids]), p.batch_size, run.seed, progress.epoch,
                            p.group_by_length)
    running, counted = torch.zeros((), device=run.device), 0
    runtime.synchronize(run.device)
    started = time.perf_counter()
    for rows in batches[progress.step_in_epoch :]:
        if progress.global_step >= run.total_steps:
            break
        running += train_step(run, rows)
        counted += 1
        progress.global_step += 1
        progress.step_in_epoch += 1
        progress.samples += len(rows)
        step = progress.global_step
        run.bar.update(1)
        if step % p.logging_steps == 0:
            mean = runtime.finite_loss((running / counted).item(), f"step {step}")
            run.bar.set_postfix(epoch=progress.epoch + 1, loss=f"{mean:.4f}", refresh=False)
            run.say(f"finetune: epoch {progress.epoch + 1} step {step}/{run.total_steps} loss {mean:.4f} "
                    f"lr {run.scheduler.get_last_lr()[0]:.2e}")
        if step % p.save_steps == 0 and run.checkpoints is not None:
            runtime.synchronize(run.device)
            progress.train_seconds += time.perf_counter() - started
            save_checkpoint(run, progress)
            started = time.perf_counter()
        if on_step is not None:
            on_step(step)
    runtime.synchronize(run.device)
    progress.train_seconds += time.perf_counter() - started
    return runtime.finite_loss((running / counted).item(), f"epoch {progress.epoch + 1}") if counted else math.nan


def train_step(run: FinetuneRun, rows: np.ndarray) -> torch.Tensor:
    """Forward, backward, clip and AdamW on one batch; returns the loss, still on the device."""
    ids, mask = collate(run.train_ids, rows, run.pad_id, run.params.pad_multiple, run.params.max_length)
    if run.device.type == "cuda":
        ids, mask = ids.pin_memory().to(run.device, non_blocking=True), mask.pin_memory().to(run.device, non_blocking=True)
    target = run.train_y[rows].to(run.device, non_blocking=True)
    with runtime.autocast(run.device, run.dtype):
        logits = run.forward(input_ids=ids, attention_mask=mask).logits
    loss = F.cross_entropy(logits.float(), target)
    loss.backward()
    runtime.optimizer_step(run.model, run.optimizer, run.params.max_grad_norm)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def end_epoch(run: FinetuneRun, progress: FinetuneProgress, train_loss: float, seconds_before: float,
              samples_before: int) -> dict:
    """Validate, keep the best weights, decide on early stopping, checkpoint; returns val scores."""
    p, epoch = run.params, progress.epoch + 1
    scores = run.score(run.val_ids, run.val_labels)
    progress.history.append({"epoch": epoch, "step": progress.global_step, "train_loss": train_loss,
                             "val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"],
                             "train_seconds": round(progress.train_seconds - seconds_before, 3),
                             "train_samples": progress.samples - samples_before})
    run.say(f"finetune: epoch {epoch} val accuracy {scores['accuracy']:.4f} macro F1 {scores['macro_f1']:.4f}")
    value = scores[p.metric]
    if progress.best is None or value > progress.best:
        progress.best, progress.best_epoch, progress.bad_epochs = value, epoch, 0
        runtime.keep_best(run, {"epoch": epoch, p.metric: value})
    else:
        progress.bad_epochs += 1
    progress.epoch, progress.step_in_epoch = epoch, 0
    stop = bool(p.early_stopping_patience and progress.bad_epochs >= p.early_stopping_patience)
    if stop:
        run.say(f"finetune: early stop after epoch {epoch}: no gain in {p.early_stopping_patience} epoch(s)")
    progress.done = stop or progress.global_step >= run.total_steps or progress.epoch >= p.num_train_epochs
    save_checkpoint(run, progress)
    return scores


@dataclass
class FinetuneResult:
    model: torch.nn.Module  # the best weights, LoRA merged, on the CPU, in eval mode
    tokenizer: object
    labels: list[str]
    history: list[dict]
    best_epoch: int
    val: dict  # classification_metrics of the best weights on val
    test: dict | None
    stats: dict  # steps, samples, seconds, samples/s, device, precision, compiled, resumed
    test_predictions: list[str] | None = None  # the predicted label of each test row, in order


def finetune(base: Path | str, data: Mapping[str, LabelledTexts], params: Any, *, seed: int,
             checkpoint_dir: Path | str | None = None, on_epoch_end: Callable[[int, dict], None] | None = None,
             on_step: Callable[[int], None] | None = None, log: Callable[[str], None] = print,
             show_progress: bool = True) -> FinetuneResult:
    """Fine-tune `base` on data["train"], select on data["val"], score data["test"] if given.

    params: the finetune section (lmforge.config.finetune.FinetuneParams).
    on_epoch_end(epoch, val_metrics) runs after each epoch's validation (the tuner reports to
    its pruner there and may raise to stop); on_step(global_step) after each optimizer step.
    show_progress: a tqdm bar over the optimizer steps on stderr."""
    torch.manual_seed(seed)
    run = prepare_run(base, data, params, seed, checkpoint_dir, log)
    progress, resumed_from = start_or_resume(run)
    trainable = sum(q.numel() for q in run.model.parameters() if q.requires_grad)
    run.bar = tqdm(total=run.total_steps, initial=progress.global_step, disable=not show_progress, unit="step",
                   desc="fine-tuning", dynamic_ncols=True, mininterval=1.0)
    log(f"finetune: {len(run.train_ids)} train / {len(run.val_ids)} val rows, {len(run.labels)} labels, "
        f"{run.total_steps} steps, device {run.device.type}, {'bf16' if run.dtype else 'fp32'}, "
        f"compile {run.compiled}, {trainable:,} trainable parameters")
    while not progress.done and progress.epoch < params.num_train_epochs:
        seconds_before, samples_before = progress.train_seconds, progress.samples
        train_loss = train_epoch(run, progress, on_step)
        scores = end_epoch(run, progress, train_loss, seconds_before, samples_before)
        run.bar.set_postfix(epoch=progress.epoch, val=f"{scores[params.metric]:.4f}")
        if on_epoch_end is not None:
            on_epoch_end(progress.epoch, scores)
    run.bar.close()
    return wrap_up(run, data, progress, resumed_from)


def wrap_up(run: FinetuneRun, data: Mapping[str, LabelledTexts], progress: FinetuneProgress,
            resumed_from: int | None) -> FinetuneResult:
    """The best weights, LoRA merged, scored on val and test, moved to the CPU."""
    runtime.restore_best(run)
    if run.params.method == "lora":
        run.model = run.model.merge_and_unload()
    run.model.eval()
    val_scores = run.score(run.val_ids, run.val_labels)
    test_scores, test_predictions = None, None
    if "test" in data and len(data["test"]):
        test_predictions = [run.labels[i] for i in run.predict(run.encode(data["test"]))]
        test_scores = classification_metrics(data["test"].labels, test_predictions, run.labels)
    run.model.to("cpu")
    seconds = progress.train_seconds
    stats = {
        "steps": progress.global_step,
        "train_samples": progress.samples,
        "train_seconds": round(seconds, 3),
        "samples_per_second": round(progress.samples / seconds, 2) if seconds > 0 else None,
        "device": torch.cuda.get_device_name() if run.device.type == "cuda" else "cpu",
        "precision": "bf16" if run.dtype else "fp32",
        "compiled": run.compiled,
        "resumed_from_step": resumed_from,
        "train_rows": len(run.train_ids),
    }
    return FinetuneResult(model=run.model, tokenizer=run.tokenizer, labels=run.labels, history=progress.history,
                          best_epoch=progress.best_epoch, val=val_scores, test=test_scores, stats=stats,
                          test_predictions=test_predictions)


def save_model(result: FinetuneResult, folder: Path | str) -> Path:
    """save_pretrained the model (safetensors) and its tokenizer into `folder`."""
    folder = Path(folder)
    result.model.save_pretrained(folder)
    result.tokenizer.save_pretrained(folder)
    return folder
