import copy
from pathlib import Path

import pytest
import yaml

from lmforge.config import ConfigError, load_params, validate_params
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


def test_the_documented_gpu_config_validates():
    params = load_params(ROOT / "configs/gpu.yaml")
    assert params.tokenize.kind == "char" and params.split["corpus"].mode == "contiguous"
    # G2 replays eager steps as one CUDA graph (no compile: its wait would not pay back); G4 reads 512 tokens.
    assert params.pretrain.cuda_graph and not params.pretrain.compile and params.finetune.max_length == 512
