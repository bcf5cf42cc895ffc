"""G4 recipes side by side: which fine-tuning settings lift MiniLM's test accuracy over three seeds.

    python bench/g4_sweep.py --grid bench/g4_grid.yaml --data DIR --model DIR --gpus 0,1 --per-gpu 5 \
        --record bench/results/X.json

Each grid entry is a set of finetune settings over `--base` (a case of bench/finetune_g4.py); every entry
runs once per seed, as its own bench/finetune_g4.py process, several at a time per GPU. Runs that share a
GPU slow each other down, so this compares accuracies, not speeds: finetune_g4.py times the chosen
recipe alone, beside the Trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def start(entry: dict, seed: int, args, folder: Path, gpu: int) -> subprocess.Popen:
    folder.mkdir(parents=True)
    command = [sys.executable, str(ROOT / "bench" / "finetune_g4.py"), "--data", args.data, "--model", args.model,
               "--cases", args.base, "--seed", str(seed), "--out", str(folder), "--budget", "100000"]
    if args.limit:
        command += ["--limit", str(args.limit)]
    for key, value in entry.items():
        command += ["--set", f"{key}={value}"]
    log = (folder / "run.log").open("w")
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)},
                            stdout=log, stderr=subprocess.STDOUT)


EPOCH_LINE = re.compile(r"finetune: epoch (\d+) val accuracy ([0-9.]+)")


def outcome(entry: dict, seed: int, folder: Path, cut: bool = False) -> dict:
    rows = [json.loads(line) for line in (folder / "g4.jsonl").read_text().splitlines()] \
        if (folder / "g4.jsonl").exists() else []
    run = next((r for r in rows if r.get("case") not in (None, "facts")), None)
    if run is None or "test_accuracy" not in run:
        log = (folder / "run.log").read_text(errors="replace")
        # A run stopped at the budget still tells how far it got: its epochs' val accuracy.
        epochs = [{"epoch": int(e), "val_accuracy": float(a)} for e, a in EPOCH_LINE.findall(log)]
        return {"settings": entry, "seed": seed, "epochs": epochs,
                "failed": "stopped at the sweep's --budget" if cut else (run or {}).get("error") or log[-1500:]}
    return {"settings": entry, "seed": seed, "test_accuracy": run["test_accuracy"],
            "val_accuracy": run["val_accuracy"], "best_epoch": run["best_epoch"],
            "epochs": [{k: h.get(k) for k in ("epoch", "val_accuracy", "train_loss")} for h in run["history"]]}


def stop(running, pending) -> list[dict]:
    """Past the budget: the running runs stopped (with the epochs they finished), the pending ones unstarted."""
    out = []
    for entry, seed, folder, proc in running:
        proc.terminate()
        proc.wait()
        out.append(outcome(entry, seed, folder, cut=True))
        print(json.dumps(out[-1]), flush=True)
    return out + [{"settings": entry, "seed": seed, "failed": "not started: over the sweep's --budget"}
                  for _, entry, seed in pending]


def summary(results: list[dict]) -> list[dict]:
    """Per grid entry: test and val accuracy over its seeds."""
    rows: dict[str, dict] = {}
    for r in results:
        key = json.dumps(r["settings"], sort_keys=True)
        row = rows.setdefault(key, {"settings": r["settings"], "test": [], "val": [], "failed": 0})
        if "failed" in r:
            row["failed"] += 1
        else:
            row["test"].append(r["test_accuracy"])
            row["val"].append(r["val_accuracy"])
    for row in rows.values():
        row["test_mean"] = round(statistics.fmean(row["test"]), 4) if row["test"] else None
        row["val_mean"] = round(statistics.fmean(row["val"]), 4) if row["val"] else None
    return list(rows.values())


def write_record(path: Path, args, results: list[dict], wall_s: float) -> None:
    record = {"command": " ".join(sys.argv), "base_case": args.base, "wall_s": round(wall_s, 1),
              "summary": summary(results), "results": results}
    path.write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="YAML list of finetune settings, one entry a recipe")
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--base", default="headtail-16-5e-5-x3", help="the finetune_g4.py case the settings override")
    parser.add_argument("--seeds", default="1337,2,3")
    parser.add_argument("--gpus", default="0", help="GPU indices to spread the runs over, comma-separated")
    parser.add_argument("--per-gpu", type=int, default=4, help="runs at a time on each GPU")
    parser.add_argument("--limit", type=int, default=None, help="train rows per run (smoke tests)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds; past it the running runs stop (their finished epochs are kept) and no more start")
    parser.add_argument("--record", default=None)
    args = parser.parse_args()

    grid = yaml.safe_load(Path(args.grid).read_text())
    work = Path(tempfile.mkdtemp(prefix="lmforge-g4-sweep-"))
    pending = [(index, entry, int(seed)) for index, entry in enumerate(grid) for seed in args.seeds.split(",")]
    slots = [int(g) for g in args.gpus.split(",")] * args.per_gpu
    running: dict[int, tuple] = {}
    results: list[dict] = []
    started = time.perf_counter()
    while pending or running:
        if args.budget and time.perf_counter() - started > args.budget:
            results += stop(running.values(), pending)
            break
        for slot, gpu in enumerate(slots):
            if slot not in running and pending:
                index, entry, seed = pending.pop(0)
                folder = work / f"entry-{index:02d}-seed-{seed}"
                running[slot] = (entry, seed, folder, start(entry, seed, args, folder, gpu))
        for slot, (entry, seed, folder, proc) in list(running.items()):
            if proc.poll() is not None:
                results.append(outcome(entry, seed, folder))
                print(json.dumps(results[-1]), flush=True)
                del running[slot]
                if args.record:  # after every run, so a call cut short keeps what finished
                    write_record(Path(args.record), args, results, time.perf_counter() - started)
        time.sleep(0.5)
    if args.record:
        write_record(Path(args.record), args, results, time.perf_counter() - started)
    table = summary(results)
    print("| settings | test accuracy by seed | test mean | val mean |\n|---|---|---:|---:|")
    for row in table:
        shown = ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "(base)"
        seeds = " / ".join(f"{a:.4f}" for a in row["test"]) + (f" ({row['failed']} failed)" if row["failed"] else "")
        print(f"| {shown} | {seeds} | {row['test_mean']} | {row['val_mean']} |")


if __name__ == "__main__":
    main()
