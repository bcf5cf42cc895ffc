"""Stage `evaluate`: score models/pretrained on val and test against a unigram baseline.

    python -m tasks.evaluate

Writes reports/evaluate/metrics.json (per split: loss, perplexity, bits per byte and the unigram
baseline's; masked loss and accuracy for a masked LM), reports/evaluate/loss_by_position.csv
(a DVC plot: mean loss at each position of the context), reports/evaluate/samples.md, and one
MLflow run.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
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
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from lmforge.training import batches
    from lmforge.evaluation import language_model as evaluation
    from lmforge.training.model import TokenInfo, check_compatible, is_masked
    from lmforge.training.runtime import pick_device

    e = params.evaluate
    device = pick_device(e.device, "evaluate.device")
    meta = batches.read_meta(tokens_dir)
    tok = TokenInfo.from_meta(meta)
    if not (model_dir / "config.json").exists():
        raise batches.DataError(f"{model_dir} holds no transformers model: run the pretrain stage first")
    config = AutoConfig.from_pretrained(model_dir)
    masked = is_masked(config)
    auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).to(device)
    info_path = model_dir / "lmforge.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    context = int(info.get("context") or params.pretrain.context)
    check_compatible(model, tok, context, source=str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    train_tokens = batches.open_split(tokens_dir, "train", meta)
    log_probs = evaluation.unigram_log_probs(train_tokens, tok.vocab_size)
    special = tuple(sorted(meta["special_ids"].values()))
    masking = batches.Masking(e.mlm_probability, tok.mask_id, tok.vocab_size, special)
    metrics: dict = {"model": str(model_dir), "masked": masked, "context": context, "device": str(device)}
    positions: dict[str, list[float]] = {}
    for split in e.splits:
        tokens = batches.open_split(tokens_dir, split, meta)
        n_bytes = int(meta["splits"][split]["bytes"])
        if masked:
            result = evaluation.masked_split_metrics(
                model, tokens, log_probs, masking, context=context, batch_size=e.batch_size, device=device,
                seed=params.seed, max_tokens=e.max_tokens, desc=f"evaluate {split}")
        else:
            result = evaluation.causal_split_metrics(
                model, tokens, log_probs, n_bytes, context=context, batch_size=e.batch_size, device=device,
                max_tokens=e.max_tokens, desc=f"evaluate {split}")
            positions[split] = result.pop("loss_by_position")
        metrics[split] = result

    settings = {"seed": params.seed}
    if masked:
        samples = evaluation.fill_mask_samples(
            model, tokenizer, batches.open_split(tokens_dir, e.splits[0], meta), masking, n=e.samples,
            length=min(context, 48), seed=params.seed, device=device)
    else:
        settings.update(temperature=e.temperature, top_k=e.top_k, max_new_tokens=e.sample_tokens)
        samples = evaluation.generate_samples(
            model, tokenizer, list(e.prompts), n=e.samples, max_new_tokens=e.sample_tokens,
            temperature=e.temperature, top_k=e.top_k, seed=params.seed, device=device)
    metrics["samples_settings"] = settings
    return metrics, samples, positions, masked


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
