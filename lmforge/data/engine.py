"""Run a data stage's shards on datatrove's executors: one task per shard, `workers` at a time.

Why datatrove (docs/data.md has the measurement): its executors run the same task list on this
machine (`LocalPipelineExecutor`, a process pool) or on a cluster (`SlurmPipelineExecutor`; Engine
below picks one), they skip tasks already completed in an earlier run of the same work folder (so a killed stage
resumes), and a task is a plain function of its rank. The number of tasks is fixed by the data
(one per shard), never by the number of workers, so the outputs are the same bytes whatever the
parallelism.

A shard task is `ShardTask(function, jobs)`: rank r calls `function(*jobs[r])`, which writes its
own outputs and returns a small JSON-able report, kept in the work folder as one JSON file per rank.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm


@dataclass
class ShardTask:
    """A datatrove pipeline step: rank r runs `function(*jobs[r])` and records its report."""

    function: Callable[..., dict]
    jobs: Sequence[tuple]
    work_dir: str

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        running = Path(self.work_dir) / "running" / f"{rank:05d}.pid"
        running.parent.mkdir(parents=True, exist_ok=True)
        running.write_text(str(os.getpid()))
        report = self.function(*self.jobs[rank])
        report["peak_rss_mb"] = peak_rss_mb()
        path = Path(self.work_dir) / "reports" / f"{rank:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        os.replace(tmp, path)
        running.unlink()
        return None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_child_rss_mb() -> float:
    """The largest peak resident memory of any finished child process, in MB."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class Engine:
    """Where shard tasks run. local: a process pool of `workers` on this machine. slurm: one Slurm
    array job per step, `workers` array tasks at a time, with `slurm` holding the arguments of
    datatrove's SlurmPipelineExecutor (partition, time, cpus_per_task, mem_per_cpu_gb, venv_path,
    sbatch_args, ...); every path must then be on a filesystem the nodes share."""

    workers: int  # no default here: the `workers` setting's (null: every core) is resolved by the caller
    executor: str = "local"
    slurm: dict = field(default_factory=dict)


def run_shards(function: Callable[..., dict], jobs: Sequence[tuple], work_dir: Path | str, *, engine: Engine,
               desc: str, bytes_key: str = "bytes_in", docs_key: str = "rows_in", progress: bool = True) -> list[dict]:
    """Run `function(*job)` for every job as a datatrove task and return the tasks' reports in job
    order. Tasks completed by an earlier run of `work_dir` are skipped (their reports say
    `"resumed": true`)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    marks = work_dir / "datatrove" / "completions"
    done_before = [int(p.name) for p in marks.iterdir()] if marks.is_dir() else []
    if jobs:
        step = ShardTask(function, list(jobs), str(work_dir))
        local = engine.executor == "local" and engine.workers > 1
        watch = _DeadWorkerWatch(work_dir / "running", desc) if local else nullcontext()
        with _ProgressWatcher(work_dir / "reports", len(jobs), desc, bytes_key, docs_key, progress), watch:
            run_steps([step], len(jobs), work_dir / "datatrove", engine, job_name=desc)
    reports = [json.loads((work_dir / "reports" / f"{rank:05d}.json").read_text()) for rank in range(len(jobs))]
    for rank in done_before:
        reports[rank]["resumed"] = True
    return reports


def run_steps(pipeline: list, tasks: int, logging_dir: Path, engine: Engine, job_name: str = "lmforge") -> None:
    """Run a datatrove pipeline over `tasks` ranks on the engine, and return when every rank is done."""
    # datatrove logs through loguru, whose default level comes from this variable when loguru is
    # first imported: warnings and errors only on the console, the progress bars say the rest.
    os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    if engine.executor == "slurm":
        _run_on_slurm(pipeline, tasks, logging_dir, engine, job_name)
        return
    # Forked workers encode on one thread each; saying so before the fork also keeps `tokenizers`
    # from warning, in every worker, that its thread pool did not survive the fork.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _release_freed_memory()
    _quiet_executor_class()(
        pipeline=pipeline,
        tasks=tasks,
        workers=max(1, min(engine.workers, tasks)),
        logging_dir=str(logging_dir),
        # fork: the workers start at once and inherit the imported modules (Linux; the default
        # forkserver re-imports them in each worker, about a second each).
        start_method="fork",
    ).run()


def _release_freed_memory() -> None:
    """Hand memory this process freed (a tokenizer's training, Arrow buffers) back to the system
    before forking: a forked worker's resident size starts at its parent's."""
    import ctypes

    try:
        import pyarrow

        pyarrow.default_memory_pool().release_unused()
    except ImportError:
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def slurm_executor(pipeline: list, tasks: int, logging_dir: Path, engine: Engine, job_name: str):
    """datatrove's SlurmPipelineExecutor for the steps (nothing is submitted until its run())."""
    from datatrove.executor.slurm import SlurmPipelineExecutor

    options = {"time": "4:00:00", "cpus_per_task": 1, "mem_per_cpu_gb": 4, **engine.slurm}
    if options.get("venv_path"):  # datatrove writes `source <venv_path>`: the activate script, not the folder
        options["venv_path"] = str(Path(options["venv_path"]) / "bin" / "activate")
    # The name goes unquoted into `#SBATCH --job-name=...`: a space ("tokenizer sample") makes sbatch refuse the script.
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", job_name)
    return SlurmPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=engine.workers, job_name=f"lmforge-{name}",
                                 logging_dir=str(logging_dir), slurm_logs_folder=str(Path(logging_dir) / "slurm"),
                                 **options)


def _run_on_slurm(pipeline: list, tasks: int, logging_dir: Path, engine: Engine, job_name: str) -> None:
    """Submit the steps as a Slurm array job through datatrove, then wait for every rank's
    completion mark; a job that leaves the queue with ranks unfinished is an error."""
    import subprocess

    executor = slurm_executor(pipeline, tasks, logging_dir, engine, job_name)
    # datatrove also submits a job merging its stats.json (which we never read) once the array job
    # succeeds; when the array job fails or is cancelled, that job's dependency can never be met
    # and it would stay pending in the queue for good.
    executor.launch_merge_stats = _no_merge_stats
    executor.run()
    marks = Path(logging_dir) / "completions"

    def finished() -> int:
        return sum(1 for _ in marks.glob("*")) if marks.is_dir() else 0

    asked = time.monotonic()
    while finished() < tasks:
        # The marks are files, cheap to count: a step of a few shards (seconds) is seen done within
        # half a second. The queue is a query of slurmctld: asked every 10 s only.
        time.sleep(0.5)
        if time.monotonic() - asked < 10:
            continue
        asked = time.monotonic()
        queued = subprocess.run(["squeue", "-h", "-j", str(executor.job_id)], capture_output=True, text=True).stdout
        done = finished()
        if not queued.strip() and done < tasks:
            raise RuntimeError(f"Slurm job {executor.job_id} ended with {tasks - done} of {tasks} {job_name} tasks "
                               f"unfinished; see {logging_dir}/slurm and {logging_dir}/logs")


def _no_merge_stats() -> None:
    """Stands in for SlurmPipelineExecutor.launch_merge_stats (a module function: the executor is
    pickled for the nodes)."""


def _quiet_executor_class():
    """datatrove logs every task of its first worker at INFO on stderr; our progress bar says the
    same in one line, so every task logs as a non-first worker does (errors only). The full logs
    stay in the work folder's datatrove/logs/."""
    from datatrove.executor import LocalPipelineExecutor

    class QuietExecutor(LocalPipelineExecutor):
        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
            return super()._run_for_rank(rank, local_rank + 1, node_rank)

    return QuietExecutor


KILLED_EXIT = 137  # what a shell reports for a process killed by SIGKILL (128 + 9)


class _DeadWorkerWatch:
    """A pool worker killed from outside (the kernel's out-of-memory killer sends SIGKILL) leaves
    its task without a result, and the pool would wait for it forever. Each task notes its
    process id in `running/` until its report is written; a noted process that is gone while the
    run goes on for GRACE_S more (a pool closing after an error would have ended the run by then)
    was killed: say so, and exit as a killed process does, so the orchestrator does not retry."""

    GRACE_S = 3.0

    def __init__(self, running: Path, desc: str):
        self.running, self.desc = running, desc
        self._stop = threading.Event()

    def __enter__(self) -> _DeadWorkerWatch:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            if self._a_task_died() and not self._stop.wait(self.GRACE_S) and self._a_task_died():
                print(f"error: a {self.desc} worker was killed (most likely out of memory); lower the `workers` "
                      "setting to run fewer at once", file=sys.stderr, flush=True)
                _kill_children()
                os._exit(KILLED_EXIT)

    def _a_task_died(self) -> bool:
        for note in self.running.glob("*.pid") if self.running.is_dir() else []:
            try:
                pid = int(note.read_text())
                os.kill(pid, 0)  # a dead worker stays a zombie until the pool reaps it (at once)
                if _is_zombie(pid):
                    return True
            except ProcessLookupError:
                if note.exists():  # the task did not finish and remove its note
                    return True
            except (ValueError, OSError):
                continue
        return False


def _kill_children() -> None:
    """The pool's other workers and its manager would outlive us, holding our stdout and stderr."""
    import multiprocess

    for child in multiprocess.active_children():
        child.kill()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


class _ProgressWatcher:
    """A progress bar over finished shards, with documents/s and MB/s, fed by the reports the
    tasks write (so it works the same for in-process and pooled workers)."""

    def __init__(self, reports: Path, total: int, desc: str, bytes_key: str, docs_key: str, enabled: bool):
        self.reports, self.total, self.desc = reports, total, desc
        self.bytes_key, self.docs_key, self.enabled = bytes_key, docs_key, enabled
        self._stop = threading.Event()

    def __enter__(self) -> _ProgressWatcher:
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()

    def _watch(self) -> None:
        start, seen = time.perf_counter(), {}
        with tqdm(total=self.total, desc=self.desc, unit="shard", mininterval=1.0) as bar:
            while True:
                stopping = self._stop.wait(1.0)
                for path in sorted(self.reports.glob("*.json")) if self.reports.exists() else []:
                    if path.name not in seen:
                        try:
                            seen[path.name] = json.loads(path.read_text())
                        except ValueError:
                            continue
                        bar.update(1)
                elapsed = max(time.perf_counter() - start, 1e-9)
                mb = sum(r.get(self.bytes_key, 0) for r in seen.values()) / 1e6
                docs = sum(r.get(self.docs_key, 0) for r in seen.values())
                bar.set_postfix_str(f"{docs / elapsed:,.0f} docs/s, {mb / elapsed:.1f} MB/s", refresh=False)
                if stopping:
                    return
