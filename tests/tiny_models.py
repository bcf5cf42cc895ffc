"""Tiny but real transformers models for the registry and serving tests (built once a process).

`sentiment_folder()`: a 2-layer, 32-wide BERT classifier with a WordPiece tokenizer trained on the
fly, fitted on clearly positive and clearly negative reviews until it labels them right.
`lm_folder()`: a 2-layer, 32-wide Llama causal LM with a byte-level BPE tokenizer (untrained);
`chat_folder()`: the same with a chat template, as the sft stage leaves models/chat.
Both are plain `save_pretrained` folders, like the pipeline's models/finetuned and models/pretrained.
`lm_gguf()`: lm_folder's model and tokenizer as one F32 GGUF file, laid out as llama.cpp's converter
writes a Llama (the packaged SmolLM2 is such a file).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

GOOD = ["wonderful", "brilliant", "superb", "delightful", "moving", "great", "excellent", "lovely"]
BAD = ["awful", "boring", "dreadful", "tedious", "terrible", "bad", "horrible", "dull"]
POSITIVE = "A wonderful, brilliant film. I loved every minute of it."
NEGATIVE = "An awful, boring film. I hated every minute of it."


def reviews() -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for i in range(len(GOOD)):
        for j in range(len(GOOD)):
            texts.append(f"a {GOOD[i]} and {GOOD[j]} film, i loved it")
            labels.append(1)
            texts.append(f"an {BAD[i]} and {BAD[j]} film, i hated it")
            labels.append(0)
    return texts, labels


@functools.lru_cache(maxsize=None)
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="lmforge-tiny-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def _fast_tokenizer(tokenizer, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


@functools.lru_cache(maxsize=None)
def sentiment_folder() -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification

    texts, labels = reviews()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts + [POSITIVE, NEGATIVE],
                            trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = _fast_tokenizer(tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                mask_token="[MASK]", model_max_length=64)

    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
                        pad_token_id=tok.token_to_id("[PAD]"))
    model = BertForSequenceClassification(config)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    target = torch.tensor(labels)
    model.train()
    for _ in range(40):
        loss = model(**batch, labels=target).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()
    with torch.no_grad():
        check = tokenizer([POSITIVE, NEGATIVE], padding=True, return_tensors="pt")
        assert model(**check).logits.argmax(-1).tolist() == [1, 0], "the tiny classifier did not learn"
    folder = _root() / "finetuned"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=None)
def lm_folder() -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = ["ROMEO: But soft, what light through yonder window breaks?", "JULIET: O Romeo, Romeo, wherefore art thou Romeo?"]
    tok.train_from_iterator(lines * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = _fast_tokenizer(tok, eos_token="<eos>", pad_token="<eos>", model_max_length=64)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tok.token_to_id("<eos>"), pad_token_id=tok.token_to_id("<eos>"),
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    folder = _root() / "pretrained"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=None)
def chat_folder() -> Path:
    """lm_folder's model with lmforge's plain chat template in its tokenizer, as sft saves a chat model."""
    from transformers import AutoTokenizer

    from lmforge.generation import DEFAULT_CHAT_TEMPLATE

    folder = _root() / "chat"
    shutil.copytree(lm_folder(), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


# lm_folder's parameter names -> the GGUF tensor names of a Llama block (llama.cpp's naming).
GGUF_BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _rope_permute(weight, n_head: int):
    # llama.cpp stores q and k with each head's rotary halves interleaved; transformers undoes it on load.
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@functools.lru_cache(maxsize=None)
def lm_gguf() -> Path:
    import json

    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = lm_folder()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = model.config
    path = _root() / "gguf" / "tiny-llama.F32.gguf"
    path.parent.mkdir()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == tokenizer.eos_token else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_bos_token_id(tokenizer.eos_token_id)
    for name, tensor in model.state_dict().items():
        weight = tensor.numpy()
        if name == "lm_head.weight":  # tied to the embeddings: GGUF stores it once
            continue
        if name == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", weight)
        elif name == "model.norm.weight":
            writer.add_tensor("output_norm.weight", weight)
        else:
            layer, part = int(name.split(".")[2]), ".".join(name.split(".")[3:-1])
            if part in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = config.num_attention_heads if part == "self_attn.q_proj" else config.num_key_value_heads
                weight = _rope_permute(weight, heads)
            writer.add_tensor(f"blk.{layer}.{GGUF_BLOCK_NAMES[part]}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def with_positions(source: Path, folder: Path, positions: int) -> Path:
    """A copy of a tiny model folder that reads `positions` tokens (rotary positions: nothing to
    retrain), for what needs a longer window than 64: long benchmark answers, long generations."""
    shutil.copytree(source, folder)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        settings = json.loads((folder / name).read_text())
        settings[key] = positions
        (folder / name).write_text(json.dumps(settings))
    return folder
