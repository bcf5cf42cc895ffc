"""Tokenizers trained on the train split only, and the flat token arrays the trainer memory-maps.

The output folder (data/tokens/) holds:
  tokenizer.json          the `tokenizers` Tokenizer
  tokenizer/              the same wrapped as a transformers PreTrainedTokenizerFast folder
  train.bin val.bin test.bin   flat token ids, documents joined with <|endoftext|> after each
  meta.json               kind, vocab size, dtype, special ids, and per split: tokens, bytes, documents
The byte counts let evaluation report bits per byte, which compares across tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = {"eos": "<|endoftext|>", "pad": "<pad>", "mask": "<mask>", "unk": "<unk>"}
SPLITS = ("train", "val", "test")
_ENCODE_BATCH = 256


def train_tokenizer(
    texts: Iterable[str],
    kind: Literal["char", "bpe"],
    vocab_size: int = 4096,
    min_frequency: int = 2,
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
        show_progress=False,
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
    vocab_size: int = 4096,
    min_frequency: int = 2,
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

    actual_vocab = tokenizer.get_vocab_size()
    dtype = token_dtype(actual_vocab)
    meta = {
        "kind": kind,
        "vocab_size": actual_vocab,
        "dtype": dtype.name,
        "special_tokens": dict(SPECIAL_TOKENS),
        "special_ids": {k: tokenizer.token_to_id(v) for k, v in SPECIAL_TOKENS.items()},
        "splits": {},
    }
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


def read_meta(tokens_dir: Path | str) -> dict:
    return json.loads((Path(tokens_dir) / "meta.json").read_text())


def load_split(tokens_dir: Path | str, split: str) -> np.memmap:
    """Memory-map one split's token ids (no copy into RAM)."""
    meta = read_meta(tokens_dir)
    return np.memmap(Path(tokens_dir) / f"{split}.bin", dtype=meta["dtype"], mode="r")
