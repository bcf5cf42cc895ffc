"""The data graph through real `dvc repro` in a temp git + DVC project."""

import json
import re

import pandas as pd
import pytest

from tests.conftest import run, write_params

DATA_TARGETS = ["tokenize", "split@task"]


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.slow
def test_data_graph_builds_caches_and_reruns_only_what_changed(dvc_repo, sources):
    first = run(["dvc", "repro", *DATA_TARGETS], dvc_repo)
    assert stages_run(first.stdout) == {
        "ingest@corpus", "ingest@task", "clean@corpus", "clean@task", "split@corpus", "split@task", "tokenize"
    }
    meta = json.loads((dvc_repo / "data/tokens/meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] > 0 and meta["vocab_size"] <= 300
    task_train = pd.read_parquet(dvc_repo / "data/split/task/train.parquet")
    assert set(task_train.columns) >= {"text", "label"} and set(task_train["label"]) == {"negative", "positive"}

    second = run(["dvc", "repro", *DATA_TARGETS], dvc_repo)
    assert stages_run(second.stdout) == set()

    write_params(dvc_repo, sources, **{"split.task.val": 0.2})
    third = run(["dvc", "repro", *DATA_TARGETS], dvc_repo)
    assert stages_run(third.stdout) == {"split@task"}

    metrics = run(["dvc", "metrics", "show", "--json"], dvc_repo)
    assert "rows_quarantined" in metrics.stdout


@pytest.mark.slow
def test_a_bad_source_stops_the_graph_with_its_message(dvc_repo, sources):
    write_params(dvc_repo, sources, **{"sources.corpus.uri": f"file:{sources['corpus']}#nothing/*.txt"})
    result = run(["dvc", "repro", "tokenize"], dvc_repo, check=False)
    assert result.returncode != 0
    assert "no member matches 'nothing/*.txt'" in result.stderr + result.stdout
    assert not (dvc_repo / "data/tokens").exists()
