"""Training batches drawn from the memory-mapped token arrays of a token folder (tokenization.py writes them).

A step's global batch (all processes, all micro-batches) is a pure function of (seed, step): its
window offsets come from a numpy generator seeded with those numbers, and each process takes its
slice of them, micro-batch by micro-batch. So the "data position" of a run is just its step, a
resumed run draws exactly the batches an uninterrupted run would have drawn, and it may resume on
another number of processes: the same global batch is only cut differently.

Windows are `context + 1` tokens long, taken uniformly at random from the split (documents run on
across the end-of-text tokens, as in GPT-2). A causal batch is (inputs, next tokens); a masked
batch is (corrupted inputs, labels with -100 where nothing is to be predicted).

When the split is small enough it is copied once to the device and windows are gathered there,
so a step moves only the offsets across the bus; otherwise windows are gathered on the host and
copied through pinned memory. Both give the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import UserError

IGNORE_INDEX = -100
SAMPLER_VERSION = "uniform-windows-v1"
_TRAIN_STREAM, _MASK_STREAM, _EVAL_STREAM = 0, 1, 2
# Splits up to this many tokens are copied to the GPU whole (as int32: 4 bytes each).
DEVICE_COPY_MAX_TOKENS = 512 * 1024 * 1024


class DataError(UserError, ValueError):
    """The token data cannot feed this run (missing, too short for the context)."""


def open_split(tokens_dir: Path | str, split: str, meta: dict | None = None):
    """Memory-map one split's token ids: one array, or its shards end to end (TokenShards), which
    slice the same way, so a batch is the same function of (seed, step, micro, rank) either way."""
    from lmforge.data.token_shards import TokenFileError, load_split, read_meta

    try:
        return load_split(tokens_dir, split, meta or read_meta(tokens_dir))
    except TokenFileError as err:
        raise DataError(str(err)) from None


def check_length(tokens: np.ndarray, context: int, split: str) -> None:
    if len(tokens) < context + 2:
        raise DataError(
            f"pretrain.context ({context}) is longer than the data: the {split} split has only "
            f"{len(tokens)} tokens; lower the context or add data"
        )


def _generator(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


@dataclass
class Masking:
    """BERT's corruption: of the chosen positions 80% become <mask>, 10% a random token, 10% stay."""

    probability: float
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]

    def apply(self, windows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        inputs = windows.astype(np.int64, copy=True)
        chosen = rng.random(windows.shape) < self.probability
        chosen &= ~np.isin(windows, self.special_ids)
        labels = np.where(chosen, inputs, IGNORE_INDEX)
        action = rng.random(windows.shape)
        inputs[chosen & (action < 0.8)] = self.mask_id
        swap = chosen & (action >= 0.8) & (action < 0.9)
        inputs[swap] = rng.integers(max(self.special_ids) + 1, self.vocab_size, size=int(swap.sum()))
        return inputs, labels


class BatchSampler:
    """Random windows of one split: the global batch of a step is reproducible from (seed, step);
    process `rank` of `world` takes micro-batch `micro` of its `accumulation` from it.

    Batches are drawn as the v1 sampler drew them for one process and one micro-batch (the
    generator's seed is [seed, stream, step, 0, 0]), so such runs keep their batches."""

    def __init__(self, tokens: np.ndarray, context: int, batch_size: int, seed: int, device: torch.device,
                 *, masking: Masking | None = None, rank: int = 0, world: int = 1, accumulation: int = 1,
                 on_device: bool = True):
        check_length(tokens, context, "train")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world} processes")
        self.tokens, self.context, self.batch_size = tokens, context, batch_size
        self.seed, self.device, self.masking, self.rank = seed, torch.device(device), masking, rank
        self.global_batch, self.accumulation = batch_size * accumulation * world, accumulation
        self._masked_step: tuple[int, np.ndarray, np.ndarray] | None = None
        # A causal window needs one extra token for the last target.
        self.span = context if masking else context + 1
        self.high = len(tokens) - self.span + 1
        self._arange = torch.arange(self.span, device=self.device)
        self._on_device = None
        if on_device and self.device.type == "cuda" and masking is None and len(tokens) <= DEVICE_COPY_MAX_TOKENS:
            self._on_device = torch.from_numpy(np.asarray(tokens).astype(np.int32)).to(self.device)

    def _rows(self, micro: int) -> slice:
        """This process's rows of the global batch for one micro-batch."""
        if not 0 <= micro < self.accumulation:
            raise IndexError(f"micro-batch {micro} of a step with {self.accumulation}")
        start = (self.rank * self.accumulation + micro) * self.batch_size
        return slice(start, start + self.batch_size)

    def global_offsets(self, step: int) -> np.ndarray:
        rng = _generator(self.seed, _TRAIN_STREAM, step, 0, 0)
        return rng.integers(0, self.high, size=self.global_batch)

    def offsets(self, step: int, micro: int) -> np.ndarray:
        return self.global_offsets(step)[self._rows(micro)]

    def _masked(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The corrupted global batch of a step (masking draws over all of it, so every process
        corrupts it alike), kept for the step's other micro-batches."""
        if self._masked_step is None or self._masked_step[0] != step:
            windows = np.stack([self.tokens[o : o + self.span] for o in self.global_offsets(step)])
            x, y = self.masking.apply(windows, _generator(self.seed, _MASK_STREAM, step, 0, 0))
            self._masked_step = (step, x, y)
        return self._masked_step[1], self._masked_step[2]

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.masking is not None:
            x, y = self._masked(step)
            rows = self._rows(micro)
            return _to_device(x[rows], self.device), _to_device(y[rows], self.device)
        offsets = self.offsets(step, micro)
        if self._on_device is not None:
            # Pinned, so the copy does not wait for the GPU to drain (no host sync per step).
            index = torch.from_numpy(offsets).pin_memory().to(self.device, non_blocking=True)[:, None] + self._arange
            windows = self._on_device[index].long()
            return windows[:, :-1], windows[:, 1:]
        windows = np.stack([self.tokens[o : o + self.span] for o in offsets]).astype(np.int64)
        return _to_device(windows[:, :-1], self.device), _to_device(windows[:, 1:], self.device)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def eval_batches(tokens: np.ndarray, context: int, batch_size: int, seed: int, device: torch.device, n: int,
                 *, masking: Masking | None = None, rank: int = 0, world: int = 1, wrap: int | None = None):
    """The same `n` random batches at every evaluation (this rank's share of them); with `wrap`,
    batch i is batch i % wrap (a rank may run a batch again to keep in step with the others)."""
    span = context if masking else context + 1
    high = len(tokens) - span + 1
    for i in range(rank, n, world):
        rng = _generator(seed, _EVAL_STREAM, i % wrap if wrap else i)
        offsets = rng.integers(0, high, size=batch_size)
        windows = np.stack([tokens[o : o + span] for o in offsets])
        if masking is not None:
            x, y = masking.apply(windows, rng)
        else:
            windows = windows.astype(np.int64)
            x, y = windows[:, :-1], windows[:, 1:]
        yield _to_device(x, torch.device(device)), _to_device(y, torch.device(device))


def window_starts(n_tokens: int, context: int, max_tokens: int | None = None, *, masked: bool = False) -> range:
    """Where each of sequential_windows' windows starts in a split of n_tokens."""
    n = n_tokens if max_tokens is None else min(n_tokens, max_tokens + 1)
    span = context if masked else context + 1
    return range(0, max(n - span, 0) + 1, context)


def sequential_windows(tokens: np.ndarray, context: int, batch_size: int, max_tokens: int | None = None,
                       *, masked: bool = False):
    """Non-overlapping windows covering the split once, for exact full-split evaluation.

    Causal windows overlap by one token so that every token but the first is a target once.
    Yields int64 numpy arrays of shape (b, context + 1) (causal) or (b, context) (masked).
    """
    span = context if masked else context + 1
    starts = window_starts(len(tokens), context, max_tokens, masked=masked)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        yield np.stack([np.asarray(tokens[s : s + span], dtype=np.int64) for s in chunk])
