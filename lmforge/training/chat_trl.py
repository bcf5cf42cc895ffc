"""Chat fine-tuning (SFT) through TRL's SFTTrainer, with the contract of chat_tuning.chat_finetune.

    result = trl_finetune(base_folder, data, params, seed=1337, checkpoint_dir=run_folders)
    save_chat_model(result, out_folder)      # chat_tuning's: merged weights + tokenizer with its template

Why TRL: bench/sft_trl.py trained SmolLM2-135M on the same 600 conversations both ways on one H100
(record: bench/results/2026-12-06-h100-sft-trl.json). TRL's SFTTrainer (sdpa, eager) fed 1.38x the
tokens/s of lmforge's own loop (compiled) at the same held-out loss (3.2661 against 3.2646), and the
rule the comparison was run under keeps lmforge's loop only at >= 1.3x TRL's speed: so TRL trains,
inside lmforge's contract.

What stays lmforge's, so that the two engines are judged and resumed alike:
- the conversations (chat_tuning.take, same seed) and the rule that drops one whose first reply
  falls past max_length (chat_tuning.encode_all on each, so the counts agree);
- the model and its LoRA (chat_tuning.load_chat_model, seeded as chat_finetune seeds it), the
  optimizer and schedule (runtime.adamw, linear warmup then linear decay: runtime.warmup_linear);
- every reported loss: the base model's, each evaluation's, the result's val and test, scored by
  chat_tuning's own scoring (conversation_loss, examples_loss), in the training precision;
- the best weights by val loss (checkpoint.save_best beside the Trainer's checkpoints, or a copy
  in memory), restored at the end; the checkpoint folder's key (chat_tuning.fingerprint, hashed by
  runtime.run_key, with an engine marker so the two engines never share a folder).

What is TRL's: tokenisation through a {% generation %}-marked twin of the chat template (the
assistant-only loss; the twins here render byte-identical text and mark exactly the tokens
packing.encode_conversation learns), best-fit-decreasing packing into rows of max_length tokens,
padding-free batches (one sequence per step whose position ids restart at every conversation; with
sdpa, transformers rebuilds the block-diagonal mask from them), its chunked loss head, the
Trainer's loop, clipping, checkpoints (checkpoint-<step>) and resume.

Where it differs from chat_finetune:
- rows: TRL packs all conversations once (longest first), so every epoch has the same rows, in an
  order drawn from the seed and the epoch; lmforge's loop shuffles conversations and packs them
  first fit each epoch. A step's loss is the mean over its target tokens in both, but rows group
  conversations of like length here, and over several epochs the step counts can differ slightly;
- checkpoints are the Trainer's (weights, optimizer, schedule, RNG, and trainer_state.json, which
  carries lmforge's progress: history, best val, base scores, token counts). Only the newest is
  kept; one whose trainer_state.json does not hold that progress is incomplete (killed while
  written) and is removed on resume, which continues from the newest complete one;
- attention is sdpa whatever the model folder asks for, and `compile: auto` leaves TRL eager, as it
  was measured (COMPILE_UNDER_AUTO); `compile: true` hands the model to torch.compile.

Imports trl, datasets and peft only when a run starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from lmforge.generation import DEFAULT_CHAT_TEMPLATE
from lmforge.training import chat_tuning, checkpoint, runtime
from lmforge.training.chat_tuning import ChatResult, Conversation, SftError, train_stats
from lmforge.training.packing import IGNORE, Example

ENGINE = "trl"
ATTENTION = "sdpa"  # bench/sft_trl.py: TRL with flex_attention and torch.compile stalled; sdpa trained
# compile: auto leaves TRL eager, as it was measured (the record's TRL side ran sdpa without
# torch.compile; TRL with torch.compile was never timed with sdpa, and stalled with flex_attention).
# compile: true asks the Trainer for torch_compile.
COMPILE_UNDER_AUTO = False
ALIGNMENT_CHECKED = 16  # conversations whose TRL labels are checked against lmforge's targets before training

# --- chat templates with generation markers ----------------------------------------------------

# SmolLM2's own template (as its model folder's chat_template.jinja holds it) ...
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ... and the same text with the assistant's reply, its <|im_end|> and the line break marked.
SMOLLM2_GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# lmforge.generation.DEFAULT_CHAT_TEMPLATE (models with no template of their own), marked: the
# reply is what follows "Assistant:", its leading space and trailing line break included.
PLAIN_GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['role'] | capitalize }}:"
    "{% generation %} {{ message['content'] }}\n{% endgeneration %}"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
MARKED_TWINS = {SMOLLM2_TEMPLATE.strip(): SMOLLM2_GENERATION_TEMPLATE,
                DEFAULT_CHAT_TEMPLATE.strip(): PLAIN_GENERATION_TEMPLATE}


def has_generation_markers(template: str) -> bool:
    return "{% generation %}" in template or "{%- generation" in template


def generation_template(template: str) -> str:
    """The {% generation %}-marked twin of a chat template (the template itself when it has markers)."""
    if has_generation_markers(template):
        return template
    marked = MARKED_TWINS.get(template.strip())
    if marked is None:
        raise SftError("the chat template has no {% generation %} markers, which TRL's assistant-only loss needs, "
                       "and lmforge carries no marked twin of it (only of SmolLM2's ChatML and of its plain "
                       "template): set sft.chat_template: plain, or train with lmforge's own loop")
    return marked


def check_alignment(tokenizer, marked: str, conversations: Sequence[Conversation], examples: Sequence[Example],
                    max_length: int) -> None:
    """TRL's ids and labels (the marked template's assistant mask) are lmforge's ids and targets."""
    for messages, example in zip(conversations, examples):
        ids, labels = trl_labels(tokenizer, marked, messages, max_length)
        if ids != example.ids or labels[1:] + [IGNORE] != example.targets:
            raise SftError("the {% generation %}-marked chat template does not mark the tokens lmforge learns "
                           "(the assistant's replies) for this tokenizer: set sft.chat_template: plain")


def trl_labels(tokenizer, marked: str, messages: Conversation, max_length: int) -> tuple[list[int], list[int]]:
    """A conversation's ids and labels as TRL builds them (label = the token where it is the
    assistant's, else IGNORE; label[t] is predicted at t - 1), cut to max_length as its packing does."""
    out = tokenizer.apply_chat_template(list(messages), chat_template=marked, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])[:max_length]
    labels = [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"])]
    return ids, [IGNORE] + labels[1:]  # the first token of a conversation is never predicted (TRL's collator)


def with_a_reply(tokenizer, conversations: Sequence[Conversation], max_length: int
                 ) -> tuple[list[Conversation], list[Example], int]:
    """The conversations that keep an assistant token within max_length tokens (chat_tuning.encode_all's
    rule, applied to each), their examples, and how many were left out."""
    kept, examples, dropped = [], [], 0
    for messages in conversations:
        encoded, lost = chat_tuning.encode_all(tokenizer, [messages], max_length)
        dropped += lost
        if encoded:
            kept.append(messages)
            examples.append(encoded[0])
    return kept, examples, dropped


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class TrlProgress:
    """What a Trainer checkpoint carries for lmforge (in trainer_state.json, as a callback's state)."""

    history: list[dict] = field(default_factory=list)  # one row per evaluation
    best_val: float | None = None
    best_step: int = -1
    base: dict | None = None  # the base model's held-out scores, before the first step
    tokens: int = 0  # tokens fed (padding-free: no padding)
    target_tokens: int = 0  # of which the assistant's, learned from
    train_seconds: float = 0.0
    logged: dict | None = None  # the last train-loss log: {"step", "loss"}


@dataclass
class TrlRun:
    params: Any
    seed: int
    base: str
    tokenizer: Any
    template: str  # the chat template conversations are rendered with (saved with the model)
    marked: str  # its {% generation %}-marked twin, which TRL tokenises with
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype | None
    compiled: bool
    train: list[Conversation]  # those with a reply within max_length
    train_examples: list[Example]
    val: list[Conversation]
    val_examples: list[Example]
    test: list[Conversation]
    dropped: dict[str, int]
    run_dir: Path | None  # checkpoints and best weights; None: nothing kept on disk
    on_metrics: Callable[[int, dict], None] | None
    say: Callable[[str], None]
    progress: TrlProgress = field(default_factory=TrlProgress)
    best_in_memory: dict[str, torch.Tensor] | None = None
    targets_pending: Any = 0  # target tokens of steps not yet added to progress (a device tensor: no sync)
    clock: float = 0.0
    total_steps: int = 0
    bar: Any = None

    def score(self, examples: Sequence[Example]) -> dict[str, float]:
        return chat_tuning.examples_loss(self.model, examples, row_length=self.params.max_length,
                                         batch_size=self.params.eval_batch_size,
                                         pad_id=int(self.tokenizer.pad_token_id), device=self.device,
                                         dtype=self.dtype)

    def score_conversations(self, conversations: Sequence[Conversation]) -> dict[str, float]:
        """conversation_loss, rendered with the plain template (the shape chat_finetune reports)."""
        self.tokenizer.chat_template = self.template
        scores = chat_tuning.conversation_loss(self.model, self.tokenizer, conversations,
                                               max_length=self.params.max_length,
                                               batch_size=self.params.eval_batch_size, device=self.device,
                                               dtype=self.dtype)
        scores.pop("dropped")
        return scores

    def settle(self) -> TrlProgress:
        """The progress with the target tokens counted so far (synchronises a GPU)."""
        if torch.is_tensor(self.targets_pending):
            self.progress.target_tokens += int(self.targets_pending)
        self.targets_pending = 0
        return self.progress

    def restart_clock(self) -> None:
        runtime.synchronize(self.device)
        self.clock = time.perf_counter()

    def stop_clock(self) -> None:
        runtime.synchronize(self.device)
        self.progress.train_seconds += time.perf_counter() - self.clock
        self.clock = time.perf_counter()


def prepare_run(base: Path | str, data: Mapping[str, Sequence[Conversation]], params: Any, seed: int,
                on_metrics: Callable[[int, dict], None] | None, log: Callable[[str], None]) -> TrlRun:
    """Model, tokenizer and conversations as chat_finetune prepares them, and the marked template."""
    train = chat_tuning.take(data["train"], params.max_train_conversations, seed)
    val = chat_tuning.take(data["val"], params.max_eval_conversations, seed)
    if not val:
        raise SftError("the val split holds no conversation: model selection needs held-out conversations")
    test = chat_tuning.take(data["test"], params.max_eval_conversations, seed) if data.get("test") else []
    device = runtime.pick_device(params.device, "sft.device")
    torch.manual_seed(seed)  # LoRA's initial weights, as chat_finetune draws them
    model, tokenizer = chat_tuning.load_chat_model(base, params)
    template = tokenizer.chat_template
    marked = generation_template(template)
    kept, train_examples, train_dropped = with_a_reply(tokenizer, train, params.max_length)
    val_examples, val_dropped = chat_tuning.encode_all(tokenizer, val, params.max_length)
    if not kept or not val_examples:
        raise SftError(f"no conversation keeps an assistant token within sft.max_length {params.max_length} "
                       f"({len(kept)} train, {len(val_examples)} val): raise max_length")
    check_alignment(tokenizer, marked, kept[:ALIGNMENT_CHECKED], train_examples[:ALIGNMENT_CHECKED],
                    params.max_length)
    model.set_attn_implementation(ATTENTION)
    model.to(device)
    runtime.enable_tf32(device)
    compiled = params.compile is True or (params.compile == "auto" and device.type == "cuda" and COMPILE_UNDER_AUTO)
    return TrlRun(params=params, seed=seed, base=str(base), tokenizer=tokenizer, template=template, marked=marked,
                  model=model, device=device, dtype=runtime.compute_dtype(params.precision, device),
                  compiled=compiled, train=kept, train_examples=train_examples, val=val, val_examples=val_examples,
                  test=test, dropped={"train": train_dropped, "val": val_dropped}, run_dir=None,
                  on_metrics=on_metrics, say=log)


def run_folder(checkpoint_dir: Path | str, run: TrlRun, data: Mapping[str, Sequence[Conversation]]) -> Path:
    """checkpoint_dir/trl-<run key>: the key of chat_finetune's run with this engine (and TRL's
    version, whose packing decides the rows) added, so the two engines never share a folder."""
    import trl

    p = run.params
    train = chat_tuning.take(data["train"], p.max_train_conversations, run.seed)
    fingerprint = chat_tuning.fingerprint(p, run.seed, run.base, train, run.val)
    key = runtime.run_key({**fingerprint, "engine": ENGINE, "trl": trl.__version__})
    return Path(checkpoint_dir) / f"{ENGINE}-{key}"


# --- checkpoints -----------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's checkpoint folders: checkpoint-<step>
STATE_FILE = "trainer_state.json"  # written last into a Trainer checkpoint
PROGRESS_CALLBACK = "LmforgeProgress"  # the class name the Trainer files our callback's state under


def checkpoint_progress(folder: Path) -> dict | None:
    """The lmforge progress a Trainer checkpoint holds; None when the checkpoint is incomplete."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        return state["stateful_callbacks"][PROGRESS_CALLBACK]["attributes"]["progress"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def last_checkpoint(run_dir: Path) -> tuple[Path | None, dict | None]:
    """The newest complete Trainer checkpoint and its progress; newer incomplete ones (a run
    killed while writing one) are removed, so the Trainer never reads or rotates them."""
    found = sorted((p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*")
                    if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()),
                   key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), reverse=True)
    for folder in found:
        progress = checkpoint_progress(folder)
        if progress is not None:
            return folder, progress
        shutil.rmtree(folder, ignore_errors=True)
    return None, None


def keep_best(run: TrlRun, step: int, val_loss: float) -> None:
    if run.run_dir is not None:
        checkpoint.save_best(run.run_dir, checkpoint.snapshot(run.model), {"step": step, "val_loss": val_loss})
    else:
        run.best_in_memory = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}


def restore_best(run: TrlRun) -> None:
    if run.run_dir is not None and (run.run_dir / checkpoint.BEST).exists():
        checkpoint.read_state(run.run_dir / checkpoint.BEST)
        checkpoint.load_weights(run.run_dir / checkpoint.BEST, run.model)
    elif run.best_in_memory is not None:
        run.model.load_state_dict(run.best_in_memory)


# --- what lmforge adds to the Trainer's loop ---------------------------------------------------------


def evaluate(run: TrlRun, state, scheduler) -> dict[str, float]:
    """Score val (chat_tuning's scoring), keep the weights if they are the best so far, record a
    history row, report the val loss; the Trainer calls it at every eval_steps and at the end."""
    run.stop_clock()
    progress, step = run.settle(), state.global_step
    scores = run.score(run.val_examples)
    logged = progress.logged or {}
    train_loss = logged.get("loss") if logged.get("step") == step else None
    row = {"step": step, "epoch": max(1, math.ceil(state.epoch - 1e-9)), "train_loss": train_loss,
           "val_loss": scores["loss"], "lr": scheduler.get_last_lr()[0], "tokens": progress.tokens}
    progress.history.append(row)
    run.say(f"sft: step {step}/{run.total_steps} val loss {scores['loss']:.4f}"
            + (f" (train {train_loss:.4f})" if train_loss is not None else ""))
    if progress.best_val is None or scores["loss"] < progress.best_val:
        progress.best_val, progress.best_step = scores["loss"], step
        keep_best(run, step, scores["loss"])
    if run.on_metrics is not None:
        run.on_metrics(step, {"val_loss": scores["loss"]})
    run.restart_clock()
    return {"eval_loss": scores["loss"]}


def step_ended(run: TrlRun, state, control) -> None:
    """Log and evaluate at every eval_steps and at the last step (lmforge's schedule), save at the
    last step too; stop the clock around what is not training."""
    p, step = run.params, state.global_step
    last = step >= state.max_steps
    run.bar.update(1)
    if step % p.eval_steps == 0 or last:
        control.should_log = control.should_evaluate = True
    if last and run.run_dir is not None:
        control.should_save = True
    if control.should_save and not control.should_evaluate:
        run.stop_clock()


def logged(run: TrlRun, state, logs: dict[str, float]) -> None:
    """A train-loss log of the Trainer (mean over the steps since the last): reported as chat_finetune does."""
    if "loss" not in logs:
        return
    loss, step = float(logs["loss"]), state.global_step
    if not math.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss} at step {step}")
    run.progress.logged = {"step": step, "loss": loss}
    run.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    if run.on_metrics is not None:
        run.on_metrics(step, {"train_loss": loss, "lr": logs.get("learning_rate")})


def counted(run: TrlRun, inputs: Mapping[str, Any]) -> None:
    """Tokens fed and target tokens of one step's batch (padding-free: every token is real)."""
    mask = inputs.get("attention_mask")
    run.progress.tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
    run.targets_pending = run.targets_pending + (inputs["labels"] != IGNORE).sum()


def trainer_classes(run: TrlRun) -> tuple[type, Any]:
    """SFTTrainer with lmforge's evaluation, token counts and no telemetry; the callback that
    carries lmforge's progress in the Trainer's checkpoints and drives logging and evaluation."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
    from trl import SFTTrainer

    class LmforgeSFTTrainer(SFTTrainer):
        def evaluate(self, *args, **kwargs):
            metrics = evaluate(run, self.state, self.lr_scheduler)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
            return metrics

        def training_step(self, model, inputs, *args, **kwargs):
            counted(run, inputs)
            return super().training_step(model, inputs, *args, **kwargs)

        def _send_telemetry(self):  # a pipeline step reports to no one
            pass

        def create_model_card(self, *args, **kwargs):  # no README.md beside the checkpoints
            pass

    class LmforgeProgress(TrainerCallback, ExportableState):
        def on_train_begin(self, args, state, control, **kwargs):
            run.restart_clock()

        def on_step_end(self, args, state, control, **kwargs):
            step_ended(run, state, control)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logged(run, state, logs or {})

        def on_save(self, args, state, control, **kwargs):
            run.restart_clock()

        def state(self) -> dict:
            return {"args": {}, "attributes": {"progress": asdict(run.settle())}}

    return LmforgeSFTTrainer, LmforgeProgress()


def sft_config(run: TrlRun, output_dir: Path):
    """SFTConfig with the sft params (the step count, optimizer and schedule are set after the
    data is packed: build_trainer)."""
    from trl import SFTConfig

    p = run.params
    saving = run.run_dir is not None
    # lmforge keeps every activation (TRL's default checkpoints them); transformers renamed the knob
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__ \
        else "gradient_checkpointing"
    return SFTConfig(
        output_dir=str(output_dir), max_length=p.max_length, packing=True, packing_strategy="bfd",
        padding_free=True, assistant_only_loss=True, **{checkpointing: False},
        per_device_train_batch_size=p.batch_size, gradient_accumulation_steps=1, learning_rate=p.learning_rate,
        weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm, num_train_epochs=p.num_train_epochs,
        bf16=run.dtype == torch.bfloat16, fp16=False, use_cpu=run.device.type == "cpu", torch_compile=run.compiled,
        logging_strategy="steps", logging_steps=p.logging_steps, eval_strategy="no",
        save_strategy="steps" if saving else "no", save_steps=p.save_steps, save_total_limit=1 if saving else None,
        report_to="none", seed=run.seed, data_seed=run.seed, disable_tqdm=True, dataloader_num_workers=0,
        shuffle_dataset=False, dataset_num_proc=None, remove_unused_columns=True,
    )


def build_trainer(run: TrlRun, output_dir: Path, show_progress: bool):
    """The Trainer over the packed conversations, with lmforge's optimizer, schedule and steps."""
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from datasets.utils import logging as datasets_logging
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer_class, callback = trainer_classes(run)
    run.tokenizer.chat_template = run.marked
    rows = [{"messages": list(messages)} for messages in run.train]
    # A fingerprint of our own: datasets would otherwise pickle every row with dill to make one.
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    dataset = Dataset(InMemoryTable.from_pylist(rows), fingerprint=digest)
    bars = datasets_logging.is_progress_bar_enabled()
    if not show_progress:  # tokenising and packing show bars of their own
        datasets_logging.disable_progress_bar()
    try:
        trainer = trainer_class(model=run.model, args=sft_config(run, output_dir), train_dataset=dataset,
                                processing_class=run.tokenizer)
    finally:
        if bars:
            datasets_logging.enable_progress_bar()
    for noisy in (PrinterCallback, ProgressCallback):  # the bar is ours; the logs are on_metrics'
        trainer.remove_callback(noisy)
    trainer.add_callback(callback)
    p = run.params
    per_epoch = math.ceil(len(trainer.train_dataset) / p.batch_size)
    run.total_steps = min(per_epoch * p.num_train_epochs, p.max_steps or per_epoch * p.num_train_epochs)
    trainer.args.max_steps = run.total_steps
    warmup = round(p.warmup_ratio * run.total_steps)
    trainer.optimizer = runtime.adamw(run.model, lr=p.learning_rate, weight_decay=p.weight_decay)
    trainer.lr_scheduler = runtime.lr_scheduler(trainer.optimizer, partial(runtime.warmup_linear, warmup=warmup,
                                                                           total=run.total_steps))
    return trainer


# --- the entry point -----------------------------------------------------------------------------------


def trl_finetune(base: Path | str, data: Mapping[str, Sequence[Conversation]], params: Any, *, seed: int,
                 checkpoint_dir: Path | str | None = None, on_metrics: Callable[[int, dict], None] | None = None,
                 log: Callable[[str], None] = print, show_progress: bool = True) -> ChatResult:
    """Fine-tune `base` on data["train"]'s conversations with TRL, select on data["val"], score
    data["test"]: chat_tuning.chat_finetune's arguments, result and resume, another loop.

    params: the sft section (lmforge.config.sft.SftParams). on_metrics(step, {name: value}) gets
    the train loss every logging_steps (and at each evaluation) and the val loss at each evaluation."""
    run = prepare_run(base, data, params, seed, on_metrics, log)
    with ExitStack() as stack:
        resume_from = None
        if checkpoint_dir is not None:
            run.run_dir = run_folder(checkpoint_dir, run, data)
            lock = checkpoint.RunLock(run.run_dir)  # a second process on this run is refused
            stack.callback(lock.release)
            resume_from, saved = last_checkpoint(run.run_dir)
            if saved is not None:
                run.progress = TrlProgress(**saved)
        output_dir = run.run_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lmforge-trl-")))
        if run.progress.base is None:  # before the first step the weights are the base model's
            run.progress.base = {"val": run.score_conversations(run.val),
                                 **({"test": run.score_conversations(run.test)} if run.test else {})}
            log(f"sft: base model val loss {run.progress.base['val']['loss']:.4f}")
        trainer = build_trainer(run, output_dir, show_progress)
        resumed = trainer_step(resume_from)
        if resumed is not None:
            log(f"sft: resumed from step {resumed} ({resume_from.name})")
        describe(run, len(trainer.train_dataset))
        run.bar = tqdm(total=run.total_steps, initial=resumed or 0, disable=not show_progress, unit="step",
                       desc="chat fine-tuning", dynamic_ncols=True, mininterval=1.0)
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:
            run.bar.close()
            run.tokenizer.chat_template = run.template
        return wrap_up(run, trainer, resumed)


def trainer_step(folder: Path | None) -> int | None:
    return int(folder.name[len(CHECKPOINT_PREFIX):]) if folder is not None else None


def describe(run: TrlRun, rows: int) -> None:
    p = run.params
    trainable = sum(q.numel() for q in run.model.parameters() if q.requires_grad)
    run.say(f"sft: {len(run.train)} train / {len(run.val_examples)} val conversations ({run.dropped['train']} + "
            f"{run.dropped['val']} with no reply within {p.max_length} tokens left out) packed into {rows} rows, "
            f"{run.total_steps} steps of {p.batch_size} rows x {p.max_length} tokens, {p.method}, TRL, device "
            f"{run.device.type}, {'bf16' if run.dtype else 'fp32'}, compile {run.compiled}, "
            f"{trainable:,} trainable parameters")


def wrap_up(run: TrlRun, trainer, resumed: int | None) -> ChatResult:
    """The best weights, scored on val and test, moved to the CPU, as chat_finetune returns them."""
    import trl

    progress = run.settle()
    restore_best(run)
    run.model.eval()
    run.model.config.use_cache = True  # from here on the model decodes
    val_scores = run.score_conversations(run.val)
    test_scores = run.score_conversations(run.test) if run.test else None
    run.model.to("cpu")
    stats = {**train_stats(run, progress, steps=trainer.state.global_step, resumed_from=resumed,
                           val_count=len(run.val_examples)),
             "engine": ENGINE, "trl": trl.__version__}
    return ChatResult(model=run.model, tokenizer=run.tokenizer, method=run.params.method, history=progress.history,
                      best_step=progress.best_step, base=progress.base or {}, val=val_scores, test=test_scores,
                      stats=stats)
