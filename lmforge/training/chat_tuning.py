"""Chat fine-tuning (SFT) of a causal LM on conversations, in a small torch loop.

    data = read_conversations(split_folder)                   # {"train": [messages, ...], ...}
    result = chat_finetune(base_folder, data, params, seed=1337, checkpoint_dir=run_folders)
    save_chat_model(result, out_folder)                       # merged weights + tokenizer with its chat template

What it does:
- each conversation is rendered by the model's chat template (lmforge.generation's plain
  `User: / Assistant:` template where the tokenizer has none, or when `chat_template: plain`),
  and only the assistant's tokens are targets (packing.encode_conversation);
- conversations are packed several to a row of `max_length` tokens without seeing each other
  (restarted positions, block-diagonal causal mask: packing.py), in an order that depends only on
  the seed and the epoch, so a resumed run sees the same rows;
- full fine-tuning or LoRA through peft; a LoRA run's adapters are saved on their own
  (<out folder>/adapter) beside the merged model;
- the loss on held-out conversations (`conversation_loss`, the one scoring function, which the
  TRL comparison in bench/sft_trl.py uses for both sides) every `eval_steps` steps, the weights
  of the lowest kept; the base model is scored the same way before the first step;
- the runtime it shares with the other loops (runtime.py): device, bf16 autocast, fused AdamW,
  warmup then linear decay, clipping, regional compile on a GPU, and checkpoints in
  <checkpoint folder>/<run key> from which a killed run resumes bitwise.

Imports at import time: torch, transformers, numpy, tqdm and the standard library; peft only for
LoRA, pandas only to read parquet.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.errors import UserError
from lmforge.generation import DEFAULT_CHAT_TEMPLATE
from lmforge.training import runtime
from lmforge.training.packing import IGNORE, Example, TemplateError, collate, encode_conversation, pack

SPLITS = ("train", "val", "test")
Conversation = list[dict[str, str]]
# sft params that change how fast a run goes or what it reports, not the weights it ends with.
OPERATIONAL_KEYS = {"save_steps", "logging_steps", "device", "eval_batch_size", "compile", "sample_prompts",
                    "sample_tokens", "dataset"}


class SftError(UserError, RuntimeError):
    """The conversations or the settings cannot be fine-tuned on (the message says why)."""


# --- data -----------------------------------------------------------------------------------


def read_conversations(folder: Path | str, splits: Sequence[str] = SPLITS) -> dict[str, list[Conversation]]:
    """{split: [messages, ...]} from a chat split folder ({train,val,test}.parquet, column `text`
    holding each conversation's messages as JSON, as lmforge.data.conversations keeps them)."""
    import pandas as pd

    out = {}
    for name in splits:
        path = Path(folder) / f"{name}.parquet"
        if not path.exists():
            raise SftError(f"{path} not found: a chat split folder holds train, val and test parquet files")
        frame = pd.read_parquet(path, columns=["text"])
        out[name] = [json.loads(text) for text in frame["text"]]
    return out


def take(conversations: Sequence[Conversation], n: int | None, seed: int) -> list[Conversation]:
    """A seeded subset of n conversations in their original order (all when n is None or not smaller)."""
    if n is None or n >= len(conversations):
        return list(conversations)
    keep = np.sort(np.random.default_rng(seed).permutation(len(conversations))[:n])
    return [conversations[i] for i in keep]


def encode_all(tokenizer, conversations: Sequence[Conversation], max_length: int) -> tuple[list[Example], int]:
    """The conversations as examples cut to max_length tokens; those left with no assistant token
    (the reply came after the cut) are dropped and counted."""
    examples, dropped = [], 0
    for messages in conversations:
        try:
            example = encode_conversation(tokenizer, messages, max_length)
        except TemplateError as err:
            raise SftError(f"{err}; set sft.chat_template: plain") from err
        if any(t != IGNORE for t in example.targets):
            examples.append(example)
        else:
            dropped += 1
    return examples, dropped


def epoch_rows(examples: Sequence[Example], seed: int, epoch: int, row_length: int, packed: bool) -> list[list[Example]]:
    """One epoch's rows, a pure function of (seed, epoch): the examples shuffled, then packed
    first fit into rows of row_length tokens (or one example a row)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    shuffled = [examples[i] for i in order]
    return pack(shuffled, row_length) if packed else [[e] for e in shuffled]


def batches_of(rows: Sequence[list[Example]], batch_size: int) -> list[Sequence[list[Example]]]:
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


# --- model ----------------------------------------------------------------------------------


def chat_template(tokenizer, choice: str) -> str:
    """The template conversations are rendered with: the model's own (`model`, falling back to the
    plain one when it has none) or lmforge.generation.DEFAULT_CHAT_TEMPLATE (`plain`)."""
    own = getattr(tokenizer, "chat_template", None)
    return own if choice == "model" and isinstance(own, str) and own else DEFAULT_CHAT_TEMPLATE


def load_chat_model(base: Path | str, params: Any):
    """The base causal LM (fp32 master weights, LoRA adapters added when method is lora) and its
    tokenizer, whose chat_template is set to the one training renders with (so it is saved)."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise SftError(f"the tokenizer of {base} has no pad, eos or unk token to pad with")
    tokenizer.chat_template = chat_template(tokenizer, params.chat_template)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if not type(model).__name__.endswith("ForCausalLM"):
        raise SftError(f"{base} holds a {type(model).__name__}, not a causal LM")
    # Training never decodes: with the cache on, every forward would fill a KV cache, and compiled
    # blocks would specialise on it.
    model.config.use_cache = False
    if params.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=params.lora.r, lora_alpha=params.lora.alpha,
                          lora_dropout=params.lora.dropout, target_modules=params.lora.target_modules)
        try:
            model = get_peft_model(model, lora)
        except ValueError as err:
            raise SftError(f"LoRA: {err} (set sft.lora.target_modules)") from err
    return model, tokenizer


# --- scoring --------------------------------------------------------------------------------


@torch.inference_mode()
def examples_loss(model: torch.nn.Module, examples: Sequence[Example], *, row_length: int, batch_size: int,
                  pad_id: int, device: torch.device, dtype: torch.dtype | None) -> dict[str, float]:
    """Mean cross-entropy per assistant token over the examples, packed in their order (packing
    changes nothing: each conversation sees only itself). Also the total target tokens."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for rows in batches_of(pack(examples, row_length), batch_size):
        batch = collate(rows, pad_id)
        with runtime.autocast(device, dtype):
            # no KV cache: scoring never decodes, and compiled blocks would recompile on one
            logits = model(**{k: v.to(device) for k, v in batch.model_inputs().items()}, use_cache=False).logits
        targets = batch.targets.to(device)
        total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                   ignore_index=IGNORE, reduction="sum").double()
        count += int((targets != IGNORE).sum())
    model.train(was_training)
    loss = float(total / max(count, 1))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": count,
            "conversations": len(examples)}


def conversation_loss(model: torch.nn.Module, tokenizer, conversations: Sequence[Conversation], *, max_length: int,
                      batch_size: int = 8, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> dict[str, float]:
    """The loss on the assistant's tokens of held-out conversations, rendered by the tokenizer's
    chat template: how every chat model here is scored, whoever trained it."""
    examples, dropped = encode_all(tokenizer, conversations, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = examples_loss(model, examples, row_length=max_length, batch_size=batch_size, pad_id=int(pad or 0),
                           device=torch.device(device), dtype=dtype)
    return {**scores, "dropped": dropped}


# --- the run --------------------------------------------------------------------------------


def fingerprint(params: Any, seed: int, base: Path | str, train: Sequence[Conversation],
                val: Sequence[Conversation]) -> dict[str, Any]:
    """Everything that decides the weights a run ends with: its checkpoint folder's key."""
    digest = hashlib.sha256()
    for split in (train, val):
        for messages in split:
            digest.update(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode())
            digest.update(b"\x00")
        digest.update(b"\x01")
    return {"seed": seed, "base": str(base), "data": digest.hexdigest(),
            **runtime.recorded_knobs("sft.", params.model_dump(), operational=OPERATIONAL_KEYS,
                                     later_at_old_behaviour={"engine": "lmforge"})}


@dataclass
class ChatProgress:
    """Where the run is; a checkpoint carries it across a kill."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_val: float | None = None
    best_step: int = -1
    history: list[dict] = field(default_factory=list)  # one row per evaluation
    train_seconds: float = 0.0
    tokens: int = 0  # tokens fed (padding not counted)
    target_tokens: int = 0  # of which the assistant's, learned from
    base: dict | None = None  # the base model's held-out scores, before the first step
    done: bool = False


@dataclass
class ChatRun:
    """One chat fine-tuning run, built by `prepare_run` before its first step."""

    params: Any
    seed: int
    tokenizer: Any
    model: torch.nn.Module
    forward: Callable
    device: torch.device
    dtype: torch.dtype | None
    compiled: bool
    train: list[Example]
    val: list[Example]
    dropped: dict[str, int]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    checkpoints: runtime.RunCheckpoints | None
    say: Callable[[str], None]
    best_in_memory: dict[str, torch.Tensor] | None = None
    bar: Any = None

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def score(self, examples: Sequence[Example]) -> dict[str, float]:
        return examples_loss(self.model, examples, row_length=self.params.max_length,
                             batch_size=self.params.eval_batch_size, pad_id=self.pad_id, device=self.device,
                             dtype=self.dtype)

    def rows(self, epoch: int) -> list[list[Example]]:
        return epoch_rows(self.train, self.seed, epoch, self.params.max_length, self.params.pack)


def count_steps(train: Sequence[Example], params: Any, seed: int) -> int:
    """Optimizer steps of the whole run: every epoch's batches, capped by max_steps."""
    total = 0
    for epoch in range(params.num_train_epochs):
        total += math.ceil(len(epoch_rows(train, seed, epoch, params.max_length, params.pack)) / params.batch_size)
        if params.max_steps is not None and total >= params.max_steps:
            return params.max_steps
    return total


def prepare_run(base: Path | str, data: Mapping[str, Sequence[Conversation]], params: Any, seed: int,
                checkpoint_dir: Path | str | None, log: Callable[[str], None]) -> ChatRun:
    """Model and tokenizer, the encoded conversations, optimizer, schedule and checkpoint folder."""
    train_conversations = take(data["train"], params.max_train_conversations, seed)
    val_conversations = take(data["val"], params.max_eval_conversations, seed)
    if not val_conversations:
        raise SftError("the val split holds no conversation: model selection needs held-out conversations")
    device = runtime.pick_device(params.device, "sft.device")
    model, tokenizer = load_chat_model(base, params)
    train, train_dropped = encode_all(tokenizer, train_conversations, params.max_length)
    val, val_dropped = encode_all(tokenizer, val_conversations, params.max_length)
    if not train or not val:
        raise SftError(f"no conversation keeps an assistant token within sft.max_length {params.max_length} "
                       f"({len(train)} train, {len(val)} val): raise max_length")
    model.to(device)
    model.train()
    runtime.enable_tf32(device)
    compiled = params.compile is True or (params.compile == "auto" and device.type == "cuda")
    optimizer = runtime.adamw(model, lr=params.learning_rate, weight_decay=params.weight_decay)
    total = count_steps(train, params, seed)
    warmup = round(params.warmup_ratio * total)
    scheduler = runtime.lr_scheduler(optimizer, partial(runtime.warmup_linear, warmup=warmup, total=total))
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = runtime.RunCheckpoints(checkpoint_dir, fingerprint(params, seed, base, train_conversations,
                                                                         val_conversations),
                                             runtime.Dist(device=device))
    forward = runtime.compile_blocks(model, lambda m: log(f"sft: {m}")) if compiled else model
    return ChatRun(params=params, seed=seed, tokenizer=tokenizer, model=model, forward=forward, device=device,
                   dtype=runtime.compute_dtype(params.precision, device), compiled=compiled, train=train, val=val,
                   dropped={"train": train_dropped, "val": val_dropped}, optimizer=optimizer, scheduler=scheduler,
                   total_steps=total, checkpoints=checkpoints, say=log)


def start_or_resume(run: ChatRun) -> tuple[ChatProgress, int | None]:
    """The progress of the run's last checkpoint (weights, optimizer, RNG restored), or a fresh one."""
    state = run.checkpoints.resume(run.model, run.optimizer, run.scheduler) if run.checkpoints else None
    if state is None:
        return ChatProgress(), None
    progress = ChatProgress(**state["progress"])
    run.say(f"sft: resumed from step {progress.global_step} (epoch {progress.epoch})")
    return progress, progress.global_step


def save_checkpoint(run: ChatRun, progress: ChatProgress) -> None:
    if run.checkpoints is not None:
        runtime.synchronize(run.device)
        run.checkpoints.save(progress.global_step, run.model, run.optimizer, run.scheduler,
                             {"progress": asdict(progress)})


def train_step(run: ChatRun, rows: Sequence[list[Example]]) -> tuple[torch.Tensor, int, int]:
    """Forward, backward, clip and AdamW on one batch of packed rows; returns the loss (still on
    the device), the tokens fed and the target tokens."""
    batch = collate(rows, run.pad_id)
    inputs = batch.model_inputs()
    if run.device.type == "cuda":
        inputs = {k: v.pin_memory().to(run.device, non_blocking=True) for k, v in inputs.items()}
    targets = batch.targets.to(run.device, non_blocking=True)
    with runtime.autocast(run.device, run.dtype):
        logits = run.forward(**inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    loss.backward()
    runtime.optimizer_step(run.model, run.optimizer, run.params.max_grad_norm)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    fed = sum(len(e) for row in rows for e in row)
    learned = sum(sum(t != IGNORE for t in e.targets) for row in rows for e in row)
    return loss.detach(), fed, learned


def evaluate(run: ChatRun, progress: ChatProgress, train_loss: float | None,
             on_metrics: Callable[[int, dict], None] | None) -> None:
    """Score val, keep the weights if they are the best so far, record a history row."""
    scores = run.score(run.val)
    step = progress.global_step
    row = {"step": step, "epoch": progress.epoch + 1, "train_loss": train_loss, "val_loss": scores["loss"],
           "lr": run.scheduler.get_last_lr()[0], "tokens": progress.tokens}
    progress.history.append(row)
    run.say(f"sft: step {step}/{run.total_steps} val loss {scores['loss']:.4f}"
            + (f" (train {train_loss:.4f})" if train_loss is not None else ""))
    if progress.best_val is None or scores["loss"] < progress.best_val:
        progress.best_val, progress.best_step = scores["loss"], step
        runtime.keep_best(run, {"step": step, "val_loss": scores["loss"]})
    if on_metrics is not None:
        on_metrics(step, {"val_loss": scores["loss"]})


def train(run: ChatRun, progress: ChatProgress, on_metrics: Callable[[int, dict], None] | None) -> None:
    """The steps left, evaluating every eval_steps and at the end, checkpointing every save_steps."""
    p = run.params
    running, counted = torch.zeros((), device=run.device), 0
    while not progress.done:
        batches = batches_of(run.rows(progress.epoch), p.batch_size)
        runtime.synchronize(run.device)
        started = time.perf_counter()
        for rows in batches[progress.step_in_epoch :]:
            if progress.global_step >= run.total_steps:
                break
            loss, fed, learned = train_step(run, rows)
            running += loss
            counted += 1
            progress.global_step += 1
            progress.step_in_epoch += 1
            progress.tokens += fed
            progress.target_tokens += learned
            step = progress.global_step
            run.bar.update(1)
            last = step >= run.total_steps
            mean = None
            if step % p.logging_steps == 0 or step % p.eval_steps == 0 or last:
                mean = runtime.finite_loss((running / counted).item(), f"step {step}")
                running, counted = torch.zeros((), device=run.device), 0
                run.bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
                if on_metrics is not None:
                    on_metrics(step, {"train_loss": mean, "lr": run.scheduler.get_last_lr()[0]})
            if step % p.eval_steps == 0 or last or step % p.save_steps == 0:
                runtime.synchronize(run.device)
                progress.train_seconds += time.perf_counter() - started
                if step % p.eval_steps == 0 or last:
                    evaluate(run, progress, mean, on_metrics)
                progress.done = last
                if step % p.save_steps == 0 or last:
                    save_checkpoint(run, progress)
                runtime.synchronize(run.device)
                started = time.perf_counter()
        runtime.synchronize(run.device)
        progress.train_seconds += time.perf_counter() - started
        if not progress.done:
            progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
            progress.done = progress.epoch >= p.num_train_epochs or progress.global_step >= run.total_steps


@dataclass
class ChatResult:
    model: torch.nn.Module  # the best weights on the CPU in eval mode (a peft model for LoRA: save_chat_model merges)
    tokenizer: Any  # its chat_template is the one training rendered with
    method: str
    history: list[dict]
    best_step: int
    base: dict  # the base model's val and test scores
    val: dict  # the best weights' val scores
    test: dict | None
    stats: dict  # steps, tokens, seconds, tokens/s, device, precision, compiled, resumed


def chat_finetune(base: Path | str, data: Mapping[str, Sequence[Conversation]], params: Any, *, seed: int,
                  checkpoint_dir: Path | str | None = None, on_metrics: Callable[[int, dict], None] | None = None,
                  log: Callable[[str], None] = print, show_progress: bool = True) -> ChatResult:
    """Fine-tune `base` on data["train"]'s conversations, select on data["val"], score data["test"].

    params: the sft section (lmforge.config.sft.SftParams). on_metrics(step, {name: value}) gets
    the train loss every logging_steps and the val loss at each evaluation."""
    torch.manual_seed(seed)
    run = prepare_run(base, data, params, seed, checkpoint_dir, log)
    test = None
    if data.get("test"):
        test, _ = encode_all(run.tokenizer, take(data["test"], params.max_eval_conversations, seed), params.max_length)
    progress, resumed_from = start_or_resume(run)
    if progress.base is None:  # before the first step the weights are the base model's (LoRA's B starts at 0)
        progress.base = {"val": run.score(run.val), **({"test": run.score(test)} if test else {})}
        log(f"sft: base model val loss {progress.base['val']['loss']:.4f}")
    trainable = sum(q.numel() for q in run.model.parameters() if q.requires_grad)
    log(f"sft: {len(run.train)} train / {len(run.val)} val conversations ({run.dropped['train']} + "
        f"{run.dropped['val']} with no reply within {params.max_length} tokens left out), {run.total_steps} steps "
        f"of {params.batch_size} rows x {params.max_length} tokens, {params.method}, device {run.device.type}, "
        f"{'bf16' if run.dtype else 'fp32'}, compile {run.compiled}, {trainable:,} trainable parameters")
    run.bar = tqdm(total=run.total_steps, initial=progress.global_step, disable=not show_progress, unit="step",
                   desc="chat fine-tuning", dynamic_ncols=True, mininterval=1.0)
    train(run, progress, on_metrics)
    run.bar.close()
    return wrap_up(run, progress, test, resumed_from)


def wrap_up(run: ChatRun, progress: ChatProgress, test: list[Example] | None, resumed_from: int | None) -> ChatResult:
    """The best weights, scored on val and test, moved to the CPU."""
    runtime.restore_best(run)
    run.model.eval()
    run.model.config.use_cache = True  # from here on the model decodes
    val_scores = run.score(run.val)
    test_scores = run.score(test) if test else None
    run.model.to("cpu")
    stats = train_stats(run, progress, steps=progress.global_step, resumed_from=resumed_from, val_count=len(run.val))
    return ChatResult(model=run.model, tokenizer=run.tokenizer, method=run.params.method, history=progress.history,
                      best_step=progress.best_step, base=progress.base or {}, val=val_scores, test=test_scores,
                      stats=stats)


def train_stats(run, progress, *, steps: int, resumed_from: int | None, val_count: int) -> dict[str, Any]:
    """A finished run's figures, as either engine reports them (run: its model, device, dtype,
    compiled, train and dropped; progress: its tokens, target_tokens and train_seconds)."""
    seconds = progress.train_seconds
    return {
        "steps": steps,
        "tokens": progress.tokens,
        "target_tokens": progress.target_tokens,
        "train_seconds": round(seconds, 3),
        "tokens_per_second": round(progress.tokens / seconds, 1) if seconds > 0 else None,
        "device": torch.cuda.get_device_name() if run.device.type == "cuda" else "cpu",
        "precision": "bf16" if run.dtype else "fp32",
        "compiled": run.compiled,
        "resumed_from_step": resumed_from,
        "train_conversations": len(run.train),
        "val_conversations": val_count,
        "dropped_conversations": run.dropped,
        "trainable_parameters": sum(q.numel() for q in run.model.parameters() if q.requires_grad),
    }


ADAPTER_FOLDER = "adapter"  # inside the saved model: a LoRA run's adapters on their own (peft's format)


def save_chat_model(result: ChatResult, folder: Path | str) -> Path:
    """The model as a plain transformers folder (LoRA merged into the weights, its adapters also
    saved on their own in folder/adapter) and its tokenizer, chat template included."""
    folder = Path(folder)
    model = result.model
    if result.method == "lora":
        model.save_pretrained(folder / ADAPTER_FOLDER)
        model = model.merge_and_unload()
    model.save_pretrained(folder)
    result.tokenizer.save_pretrained(folder)
    return folder
