"""C2 (docs/performance.md): what the Prefect flow adds over `dvc repro` on a cached graph.

    .venv/bin/python bench/bench_pipeline.py [--target tokenize --target split@task] [--record FILE]

Runs a no-op `dvc repro` and then the pipeline flow (`python -m flows.pipeline`) over the same
targets, each as a fresh process, best of N; prints one JSON line per case. With PREFECT_API_URL
set (a running `prefect server start`) the flow talks to that server; without it Prefect starts a
temporary local server inside the process, which costs several seconds on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPEATS = 3
BIN = Path(sys.executable).parent


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    return time.perf_counter() - start


def n_stages(targets: list[str]) -> int:
    sys.path.insert(0, str(Path.cwd()))
    from flows.pipeline import stage_graph

    return len(stage_graph(Path.cwd(), targets or None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", action="append", default=[], help="stage to build (repeatable; default: all)")
    parser.add_argument("--record", help="also write the results with their context to this JSON file")
    args = parser.parse_args()
    dvc = [str(BIN / "dvc"), "repro", *args.target]
    flow = [sys.executable, "-m", "flows.pipeline", *[x for t in args.target for x in ("--target", t)]]
    wall(dvc)  # build anything missing first: both cases then measure a cached graph
    repro = min(wall(dvc) for _ in range(REPEATS))
    flowed = min(wall(flow) for _ in range(REPEATS))
    stages = n_stages(args.target)
    server = os.environ.get("PREFECT_API_URL", "temporary in-process server")
    cases = [
        {"case": "C2 no-op dvc repro", "stages": stages, "seconds": round(repro, 2), "target_s": 3.0},
        {"case": "C2 pipeline flow, cached graph", "stages": stages, "seconds": round(flowed, 2),
         "overhead_per_stage_s": round((flowed - repro) / stages, 2), "target_overhead_per_stage_s": 1.0,
         "prefect_api": server},
    ]
    for case in cases:
        print(json.dumps(case))
    if args.record:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        record = {"command": " ".join(sys.argv), "commit": commit, "card": "CPU, 2 cores (developer machine)",
                  "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "cases": cases}
        Path(args.record).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
