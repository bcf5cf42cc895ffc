"""tokenize: learn a tokenizer on a seeded sample of data/split/corpus/train/ (or, with
tokenize.kind pretrained, take a base model's as it is), then encode every split shard into
data/tokens/<split>/part-NNNNN.bin on the data engine, with meta.json as the index
(lmforge/data/tokenization.py)."""

from __future__ import annotations

import time

from lmforge.atomic import atomic_dir, write_json
from lmforge.data.engine import peak_child_rss_mb, peak_rss_mb
from lmforge.data.tokenization import SPLITS, write_token_shards
from lmforge.errors import UserError
from tasks import layout
from tasks._common import fail, params_or_exit, stage_args, timed
from tasks._data_plane import data_engine, remove_work_dir, work_dir_for


def base_model_folder(spec: str):
    """The local folder of tokenize.model: a packaged model (fetched and checked once) or a folder."""
    from lmforge.training.base_models import resolve_base_model

    return resolve_base_model(spec, layout.repo_root(), key="tokenize.model")


def main() -> None:
    args = stage_args(__doc__)
    all_params = params_or_exit(args.params)
    params = all_params.tokenize
    split_dir = layout.CORPUS_SPLIT
    if not (split_dir / "index.json").is_file():
        fail(f"{split_dir}/index.json is missing: run the split stage first (dvc repro split@corpus)")
    with timed("tokenize"):
        start = time.perf_counter()
        work = work_dir_for("tokenize", params, split_dir / "index.json")
        try:
            base = base_model_folder(params.model) if params.kind == "pretrained" else None
            with atomic_dir(layout.TOKENS) as out:
                meta = write_token_shards(split_dir, out, params.kind, params.vocab_size, params.min_frequency,
                                          params.sample_mb, all_params.seed, work, data_engine(all_params),
                                          pretrained=base, pretrained_name=params.model)
        except (UserError, ValueError) as err:  # ValueError: the tokenizers library's complaints
            fail(f"tokenize: {err}")
        remove_work_dir(work)
        seconds = time.perf_counter() - start
    splits = meta["splits"]
    total = sum(s["tokens"] for s in splits.values())
    text_bytes = sum(s["bytes"] for s in splits.values())
    report = {"kind": meta["kind"], "vocab_size": meta["vocab_size"], "seconds": round(seconds, 2),
              **{f"{s}_tokens": v["tokens"] for s, v in splits.items()},
              "bytes_per_token": round(text_bytes / max(total, 1), 3),
              "shards": sum(len(v["shards"]) for v in splits.values()),
              "sample_fraction": meta.get("tokenizer_sample", {}).get("fraction", 0.0),  # none learned: 0
              "mb_per_s": round(text_bytes / 1e6 / max(seconds, 1e-9), 2),
              "peak_rss_mb": max(peak_rss_mb(), peak_child_rss_mb())}
    write_json(layout.TOKENIZE_REPORT, report)
    print(f"tokenize: {meta['kind']} vocab {meta['vocab_size']}, " +
          ", ".join(f"{s} {splits[s]['tokens']:,} tokens" for s in SPLITS) + f" ({report['mb_per_s']} MB/s)")


if __name__ == "__main__":
    main()
