"""Stage `evaluate`: score models/pretrained on val and test against a unigram baseline.

    python -m tasks.evaluate

Writes reports/evaluate/metrics.json (per split: loss, perplexity, bits per byte and the unigram
baseline's; masked loss and accuracy for a masked LM), reports/evaluate/loss_by_position.csv
(a DVC plot: mean loss at each position of the context), reports/evaluate/samples.md, and one
MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

from tasks import layout


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--model", default=str(layout.PRETRAINED))
    parser.add_argument("--reports", default="reports/evaluate")
    return parser.parse_args(argv)


def evaluate(params, tokens_dir: Path, model_dir: Path) -> tuple[dict, list[dict], dict, bool]:
    """(metrics, samples, loss by position per split, masked?) for the saved model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from lmforge.training import batches
    from lmforge.training.model import TokenInfo, check_compatible, is_masked
    from lmforge.training.runtime import pick_device

    e = params.evaluate
    device = pick_device(e.device, "evaluate.device")
    meta = batches.read_meta(tokens_dir)
    tok = TokenInfo.from_meta(meta)
    if not (model_dir / "config.json").exists():
        raise batches.DataError(f"{model_dir} holds no transformers model: run the pretrain stage first")
    masked = is_masked(AutoConfig.from_pretrained(model_dir))
    auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    info_path = model_dir / "lmforge.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    context = int(info.get("context") or params.pretrain.context)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with _placed_model(auto, model_dir, e, device) as (model, device, placement):
        check_compatible(model, tok, context, source=str(model_dir))
        metrics: dict = {"model": str(model_dir), "masked": masked, "context": context, "device": str(device),
                         "placement": placement}
        positions = _score_splits(model, params, tokens_dir, meta, tok, context, masked, device, metrics)
        samples, metrics["samples_settings"] = _samples(model, tokenizer, params, tokens_dir, meta, tok, context,
                                                        masked, device)
    return metrics, samples, positions, masked


@contextlib.contextmanager
def _placed_model(auto, model_dir: Path, e, device):
    """(model, the device its inputs go to, placement) while the block runs. device_map none: the
    whole model on `device` (placement "whole"); auto: accelerate spreads its layers over the GPUs,
    CPU memory and disk (placement: how many of the model's blocks each device holds)."""
    import torch

    kwargs = {"attn_implementation": "sdpa", "dtype": torch.float32}
    if e.device_map == "none":
        yield auto.from_pretrained(model_dir, **kwargs).to(device), device, "whole"
        return
    # Weights spilled to disk are read back at every forward, so the folder outlives the scoring.
    # (transformers 5 reads a safetensors checkpoint's offloaded weights in place: this folder
    # fills only for checkpoints in other formats.)
    with tempfile.TemporaryDirectory(prefix="lmforge-offload-") as offload:
        model = auto.from_pretrained(model_dir, **kwargs, device_map="auto",
                                     max_memory=_memory_caps(e.max_memory, device), offload_folder=offload)
        yield model, _input_device(model), _placement(model)


def _memory_caps(max_memory: dict[str, str] | None, device) -> dict | None:
    """accelerate's max_memory: a GPU is keyed by its int index. evaluate.device cpu keeps the GPUs
    out (accelerate's own default, None, would fill every visible GPU first)."""
    if max_memory is not None:
        return {int(key) if key.isdigit() else key: size for key, size in max_memory.items()}
    if device.type == "cpu":
        import psutil  # accelerate's dependency: its default CPU budget is this same figure

        return {"cpu": psutil.virtual_memory().available}
    return None


def _input_device(model):
    """The input embeddings' device. Offloaded embeddings (cpu beside a GPU, or disk) hold their
    weight on the meta device; accelerate's hook then runs them on its execution device."""
    import torch

    embeddings = model.get_input_embeddings()
    if embeddings.weight.device.type != "meta":
        return embeddings.weight.device
    return torch.device(embeddings._hf_hook.execution_device)


def _placement(model) -> dict[str, int]:
    """Blocks per device ("cuda:0", "cpu", "disk"). transformers sets hf_device_map only when it
    dispatched the model over several devices or disk; otherwise the model fits the first one whole."""
    device_map = getattr(model, "hf_device_map", None) or {"": next(model.parameters()).device}
    names = [f"cuda:{d}" if isinstance(d, int) else str(d) for d in device_map.values()]
    return dict(sorted(Counter(names).items()))


def _score_splits(model, params, tokens_dir: Path, meta: dict, tok, context: int, masked: bool, device,
                  metrics: dict) -> dict[str, list[float]]:
    """Each split's metrics into `metrics`; returns a causal model's loss by position per split."""
    from lmforge.evaluation import language_model as evaluation
    from lmforge.training import batches

    e = params.evaluate
    log_probs = evaluation.unigram_log_probs(batches.open_split(tokens_dir, "train", meta), tok.vocab_size)
    positions: dict[str, list[float]] = {}
    for split in e.splits:
        tokens = batches.open_split(tokens_dir, split, meta)
        n_bytes = int(meta["splits"][split]["bytes"])
        if masked:
            result = evaluation.masked_split_metrics(
                model, tokens, log_probs, _masking(e, meta, tok), context=context, batch_size=e.batch_size,
                device=device, seed=params.seed, max_tokens=e.max_tokens, desc=f"evaluate {split}")
        else:
            result = evaluation.causal_split_metrics(
                model, tokens, log_probs, n_bytes, context=context, batch_size=e.batch_size, device=device,
                max_tokens=e.max_tokens, desc=f"evaluate {split}")
            positions[split] = result.pop("loss_by_position")
        metrics[split] = result
    return positions


def _masking(e, meta: dict, tok):
    from lmforge.training import batches

    special = tuple(sorted(meta["special_ids"].values()))
    return batches.Masking(e.mlm_probability, tok.mask_id, tok.vocab_size, special)


def _samples(model, tokenizer, params, tokens_dir: Path, meta: dict, tok, context: int, masked: bool,
             device) -> tuple[list[dict], dict]:
    """(samples, the settings they were drawn with) for reports/evaluate/samples.md."""
    from lmforge.evaluation import language_model as evaluation
    from lmforge.training import batches

    e = params.evaluate
    settings = {"seed": params.seed}
    if masked:
        samples = evaluation.fill_mask_samples(
            model, tokenizer, batches.open_split(tokens_dir, e.splits[0], meta), _masking(e, meta, tok),
            n=e.samples, length=min(context, 48), seed=params.seed, device=device)
    else:
        settings.update(temperature=e.temperature, top_k=e.top_k, max_new_tokens=e.sample_tokens)
        samples = evaluation.generate_samples(
            model, tokenizer, list(e.prompts), n=e.samples, max_new_tokens=e.sample_tokens,
            temperature=e.temperature, top_k=e.top_k, seed=params.seed, device=device)
    return samples, settings


def write_reports(reports: Path, metrics: dict, samples: list[dict], positions: dict, masked: bool) -> list[Path]:
    from lmforge.atomic import atomic_path, write_json
    from lmforge.evaluation.language_model import samples_markdown

    reports.mkdir(parents=True, exist_ok=True)
    write_json(reports / "metrics.json", metrics)
    settings = metrics.pop("samples_settings", {})
    with atomic_path(reports / "samples.md") as tmp:
        tmp.write_text(samples_markdown(samples, masked=masked, settings=settings))
    paths = [reports / "metrics.json", reports / "samples.md"]
    with atomic_path(reports / "loss_by_position.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        splits = list(positions)
        writer.writerow(["position", *[f"{s}_loss" for s in splits]])
        length = max((len(v) for v in positions.values()), default=0)
        for i in range(length):
            writer.writerow([i, *[f"{positions[s][i]:.6f}" for s in splits]])
    paths.append(reports / "loss_by_position.csv")
    return paths


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from lmforge.config import load_params

    params = load_params(args.params)
    from lmforge.registry import tracking
    from tasks.lineage import input_hashes

    lineage = input_hashes([args.tokens, args.model])
    with tracking.stage_run("evaluate", {"seed": params.seed, "evaluate": params.evaluate.model_dump()},
                            tags=lineage) as run:
        metrics, samples, positions, masked = evaluate(params, Path(args.tokens), Path(args.model))
        paths = write_reports(Path(args.reports), metrics, samples, positions, masked)
        flat = {f"{split}_{k}": v for split in params.evaluate.splits for k, v in metrics[split].items()
                if isinstance(v, (int, float))}
        run.log_metrics(flat)
        for path in paths:
            run.log_artifact(path, "reports")
    for split in params.evaluate.splits:
        m = metrics[split]
        if masked:
            print(f"[evaluate] {split}: masked accuracy {m['masked_accuracy']:.3f} (unigram "
                  f"{m['unigram_masked_accuracy']:.3f}), masked loss {m['masked_loss']:.3f}", flush=True)
        else:
            print(f"[evaluate] {split}: loss {m['loss']:.3f}, ppl {m['perplexity']:.1f}, {m['bits_per_byte']:.3f} "
                  f"bits/byte (unigram {m['unigram_bits_per_byte']:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    from tasks._common import run_main

    run_main("evaluate", main)
