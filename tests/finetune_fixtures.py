"""Small real inputs for the finetune and tune tests.

`tiny_base(folder)`: an untrained 2-layer, 32-wide BERT encoder (no head) with a WordPiece
tokenizer trained on the fly, saved with save_pretrained: a real transformers folder that
AutoModelForSequenceClassification loads like the packaged MiniLM, in a fraction of a second.
`write_task(folder, labels)`: {train,val,test}.parquet of synthetic reviews whose label shows in
its words, in the split stage's contract (columns text, label), for any number of labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = {
    "positive": ["wonderful", "brilliant", "superb", "delightful", "moving", "great", "excellent", "lovely"],
    "negative": ["awful", "boring", "dreadful", "tedious", "terrible", "bad", "horrible", "dull"],
    "neutral": ["average", "okay", "middling", "passable", "ordinary", "fine", "standard", "so-so"],
}
FILLER = ["the", "film", "plot", "acting", "a", "story", "was", "and", "of", "director", "scene", "cast",
          "music", "ending", "it", "this", "movie", "really", "quite", "with"]


def review(label: str, rng: np.random.Generator) -> str:
    """A review of 6 to 60 words: filler with two or three of the label's words in it."""
    n = int(rng.integers(6, 60))
    words = list(rng.choice(FILLER, size=n))
    for _ in range(int(rng.integers(2, 4))):
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(WORDS[label])))
    return " ".join(words) + "."


def task_frames(labels=("negative", "positive"), n_train: int = 160, n_val: int = 40, n_test: int = 40,
                seed: int = 0) -> dict:
    import pandas as pd

    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        names = [labels[i % len(labels)] for i in range(n)]
        rng.shuffle(names)
        out[split] = pd.DataFrame({"text": [review(name, rng) for name in names], "label": names})
    return out


def write_task(folder: Path, labels=("negative", "positive"), **sizes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, frame in task_frames(labels, **sizes).items():
        frame.to_parquet(folder / f"{split}.parquet", index=False)
    return folder


def tiny_base(folder: Path, max_length: int = 128) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    if (folder / "config.json").exists():
        return folder
    rng = np.random.default_rng(1)
    corpus = [review(label, rng) for label in WORDS for _ in range(40)]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_max_length=max_length)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=max_length,
                        pad_token_id=tok.token_to_id("[PAD]"))
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def params_file(path: Path, **sections) -> Path:
    """The project's params.yaml with `sections` (e.g. finetune={...}) replacing its own."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in sections.items():
        params[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def tiny_finetune(base: Path, **overrides) -> dict:
    """A finetune section sized for the tiny model: a few seconds on one CPU thread."""
    section = {
        "base_model": str(base), "max_length": 64, "num_train_epochs": 6, "batch_size": 8, "eval_batch_size": 64,
        "learning_rate": 3e-3, "warmup_ratio": 0.1, "weight_decay": 0.0, "early_stopping_patience": 0,
        "save_steps": 5, "device": "cpu", "compile": False, "use_tuned": True,
    }
    section.update(overrides)
    return section


def tiny_causal_base(folder: Path, max_length: int = 128, n_layer: int = 2) -> Path:
    """An untrained n_layer-deep, 32-wide Llama causal LM with a byte-level BPE tokenizer that has no
    pad token (like SmolLM2 or our own pretrained model): the causal-LM path of fine-tuning."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").exists():
        return folder
    rng = np.random.default_rng(2)
    corpus = [review(label, rng) for label in WORDS for _ in range(40)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eos = tok.token_to_id("<|endoftext|>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        model_max_length=max_length)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_length,
                         bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
