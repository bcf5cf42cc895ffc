"""Evaluating a saved language model folder (save_pretrained + tokenizer + lmforge.json) on token data.

- `evaluate` loads the model, whole on one device or, with evaluate.device_map auto, spread by
  accelerate over the GPUs, CPU memory and disk (`placed_model`; the report's `placement` says
  how), checks it against the token data, scores each split (language_model.py: loss,
  perplexity and bits per byte, or masked loss and accuracy, against the unigram baseline) and
  draws the samples (generated text, or masks filled in).
- `write_reports` writes what it found into a folder: metrics.json, samples.md and
  loss_by_position.csv (a causal model's mean loss at each position of the context).

The caller names the folders (the model, the token data, the reports); this module names none.
Imports torch, numpy, transformers (accelerate and psutil with device_map auto) and lmforge.training.
"""

from __future__ import annotations

import contextlib
import csv
import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.evaluation import language_model as scoring
from lmforge.data import token_shards
from lmforge.training import batches


class NoModelError(batches.DataError):
    """The model folder holds no transformers model."""


@dataclass
class Evaluation:
    """What `evaluate` found: the metrics (per split, and how the model was placed), the samples,
    a causal model's loss by position per split, and whether the model is masked."""

    metrics: dict[str, Any]
    samples: list[dict[str, str]]
    positions: dict[str, list[float]]
    masked: bool


def evaluate(e: Any, seed: int, tokens_dir: Path, model_dir: Path, default_context: int) -> Evaluation:
    """Score the model saved in `model_dir` on the splits of `tokens_dir` that e.splits names.

    e: the evaluate params (lmforge.config.evaluate.EvaluateParams). default_context: the context
    when the folder's lmforge.json records none (a folder saved by other tools)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from lmforge.training.model import TokenInfo, check_compatible, is_masked
    from lmforge.training.runtime import pick_device

    device = pick_device(e.device, "evaluate.device")
    meta = token_shards.read_meta(tokens_dir)
    tok = TokenInfo.from_meta(meta)
    if not (model_dir / "config.json").exists():
        raise NoModelError(f"{model_dir} holds no transformers model")
    masked = is_masked(AutoConfig.from_pretrained(model_dir))
    auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    info_path = model_dir / "lmforge.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    context = int(info.get("context") or default_context)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with placed_model(auto, model_dir, e, device) as (model, device, placement):
        check_compatible(model, tok, context, source=str(model_dir))
        metrics: dict = {"model": str(model_dir), "masked": masked, "context": context, "device": str(device),
                         "placement": placement}
        positions = score_splits(model, e, seed, tokens_dir, meta, tok, context, masked, device, metrics)
        samples, metrics["samples_settings"] = draw_samples(model, tokenizer, e, seed, tokens_dir, meta, tok, context,
                                                            masked, device)
    base = info.get("base_model")
    if base:
        metrics["base"] = score_base(auto, base, e, seed, tokens_dir, meta, tok, context, masked, device)
        metrics["vs_base"] = gains_over_base(metrics, e.splits, masked)
    return Evaluation(metrics=metrics, samples=samples, positions=positions, masked=masked)


def score_base(auto, base: dict, e: Any, seed: int, tokens_dir: Path, meta: dict, tok, context: int, masked: bool,
               device) -> dict[str, Any]:
    """The base model a continued pretraining started from (lmforge.json's base_model), placed as
    the continued one was and scored on the same tokens, windows and seed."""
    from lmforge.training.model import check_compatible

    folder = Path(base["folder"])
    if not (folder / "config.json").exists() and not base.get("gguf_file"):
        raise NoModelError(f"{folder}, the base model this one continued, is gone: its loss cannot be compared")
    load = {"gguf_file": base["gguf_file"]} if base.get("gguf_file") else {}
    with placed_model(auto, folder, e, device, **load) as (model, device, _):
        check_compatible(model, tok, context, source=str(folder))
        scores: dict[str, Any] = {"model": str(folder)}
        score_splits(model, e, seed, tokens_dir, meta, tok, context, masked, device, scores)
    return scores


def gains_over_base(metrics: dict, splits, masked: bool) -> dict[str, dict[str, float]]:
    """Per split, how much lower the continued model's loss is than the base model's (positive:
    continued pretraining helped on these tokens)."""
    key = "masked_loss" if masked else "loss"
    return {split: {f"{key}_drop": metrics["base"][split][key] - metrics[split][key]} for split in splits}


@contextlib.contextmanager
def placed_model(auto, model_dir: Path, e: Any, device, **load: Any):
    """(model, the device its inputs go to, placement) while the block runs. device_map none: the
    whole model on `device` (placement "whole"); auto: accelerate spreads its layers over the GPUs,
    CPU memory and disk (placement: how many of the model's blocks each device holds). `load`: more
    from_pretrained arguments (a GGUF file)."""
    import torch

    kwargs = {"attn_implementation": "sdpa", "dtype": torch.float32, **load}
    if e.device_map == "none":
        yield auto.from_pretrained(model_dir, **kwargs).to(device), device, "whole"
        return
    # Weights spilled to disk are read back at every forward, so the folder outlives the scoring.
    # (transformers 5 reads a safetensors checkpoint's offloaded weights in place: this folder
    # fills only for checkpoints in other formats.)
    with tempfile.TemporaryDirectory(prefix="lmforge-offload-") as offload:
        model = auto.from_pretrained(model_dir, **kwargs, device_map="auto",
                                     max_memory=memory_caps(e.max_memory, device), offload_folder=offload)
        yield model, input_device(model), placement_of(model)


def memory_caps(max_memory: dict[str, str] | None, device) -> dict | None:
    """accelerate's max_memory: a GPU is keyed by its int index. evaluate.device cpu keeps the GPUs
    out (accelerate's own default, None, would fill every visible GPU first)."""
    if max_memory is not None:
        return {int(key) if key.isdigit() else key: size for key, size in max_memory.items()}
    if device.type == "cpu":
        import psutil  # accelerate's dependency: its default CPU budget is this same figure

        return {"cpu": psutil.virtual_memory().available}
    return None


def input_device(model):
    """The input embeddings' device. Offloaded embeddings (cpu beside a GPU, or disk) hold their
    weight on the meta device; accelerate's hook then runs them on its execution device."""
    import torch

    embeddings = model.get_input_embeddings()
    if embeddings.weight.device.type != "meta":
        return embeddings.weight.device
    return torch.device(embeddings._hf_hook.execution_device)


def placement_of(model) -> dict[str, int]:
    """Blocks per device ("cuda:0", "cpu", "disk"). transformers sets hf_device_map only when it
    dispatched the model over several devices or disk; otherwise the model fits the first one whole."""
    device_map = getattr(model, "hf_device_map", None) or {"": next(model.parameters()).device}
    names = [f"cuda:{d}" if isinstance(d, int) else str(d) for d in device_map.values()]
    return dict(sorted(Counter(names).items()))


def score_splits(model, e: Any, seed: int, tokens_dir: Path, meta: dict, tok, context: int, masked: bool, device,
                 metrics: dict) -> dict[str, list[float]]:
    """Each split's metrics into `metrics`; returns a causal model's loss by position per split."""
    log_probs = scoring.unigram_log_probs(batches.open_split(tokens_dir, "train", meta), tok.vocab_size)
    positions: dict[str, list[float]] = {}
    for split in e.splits:
        tokens = batches.open_split(tokens_dir, split, meta)
        n_bytes = int(meta["splits"][split]["bytes"])
        if masked:
            result = scoring.masked_split_metrics(
                model, tokens, log_probs, masking(e, meta, tok), context=context, batch_size=e.batch_size,
                device=device, seed=seed, max_tokens=e.max_tokens, desc=f"evaluate {split}")
        else:
            result = scoring.causal_split_metrics(
                model, tokens, log_probs, n_bytes, context=context, batch_size=e.batch_size, device=device,
                max_tokens=e.max_tokens, desc=f"evaluate {split}")
            positions[split] = result.pop("loss_by_position")
        metrics[split] = result
    return positions


def masking(e: Any, meta: dict, tok) -> batches.Masking:
    """The BERT corruption a masked model is scored under (evaluate.mlm_probability)."""
    special = tuple(sorted(meta["special_ids"].values()))
    return batches.Masking(e.mlm_probability, tok.mask_id, tok.vocab_size, special)


def draw_samples(model, tokenizer, e: Any, seed: int, tokens_dir: Path, meta: dict, tok, context: int, masked: bool,
                 device) -> tuple[list[dict], dict]:
    """(samples, the settings they were drawn with) for samples.md."""
    settings = {"seed": seed}
    if masked:
        samples = scoring.fill_mask_samples(
            model, tokenizer, batches.open_split(tokens_dir, e.splits[0], meta), masking(e, meta, tok),
            n=e.samples, length=min(context, 48), seed=seed, device=device)
    else:
        settings.update(temperature=e.temperature, top_k=e.top_k, max_new_tokens=e.sample_tokens)
        samples = scoring.generate_samples(
            model, tokenizer, list(e.prompts), n=e.samples, max_new_tokens=e.sample_tokens,
            temperature=e.temperature, top_k=e.top_k, seed=seed, device=device)
    return samples, settings


def write_reports(reports: Path, result: Evaluation) -> list[Path]:
    """metrics.json, samples.md and loss_by_position.csv into `reports`; returns the files written."""
    from lmforge.atomic import atomic_path, write_json

    reports.mkdir(parents=True, exist_ok=True)
    write_json(reports / "metrics.json", result.metrics)
    settings = result.metrics.get("samples_settings", {})
    with atomic_path(reports / "samples.md") as tmp:
        tmp.write_text(scoring.samples_markdown(result.samples, masked=result.masked, settings=settings))
    positions = result.positions
    with atomic_path(reports / "loss_by_position.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        splits = list(positions)
        writer.writerow(["position", *[f"{s}_loss" for s in splits]])
        length = max((len(v) for v in positions.values()), default=0)
        for i in range(length):
            writer.writerow([i, *[f"{positions[s][i]:.6f}" for s in splits]])
    return [reports / "metrics.json", reports / "samples.md", reports / "loss_by_position.csv"]


def base_line(split: str, metrics: dict[str, Any], masked: bool) -> str | None:
    """The base model's figure beside the continued one's, for the log; None without a base."""
    if "base" not in metrics:
        return None
    key = "masked_loss" if masked else "loss"
    return (f"{split}: base model {key} {metrics['base'][split][key]:.3f} -> continued {metrics[split][key]:.3f} "
            f"on the same tokens")


def split_line(split: str, m: dict[str, Any], masked: bool) -> str:
    """One split's figures in a line, for the log."""
    if masked:
        return (f"{split}: masked accuracy {m['masked_accuracy']:.3f} (unigram {m['unigram_masked_accuracy']:.3f}), "
                f"masked loss {m['masked_loss']:.3f}")
    return (f"{split}: loss {m['loss']:.3f}, ppl {m['perplexity']:.1f}, {m['bits_per_byte']:.3f} bits/byte "
            f"(unigram {m['unigram_bits_per_byte']:.3f})")
