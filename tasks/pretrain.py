"""Stage `pretrain`: train a model on data/tokens, save it as a transformers folder.

    python -m tasks.pretrain            # what dvc.yaml runs; resumes a killed run

Reads params.yaml (seed, pretrain), writes models/pretrained/ (save_pretrained + tokenizer),
models/checkpoints/<run key>/ (kept between runs, for resuming), reports/pretrain/ (metrics.json,
loss.csv and train_loss.csv for DVC plots, loss.png) and one MLflow run. With more than one GPU
visible, or several hosts asked for (pretrain.nnodes), it relaunches itself under torchrun, one
process per GPU (launch_command; docs/scaling.md has the two-host recipe).

The training, the model folder and the reports are lmforge/training/pretraining.py's; this module
takes the paths (tasks/layout.py), launches the processes and records the MLflow run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lmforge.errors import UserError
from tasks import layout

STARTED = time.perf_counter()


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(layout.PARAMS))
    parser.add_argument("--tokens", default=str(layout.TOKENS))
    parser.add_argument("--out", default=str(layout.PRETRAINED))
    parser.add_argument("--checkpoints", default=str(layout.CHECKPOINTS))
    parser.add_argument("--reports", default=str(layout.PRETRAIN_REPORTS))
    return parser.parse_args(argv)


class LaunchError(UserError, ValueError):
    """Several hosts are asked for, but this host's rank or the meeting point is not given."""


def _first(env: dict[str, str], *names: str) -> str | None:
    return next((env[n] for n in names if env.get(n)), None)


def launch_command(p, argv: list[str], env: dict[str, str], gpus: int) -> list[str] | None:
    """The torchrun command this stage becomes, or None to train in this process.

    One process per visible GPU (pretrain.nproc_per_node overrides; 1 on the CPU), on pretrain.nnodes
    hosts. With several hosts every host runs this same stage (`dvc repro` on node 0, the stage's
    command elsewhere) with NODE_RANK (or torchrun's PET_NODE_RANK) set; they meet at
    pretrain.rdzv_endpoint, else PET_RDZV_ENDPOINT, else MASTER_ADDR:MASTER_PORT. Ranks follow the
    node rank (torchrun's static rendezvous), so global rank 0, the one that writes, is on node 0."""
    if "LOCAL_RANK" in env or "WORLD_SIZE" in env or env.get("LMFORGE_NO_TORCHRUN"):
        return None  # already one of several processes (torchrun, srun, mpirun), or told to stay one
    per_node = p.nproc_per_node or (gpus if p.device != "cpu" and gpus > 0 else 1)
    if p.device != "cpu" and gpus and per_node > gpus:
        raise LaunchError(f"pretrain.nproc_per_node is {per_node} but this host shows {gpus} GPUs")
    # torchrun's own form may be a range (PET_NNODES=1:4); a static launch takes its upper end.
    nnodes = p.nnodes if p.nnodes > 1 else int((_first(env, "PET_NNODES", "NNODES") or "1").split(":")[-1])
    if per_node == 1 and nnodes == 1:
        return None
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={per_node}"]
    if nnodes == 1:
        return [*command, "--standalone", "-m", "tasks.pretrain", *argv]
    node_rank = _first(env, "NODE_RANK", "PET_NODE_RANK")
    endpoint = p.rdzv_endpoint or _first(env, "PET_RDZV_ENDPOINT")
    if not endpoint and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        endpoint = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    if node_rank is None or not endpoint:
        raise LaunchError(f"pretrain.nnodes is {nnodes}: set NODE_RANK on each host (0 on the one at the endpoint) "
                          "and pretrain.rdzv_endpoint (host:port of node 0) or MASTER_ADDR and MASTER_PORT")
    return [*command, f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=static",
            f"--rdzv_endpoint={endpoint}", "-m", "tasks.pretrain", *argv]


def _maybe_torchrun(p, argv: list[str]) -> None:
    """Become the torchrun command launch_command gives, if any."""
    gpus = 0
    if p.device != "cpu":
        import torch

        gpus = torch.cuda.device_count()
    command = launch_command(p, argv, dict(os.environ), gpus)
    if command:
        print(f"[pretrain] {' '.join(command[1:])}", flush=True)
        os.execv(sys.executable, command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _args(argv)
    from lmforge.config import load_params

    params = load_params(args.params)
    _maybe_torchrun(params.pretrain, argv)

    from lmforge.registry import tracking
    from tasks.lineage import input_hashes
    from lmforge.training import pretraining, runtime

    p = pretraining.resolve_init_from(params.pretrain)
    runtime.start_cuda_init(p.device)
    rank = int(os.environ.get("RANK", "0"))
    logged = {"seed": params.seed, "pretrain": p.model_dump()}
    lineage = input_hashes([args.tokens])
    runner = tracking.stage_run("pretrain", logged, tags=lineage) if rank == 0 else _no_run()
    with runner as run:
        result = pretraining.train(p, seed=params.seed, tokens_dir=Path(args.tokens), checkpoint_root=args.checkpoints,
                                   on_metrics=run.log_metrics, scorer=benchmark_scorer(p, Path(args.tokens)))
        if result.dist.main:
            pretraining.save_model(result.model, Path(args.tokens), Path(args.out),
                                   pretraining.model_info(result, p, params.seed, args.tokens))
            metrics = {**pretraining.run_metrics(result), "stage_s": time.perf_counter() - STARTED}
            if result.history.get("benchmarks"):  # the last scores of pretrain.benchmark_steps; MLflow has the curves
                metrics["benchmarks"] = result.history["benchmarks"][-1]
            paths = pretraining.write_reports(result, Path(args.reports), metrics)
            run.set_tags({"run_key": result.run_dir.name, "resumed_from": result.resumed_from})
            run.log_metrics({f"final_{k}": v for k, v in metrics.items() if not isinstance(v, bool)})
            for path in paths:
                run.log_artifact(path, "reports")
            run.log_artifact(args.out, "model")
            print(f"[pretrain] best val loss {result.best_val_loss:.4f}, {result.tokens_per_s:,.0f} tokens/s"
                  + (f", MFU {100 * result.mfu:.1f}%" if result.mfu else "")
                  + f"; saved {args.out} in {metrics['stage_s']:.1f}s", flush=True)
    if result.dist.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


def benchmark_scorer(p, tokens: Path):
    """pretrain.benchmark_steps: the harness's scores of the model in training, on
    pretrain.benchmark_tasks, as bench_<task>_<metric>; None when off (or a masked LM, which the
    benchmarks do not score)."""
    if not p.benchmark_steps or not p.benchmark_tasks or p.arch == "bert":
        return None
    from transformers import AutoTokenizer

    from lmforge.evaluation.benchmarks import run_benchmarks

    tokenizer = AutoTokenizer.from_pretrained(tokens / "tokenizer")

    def score(model) -> dict[str, float]:
        report = run_benchmarks(model, p.benchmark_tasks, tokenizer=tokenizer)
        return {f"bench_{name}_{metric}": task[metric] for name, task in report["tasks"].items()
                for metric in ("acc", "acc_norm") if isinstance(task.get(metric), float)}

    return score


class _no_run:
    """Ranks other than 0 log nothing."""

    def __enter__(self):
        from lmforge.registry.tracking import Run

        return Run(False)

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    from tasks._common import run_main

    run_main("pretrain", main)
