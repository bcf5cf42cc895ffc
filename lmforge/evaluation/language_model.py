"""Evaluation of a trained model on whole splits, against a unigram baseline.

- Causal models: mean next-token loss over the split (non-overlapping windows, each token but
  the first a target once), perplexity, and bits per byte = loss / ln 2 * tokens / bytes, with the
  split's UTF-8 byte count from meta.json, so models with different tokenizers compare.
- Masked models: loss and accuracy on BERT-corrupted positions (a fixed seed chooses them).
- The unigram baseline predicts every token from the train split's token frequencies (add-one
  smoothed): its loss, bits per byte and, for masked models, the accuracy of always guessing the
  most frequent token, on the same tokens the model is scored on.
- Samples: text generated from prompts with temperature and top-k (causal), or masked tokens
  filled in (masked).
- A split is scored under a tqdm bar on stderr (one tick per batch, redrawn at most once a
  second), as pretraining's steps are; progress=False leaves it out.

Imports only torch, numpy, transformers and tqdm.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmforge.training import batches, runtime

LN2 = math.log(2.0)


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    """Mean loss per token (nats) -> bits per UTF-8 byte of the text those tokens encode."""
    return loss_nats / LN2 * tokens / n_bytes if n_bytes else math.nan


def unigram_log_probs(train_tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    # Counted shard by shard (a sharded split is never copied into RAM whole).
    shards = train_tokens.iter_shards() if hasattr(train_tokens, "iter_shards") else [train_tokens]
    counts = np.zeros(vocab_size, dtype=np.float64)
    for shard in shards:
        counts += np.bincount(np.asarray(shard), minlength=vocab_size)[:vocab_size]
    return np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)


def unigram_loss(log_probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood (nats) of `targets` under the unigram model."""
    targets = np.asarray(targets)
    return float(-log_probs[targets].mean()) if targets.size else math.nan


def _autocast(device: torch.device):
    """Scored as pretraining trains: bf16 on a GPU, fp32 on the CPU."""
    return runtime.autocast(device, torch.bfloat16 if device.type == "cuda" else None)


def window_batches(n_tokens: int, context: int, batch_size: int, max_tokens: int | None = None,
                   *, masked: bool = False) -> int:
    """How many batches batches.sequential_windows yields for a split of n_tokens (the bar's total)."""
    windows = len(batches.window_starts(n_tokens, context, max_tokens, masked=masked))
    return -(-windows // batch_size)


def _scored_batches(tokens, context: int, batch_size: int, max_tokens: int | None, masked: bool,
                    desc: str, progress: bool):
    """The split's window batches, under a progress bar on stderr when `progress`."""
    total = window_batches(len(tokens), context, batch_size, max_tokens, masked=masked)
    windows = batches.sequential_windows(tokens, context, batch_size, max_tokens, masked=masked)
    return tqdm(windows, total=total, desc=desc, unit="batch", disable=not progress, mininterval=1.0,
                dynamic_ncols=True)


def _context_of(model, requested: int | None) -> int:
    c = model.config
    limit = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 512
    return min(requested or limit, limit)


@torch.no_grad()
def causal_split_metrics(model, tokens: np.ndarray, train_log_probs: np.ndarray, n_bytes: int, *, context: int,
                         batch_size: int, device: torch.device, max_tokens: int | None = None,
                         desc: str = "scoring", progress: bool = True) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of a causal LM over a split, with the unigram baseline."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    by_position = torch.zeros(context, dtype=torch.float64)
    windows_seen = 0
    unigram_sum = 0.0
    for windows in _scored_batches(tokens, context, batch_size, max_tokens, False, desc, progress):
        x = torch.from_numpy(windows[:, :-1]).to(device)
        y = torch.from_numpy(windows[:, 1:]).to(device)
        with _autocast(device):
            logits = model(input_ids=x, use_cache=False).logits
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        nll = nll.view(y.shape).double().cpu()
        total_nll += float(nll.sum())
        total_tokens += y.numel()
        by_position += nll.sum(0)
        windows_seen += y.size(0)
        unigram_sum += float(-train_log_probs[windows[:, 1:]].sum())
    if total_tokens == 0:
        raise ValueError(f"the split has {len(tokens)} tokens: too few for one window of {context + 1}")
    loss = total_nll / total_tokens
    base = unigram_sum / total_tokens
    # The split's bytes are spread evenly over its tokens when only part of it is scored.
    bytes_scored = n_bytes * total_tokens / max(1, len(tokens) - 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": loss / LN2 * total_tokens / bytes_scored,
        "unigram_loss": base,
        "unigram_perplexity": math.exp(min(base, 700.0)),
        "unigram_bits_per_byte": base / LN2 * total_tokens / bytes_scored,
        "tokens": total_tokens,
        "loss_by_position": (by_position / max(1, windows_seen)).tolist(),
    }


@torch.no_grad()
def masked_split_metrics(model, tokens: np.ndarray, train_log_probs: np.ndarray, masking: batches.Masking, *,
                         context: int, batch_size: int, device: torch.device, seed: int,
                         max_tokens: int | None = None, desc: str = "scoring",
                         progress: bool = True) -> dict[str, Any]:
    """Loss and accuracy on masked positions, against the unigram guess."""
    model.eval()
    rng = np.random.default_rng([seed, 7])
    total_nll, correct, count = 0.0, 0, 0
    unigram_sum, unigram_correct = 0.0, 0
    top = int(np.argmax(train_log_probs))
    for windows in _scored_batches(tokens, context, batch_size, max_tokens, True, desc, progress):
        inputs, labels = masking.apply(windows, rng)
        chosen = labels != batches.IGNORE_INDEX
        if not chosen.any():
            continue
        x = torch.from_numpy(inputs).to(device)
        y = torch.from_numpy(labels).to(device)
        with _autocast(device):
            logits = model(input_ids=x).logits
        flat_logits, flat_y = logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)
        total_nll += float(F.cross_entropy(flat_logits, flat_y, ignore_index=batches.IGNORE_INDEX, reduction="sum"))
        keep = flat_y != batches.IGNORE_INDEX
        correct += int((flat_logits[keep].argmax(-1) == flat_y[keep]).sum())
        count += int(keep.sum())
        targets = labels[chosen]
        unigram_sum += float(-train_log_probs[targets].sum())
        unigram_correct += int((targets == top).sum())
    if count == 0:
        raise ValueError("no masked positions were drawn: the split is too small")
    loss = total_nll / count
    return {
        "masked_loss": loss,
        "masked_perplexity": math.exp(min(loss, 700.0)),
        "masked_accuracy": correct / count,
        "unigram_masked_loss": unigram_sum / count,
        "unigram_masked_accuracy": unigram_correct / count,
        "masked_tokens": count,
    }


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], *, n: int, max_new_tokens: int, temperature: float,
                     top_k: int | None, seed: int, device: torch.device) -> list[dict[str, str]]:
    """`n` samples, cycling through the prompts, sampled with temperature and top-k."""
    model.eval()
    # Never run past the positions the model has (GPT-2's learned positions stop there).
    limit = _context_of(model, None)
    out = []
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        if ids.numel() == 0:
            ids = torch.tensor([[tokenizer.eos_token_id]])
        ids = ids[:, -(limit - 1):]
        torch.manual_seed(seed + i)
        generated = model.generate(
            ids.to(device), attention_mask=torch.ones_like(ids).to(device), do_sample=True,
            max_new_tokens=max(1, min(max_new_tokens, limit - ids.size(1))), temperature=temperature, top_k=top_k or 0,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
        )
        text = tokenizer.decode(generated[0, ids.size(1):], skip_special_tokens=False)
        out.append({"prompt": prompt, "text": text})
    return out


@torch.no_grad()
def fill_mask_samples(model, tokenizer, tokens: np.ndarray, masking: batches.Masking, *, n: int, length: int,
                      seed: int, device: torch.device) -> list[dict[str, str]]:
    """`n` val snippets with some tokens masked, the original, and the model's filling-in."""
    model.eval()
    rng = np.random.default_rng([seed, 11])
    out = []
    high = max(1, len(tokens) - length)
    for _ in range(n):
        start = int(rng.integers(0, high))
        window = np.asarray(tokens[start : start + length], dtype=np.int64)[None]
        inputs = window.copy()
        chosen = (rng.random(window.shape) < masking.probability) & ~np.isin(window, masking.special_ids)
        if not chosen.any():
            chosen[0, len(window[0]) // 2] = True
        inputs[chosen] = masking.mask_id
        logits = model(input_ids=torch.from_numpy(inputs).to(device)).logits[0].float().cpu()
        filled = inputs[0].copy()
        filled[chosen[0]] = logits.argmax(-1).numpy()[chosen[0]]
        out.append({
            "original": tokenizer.decode(window[0].tolist()),
            "masked": tokenizer.decode(inputs[0].tolist()),
            "filled": tokenizer.decode(filled.tolist()),
        })
    return out


def samples_markdown(samples: list[dict[str, str]], *, masked: bool, settings: dict[str, Any]) -> str:
    lines = ["# Samples", "", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    for i, s in enumerate(samples, 1):
        lines.append(f"## Sample {i}")
        lines.append("")
        if masked:
            for key in ("original", "masked", "filled"):
                lines += [f"**{key}**", "", "```text", s[key], "```", ""]
        else:
            lines += [f"**prompt:** `{s['prompt']}`", "", "```text", s["prompt"] + s["text"], "```", ""]
    return "\n".join(lines)
