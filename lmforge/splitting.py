"""Deterministic, leak-free train/val/test splits.

random:     rows are shuffled with the seed; with a `label` column each label is split on its own
            (stratified), so every split keeps the label balance. Whole rows move, never parts.
contiguous: the texts are joined in order and cut at the given fractions, on line boundaries:
            the head trains, the next part validates, the tail tests (the classic char benchmark).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lmforge.config import SplitParams

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
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
                raise SplitError(f"a text is in both {seen[text]} and {split}: the clean stage should have deduplicated it")
            seen[text] = split


def split_report(splits: dict[str, pd.DataFrame]) -> dict:
    report = {}
    for split, frame in splits.items():
        entry = {"rows": len(frame), "chars": int(frame["text"].str.len().sum())}
        if "label" in frame:
            entry["labels"] = {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()}
        report[split] = entry
    return report
