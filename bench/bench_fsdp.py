"""G5, G6 and G1 under FSDP (docs/performance.md): lmforge's sharded step beside the FSDP2 anchor.

    python bench/bench_fsdp.py --cases g5,g6,g1 --anchor .gpu/anchors/fsdp_anchor.py --record bench/results/X.json

Each case runs as a fresh `torchrun` job of this file's `worker`, which builds the stage's own
step the way the pretrain stage does (model.build_model, activation checkpointing,
pretraining.distribute: fully_shard per block with bf16 compute and fp32 reduction, per-block
compile; then pretrain_step.build_step: the loss, clipping, fused AdamW) and times it on random
tokens, without the stage's evaluation and checkpoints (a 13B model's checkpoint would not fit
the lent machine's disk). A case that runs out of GPU memory is recorded as such.
  g5  the 1.14B Llama of ../shared/anchors/fsdp_anchor.py (16 x 2048, SwiGLU 8192, vocab 32,000,
      8 x 2048 tokens per GPU) on 2 GPUs: the anchor (fully_shard per block, per-block compile)
      and lmforge, in the same call; the ratio is the figure
  g6  the largest Llama-style model that trains: FSDP2 + full activation checkpointing on 2 GPUs
      (13B, then 7B), and whole on one GPU (DDP's memory: 7B, then 3B), 1 x 2048 tokens per GPU
  g1  G1's GPT-2-124M shape (bench_gpu.G1_SHAPE) on 2 GPUs under ddp and under fsdp: the cost of sharding
  resume  the real pretrain stage with G5's model under fsdp on 2 GPUs, killed (SIGKILL) once a
      checkpoint exists, then resumed on 1 GPU to the end: N -> M on GPUs, and what a synchronous
      checkpoint of a 1.2B model with AdamW's state costs (metrics.json's checkpoint_s)
The table comes last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_1B = dict(arch="llama", n_layer=16, n_head=16, d_model=2048, d_ff=8192, context=2048, batch_size=8,
                tie_embeddings=False)
LLAMA_3B = dict(arch="llama", n_layer=26, n_head=32, d_model=3200, d_ff=8640, context=2048, batch_size=1,
                tie_embeddings=False)
LLAMA_7B = dict(arch="llama", n_layer=32, n_head=32, d_model=4096, d_ff=11008, context=2048, batch_size=1,
                tie_embeddings=False)
LLAMA_13B = dict(arch="llama", n_layer=40, n_head=40, d_model=5120, d_ff=13824, context=2048, batch_size=1,
                 tie_embeddings=False)
VOCAB = 32_000
COMMON = dict(compile=True, learning_rate=3e-4, warmup_steps=1, max_steps=100, fused_loss=False,
              param_dtype="fp32", device="cuda")


def worker(shape: dict, steps: int) -> None:
    """One torchrun process: build the stage's step for `shape`, time `steps` steps, rank 0 prints JSON."""
    import torch

    from lmforge.config.pretrain import PretrainParams
    from lmforge.training import pretrain_step, pretraining, runtime
    from lmforge.training.model import (TokenInfo, build_model, count_params, flops_per_token,
                                        set_activation_checkpointing, set_training_attention)

    p = PretrainParams(**{**COMMON, **shape})
    d = runtime.setup_distributed(p.device)  # cuda; a shape may say cpu, to check the code path
    say = print if d.main else (lambda _msg: None)
    runtime.enable_tf32(d.device)
    started = time.perf_counter()
    model = build_model(p, TokenInfo(VOCAB, 0, 1, 2, 3), seed=0,
                        device=pretraining.init_device(p, d)).train()
    set_training_attention(model, True)
    set_activation_checkpointing(model, p.activation_checkpointing, True)
    model = pretraining.distribute(model, p, d, say)
    built_s = time.perf_counter() - started
    step = pretrain_step.build_step(model, pretraining.make_optimizer(model, p), p, d, masked=False, say=say)
    x = torch.randint(4, VOCAB, (p.batch_size, p.context), device=d.device)

    def one() -> None:
        step([(x, x)])
        step.optimizer.zero_grad(set_to_none=True)

    cuda = d.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(d.device)
    with pretrain_step.around_the_loop(p, d.device):  # as the stage's loop: SDPA's order, a memory budget
        start = time.perf_counter()
        for _ in range(3):  # compile and warm up
            one()
        runtime.synchronize(d.device)
        warm_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            one()
        runtime.synchronize(d.device)
        step_s = (time.perf_counter() - start) / steps
    tokens_per_gpu = p.batch_size * p.context / step_s
    flops = flops_per_token(model, p.context)
    peak = runtime.peak_flops(d.device)
    if d.main:
        print("RESULT " + json.dumps({
            "params_b": round(count_params(model) / 1e9, 3), "gpus": d.world, "parallel": p.parallel,
            "activation_checkpointing": p.activation_checkpointing, "step_ms": round(1000 * step_s, 1),
            "tokens_per_s_per_gpu": round(tokens_per_gpu), "tflops_per_gpu": round(tokens_per_gpu * flops / 1e12, 1),
            "mfu": round(tokens_per_gpu * flops / peak, 4) if peak else None, "build_s": round(built_s, 1),
            "warmup_s": round(warm_s, 1), "peak_gib": round(torch.cuda.max_memory_allocated(d.device) / 2**30, 1) if cuda else None,
            "loss_sum_finite": bool(torch.isfinite(step.loss_sum).item())}), flush=True)
    if d.world > 1:
        torch.distributed.destroy_process_group()


def torchrun(args: list[str], gpus: int, log: Path, timeout: int) -> tuple[dict | None, str]:
    """Run `args` under torchrun on `gpus` GPUs; (the RESULT / anchor JSON line, why not)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *args]
    # torchrun's default of one thread a process makes a 13B model's CPU initialisation take minutes.
    threads = str(max(1, (os.cpu_count() or 2) // gpus))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus))),
           "OMP_NUM_THREADS": threads}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    log.write_text(done.stdout + done.stderr)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), ""
        if line.startswith("{") and "tokens_per_s_per_gpu" in line:  # the anchor's line
            return json.loads(line), ""
    text = done.stdout + done.stderr
    why = "out of GPU memory" if "OutOfMemoryError" in text or "out of memory" in text else f"exit {done.returncode}"
    print(text[-3000:], flush=True)
    return None, why


def lmforge_case(name: str, shape: dict, gpus: int, steps: int, work: Path, timeout: int) -> dict:
    print(f"[bench] {name} on {gpus} GPU(s) ...", flush=True)
    result, why = torchrun([str(Path(__file__).resolve()), "worker", "--shape", json.dumps(shape), "--steps", str(steps)],
                           gpus, work / f"{name}.log", timeout)
    out = {"case": name, "gpus": gpus, "shape": shape, "result": result, "failed": why or None}
    print(json.dumps(out), flush=True)
    return out


def ladder(name: str, shapes: list[tuple[str, dict]], gpus: int, steps: int, work: Path) -> list[dict]:
    """Largest first; stop at the first that trains."""
    tried = []
    for label, shape in shapes:
        tried.append(lmforge_case(f"{name}-{label}", shape, gpus, steps, work, timeout=330))
        if tried[-1]["result"]:
            break
    return tried


def run_cases(cases: list[str], anchor: Path, work: Path, steps: int) -> dict:
    results: dict = {}
    if "g5" in cases:
        print("[bench] g5 anchor ...", flush=True)
        anchor_result, why = torchrun([str(anchor), "compile"], 2, work / "g5-anchor.log", timeout=400)
        results["g5_anchor"] = {"result": anchor_result, "failed": why or None}
        results["g5_lmforge"] = lmforge_case("g5-lmforge", {**LLAMA_1B, "parallel": "fsdp"}, 2, steps, work, 400)
    if "g1" in cases:
        from bench_gpu import G1_SHAPE

        g1 = {**G1_SHAPE, "fused_loss": False, "param_dtype": "fp32", "batch_size": 32}
        results["g1_ddp_2"] = lmforge_case("g1-ddp", {**g1, "parallel": "ddp"}, 2, steps, work, 300)
        results["g1_fsdp_2"] = lmforge_case("g1-fsdp", {**g1, "parallel": "fsdp"}, 2, steps, work, 300)
    if "resume" in cases:
        print("[bench] resume: 2 GPUs, killed, then 1 GPU ...", flush=True)
        results["resume"] = resume_case(work)
        print(json.dumps(results["resume"]), flush=True)
    if "g6" in cases:
        full = {"activation_checkpointing": "full"}
        results["g6_fsdp_2"] = ladder("g6-fsdp", [("13b", {**LLAMA_13B, **full, "parallel": "fsdp"}),
                                                  ("7b", {**LLAMA_7B, **full, "parallel": "fsdp"})], 2, 4, work)
        results["g6_whole_1"] = ladder("g6-whole", [("7b", {**LLAMA_7B, **full}), ("3b", {**LLAMA_3B, **full})],
                                       1, 4, work)
    return results


def resume_case(work: Path) -> dict:
    """G5's model through `python -m tasks.pretrain`: 2 GPUs until the first checkpoint, killed, then 1 GPU."""
    import signal

    import yaml

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_gpu import base_params, case_params, write_random_tokens

    folder = work / "resume"
    write_random_tokens(folder / "tokens", VOCAB, train_tokens=20_000_000)
    shape = {**LLAMA_1B, **COMMON, "parallel": "fsdp", "global_batch_size": 16, "max_steps": 30, "save_steps": 10,
             "eval_steps": 10, "eval_batches": 2, "logging_steps": 5, "warmup_steps": 2, "save": "last"}
    params = case_params(base_params(ROOT / "params.yaml", ROOT / "configs" / "gpu.yaml", None), shape)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    command = [sys.executable, "-m", "tasks.pretrain", "--params", str(folder / "params.yaml"), "--tokens",
               str(folder / "tokens"), "--out", str(folder / "model"), "--checkpoints", str(folder / "checkpoints"),
               "--reports", str(folder / "reports")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LMFORGE_TRACKING": "off"}
    with (folder / "two.log").open("w") as log:
        two = subprocess.Popen(command, cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": "0,1"}, stdout=log,
                               stderr=subprocess.STDOUT)
        started = time.perf_counter()
        while not list((folder / "checkpoints").glob("*/latest")):
            if two.poll() is not None or time.perf_counter() - started > 400:
                return {"failed": (folder / "two.log").read_text()[-3000:]}
            time.sleep(0.2)
        # Every process of the run, as a crashed host loses them: torchrun starts each worker in a
        # session of its own, so its process group alone would leave them training.
        import psutil

        everyone = [psutil.Process(two.pid), *psutil.Process(two.pid).children(recursive=True)]
        for proc in everyone:
            proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(everyone, timeout=60)
        two.wait()
    killed_after_s = time.perf_counter() - started
    started = time.perf_counter()
    one = subprocess.run(command, cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": "0"}, capture_output=True, text=True)
    (folder / "one.log").write_text(one.stdout + one.stderr)
    if one.returncode:
        return {"failed": (one.stdout + one.stderr)[-3000:]}
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    lines = [line for line in one.stdout.splitlines() if "resuming run" in line or "written by" in line]
    return {"killed_after_s": round(killed_after_s, 1), "resume_wall_s": round(time.perf_counter() - started, 1),
            "resume_log": lines, "metrics": metrics,
            "saved_files": sorted(p.name for p in (folder / "model").iterdir())}


def table(results: dict) -> str:
    lines = ["| case | GPUs | params (B) | tokens/s per GPU | TFLOP/s per GPU | MFU | peak GiB | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]

    def add(label: str, entry: dict, note: str = "") -> None:
        r = entry.get("result")
        if not r:
            lines.append(f"| {label} | | | | | | | {entry.get('failed')} |")
            return
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        lines.append(f"| {label} | {r['gpus']} | {r.get('params_b', r.get('params_M', 0) / 1000):.2f} | "
                     f"{r['tokens_per_s_per_gpu']:,} | {r['tflops_per_gpu']} | {mfu} | {r['peak_gib']} | {note} |")

    if "g5_anchor" in results:
        add("g5 anchor (fsdp_anchor.py compile)", results["g5_anchor"])
        a, m = results["g5_anchor"].get("result"), results["g5_lmforge"].get("result")
        ratio = f"{m['tokens_per_s_per_gpu'] / a['tokens_per_s_per_gpu']:.3f}x the anchor (target 1.15x)" if a and m else ""
        add("g5 lmforge fsdp", results["g5_lmforge"], ratio)
    for key in ("g1_ddp_2", "g1_fsdp_2"):
        if key in results:
            add(key.replace("_", " "), results[key])
    for key in ("g6_fsdp_2", "g6_whole_1"):
        for entry in results.get(key, []):
            add(entry["case"], entry)
    r = results.get("resume")
    if r and "metrics" in r:
        m = r["metrics"]
        lines.append(f"| resume: killed on 2 GPUs after {r['killed_after_s']} s, resumed on {m['world_size']} "
                     f"from step {m['resumed_from']} | {m['world_size']} | {m['params'] / 1e9:.2f} | "
                     f"{m['tokens_per_s'] / m['world_size']:,.0f} | | | {m.get('peak_memory_gb', 0):.1f} | "
                     f"checkpoints {m.get('checkpoint_s', 0):.1f} s of {m['wall_s']:.0f} s |")
    elif r:
        lines.append("| resume | | | | | | | failed |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode")
    w = sub.add_parser("worker")
    w.add_argument("--shape", required=True)
    w.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cases", default="g5,g1,g6")
    parser.add_argument("--anchor", default=str(ROOT.parent / "shared" / "anchors" / "fsdp_anchor.py"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--record", default=None)
    args = parser.parse_args()
    if args.mode == "worker":
        worker(json.loads(args.shape), args.steps)
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_gpu import environment

    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-fsdp-"))
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    results = run_cases(cases, Path(args.anchor), work, args.steps)
    record = {"environment": environment(), "command": " ".join(sys.argv), "results": results}
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(record, indent=1) + "\n")
    print(table(results), flush=True)


if __name__ == "__main__":
    main()
