import copy
import importlib
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

import lmforge.config
from lmforge.config import ConfigError, load_params, parse_yaml, validate_params
from lmforge.config.overrides import apply_overrides, merge_overlay, parse_override
from lmforge.config.tune import TuneParams
from lmforge.errors import UserError
from tests.conftest import ROOT, run

DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(dotted: str, value) -> dict:
    params = copy.deepcopy(DEFAULT)
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return params


def test_default_params_validate():
    params = load_params(ROOT / "params.yaml")
    assert params.clean["task"].labels == {"0": "negative", "1": "positive"}
    assert params.tokenize.kind == "bpe"


@pytest.mark.parametrize(
    "dotted, value, expected",
    [
        ("clean.task.max_chars", "lots", "clean.task.max_chars"),  # wrong type
        ("split.corpus.val", 1.5, "split.corpus.val"),  # out of range
        ("split.task.colour", "blue", "split.task.colour"),  # unknown key
        ("tokenize.kind", "wordpiece", "tokenize.kind"),  # bad choice
        ("sources.corpus.sha256", "abc", "sources.corpus.sha256"),
        ("sources.task.uri", "ftp://example.invalid/x.csv", "sources.task.uri"),
        ("clean.corpus.min_chars", 10**9, "clean.corpus"),  # min above max
        ("split.task.test", 0.95, "split.task"),  # nothing left to train on
    ],
)
def test_bad_values_name_the_key(dotted, value, expected):
    with pytest.raises(ConfigError) as err:
        validate_params(with_change(dotted, value))
    assert expected in str(err.value)


def test_unknown_top_level_section_is_rejected():
    params = copy.deepcopy(DEFAULT)
    params["pretrian"] = {}
    with pytest.raises(ConfigError, match="pretrian"):
        validate_params(params)


def test_stage_stops_before_work_on_a_bad_config(tmp_path: Path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_change("split.task.val", -0.2)))
    result = run(["python", "-m", "tasks.split", "task"], tmp_path, check=False)
    assert result.returncode == 2
    assert "split.task.val" in result.stderr
    assert not (tmp_path / "data").exists()


def test_missing_params_file_is_explained(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def gpu_params() -> dict:
    """params.yaml with configs/gpu.yaml (an overlay of the keys it changes) merged over it."""
    return merge_overlay(DEFAULT, yaml.safe_load((ROOT / "configs/gpu.yaml").read_text()))


def test_the_documented_gpu_config_validates():
    params = validate_params(gpu_params())
    assert params.tokenize.kind == "char" and params.split["corpus"].mode == "contiguous"
    # G2 replays eager steps as one CUDA graph (no compile: its wait would not pay back); G4 reads 512 tokens
    # with SmolLM2, compiled on a GPU (auto: each block compiled, 2.3x the Trainer's samples/s).
    assert params.pretrain.cuda_graph and not params.pretrain.compile and params.finetune.max_length == 512
    assert params.finetune.base_model == "smollm2" and params.finetune.compile == "auto"


# The last commit whose configs/gpu.yaml was a full params file: the recipe G2 and G4 were measured with.
FULL_GPU_CONFIG = "b6b852f6a7de3c36b1e09b154a2e32d1bf724435:configs/gpu.yaml"


# What the recipe changed on purpose since then: G2 moved to Muon (bench/results/2026-11-30-h200x2-g2-sweep.json),
# G4 to SmolLM2-135M (bench/results/2026-11-30-h200x2-g4-smollm2.json), compiled as before
# (bench/results/2026-12-01-h200-g4-smollm2-compiled.json).
CHANGED_SINCE = {"pretrain": {"optimizer": "muon", "muon_learning_rate": 0.004, "dropout": 0.1, "max_steps": 2000,
                              "save_steps": 1000},
                 "finetune": {"base_model": "smollm2", "num_train_epochs": 2, "learning_rate": 3.0e-5}}


def test_gpu_overlay_over_params_is_the_measured_gpu_recipe():
    # An overlay inherits every key it does not list: a change to params.yaml that would silently
    # change the GPU recipe fails here (list the old value in configs/gpu.yaml to keep the recipe).
    shown = subprocess.run(["git", "show", FULL_GPU_CONFIG], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode:
        pytest.skip(f"no git history here ({shown.stderr.strip()})")
    # tune is no part of the recipe (G4 sets finetune.use_tuned: false): its CPU sizing may move;
    # nor is the chat dataset, read only when `datasets` lists it.
    then = merge_overlay(with_new_names(yaml.safe_load(shown.stdout)), CHANGED_SINCE)
    now, then = validate_params(gpu_params()), validate_params(then)
    # nor is chat fine-tuning (sft), added after the recipe was measured, nor the benchmarks evaluate
    # scores the trained model on (they change no training).
    outside = {"tune": True, "sources": {"chat"}, "clean": {"chat"}, "split": {"chat"}, "sft": True, "datasets": True,
               "evaluate": {"benchmarks", "benchmark_batch_size"}}
    assert now.model_dump(exclude=outside) == then.model_dump(exclude=outside)
    assert set(then.datasets) <= set(now.datasets)
    assert not now.finetune.use_tuned


def with_new_names(params: dict) -> dict:
    """A params tree written before the rename to TrainingArguments' names, with the new names."""
    for old, new in lmforge.config.RENAMED_KEYS.items():
        (section, old_knob), new_knob = old.split("."), new.split(".")[1]
        if old_knob in params.get(section, {}):
            params[section][new_knob] = params[section].pop(old_knob)
    return params


def test_overlay_lists_only_changes():
    # A key the overlay sets to params.yaml's own value is noise that hides the real changes.
    def same(base, overlay, path=()):
        for key, value in overlay.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                yield from same(base[key], value, (*path, key))
            elif key in base and base[key] == value:
                yield ".".join(map(str, (*path, key)))

    assert list(same(DEFAULT, yaml.safe_load((ROOT / "configs/gpu.yaml").read_text()))) == []


def test_merge_overlay_merges_mappings_and_replaces_the_rest():
    merged = merge_overlay(DEFAULT, {"pretrain": {"max_steps": 70}, "evaluate": {"splits": ["val"]},
                                     "clean": {"corpus": {"near_dedup": {"n_grams": 3}}}})
    assert merged["pretrain"]["max_steps"] == 70
    assert merged["pretrain"]["learning_rate"] == DEFAULT["pretrain"]["learning_rate"]
    assert merged["evaluate"]["splits"] == ["val"]  # a list is replaced, not extended
    assert merged["clean"]["corpus"]["near_dedup"] == {"n_grams": 3}  # null takes the mapping whole
    assert DEFAULT["pretrain"]["max_steps"] != 70  # the base is not changed
    validate_params(merged)


@pytest.mark.parametrize("overlay, dotted", [
    ({"pretrain": {"stpes": 3}}, "pretrain.stpes"),
    ({"pretrian": {"max_steps": 3}}, "pretrian"),
    ({"register": {"lm": {"gate": {"metrc": "loss"}}}}, "register.lm.gate.metrc"),
])
def test_merge_overlay_rejects_a_key_params_has_no_place_for(overlay, dotted):
    with pytest.raises(ConfigError, match=f"'{dotted}'"):
        merge_overlay(DEFAULT, overlay)


def test_merge_overlay_accepts_schema_fields_and_free_form_keys():
    # Fields params.yaml leaves to their default, and new keys of free-form mappings, have a place.
    merged = merge_overlay(DEFAULT, {"finetune": {"pad_multiple": 16},
                                     "data_engine": {"slurm": {"sbatch_args": {"account": "lm"}}},
                                     "tune": {"space": {"num_train_epochs": {"type": "int", "low": 1, "high": 3}}}})
    params = validate_params(merged)
    assert params.finetune.pad_multiple == 16 and params.data_engine.slurm.sbatch_args == {"account": "lm"}
    assert set(params.tune.space) == {*DEFAULT["tune"]["space"], "num_train_epochs"}


def test_params_task_merges_the_overlay_keeping_comments(tmp_path: Path):
    from tasks.params import apply_overlay

    target = tmp_path / "params.yaml"
    target.write_text((ROOT / "params.yaml").read_text())
    changes = apply_overlay(target, ROOT / "configs/gpu.yaml")
    assert "tokenize.kind: 'bpe' -> 'char'" in changes
    assert load_params(target) == validate_params(gpu_params())
    text = target.read_text()
    assert "kind: char                    # char: one token per character" in text  # comments and columns kept
    assert "n_kv_head: null" in text
    assert apply_overlay(target, ROOT / "configs/gpu.yaml") == []  # applying it again changes nothing


@pytest.mark.parametrize("overlay", ["pretrain:\n  stpes: 3\n", "pretrain:\n  max_steps: -3\n", "- a list\n",
                                     "pretrain:\n  lr: 0.1\n"])
def test_params_task_leaves_the_file_alone_on_a_bad_overlay(tmp_path: Path, overlay: str):
    from tasks.params import apply_overlay

    target, bad = tmp_path / "params.yaml", tmp_path / "bad.yaml"
    target.write_text((ROOT / "params.yaml").read_text())
    bad.write_text(overlay)
    with pytest.raises(ConfigError):
        apply_overlay(target, bad)
    assert target.read_text() == (ROOT / "params.yaml").read_text()


def test_every_section_forbids_unknown_keys():
    import importlib
    import pkgutil

    modules = [importlib.import_module(f"lmforge.config.{m.name}") for m in pkgutil.iter_modules(lmforge.config.__path__)]
    sections = [value for module in [lmforge.config, *modules] for value in vars(module).values()
                if isinstance(value, type) and issubclass(value, BaseModel) and value is not BaseModel]
    assert len({s.__name__ for s in sections}) >= 12  # every section's module was found
    nested = [inner for section in sections for inner in vars(section).values()
              if isinstance(inner, type) and issubclass(inner, BaseModel)]
    for section in sections + nested:
        assert section.model_config.get("extra") == "forbid", section.__name__


USER_ERRORS = [
    "lmforge.data.documents.CorpusFormatError", "lmforge.data.cleaning.CleanError",
    "lmforge.data.sources.SourceError", "lmforge.data.splitting.SplitError",
    "lmforge.data.token_shards.TokenFileError", "lmforge.config.ConfigError",
    "lmforge.training.model.ModelConfigError", "lmforge.training.batches.DataError",
    "lmforge.training.checkpoint.CheckpointError", "lmforge.training.finetuning.FinetuneError",
    "lmforge.registry.registration.RegistryError", "lmforge.training.base_models.BaseModelError",
    "lmforge.training.tuning.SpaceError",
]


@pytest.mark.parametrize("dotted", USER_ERRORS)
def test_user_errors_share_one_base(dotted: str):
    # A stage prints a UserError's message alone and exits 2 (never retried); anything else is a bug.
    module, _, name = dotted.rpartition(".")
    assert issubclass(getattr(importlib.import_module(module), name), UserError)


def test_a_key_written_twice_is_an_error_not_a_silent_drop(tmp_path: Path):
    # PyYAML keeps the last of two equal keys; the first section's settings would vanish unseen.
    target = tmp_path / "params.yaml"
    target.write_text((ROOT / "params.yaml").read_text() + "pretrain:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"'pretrain' appears twice(.|\n)*params.yaml\", line"):
        load_params(target)


def test_params_read_as_yaml_1_2_as_dvc_writes_them(tmp_path: Path):
    # `dvc exp run -S` rewrites params.yaml with YAML 1.2 rules, which leave 4:00:00 unquoted;
    # YAML 1.1 would read it as 14400 seconds and yes/no as booleans.
    from ruamel.yaml import YAML

    yaml12 = YAML()
    tree = yaml12.load((ROOT / "params.yaml").read_text())
    target = tmp_path / "params.yaml"
    with open(target, "w") as fh:
        yaml12.dump(tree, fh)
    assert "time: 4:00:00" in target.read_text()
    assert load_params(target).data_engine.slurm.time == "4:00:00"
    assert parse_yaml("a: yes\nb: 1e-3\nc: 0x10\nd: .inf\ne: False", "x") == {
        "a": "yes", "b": 0.001, "c": 16, "d": float("inf"), "e": False}
    assert parse_override("data_engine.slurm.time=4:00:00") == ("data_engine.slurm.time", "4:00:00")


# --- knobs renamed to TrainingArguments' names: the old name stops with the new one -------------

HINT = "(the name transformers' TrainingArguments uses)"


def with_old_name(old: str, new: str) -> dict:
    """params.yaml with the knob `new` written under its old name `old` (both dotted paths)."""
    params = copy.deepcopy(DEFAULT)
    (section, old_knob), new_knob = old.split("."), new.split(".")[1]
    default = getattr(getattr(validate_params(DEFAULT), section), new_knob)  # not every knob is in params.yaml
    params[section][old_knob] = params[section].pop(new_knob, default)
    return params


@pytest.mark.parametrize("old, new", sorted(lmforge.config.RENAMED_KEYS.items()))
def test_a_params_file_with_an_old_name_stops_with_the_new_one(tmp_path: Path, old: str, new: str):
    target = tmp_path / "params.yaml"
    target.write_text(yaml.safe_dump(with_old_name(old, new), sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_params(target)
    assert str(err.value) == f"{target}: {old} was renamed {new} {HINT}"


def test_every_old_name_in_a_file_is_named_at_once():
    params = with_old_name("finetune.epochs", "finetune.num_train_epochs")
    params["pretrain"]["lr"] = params["pretrain"].pop("learning_rate")
    with pytest.raises(ConfigError) as err:
        validate_params(params)
    assert str(err.value).splitlines() == [f"params: pretrain.lr was renamed pretrain.learning_rate {HINT}",
                                           f"params: finetune.epochs was renamed finetune.num_train_epochs {HINT}"]


def test_an_overlay_with_an_old_name_stops_with_the_new_one():
    with pytest.raises(ConfigError, match=r"^overlay: finetune\.epochs was renamed finetune\.num_train_epochs \("):
        merge_overlay(DEFAULT, {"finetune": {"epochs": 3}})
    with pytest.raises(ConfigError, match=r"^overlay: pretrain\.eval_every was renamed pretrain\.eval_steps \("):
        merge_overlay(DEFAULT, {"pretrain": {"eval_every": 50}})


def test_an_override_with_an_old_name_stops_with_the_new_one(tmp_path: Path):
    from flows.pipeline import check_overrides

    with pytest.raises(ConfigError) as err:
        apply_overrides(copy.deepcopy(DEFAULT), ["pretrain.steps=50"])
    assert str(err.value) == f"override 'pretrain.steps=50': pretrain.steps was renamed pretrain.max_steps {HINT}"
    # The new names are the ones that are set.
    tree = apply_overrides(copy.deepcopy(DEFAULT), ["pretrain.max_steps=50", "finetune.num_train_epochs=2"])
    params = validate_params(tree)
    assert params.pretrain.max_steps == 50 and params.finetune.num_train_epochs == 2
    # The flow's -S goes through the same check before DVC runs anything.
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(ConfigError, match=r"finetune\.checkpoint_every was renamed finetune\.save_steps"):
        check_overrides(tmp_path, ["finetune.checkpoint_every=5"])
    check_overrides(tmp_path, ["finetune.save_steps=5", "pretrain.logging_steps=5"])


def test_an_override_into_a_file_with_an_old_name_names_the_file_s_key():
    # An old params.yaml: the -S key is right, the file is not; the message says which to fix.
    with pytest.raises(ConfigError, match=r"^params\.yaml: pretrain\.grad_clip was renamed pretrain\.max_grad_norm"):
        apply_overrides(with_old_name("pretrain.grad_clip", "pretrain.max_grad_norm"), ["pretrain.max_steps=5"],
                        where="params.yaml")


def test_a_tune_space_key_with_an_old_name_stops_with_the_new_one():
    params = copy.deepcopy(DEFAULT)
    params["tune"]["space"]["epochs"] = {"type": "int", "low": 1, "high": 3}
    with pytest.raises(ConfigError, match=r"^params: tune\.space\.epochs was renamed tune\.space\.num_train_epochs \("):
        validate_params(params)
    with pytest.raises(ValueError, match=r"tune\.space\.epochs was renamed tune\.space\.num_train_epochs"):
        TuneParams.model_validate({"space": params["tune"]["space"]})


def test_tuned_overrides_with_an_old_name_stop_with_the_new_one(tmp_path: Path):
    # reports/tune/best.yaml from a study run before the rename, merged into finetune by the finetune stage.
    from lmforge.training.tuned import read_best_values, with_tuned_values

    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"params": {"learning_rate": 1e-4, "epochs": 2}}))
    section = validate_params(DEFAULT).finetune
    with pytest.raises(ConfigError) as err:
        with_tuned_values(section, read_best_values(best), str(best))
    assert f"finetune.epochs was renamed finetune.num_train_epochs {HINT}" in str(err.value)
    assert str(best) in str(err.value)
    tuned = with_tuned_values(section, {"learning_rate": 1e-4, "num_train_epochs": 2}, str(best))
    assert tuned.num_train_epochs == 2 and tuned.learning_rate == 1e-4


def test_the_new_names_load():
    params = load_params(ROOT / "params.yaml")
    p, f = params.pretrain, params.finetune
    assert (p.learning_rate, p.max_steps, p.max_grad_norm, p.gradient_accumulation_steps) == (
        DEFAULT["pretrain"]["learning_rate"], DEFAULT["pretrain"]["max_steps"], DEFAULT["pretrain"]["max_grad_norm"],
        DEFAULT["pretrain"]["gradient_accumulation_steps"])
    assert (p.adam_beta1, p.adam_beta2, p.eval_steps, p.save_steps, p.logging_steps) == (
        DEFAULT["pretrain"]["adam_beta1"], DEFAULT["pretrain"]["adam_beta2"], DEFAULT["pretrain"]["eval_steps"],
        DEFAULT["pretrain"]["save_steps"], DEFAULT["pretrain"]["logging_steps"])
    assert (f.num_train_epochs, f.save_steps) == (DEFAULT["finetune"]["num_train_epochs"], DEFAULT["finetune"]["save_steps"])
    # Every new name is a field of its section: the table names no knob that does not exist.
    for new in lmforge.config.RENAMED_KEYS.values():
        section, knob = new.split(".")
        assert knob in type(getattr(params, section)).model_fields, new


def evaluate_with(**knobs) -> dict:
    params = copy.deepcopy(DEFAULT)
    params["evaluate"].update(knobs)
    return params


def test_max_memory_without_device_map_auto_is_refused_naming_both_knobs():
    with pytest.raises(ConfigError) as err:
        validate_params(evaluate_with(max_memory={"cpu": "8GiB"}))
    message = str(err.value)
    assert "evaluate" in message and "max_memory" in message and "device_map: auto" in message, message
    # The same caps with device_map auto load; YAML's int key for a GPU is read as its index.
    caps = validate_params(evaluate_with(device_map="auto", max_memory={0: "60GiB", "cpu": "1.5GB"})).evaluate
    assert caps.max_memory == {"0": "60GiB", "cpu": "1.5GB"}


@pytest.mark.parametrize("knobs, expected", [
    ({"max_memory": {"cpu": "1TB"}}, "no size accelerate reads"),  # accelerate has no TB
    ({"max_memory": {"cpu": "1000"}}, "no size accelerate reads"),  # a bare number in a string
    ({"max_memory": {"gpu0": "8GiB"}}, "is no device"),
    ({"max_memory": {"disk": "8GiB"}}, "is no device"),  # accelerate never caps the disk
    ({"device": "cpu", "max_memory": {"0": "8GiB"}}, "device cpu keeps the GPUs out"),
    ({"device_map": "balanced"}, "evaluate.device_map"),
])
def test_bad_device_map_knobs_are_refused(knobs, expected):
    with pytest.raises(ConfigError, match=expected):
        validate_params(evaluate_with(**{"device_map": "auto", **knobs}))


def test_a_base_model_needs_its_own_tokenizer_named_in_tokenize():
    params = copy.deepcopy(DEFAULT)
    params["pretrain"]["init_from"] = "smollm2"
    with pytest.raises(ConfigError, match="set tokenize.kind: pretrained and tokenize.model: 'smollm2'"):
        validate_params(params)
    params["tokenize"].update(kind="pretrained", model="smollm2")
    assert validate_params(params).tokenize.model == "smollm2"
    params["tokenize"]["model"] = None
    with pytest.raises(ConfigError, match="tokenize: .*kind pretrained takes the tokenizer of `model`"):
        validate_params(params)
    params["tokenize"].update(kind="bpe", model="smollm2")
    with pytest.raises(ConfigError, match="model is read only with kind pretrained"):
        validate_params(params)
