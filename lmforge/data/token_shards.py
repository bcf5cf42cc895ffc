"""Reading a token folder (lmforge/data/tokenization.py writes it): the split's token ids,
memory-mapped, one flat file or its shards end to end.

Apart from tokenization.py so that the stages that only read tokens (pretrain, evaluate) import
neither the tokenizer trainer nor the data engine nor the tokenize section's schema: an edit to
any of those reruns tokenize, not training (tests/test_dvc_deps.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from lmforge.errors import UserError


def read_meta(tokens_dir: Path | str) -> dict:
    """The token folder's meta.json: its vocabulary, dtype and splits."""
    path = Path(tokens_dir) / "meta.json"
    if not path.exists():
        raise TokenFileError(f"{path} not found: the token folder has not been written yet (tokenize the corpus first)")
    return json.loads(path.read_text())


def load_split(tokens_dir: Path | str, split: str, meta: dict | None = None) -> np.ndarray | TokenShards:
    """One split's token ids, memory-mapped (no copy into RAM): one array, or its shards end to end."""
    tokens_dir = Path(tokens_dir)
    meta = meta or read_meta(tokens_dir)
    dtype = np.dtype(meta["dtype"])
    shards = meta["splits"][split].get("shards")
    if shards is None:  # one flat file (write_tokens)
        return _memmap(tokens_dir / f"{split}.bin", dtype, meta["splits"][split]["tokens"])
    arrays = [_memmap(tokens_dir / s["file"], dtype, s["tokens"]) for s in shards if s["tokens"]]
    if len(arrays) == 1:
        return arrays[0]
    return TokenShards(arrays, dtype)


class TokenFileError(UserError, ValueError):
    """A token file is missing or does not hold what meta.json says."""


def _memmap(path: Path, dtype: np.dtype, tokens: int) -> np.ndarray:
    if not path.exists():
        raise TokenFileError(f"{path} not found: the token folder is incomplete; tokenize again")
    if path.stat().st_size != tokens * dtype.itemsize:
        raise TokenFileError(f"{path} holds {path.stat().st_size} bytes, meta.json promises {tokens} {dtype} tokens")
    if tokens == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class TokenShards:
    """A split's shards as one sequence: `len`, slices (a window may span two shards) and
    `np.asarray` (which copies everything: for splits that fit in memory). Each shard stays a
    memory map, so a window reads only its own pages."""

    def __init__(self, shards: list[np.ndarray], dtype: np.dtype):
        self.shards, self.dtype = shards, dtype
        self.starts = np.cumsum([0] + [len(s) for s in shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenShards supports contiguous slices only")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - self.starts[first]
        if stop <= self.starts[first + 1]:  # the common case: inside one shard
            return self.shards[first][offset : offset + stop - start]
        pieces, position, shard = [], start, first
        while position < stop:
            local = position - self.starts[shard]
            take = min(stop, self.starts[shard + 1]) - position
            pieces.append(self.shards[shard][local : local + take])
            position += take
            shard += 1
        return np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        joined = np.concatenate(self.shards) if self.shards else np.zeros(0, dtype=self.dtype)
        return joined if dtype is None else joined.astype(dtype)

    def iter_shards(self) -> Iterator[np.ndarray]:
        yield from self.shards
