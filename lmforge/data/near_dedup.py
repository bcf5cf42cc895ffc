"""Near-duplicate documents by MinHash, on datatrove's own recipe (its MinHash steps 1-3).

1. signatures: each clean shard's documents (word 5-grams of the simplified text) hashed into
   `buckets` bands of `hashes_per_bucket` minimum hashes, one task per shard;
2. buckets: per band, the documents whose band matches another's, one task per band;
3. cluster: the matching pairs joined into clusters (union-find over the duplicates only).
With 14 bands of 8 hashes, pairs above about 0.75 Jaccard similarity are found almost always and
pairs below 0.5 almost never.

Of each cluster lmforge keeps the document that comes first in shard order, as the exact
deduplication does, so the two agree and every cluster keeps exactly one document.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from lmforge.data.engine import Engine, run_steps

_WORDS = re.compile(r"\w+")


def _word_tokenizer():
    """Words as runs of letters and digits: no NLTK data to download, which an offline machine
    cannot (datatrove's English default loads NLTK's punkt model)."""
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Words(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return _WORDS.findall(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    return Words()


def near_duplicate_clusters(kept_dir: Path, pattern: str, shards: int, work_dir: Path, engine: Engine, *,
                            n_grams: int, buckets: int, hashes_per_bucket: int, seed: int) -> list[list[tuple[int, int]]]:
    """The clusters of near-duplicate documents among the `shards` parquet files of kept_dir that
    match `pattern` (sorted, shard i = the i-th file), each a sorted list of (shard, row)."""
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupSignature)
    from datatrove.pipeline.readers import ParquetReader

    config = MinhashConfig(n_grams=n_grams, num_buckets=buckets, hashes_per_bucket=hashes_per_bucket, seed=seed)
    work_dir = Path(work_dir)
    signatures, matches, clusters = work_dir / "signatures", work_dir / "buckets", work_dir / "clusters"
    reader = ParquetReader(str(kept_dir), glob_pattern=pattern, text_key="text", id_key="id", read_metadata=False)
    run_steps([reader, MinhashDedupSignature(output_folder=str(signatures), config=config,
                                                 language=_word_tokenizer())], shards,
              work_dir / "log-signatures", engine, job_name="near-dedup-signatures")
    run_steps([MinhashDedupBuckets(input_folder=str(signatures), output_folder=str(matches), config=config)], buckets, work_dir / "log-buckets", engine,
              job_name="near-dedup-buckets")
    run_steps([MinhashDedupCluster(input_folder=str(matches), output_folder=str(clusters), config=config,
                                  save_cluster_id=True)], 1,
              work_dir / "log-cluster", Engine(workers=1, executor=engine.executor, slurm=engine.slurm),
              job_name="near-dedup-cluster")
    return _read_clusters(clusters, shards)


def _read_clusters(folder: Path, shards: int) -> list[list[tuple[int, int]]]:
    # datatrove writes, per shard, pairs of little-endian uint32: (row, cluster id).
    members: dict[int, list[tuple[int, int]]] = {}
    for shard in range(shards):
        path = folder / f"{shard:06d}.clusters"
        if not path.exists():
            continue
        pairs = np.frombuffer(path.read_bytes(), dtype="<u4").reshape(-1, 2)
        for row, cluster in pairs.tolist():
            members.setdefault(cluster, []).append((shard, row))
    return [sorted(group) for _, group in sorted(members.items())]


def rows_to_drop(clusters: list[list[tuple[int, int]]]) -> dict[tuple[int, int], tuple[int, int]]:
    """Every cluster member but the first, each mapped to that first (kept) member."""
    return {member: group[0] for group in clusters for member in group[1:]}
