"""G2 recipes side by side: which schedule and optimizer reach val <= 1.294 in the fewest steps.

    python bench/g2_sweep.py --grid bench/g2_grid.yaml --per-gpu 4 --record bench/results/X.json

Each grid entry is a set of pretrain overrides over the configs/gpu.yaml recipe; every entry runs the
real pretrain stage on G2's char-level Shakespeare split (bench_gpu.py's), several at a time per
GPU. Runs that share a GPU slow each other down, so this compares losses, not times: the step
counts decide, and bench_gpu.py times the chosen recipe alone. The loss is the stage's, over
`--eval-batches` random val windows at the end (eval_steps is set to max_steps), which on G2's
460k val characters reads the whole split about twice.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_gpu  # noqa: E402  (its helpers: params, token data, the stage's environment)


def start(entry: dict, index: int, base: dict, tokens: Path, work: Path, gpu: int, eval_batches: int):
    folder = work / f"run-{index:02d}"
    folder.mkdir(parents=True)
    overrides = {**entry, "eval_steps": entry.get("max_steps", base["pretrain"]["max_steps"]),
                 "eval_batches": eval_batches, "save_steps": 100_000}
    params = bench_gpu.case_params(base, overrides)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = (folder / "pretrain.log").open("w")
    command = [sys.executable, "-m", "tasks.pretrain", "--params", str(folder / "params.yaml"), "--tokens", str(tokens),
               "--out", str(folder / "model"), "--checkpoints", str(folder / "checkpoints"),
               "--reports", str(folder / "reports")]
    proc = subprocess.Popen(command, cwd=ROOT, env=bench_gpu.stage_env(str(gpu)), stdout=log,
                            stderr=subprocess.STDOUT)
    return proc, folder


def result(entry: dict, folder: Path, code: int) -> dict:
    if code:
        return {"overrides": entry, "failed": (folder / "pretrain.log").read_text()[-1500:]}
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    return {"overrides": entry, "val_loss": metrics["final_val_loss"], "train_loss": metrics["final_train_loss"],
            "steps": metrics["steps"], "train_s_shared_gpu": metrics["train_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="YAML list of pretrain overrides, one entry a run")
    parser.add_argument("--gpus", default="0", help="GPU indices to spread the runs over, comma-separated")
    parser.add_argument("--per-gpu", type=int, default=4, help="runs at a time on each GPU")
    parser.add_argument("--eval-batches", type=int, default=60)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "gpu.yaml"))
    parser.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "shakespeare_plays.txt"))
    parser.add_argument("--record", default=None)
    args = parser.parse_args()

    grid = yaml.safe_load(Path(args.grid).read_text())
    base = bench_gpu.base_params(Path(args.params), Path(args.config), None)
    work = Path(tempfile.mkdtemp(prefix="lmforge-g2-sweep-"))
    bench_gpu.write_shakespeare_tokens(Path(args.corpus), work / "tokens")
    slots = [int(g) for g in args.gpus.split(",")] * args.per_gpu
    running: dict[int, tuple] = {}
    results: list[dict | None] = [None] * len(grid)
    pending = list(enumerate(grid))
    started = time.perf_counter()
    while pending or running:
        for slot, gpu in enumerate(slots):
            if slot not in running and pending:
                index, entry = pending.pop(0)
                running[slot] = (index, entry, *start(entry, index, base, work / "tokens", work, gpu,
                                                      args.eval_batches))
        for slot, (index, entry, proc, folder) in list(running.items()):
            if proc.poll() is not None:
                results[index] = result(entry, folder, proc.returncode)
                print(json.dumps(results[index]), flush=True)
                del running[slot]
        time.sleep(0.5)
    record = {"command": " ".join(sys.argv), "environment": bench_gpu.environment(), "wall_s": time.perf_counter() - started,
              "base": base["pretrain"], "results": results}
    if args.record:
        Path(args.record).write_text(json.dumps(record, indent=1) + "\n")
    print("| overrides | steps | val loss (stage) | train loss |\n|---|---:|---:|---:|")
    for r in results:
        shown = ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
        if "failed" in r:
            print(f"| {shown} | failed | {r['failed'][-120:]!r} | |")
        else:
            print(f"| {shown} | {r['steps']} | {r['val_loss']:.4f} | {r['train_loss']:.4f} |")


if __name__ == "__main__":
    main()
