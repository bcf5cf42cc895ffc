"""Tokenizers trained on the train split only, and the token arrays the trainer memory-maps.

The output folder holds:
  tokenizer.json          the `tokenizers` Tokenizer
  tokenizer/              the same wrapped as a transformers PreTrainedTokenizerFast folder
  <split>/part-NNNNN.bin  token ids of one split shard, each document followed by <|endoftext|>
                          (uint16, or uint32 once the vocabulary passes 65,536)
  meta.json               kind, vocab size, dtype, special ids, and per split: tokens, bytes,
                          documents and the index of its shards (file, tokens), in order
A split's tokens are its shards laid end to end (lmforge/training/batches.py reads them so). Small sets
written in memory (`write_tokens`) keep one flat <split>.bin each, which reads the same way.
The byte counts let evaluation report bits per byte, which compares across tokenizers.

At corpus scale (`write_token_shards`) the tokenizer learns from a seeded sample of the train
split (about `sample_mb` of text), then every shard is encoded on its own, on the data engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Literal

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.config.tokenize import TokenizeParams
from lmforge.errors import UserError

if TYPE_CHECKING:
    from lmforge.data.engine import Engine

SPECIAL_TOKENS = {"eos": "<|endoftext|>", "pad": "<pad>", "mask": "<mask>", "unk": "<unk>"}
SPLITS = ("train", "val", "test")
_ENCODE_BATCH = 256
# A caller that passes no vocab_size / min_frequency gets the tokenize section's defaults: one place for them.
_DEFAULTS = TokenizeParams()


def train_tokenizer(
    texts: Iterable[str],
    kind: Literal["char", "bpe"],
    vocab_size: int = _DEFAULTS.vocab_size,
    min_frequency: int = _DEFAULTS.min_frequency,
) -> Tokenizer:
    """Learn a tokenizer from `texts`. Special tokens always take ids 0..3 in SPECIAL_TOKENS order."""
    if kind == "char":
        return _train_char(texts)
    if kind == "bpe":
        return _train_bpe(texts, vocab_size, min_frequency)
    raise ValueError(f"unknown tokenizer kind {kind!r}: use 'char' or 'bpe'")


def _train_char(texts: Iterable[str]) -> Tokenizer:
    alphabet: set[str] = set()
    for text in texts:
        alphabet.update(text)
    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    # Every character is its own word; Fuse glues them back without spaces on decode.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(specials)
    return tokenizer


def _train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,  # the trainer's own bars (shown on a terminal only)
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def encode_documents(tokenizer: Tokenizer, documents: list[str], dtype: np.dtype) -> np.ndarray:
    """All documents as one flat array, each followed by the end-of-text id."""
    eos = tokenizer.token_to_id(SPECIAL_TOKENS["eos"])
    pieces: list[np.ndarray] = []
    for start in range(0, len(documents), _ENCODE_BATCH):
        batch = documents[start : start + _ENCODE_BATCH]
        # encode_batch_fast skips offset tracking: the ids are all we store.
        for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
            pieces.append(np.asarray(encoding.ids, dtype=dtype))
            pieces.append(np.asarray([eos], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def as_transformers_tokenizer(tokenizer: Tokenizer):
    """Wrap for transformers: AutoTokenizer loads the saved folder, models save it beside them."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=SPECIAL_TOKENS["eos"],
        bos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        mask_token=SPECIAL_TOKENS["mask"],
        unk_token=SPECIAL_TOKENS["unk"],
    )


def write_tokens(
    split_texts: dict[str, list[str]],
    out_dir: Path | str,
    kind: Literal["char", "bpe"],
    vocab_size: int = _DEFAULTS.vocab_size,
    min_frequency: int = _DEFAULTS.min_frequency,
) -> dict:
    """Train on split_texts["train"], encode every split into out_dir, return the meta written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [s for s in SPLITS if s not in split_texts]
    if missing:
        raise ValueError(f"missing splits: {', '.join(missing)}")
    if not any(split_texts["train"]):
        raise ValueError("the train split is empty: nothing to learn a tokenizer from")

    tokenizer = train_tokenizer(split_texts["train"], kind, vocab_size, min_frequency)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    as_transformers_tokenizer(tokenizer).save_pretrained(str(out_dir / "tokenizer"))

    meta = _meta(tokenizer, kind)
    dtype = np.dtype(meta["dtype"])
    for split in SPLITS:
        documents = split_texts[split]
        ids = encode_documents(tokenizer, documents, dtype)
        ids.tofile(out_dir / f"{split}.bin")
        meta["splits"][split] = {
            "tokens": int(ids.size),
            "bytes": sum(len(d.encode("utf-8")) for d in documents),
            "documents": len(documents),
        }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# --- corpus scale: a sampled tokenizer, shards encoded one by one ------------------------------


def in_sample(doc_id: str, seed: int, fraction: float) -> bool:
    """A document is in the tokenizer's sample when a hash of (seed, its id) falls below `fraction`
    (a stream of its own, independent of the split's hash)."""
    from lmforge.data.documents import hash_position

    return hash_position(f"tokenizer-sample:{seed}:{doc_id}") < fraction


def sample_texts(parts: list[Path], fraction: float, seed: int) -> Iterator[str]:
    """The sampled train texts, streamed a row group at a time."""
    import pyarrow.parquet as pq

    for part in parts:
        reader = pq.ParquetFile(part)
        for i in range(reader.num_row_groups):
            table = reader.read_row_group(i, columns=["id", "text"])
            for doc_id, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist()):
                if fraction >= 1.0 or in_sample(doc_id, seed, fraction):
                    yield text


def sample_shard(in_path: str, out_path: str, fraction: float, seed: int) -> dict:
    """One train shard's sampled texts into their own parquet file (the sampling scan reads every
    document, so it runs on the workers; the trainer then reads only the sample)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = list(sample_texts([Path(in_path)], fraction, seed))
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), out_path)
    sampled = sum(len(t.encode("utf-8")) for t in texts)
    return {"rows_in": pq.ParquetFile(in_path).metadata.num_rows, "bytes_in": sampled, "sampled_bytes": sampled}


def _sampled(files: list[Path]) -> Iterator[str]:
    import pyarrow.parquet as pq

    for path in files:
        yield from pq.read_table(path).column("text").to_pylist()


class FastEncoder:
    """Encodes with fastokens (a Rust reader of the same tokenizer.json: 14 MB/s on one thread here
    against 0.8-1.0 for `tokenizers`, docs/data.md), and checks it: the first documents of every
    shard (about 100 kB of text) are encoded by `tokenizers` too, and on any difference, or a tokenizer fastokens cannot
    read, `tokenizers` encodes the shard. The ids are the same either way; only the speed differs."""

    CHECKED_BYTES = 100_000  # at about 1 MB/s for `tokenizers`, 0.1 s a shard

    def __init__(self, tokenizer_path: str, eos_token: str = SPECIAL_TOKENS["eos"]):
        self.reference = Tokenizer.from_file(tokenizer_path)
        self.eos = self.reference.token_to_id(eos_token)
        try:
            import fastokens

            self.fast = fastokens.Tokenizer.from_file(tokenizer_path)
        except Exception:  # not installed, or a tokenizer it does not support: encode with tokenizers
            self.fast = None
        self.unchecked = self.CHECKED_BYTES

    def encode(self, texts: list[str], dtype: np.dtype) -> np.ndarray:
        if self.fast is not None and self.unchecked > 0:
            self._check(texts)
        if self.fast is None:
            return encode_documents(self.reference, texts, dtype)
        pieces = []
        for text in texts:
            pieces.append(np.asarray(self.fast.encode(text, add_special_tokens=False).ids, dtype=dtype))
            pieces.append(np.asarray([self.eos], dtype=dtype))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)

    def _check(self, texts: list[str]) -> None:
        for text in texts:
            fast = self.fast.encode(text, add_special_tokens=False).ids
            if fast != self.reference.encode(text, add_special_tokens=False).ids:
                self.fast = None
                return
            self.unchecked -= len(text)
            if self.unchecked <= 0:
                return


def encode_shard(tokenizer_path: str, in_path: str, out_path: str, dtype_name: str,
                 eos_token: str = SPECIAL_TOKENS["eos"]) -> dict:
    """Encode one split shard (parquet, column `text`) into a flat .bin of ids, a batch at a time,
    each document followed by `eos_token`."""
    import pyarrow.parquet as pq

    encoder = FastEncoder(tokenizer_path, eos_token)
    dtype = np.dtype(dtype_name)
    reader = pq.ParquetFile(in_path)
    tokens = documents = text_bytes = 0
    with open(out_path, "wb") as out:
        for batch in reader.iter_batches(columns=["text"], batch_size=_ENCODE_BATCH * 4):
            texts = batch.column(0).to_pylist()
            ids = encoder.encode(texts, dtype)
            ids.tofile(out)
            tokens += ids.size
            documents += len(texts)
            text_bytes += sum(len(t.encode("utf-8")) for t in texts)
    return {"tokens": tokens, "documents": documents, "bytes_in": text_bytes, "rows_in": documents,
            "encoder": "fastokens" if encoder.fast is not None else "tokenizers"}


def write_token_shards(split_dir: Path, out_dir: Path, kind: Literal["char", "bpe", "pretrained"], vocab_size: int,
                       min_frequency: int, sample_mb: float, seed: int, work_dir: Path, engine: Engine,
                       progress: bool = True, pretrained: Path | None = None, pretrained_name: str | None = None) -> dict:
    """Learn the tokenizer on a sample of split_dir's train parts (kind char or bpe), or take the
    one of the `pretrained` model folder (kind pretrained, its vocabulary and special tokens kept),
    encode every part of every split into out_dir/<split>/part-NNNNN.bin on the data engine, and
    write meta.json with the index."""
    from lmforge.data.engine import run_shards

    split_dir, out_dir = Path(split_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = json.loads((split_dir / "index.json").read_text())
    if kind == "pretrained":
        meta = take_tokenizer(Path(pretrained), out_dir, pretrained_name or str(pretrained))
    else:
        meta = learn_tokenizer(split_dir, index, out_dir, kind, vocab_size, min_frequency, sample_mb, seed,
                               work_dir, engine, progress)
    jobs, names = [], []
    for split in SPLITS:
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        for entry in index[split]:
            name = f"{split}/{Path(entry['file']).stem}.bin"
            names.append((split, name))
            jobs.append((str(out_dir / "tokenizer.json"), str(split_dir / entry["file"]), str(out_dir / name), meta["dtype"],
                         meta["special_tokens"]["eos"]))
    reports = run_shards(encode_shard, jobs, Path(work_dir) / "encode", engine=engine, desc="encoding", progress=progress)
    for split in SPLITS:
        mine = [(name, r) for (s, name), r in zip(names, reports) if s == split]
        meta["splits"][split] = {
            "tokens": sum(r["tokens"] for _, r in mine),
            "bytes": sum(r["bytes_in"] for _, r in mine),
            "documents": sum(r["documents"] for _, r in mine),
            "shards": [{"file": name, "tokens": r["tokens"]} for name, r in mine],
        }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def learn_tokenizer(split_dir: Path, index: dict, out_dir: Path, kind: Literal["char", "bpe"], vocab_size: int,
                    min_frequency: int, sample_mb: float, seed: int, work_dir: Path, engine: Engine,
                    progress: bool) -> dict:
    """Train a tokenizer on a seeded sample of the train split, save it (tokenizer.json and the
    transformers folder) into out_dir and return the start of meta.json."""
    from lmforge.data.engine import run_shards

    train_bytes = sum(entry["bytes"] for entry in index["train"])
    if not train_bytes:
        raise ValueError("the train split is empty: nothing to learn a tokenizer from")
    fraction = min(1.0, sample_mb * 1e6 / train_bytes)
    samples = Path(work_dir) / "sample"
    samples.mkdir(parents=True, exist_ok=True)
    jobs = [(str(split_dir / entry["file"]), str(samples / f"{i:05d}.parquet"), fraction, seed)
            for i, entry in enumerate(index["train"])]
    run_shards(sample_shard, jobs, Path(work_dir) / "sampling", engine=engine, desc="tokenizer sample", progress=progress)
    _train_on_cores(engine.workers)
    tokenizer = train_tokenizer(_sampled([Path(job[1]) for job in jobs]), kind, vocab_size, min_frequency)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    as_transformers_tokenizer(tokenizer).save_pretrained(str(out_dir / "tokenizer"))
    meta = _meta(tokenizer, kind)
    meta["tokenizer_sample"] = {"fraction": round(fraction, 6), "train_bytes": train_bytes}
    return meta


class PretrainedTokenizerError(UserError, ValueError):
    """The base model's folder holds no tokenizer this stage can encode with."""


def take_tokenizer(folder: Path, out_dir: Path, name: str) -> dict:
    """The tokenizer of a base model folder, unchanged (vocabulary, special tokens, chat template),
    copied into out_dir; returns the start of meta.json. Documents are separated by the model's own
    end-of-sequence token; pad, mask and unk fall back to it where the model has none."""
    import shutil

    from transformers import AutoTokenizer

    source = folder / "tokenizer.json"
    if not source.is_file():
        raise PretrainedTokenizerError(f"tokenize.model: {folder} holds no tokenizer.json (a fast tokenizer) to encode with")
    hf = AutoTokenizer.from_pretrained(folder)
    if hf.eos_token is None:
        raise PretrainedTokenizerError(f"tokenize.model: the tokenizer of {folder} has no end-of-sequence token "
                                       "to separate documents with")
    shutil.copyfile(source, out_dir / "tokenizer.json")
    hf.save_pretrained(str(out_dir / "tokenizer"))
    tokenizer = Tokenizer.from_file(str(source))
    special = {"eos": hf.eos_token}
    for role in ("pad", "mask", "unk"):
        special[role] = getattr(hf, f"{role}_token", None) or hf.eos_token
    vocab = tokenizer.get_vocab_size()
    return {"kind": "pretrained", "tokenizer_from": name, "vocab_size": vocab, "dtype": token_dtype(vocab).name,
            "special_tokens": special, "special_ids": {k: tokenizer.token_to_id(v) for k, v in special.items()},
            "splits": {}}


def _train_on_cores(workers: int) -> None:
    """The BPE trainer's thread pool takes the same number of cores as the workers that encode
    (its pool reads these variables when it starts, at the first training in the process)."""
    import os

    # Set both ways: the data engine turns parallelism off before it forks workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if workers > 1 else "false"
    os.environ.setdefault("RAYON_NUM_THREADS", str(workers))


def _meta(tokenizer: Tokenizer, kind: str) -> dict:
    actual_vocab = tokenizer.get_vocab_size()
    return {
        "kind": kind,
        "vocab_size": actual_vocab,
        "dtype": token_dtype(actual_vocab).name,
        "special_tokens": dict(SPECIAL_TOKENS),
        "special_ids": {k: tokenizer.token_to_id(v) for k, v in SPECIAL_TOKENS.items()},
        "splits": {},
    }
