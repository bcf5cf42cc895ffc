"""Chat fine-tuning's data: the assistant's tokens found through the chat template, and packed rows
that score exactly as their conversations one by one (a tiny real Llama, SDPA attention)."""

from __future__ import annotations

import pytest
import torch

from lmforge.generation import DEFAULT_CHAT_TEMPLATE
from lmforge.training.packing import IGNORE, Example, block_causal_mask, collate, encode_conversation, pack, token_loss
from tests.tiny_models import lm_folder

CONVERSATIONS = [
    [{"role": "user", "content": "Who is Romeo?"}, {"role": "assistant", "content": "A Montague."},
     {"role": "user", "content": "And Juliet?"}, {"role": "assistant", "content": "A Capulet."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where?"},
     {"role": "assistant", "content": "Verona."}],
    [{"role": "user", "content": "What light breaks?"}, {"role": "assistant", "content": "Yonder window."}],
]


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(lm_folder(), attn_implementation="sdpa", dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(lm_folder())


def test_only_the_assistants_tokens_are_learned(tiny):
    _, tokenizer = tiny
    example = encode_conversation(tokenizer, CONVERSATIONS[0], max_length=512, template=DEFAULT_CHAT_TEMPLATE)
    assert len(example.ids) == len(example.targets) and example.targets[-1] == IGNORE
    learned = [t for t in example.targets if t != IGNORE]
    assert tokenizer.decode(learned) == " A Montague.\n A Capulet.\n"  # the replies (and their line ends), nothing else
    whole = tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False, chat_template=DEFAULT_CHAT_TEMPLATE)
    assert tokenizer.decode(example.ids) == whole
    cut = encode_conversation(tokenizer, CONVERSATIONS[0], max_length=10, template=DEFAULT_CHAT_TEMPLATE)
    assert len(cut.ids) == 10 and cut.ids == example.ids[:10]


def test_first_fit_packing_keeps_order_and_refuses_what_cannot_fit():
    examples = [Example([1] * n, [IGNORE] * n) for n in (6, 5, 3, 2)]
    rows = pack(examples, row_length=8)
    assert [[len(e) for e in row] for row in rows] == [[6, 2], [5, 3]]
    with pytest.raises(ValueError, match="does not fit a row of 4"):
        pack(examples, row_length=4)


def test_a_packed_batch_scores_as_its_conversations_one_by_one(tiny):
    model, tokenizer = tiny
    examples = [encode_conversation(tokenizer, c, 512, DEFAULT_CHAT_TEMPLATE) for c in CONVERSATIONS]
    rows = pack(examples, row_length=sum(len(e) for e in examples) - 1)  # two rows, one holding two conversations
    assert sorted(len(row) for row in rows) == [1, 2]
    batch = collate(rows, pad_id=tokenizer.eos_token_id)
    with torch.no_grad():
        packed = token_loss(model(**batch.model_inputs()).logits, batch.targets)
        logits, targets = [], []
        for example in examples:
            logits.append(model(torch.tensor([example.ids])).logits[0])
            targets.append(torch.tensor(example.targets))
        alone = token_loss(torch.cat(logits)[None], torch.cat(targets)[None])
        # restarted positions alone, with a plain causal mask: the second conversation sees the first
        leaky = token_loss(model(batch.input_ids, position_ids=batch.position_ids).logits, batch.targets)
    assert packed.item() == pytest.approx(alone.item(), rel=1e-5, abs=1e-6)
    assert leaky.item() != pytest.approx(alone.item(), rel=1e-5, abs=1e-6)
    # the same, logit by logit, for the row that holds two conversations
    two = next(r for r, row in enumerate(rows) if len(row) == 2)
    first, second = rows[two]
    with torch.no_grad():
        row_logits = model(**{k: v[two:two + 1] for k, v in batch.model_inputs().items()}).logits[0]
        leaky_logits = model(batch.input_ids[two:two + 1], position_ids=batch.position_ids[two:two + 1]).logits[0]
        second_alone = model(torch.tensor([second.ids])).logits[0]
    span = slice(len(first), len(first) + len(second))
    assert (row_logits[span] - second_alone).abs().max() < 1e-4
    assert (leaky_logits[span] - second_alone).abs().max() > 1e-2


def test_the_block_mask_is_causal_within_a_conversation_and_closed_between():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]))[0, 0]
    assert mask[1, 0] and not mask[0, 1]  # causal
    assert not mask[2, 1] and mask[4, 2]  # the second conversation starts afresh
    assert mask[5].tolist() == [False] * 5 + [True]  # padding sees itself alone
