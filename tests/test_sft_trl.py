"""Chat fine-tuning through TRL (lmforge/training/chat_trl.py): chat_finetune's contract on real tiny
models. LoRA and full runs learn and save a chat model, the counts agree with lmforge's loop, a run
killed with SIGKILL resumes to the same bits, TRL learns exactly lmforge's target tokens, and a
template TRL cannot mask is refused clearly."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmforge.config.sft import SftParams
from lmforge.generation import DEFAULT_CHAT_TEMPLATE
from lmforge.training import chat_trl
from lmforge.training.chat_tuning import (ADAPTER_FOLDER, SftError, chat_finetune, conversation_loss, encode_all,
                                          examples_loss, save_chat_model, take)
from tests.test_sft import SEED, TINY, conversations, killed_at_step_8, quiet, talk
from tests.tiny_models import lm_folder

# a conversation whose reply falls past max_length (64 tokens): left out and counted
LONG = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]


def test_a_lora_run_learns_and_saves_a_chat_model_that_scores_as_trained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen: list[tuple[int, str]] = []
    result = chat_trl.trl_finetune(lm_folder(), conversations(), SftParams(**TINY), seed=SEED, log=quiet,
                                   show_progress=False,
                                   on_metrics=lambda step, values: seen.extend((step, k) for k in values))
    assert result.test["loss"] < result.base["test"]["loss"] - 0.1  # LoRA on q and v of a 32-wide model: slow
    assert result.stats["engine"] == "trl" and result.stats["steps"] == 10  # 40 conversations, 4 rows a step
    assert [h["step"] for h in result.history] == [4, 8, 10] and result.best_step in (4, 8, 10)
    assert (2, "train_loss") in seen and (2, "lr") in seen and (4, "val_loss") in seen and (10, "val_loss") in seen
    assert result.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE  # the plain template, not TRL's marked twin
    assert result.stats["trainable_parameters"] < sum(p.numel() for p in result.model.parameters())

    folder = save_chat_model(result, tmp_path / "chat")
    assert (folder / ADAPTER_FOLDER / "adapter_config.json").exists()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    again = conversation_loss(model, tokenizer, take(conversations()["test"], 8, SEED), max_length=64)
    assert again["loss"] == pytest.approx(result.test["loss"], rel=1e-5)


def test_a_full_run_learns_and_counts_what_lmforges_loop_counts():
    data = conversations()
    data["train"] = data["train"] + [LONG]
    params = SftParams(**{**TINY, "method": "full", "learning_rate": 0.003})
    trl = chat_trl.trl_finetune(lm_folder(), data, params, seed=SEED, log=quiet, show_progress=False)
    own = chat_finetune(lm_folder(), data, params, seed=SEED, log=quiet, show_progress=False)
    assert trl.test["loss"] < trl.base["test"]["loss"] - 0.5
    assert trl.stats["trainable_parameters"] == sum(p.numel() for p in trl.model.parameters())
    assert trl.base == own.base  # the same scoring of the same base model
    for key in ("steps", "tokens", "target_tokens", "train_conversations", "val_conversations",
                "dropped_conversations"):
        assert trl.stats[key] == own.stats[key], key
    assert trl.stats["dropped_conversations"] == {"train": 1, "val": 0}
    assert [(h["step"], h["epoch"]) for h in trl.history] == [(h["step"], h["epoch"]) for h in own.history]
    assert [h["lr"] for h in trl.history] == pytest.approx([h["lr"] for h in own.history])  # lmforge's schedule
    assert trl.test["loss"] == pytest.approx(own.test["loss"], abs=0.15)  # other row order, same learning
    assert next(trl.model.parameters()).device.type == "cpu" and not trl.model.training


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_killed_with_sigkill_resumes_to_the_same_bits(tmp_path, method):
    data, settings = conversations(), {**TINY, "method": method, "learning_rate": 0.003}
    params = SftParams(**settings)
    straight = chat_trl.trl_finetune(lm_folder(), data, params, seed=SEED, log=quiet, show_progress=False)

    killed = killed_at_step_8("lmforge.training.chat_trl:trl_finetune", data, settings, tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL at step 8, past the checkpoint of step 6
    (run_dir,) = (tmp_path / "ckpt").iterdir()
    assert run_dir.name.startswith("trl-") and (run_dir / "checkpoint-6").is_dir()
    shutil.copytree(run_dir / "checkpoint-6", run_dir / "checkpoint-9")  # as if killed while writing step 9's
    (run_dir / "checkpoint-9" / chat_trl.STATE_FILE).write_text('{"global_step": 9, "stateful_')

    resumed = chat_trl.trl_finetune(lm_folder(), data, params, seed=SEED, checkpoint_dir=tmp_path / "ckpt",
                                    log=quiet, show_progress=False)
    assert resumed.stats["resumed_from_step"] == 6
    assert resumed.stats["steps"] == straight.stats["steps"] == 10
    assert resumed.stats["tokens"] == straight.stats["tokens"]
    assert resumed.stats["target_tokens"] == straight.stats["target_tokens"]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.history == straight.history  # train and val losses, lr, tokens: row for row
    assert resumed.base == straight.base and resumed.best_step == straight.best_step


def short(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": f"{i}."}]


def test_trl_learns_exactly_lmforges_targets_and_packed_conversations_do_not_see_each_other(tmp_path):
    convs = [short(i) for i in range(6)] + [talk(3), [{"role": "system", "content": "Be brief."}] + short(7)]
    data = {"train": convs, "val": convs[:2]}
    run = chat_trl.prepare_run(lm_folder(), data, SftParams(**{**TINY, "method": "full"}), SEED, None, quiet)
    trainer = chat_trl.build_trainer(run, tmp_path, show_progress=False)
    expected, _ = encode_all(run.tokenizer, convs, 64)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert any(len(row["seq_lengths"]) > 1 for row in rows)  # several conversations share a row
    batch = trainer.data_collator(rows)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    found, start = [], 0
    for length in [n for row in rows for n in row["seq_lengths"]]:
        targets = labels[start + 1 : start + length] + [-100]  # label t is predicted at t - 1
        found.append((ids[start : start + length], targets))
        start += length
    assert sorted(found) == sorted((e.ids, e.targets) for e in expected)

    run.model.eval()
    with torch.no_grad():
        packed = trainer.compute_loss(run.model, dict(batch)).item()
    alone = examples_loss(run.model, expected, row_length=64, batch_size=1, pad_id=0, device=torch.device("cpu"),
                          dtype=None)["loss"]
    assert packed == pytest.approx(alone, rel=1e-5)


def test_the_marked_twins_render_the_templates_text():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_folder())
    for plain, marked in ((chat_trl.SMOLLM2_TEMPLATE, chat_trl.SMOLLM2_GENERATION_TEMPLATE),
                          (DEFAULT_CHAT_TEMPLATE, chat_trl.PLAIN_GENERATION_TEMPLATE)):
        assert chat_trl.generation_template(plain) == marked and chat_trl.generation_template(marked) == marked
        for messages, cue in ((talk(2), False), (short(1), False), (short(1)[:1], True)):
            def render(template):
                return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                     add_generation_prompt=cue)

            assert render(plain) == render(marked)


def test_a_template_without_generation_markers_is_a_clear_error(tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    shutil.copytree(lm_folder(), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}" \
                              "{% if add_generation_prompt %}<assistant>{% endif %}"
    tokenizer.save_pretrained(folder)
    with pytest.raises(SftError, match=r"no \{% generation %\} markers.*sft.chat_template: plain"):
        chat_trl.trl_finetune(folder, conversations(), SftParams(**{**TINY, "chat_template": "model"}), seed=SEED,
                              log=quiet, show_progress=False)
