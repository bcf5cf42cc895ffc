import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from lmforge.data.token_shards import load_split
from lmforge.data.tokenization import SPECIAL_TOKENS, train_tokenizer, write_tokens
from tests.conftest import play

SPLITS = {
    "train": [play("Alpha"), play("Beta"), "caf\u00e9 \u2014 na\u00efve"],
    "val": [play("Gamma")],
    "test": [play("Delta")],
}


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokens_round_trip_through_transformers(tmp_path, kind):
    meta = write_tokens(SPLITS, tmp_path, kind, vocab_size=400, min_frequency=2)
    assert meta["dtype"] == "uint16"
    assert meta["special_ids"] == {"eos": 0, "pad": 1, "mask": 2, "unk": 3}
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    for split, texts in SPLITS.items():
        ids = load_split(tmp_path, split)
        assert ids.size == meta["splits"][split]["tokens"]
        assert meta["splits"][split]["bytes"] == sum(len(t.encode()) for t in texts)
        assert (ids == 0).sum() == len(texts)  # one end-of-text after each document
    hf = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert hf.eos_token == SPECIAL_TOKENS["eos"] and hf.pad_token_id == 1 and hf.mask_token_id == 2
    train = load_split(tmp_path, "train")
    first_doc = train[: int(np.argmax(train == 0))]
    assert hf.decode(first_doc.tolist()) == SPLITS["train"][0]


def test_char_tokenizer_maps_unseen_characters_to_unk():
    tok = train_tokenizer(["abc"], "char")
    assert tok.decode(tok.encode("abz").ids) == "ab"  # unk is special, skipped on decode
    assert tok.encode("abz").ids[-1] == 3


def test_bpe_learns_merges_beyond_bytes():
    tok = train_tokenizer([play("Alpha")] * 3, "bpe", vocab_size=400)
    text = "the quality of mercy"
    assert len(tok.encode(text).ids) < len(text.encode())


def test_empty_train_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train split is empty"):
        write_tokens({"train": [], "val": ["a"], "test": ["b"]}, tmp_path, "char")
