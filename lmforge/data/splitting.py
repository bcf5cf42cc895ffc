"""Deterministic, leak-free train/val/test splits.

hash:       each document goes where a hash of (seed, its id) falls: below `val` to val, below
            `val + test` to test, else train. A document's split never depends on the others, so
            a corpus is split shard by shard in bounded memory, and adding documents moves none.
random:     rows are shuffled with the seed; with a `label` column each label is split on its own
            (stratified), so every split keeps the label balance. Whole rows move, never parts.
contiguous: the texts are joined in order and cut at the given fractions, on line boundaries:
            the head trains, the next part validates, the tail tests (the classic char benchmark).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from lmforge.config.split import SplitParams
from lmforge.data.documents import hash_position
from lmforge.errors import UserError

SPLITS = ("train", "val", "test")


class SplitError(UserError, ValueError):
    """The data cannot be split as asked (too few rows, labels in contiguous mode...)."""


def split_frame(frame: pd.DataFrame, params: SplitParams, seed: int) -> dict[str, pd.DataFrame]:
    if frame.empty:
        raise SplitError("nothing to split: the clean table has no rows")
    if params.mode == "contiguous":
        splits = _split_contiguous(frame, params)
    else:
        splits = _split_random(frame, params, seed)
    _assert_disjoint(splits)
    return splits


def _split_random(frame: pd.DataFrame, params: SplitParams, seed: int) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    groups = [g for _, g in frame.groupby("label", sort=True)] if "label" in frame else [frame]
    parts: dict[str, list[pd.DataFrame]] = {s: [] for s in SPLITS}
    for group in groups:
        group = group.iloc[rng.permutation(len(group))]
        if params.max_rows is not None:
            # Cap each label in proportion to its share, so the cap keeps the balance too.
            group = group.iloc[: max(1, round(params.max_rows * len(group) / len(frame)))]
        n_val, n_test = _sizes(len(group), params)
        parts["val"].append(group.iloc[:n_val])
        parts["test"].append(group.iloc[n_val : n_val + n_test])
        parts["train"].append(group.iloc[n_val + n_test :])
    # Shuffle again across labels so no split is sorted by label.
    out = {}
    for split, pieces in parts.items():
        joined = pd.concat(pieces)
        out[split] = joined.iloc[rng.permutation(len(joined))].reset_index(drop=True)
    if out["train"].empty:
        raise SplitError(f"only {len(frame)} rows: the train split would be empty")
    return out


def _sizes(n: int, params: SplitParams) -> tuple[int, int]:
    """Rows for val and test; a non-zero fraction gets at least one row when there are three."""
    def size(fraction: float) -> int:
        k = round(n * fraction)
        return max(k, 1) if fraction > 0 and n >= 3 else k
    return size(params.val), size(params.test)


def _split_contiguous(frame: pd.DataFrame, params: SplitParams) -> dict[str, pd.DataFrame]:
    if "label" in frame:
        raise SplitError("contiguous mode is for unlabelled text; use mode: random for labelled data")
    text = "\n\n".join(frame["text"])
    if params.max_rows is not None:
        raise SplitError("max_rows has no meaning in contiguous mode; set it to null")
    train_end = _line_boundary(text, round(len(text) * (1 - params.val - params.test)))
    val_end = _line_boundary(text, round(len(text) * (1 - params.test)))
    pieces = {"train": text[:train_end], "val": text[train_end:val_end], "test": text[val_end:]}
    empty = {"id": pd.Series([], dtype=str), "text": pd.Series([], dtype=str)}
    return {s: pd.DataFrame({"id": [f"{s}-0"], "text": [t]}) if t else pd.DataFrame(empty) for s, t in pieces.items()}


def _line_boundary(text: str, position: int) -> int:
    """The first position after a newline at or beyond `position` (or the end of the text)."""
    newline = text.find("\n", position)
    return len(text) if newline == -1 else newline + 1


def _assert_disjoint(splits: dict[str, pd.DataFrame]) -> None:
    seen: dict[str, str] = {}
    for split, frame in splits.items():
        for text in frame["text"]:
            if text in seen and seen[text] != split:
                raise SplitError(f"a text is in both {seen[text]} and {split}: cleaning should have deduplicated it")
            seen[text] = split


def split_report(splits: dict[str, pd.DataFrame]) -> dict:
    report = {}
    for split, frame in splits.items():
        entry = {"rows": len(frame), "chars": int(frame["text"].str.len().sum())}
        if "label" in frame:
            entry["labels"] = {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()}
        report[split] = entry
    return report


# --- hash mode: one shard at a time ----------------------------------------------------------


def split_of(doc_id: str, seed: int, val: float, test: float) -> str:
    position = hash_position(f"{seed}:{doc_id}")
    return "val" if position < val else "test" if position < val + test else "train"


def split_shard(in_path: str, out_dir: str, part: str, seed: int, val: float, test: float) -> dict:
    """Split one clean shard into out_dir/{train,val,test}/<part>.parquet, a row group at a time.
    Returns rows and bytes of text per split."""
    reader = pq.ParquetFile(in_path)
    writers = {s: pq.ParquetWriter(str(Path(out_dir) / s / f"{part}.parquet"), reader.schema_arrow, compression="zstd")
               for s in SPLITS}
    report = {s: {"rows": 0, "bytes": 0} for s in SPLITS}
    try:
        for i in range(reader.num_row_groups):
            table = reader.read_row_group(i)
            where = np.array([split_of(d, seed, val, test) for d in table.column("id").to_pylist()])
            text_bytes = np.array([len(t.encode("utf-8")) for t in table.column("text").to_pylist()])
            for split in SPLITS:
                mine = where == split
                writers[split].write_table(table.filter(mine))
                report[split]["rows"] += int(mine.sum())
                report[split]["bytes"] += int(text_bytes[mine].sum())
    finally:
        for writer in writers.values():
            writer.close()
    report["rows_in"] = reader.metadata.num_rows
    report["bytes_in"] = sum(report[s]["bytes"] for s in SPLITS)
    return report
