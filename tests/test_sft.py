"""Chat fine-tuning: the sft stage through `dvc repro` in a real DVC project, a chat model that
answers a list of messages through transformers' pipeline, LoRA and full runs, and a run killed
with SIGKILL that resumes to the same bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from lmforge.config.sft import SftParams
from lmforge.training.chat_tuning import (ADAPTER_FOLDER, chat_finetune, conversation_loss, save_chat_model,
                                          take)
from tests.conftest import ROOT, run, write_params
from tests.tiny_models import lm_folder

SEED = 7
TINY = {"max_length": 64, "batch_size": 4, "eval_batch_size": 8, "learning_rate": 0.01, "warmup_ratio": 0.1,
        "max_steps": 12, "eval_steps": 4, "save_steps": 3, "logging_steps": 2, "device": "cpu",
        "max_eval_conversations": 8, "sample_tokens": 6}


def talk(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Add."}, {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]


def conversations() -> dict[str, list]:
    every = [talk(i) for i in range(60)]
    return {"train": every[:40], "val": every[40:50], "test": every[50:]}


def quiet(_message: str) -> None:
    pass


@pytest.mark.slow
def test_dvc_repro_sft_writes_a_chat_model_that_answers_messages_through_a_pipeline(dvc_repo, sources):
    from transformers import pipeline

    write_params(dvc_repo, sources, **{f"sft.{k}": v for k, v in TINY.items()},
                 **{"sft.base_model": str(lm_folder()), "sft.sample_prompts": ["What is 3 plus 3?"], "sft.num_train_epochs": 2,
                    "sft.benchmarks": [{"name": "copa", "limit": 6}], "sft.benchmark_batch_size": 8})
    done = run(["dvc", "repro", "sft"], dvc_repo)
    assert "Running stage 'sft'" in done.stdout and "split@chat" in done.stdout

    chat = dvc_repo / "models/chat"
    assert (chat / ADAPTER_FOLDER / "adapter_config.json").exists()  # LoRA's adapters on their own, beside the merged model
    answer = pipeline("text-generation", model=str(chat), device="cpu")(
        [{"role": "user", "content": "What is 3 plus 3?"}], max_new_tokens=5, do_sample=False)
    reply = answer[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)

    metrics = json.loads((dvc_repo / "reports/sft/metrics.json").read_text())
    for split in ("val", "test"):
        assert metrics["base"][split]["target_tokens"] == metrics[split]["target_tokens"] > 0  # the same tokens scored
        assert metrics[split]["loss"] < metrics["base"][split]["loss"]  # the untrained base learns the replies
        assert metrics["vs_base"][split] == pytest.approx(metrics["base"][split]["loss"] - metrics[split]["loss"], abs=1e-5)
    history = pd.read_csv(dvc_repo / "reports/sft/history.csv")
    assert history["step"].tolist() == [4, 8, 12] and history["val_loss"].notna().all()
    # the base and the chat model on the same benchmark documents, the change in points beside
    bench = json.loads((dvc_repo / "reports/sft/benchmarks.json").read_text())["tasks"]["copa"]
    assert bench["base"]["examples"] == bench["chat"]["examples"] == 6
    for metric, points in bench["change_points"].items():
        assert points == pytest.approx(100 * (bench["chat"][metric] - bench["base"][metric]), abs=0.01)
    samples = (dvc_repo / "reports/sft/samples.md").read_text()
    assert "## What is 3 plus 3?" in samples and "**base:**" in samples and "**chat:**" in samples

    again = run(["dvc", "repro", "sft"], dvc_repo)
    assert "Running stage 'sft'" not in again.stdout  # cached


def test_full_fine_tuning_learns_the_replies_and_saves_a_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = SftParams(**{**TINY, "method": "full", "learning_rate": 0.003})
    result = chat_finetune(lm_folder(), conversations(), params, seed=SEED, log=quiet, show_progress=False)
    assert result.test["loss"] < result.base["test"]["loss"] - 0.5
    assert result.stats["trainable_parameters"] == sum(p.numel() for p in result.model.parameters())
    folder = save_chat_model(result, tmp_path / "chat")
    assert not (folder / ADAPTER_FOLDER).exists()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template  # the template it was trained with travels with it
    again = conversation_loss(model, tokenizer, take(conversations()["test"], 8, SEED), max_length=64)
    assert again["loss"] == pytest.approx(result.test["loss"], rel=1e-5)  # the saved folder scores as trained


def test_the_loss_counts_only_the_assistants_tokens_whatever_the_packing():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(lm_folder()), AutoTokenizer.from_pretrained(lm_folder())
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                              "{% if add_generation_prompt %}assistant:{% endif %}"
    convs = conversations()["val"]
    packed = conversation_loss(model, tokenizer, convs, max_length=64, batch_size=2)
    alone = [conversation_loss(model, tokenizer, [c], max_length=64) for c in convs]
    assert packed["target_tokens"] == sum(a["target_tokens"] for a in alone)
    mean = sum(a["loss"] * a["target_tokens"] for a in alone) / packed["target_tokens"]
    assert packed["loss"] == pytest.approx(mean, rel=1e-5)
    # the system and user turns are no targets: a longer user message leaves the target count as it is
    longer = [[m if m["role"] != "user" else {**m, "content": m["content"] + " Tell me."} for m in c] for c in convs]
    assert conversation_loss(model, tokenizer, longer, max_length=256)["target_tokens"] == \
        conversation_loss(model, tokenizer, convs, max_length=256)["target_tokens"]


KILLED_RUN = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from lmforge.config.sft import SftParams
from {module} import {function} as finetune
folder, data, params, checkpoints = sys.argv[1], json.loads(open(sys.argv[2]).read()), json.loads(sys.argv[3]), sys.argv[4]
def die(step, values):
    if step == 8:
        os.kill(os.getpid(), signal.SIGKILL)
finetune(folder, data, SftParams(**params), seed=int(sys.argv[5]), checkpoint_dir=checkpoints,
         on_metrics=die, log=print, show_progress=False)
"""


def killed_at_step_8(engine: str, data: dict, settings: dict, tmp_path) -> subprocess.CompletedProcess:
    """An sft engine (module:function) training in a process of its own, SIGKILLed at step 8."""
    module, function = engine.split(":")
    (tmp_path / "data.json").write_text(json.dumps(data))
    script = KILLED_RUN.format(module=module, function=function)
    return subprocess.run([sys.executable, "-c", script, str(lm_folder()), str(tmp_path / "data.json"),
                           json.dumps(settings), str(tmp_path / "ckpt"), str(SEED)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_killed_with_sigkill_resumes_to_the_same_bits(tmp_path, method):
    data, settings = conversations(), {**TINY, "method": method, "learning_rate": 0.003}
    params = SftParams(**settings)
    straight = chat_finetune(lm_folder(), data, params, seed=SEED, log=quiet, show_progress=False)

    killed = killed_at_step_8("lmforge.training.chat_tuning:chat_finetune", data, settings, tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL at step 8, past the checkpoint of step 6

    resumed = chat_finetune(lm_folder(), data, params, seed=SEED, checkpoint_dir=tmp_path / "ckpt", log=quiet,
                            show_progress=False)
    assert resumed.stats["resumed_from_step"] == 6
    assert resumed.stats["steps"] == straight.stats["steps"] == 10  # one epoch: 40 conversations, 4 a step
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in straight.history]
    assert resumed.base == straight.base


def test_a_conversation_whose_reply_falls_past_max_length_is_left_out_and_counted():
    data = conversations()
    data["train"] = data["train"] + [[{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]]
    result = chat_finetune(lm_folder(), data, SftParams(**{**TINY, "max_steps": 1}), seed=SEED, log=quiet,
                           show_progress=False)
    assert result.stats["dropped_conversations"] == {"train": 1, "val": 0}
    assert result.stats["train_conversations"] == 40


def test_an_unknown_base_model_is_named_by_the_key_that_asked_for_it(tmp_path):
    from lmforge.training.base_models import BaseModelError, resolve_base_model

    with pytest.raises(BaseModelError, match=r"^sft\.base_model: 'nope' is neither a known model"):
        resolve_base_model("nope", tmp_path, key="sft.base_model")
