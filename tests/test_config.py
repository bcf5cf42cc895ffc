import copy
import importlib
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

import lmforge.config
from lmforge.config import ConfigError, load_params, merge_overlay, validate_params
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
    # G2 replays eager steps as one CUDA graph (no compile: its wait would not pay back); G4 reads 512 tokens.
    assert params.pretrain.cuda_graph and not params.pretrain.compile and params.finetune.max_length == 512


# The last commit whose configs/gpu.yaml was a full params file: the recipe G2 and G4 were measured with.
FULL_GPU_CONFIG = "b6b852f6a7de3c36b1e09b154a2e32d1bf724435:configs/gpu.yaml"


def test_gpu_overlay_over_params_is_the_measured_gpu_recipe():
    # An overlay inherits every key it does not list: a change to params.yaml that would silently
    # change the GPU recipe fails here (list the old value in configs/gpu.yaml to keep the recipe).
    shown = subprocess.run(["git", "show", FULL_GPU_CONFIG], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode:
        pytest.skip(f"no git history here ({shown.stderr.strip()})")
    assert validate_params(gpu_params()) == validate_params(yaml.safe_load(shown.stdout))


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
    merged = merge_overlay(DEFAULT, {"pretrain": {"steps": 70}, "evaluate": {"splits": ["val"]},
                                     "clean": {"corpus": {"near_dedup": {"n_grams": 3}}}})
    assert merged["pretrain"]["steps"] == 70 and merged["pretrain"]["lr"] == DEFAULT["pretrain"]["lr"]
    assert merged["evaluate"]["splits"] == ["val"]  # a list is replaced, not extended
    assert merged["clean"]["corpus"]["near_dedup"] == {"n_grams": 3}  # null takes the mapping whole
    assert DEFAULT["pretrain"]["steps"] != 70  # the base is not changed
    validate_params(merged)


@pytest.mark.parametrize("overlay, dotted", [
    ({"pretrain": {"stpes": 3}}, "pretrain.stpes"),
    ({"pretrian": {"steps": 3}}, "pretrian"),
    ({"register": {"lm": {"gate": {"metrc": "loss"}}}}, "register.lm.gate.metrc"),
])
def test_merge_overlay_rejects_a_key_params_has_no_place_for(overlay, dotted):
    with pytest.raises(ConfigError, match=f"'{dotted}'"):
        merge_overlay(DEFAULT, overlay)


def test_merge_overlay_accepts_schema_fields_and_free_form_keys():
    # Fields params.yaml leaves to their default, and new keys of free-form mappings, have a place.
    merged = merge_overlay(DEFAULT, {"finetune": {"pad_multiple": 16},
                                     "data_engine": {"slurm": {"sbatch_args": {"account": "lm"}}},
                                     "tune": {"space": {"epochs": {"type": "int", "low": 1, "high": 3}}}})
    params = validate_params(merged)
    assert params.finetune.pad_multiple == 16 and params.data_engine.slurm.sbatch_args == {"account": "lm"}
    assert set(params.tune.space) == {*DEFAULT["tune"]["space"], "epochs"}


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


@pytest.mark.parametrize("overlay", ["pretrain:\n  stpes: 3\n", "pretrain:\n  steps: -3\n", "- a list\n"])
def test_params_task_leaves_the_file_alone_on_a_bad_overlay(tmp_path: Path, overlay: str):
    from tasks.params import apply_overlay

    target, bad = tmp_path / "params.yaml", tmp_path / "bad.yaml"
    target.write_text((ROOT / "params.yaml").read_text())
    bad.write_text(overlay)
    with pytest.raises(ConfigError):
        apply_overlay(target, bad)
    assert target.read_text() == (ROOT / "params.yaml").read_text()


def test_every_section_forbids_unknown_keys():
    sections = [value for value in vars(lmforge.config).values()
                if isinstance(value, type) and issubclass(value, BaseModel) and value is not BaseModel]
    nested = [inner for section in sections for inner in vars(section).values()
              if isinstance(inner, type) and issubclass(inner, BaseModel)]
    for section in sections + nested:
        assert section.model_config.get("extra") == "forbid", section.__name__


USER_ERRORS = [
    "lmforge.data.documents.CorpusFormatError", "lmforge.data.cleaning.CleanError",
    "lmforge.data.sources.SourceError", "lmforge.data.splitting.SplitError",
    "lmforge.data.tokenization.TokenFileError", "lmforge.config.ConfigError",
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
    target.write_text((ROOT / "params.yaml").read_text() + "pretrain:\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"'pretrain' appears twice(.|\n)*params.yaml\", line"):
        load_params(target)
