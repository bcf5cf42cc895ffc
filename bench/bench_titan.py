"""G7 (../shared/BENCHMARKS.md, issue #41): lmforge's pretrain step beside torchtitan on Llama 3.2 1B's shape.

    python bench/bench_titan.py --cases bf16 --record $OUT/g7.json        # one group of cases
    python bench/bench_titan.py --list                                     # the cases, groups, estimates
    python bench/bench_titan.py merge A.json B.json --record g7.json      # calls' records as one
    python bench/bench_titan.py plot g7.json loss.png                       # its loss curves, drawn
    python bench/bench_titan.py --loss-curve --text plays.txt --tokenizer tokenizer.json --record loss.json
    python bench/bench_titan.py --smoke                                   # tiny shape on the CPU
    python bench/bench_titan.py --cases like --profile-steps 3            # + GPU time by kernel kind

The model: 16 layers, width 2048, 32 heads, 8 key/value heads, SwiGLU 8192, vocabulary 128,256,
RoPE theta 500,000, untied embeddings (torchtitan's llama3 has no tied head; Llama 3.2 1B ties
its). Each case runs as a fresh process (torchrun when --gpus > 1), one after another on the same
GPU(s), and times `--steps` steps after `--warmup` (each step synchronised; the median counts):
  torchtitan  a pinned snapshot (.gpu_carry/titan/src, its COMMIT file names the commit) through its
              own Trainer and train() loop, its defaults kept (fp32 weights with bf16 autocast on one
              GPU, FSDP2 on several, fused AdamW, layer-wise activation checkpointing of every 2nd
              block, linear warm-up) except: the model (a train spec registered from this file with
              the 1B shape and a dataloader of random token ids, since the GPU machine has no dataset
              or tokenizer: torchtitan's source is not edited; `datasets`, which its HF dataset module
              imports at load, is replaced by a stand-in module when it is not installed), sequence
              length and local batch, compile on (its per-block compile of model and loss), warm-up 2
              steps, and for float8 the `quantize.linear.float8` converter with the recipe and
              filter_fqns ["output", "auto_filter_small_kn"]: "output" as torchtitan's own llama3
              train configs set it (its default list is empty), the size filter as its float8 guide
              advises; these are the layers lmforge converts too.
  lmforge     the pretrain stage's own step (model.build_model, activation checkpointing, float8,
              pretraining.distribute, pretrain_step.build_step and StepRunner, fused AdamW), same
              shape, batch, checkpointing (every 2nd block), compile, bf16 autocast over fp32 weights;
              its levers (fused_loss, param_dtype bf16, cuda_graph, other checkpointing, selective
              checkpointing by the partitioner's memory budget: --lmforge-budget) as variants:
              the headline groups run it with fused_loss and the bf16 working copy (fp32 masters), the
              like group with neither; compile_optimizer (the update compiled, reading the copy's bf16
              gradients) in the optimizer and headline-co groups.
Per case: tokens/s (global and per GPU), MFU against an 8192^3 bf16 matmul measured in the same
process (and an FP8 one, for the FP8 cases), peak memory, time to first step (from the process's
launch) and the first step alone. The record's headline: g7_vs_torchtitan (seq 2048, bf16),
g7_8k_vs_torchtitan (8192), g7_fp8_vs_torchtitan (best of tensorwise/rowwise on each side), each
from cases in the same call, with like-for-like, same-budget and any-checkpointing variants beside
them, and both cases' peak memory (a memory budget counts for lmforge's side, as the issue allows).

On the GPU machine (no network) the snapshot and the wheels it needs travel in .gpu_carry/titan and
.whl (git-ignored), which bench/titan_carry.sh builds here; bench/titan_call.sh runs one group a call
there, each in under 550 s (headline: the three ratios; like, levers, fp8-like, optimizer: what made
the difference). `merge` joins calls' records (each ratio stays its own call's).
Both sides run with PYTORCH_ALLOC_CONF=expandable_segments:True (torchtitan's run_train.sh sets it),
except lmforge's CUDA-graph case.

--loss-curve: the same 1B model on real text (--text: the bundled Shakespeare plays) tokenized
with --tokenizer (SmolLM2's 49,152-token BPE: no 128k tokenizer is on the offline machine, so ids
stay below 49,152 and the other embedding rows are never inputs), the same windows in the same
order for every run, bf16 and FP8 for each side (lmforge with its headline levers, torchtitan with
its defaults; learning rate 3e-4 after a tenth of the steps' warm-up, each side's own decay); the
record compares FP8's curve with bf16's over the last 50 steps against bf16's step-to-step noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TITAN_SRC = ROOT / ".gpu_carry" / "titan" / "src"

# Llama 3.2 1B (its params.json): dim 2048, 16 layers, 32 heads, 8 KV heads, ffn_dim_multiplier 1.5,
# multiple_of 256 (SwiGLU hidden 8192), vocabulary 128,256, rope theta 500,000.
LLAMA_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256,
                vocab=128_256, rope_theta=500_000.0)
SMOKE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=1.5, multiple_of=64, vocab=512,
             rope_theta=500_000.0)
TOKENS_PER_STEP = 16_384  # torchtitan's default local batch (8) x 2048; 2 x 8192 at sequence 8192
TITAN_AC = 2  # torchtitan's default: mode selective, selective_ac_option "2" (every 2nd block recomputed)
MATMUL_N = 8192


def ffn_hidden(shape: dict) -> int:
    """torchtitan's FeedForward width: 2/3 of 4 x dim, times the multiplier, up to multiple_of."""
    hidden = int(2 * 4 * shape["dim"] / 3)
    if shape.get("ffn_dim_multiplier"):
        hidden = int(shape["ffn_dim_multiplier"] * hidden)
    m = shape["multiple_of"]
    return m * ((hidden + m - 1) // m)


def param_counts(shape: dict) -> tuple[int, int]:
    """(all parameters, those outside the input embedding) of the untied Llama of `shape`."""
    d, heads, kv = shape["dim"], shape["n_heads"], shape["n_kv_heads"]
    head = d // heads
    block = 2 * d * d + 2 * d * kv * head + 3 * d * ffn_hidden(shape) + 2 * d
    embedding = shape["vocab"] * d
    non_embedding = shape["n_layers"] * block + d + shape["vocab"] * d  # blocks, final norm, output layer
    return non_embedding + embedding, non_embedding


def flops_per_token(shape: dict, seq: int) -> float:
    """6N + 12 * layers * width * sequence (PaLM's appendix B, torchtitan's formula): N without the
    input embedding, recomputation not counted (model FLOPs), the attention term as if unmasked (the
    causal half is counted whole, as the field quotes MFU). The same for both sides, so ratios hold."""
    return 6.0 * param_counts(shape)[1] + 12.0 * shape["n_layers"] * shape["dim"] * seq


@dataclass
class Case:
    name: str
    side: str  # titan | lmforge
    seq: int
    float8: str = "none"  # none | tensorwise | rowwise
    ac: str | int = TITAN_AC  # layer-wise activation checkpointing: none, full or every n-th block (titan: or op)
    budget: float = 1.0  # below 1 (with ac none): the compiled step's activation memory budget (selective, per op)
    fused_loss: bool = False
    param_dtype: str = "fp32"
    cuda_graph: bool = False
    compile_optimizer: bool = False  # lmforge, with param_dtype bf16: the update compiled, reading bf16 gradients
    titan_fp8_filter: str = "auto"  # auto: torchao's size filter + output; output: the output layer only
    est_s: int = 120  # seconds on one H100, cold compile caches (a guess until measured)

    @property
    def precision(self) -> str:
        return "bf16" if self.float8 == "none" else f"fp8-{self.float8}"

    @property
    def levers(self) -> list[str]:
        out = []
        if self.fused_loss:
            out.append("fused_loss")
        if self.param_dtype == "bf16":
            out.append("param_dtype bf16")
        if self.cuda_graph:
            out.append("cuda_graph")
        if self.compile_optimizer:
            out.append("compile_optimizer")
        if self.budget < 1.0:
            out.append(f"activation_memory_budget {self.budget}")
        elif self.ac != TITAN_AC:
            out.append(f"activation_checkpointing {self.ac}")
        if self.side == "titan" and self.float8 != "none" and self.titan_fp8_filter != "auto":
            out.append("float8 filter_fqns output only")
        return out


def _cases() -> dict[str, Case]:
    T, L = "titan", "lmforge"
    cases = [
        Case("titan-bf16-2k", T, 2048, est_s=80),
        Case("lmf-bf16-2k", L, 2048, est_s=130),
        Case("lmf-bf16-2k-fused", L, 2048, fused_loss=True, est_s=130),
        Case("lmf-bf16-2k-fused-bf16p", L, 2048, fused_loss=True, param_dtype="bf16", est_s=130),
        Case("titan-bf16-8k", T, 8192, est_s=90),
        Case("lmf-bf16-8k", L, 8192, est_s=140),
        Case("lmf-bf16-8k-fused", L, 8192, fused_loss=True, est_s=140),
        Case("lmf-bf16-8k-fused-bf16p", L, 8192, fused_loss=True, param_dtype="bf16", est_s=140),
        Case("titan-fp8tw-2k", T, 2048, float8="tensorwise", est_s=95),
        Case("titan-fp8rw-2k", T, 2048, float8="rowwise", est_s=95),
        Case("lmf-fp8tw-2k", L, 2048, float8="tensorwise", est_s=150),
        Case("lmf-fp8rw-2k", L, 2048, float8="rowwise", est_s=150),
        # levers and the strongest torchtitan settings beside them
        Case("titan-bf16-2k-noac", T, 2048, ac="none", est_s=80),
        Case("lmf-bf16-2k-fused-noac", L, 2048, fused_loss=True, ac="none", est_s=130),
        Case("lmf-bf16-2k-fused-bf16p-graph", L, 2048, fused_loss=True, param_dtype="bf16", cuda_graph=True, est_s=160),
        Case("lmf-fp8tw-2k-fused-bf16p", L, 2048, float8="tensorwise", fused_loss=True, param_dtype="bf16", est_s=150),
        Case("lmf-fp8rw-2k-fused-bf16p", L, 2048, float8="rowwise", fused_loss=True, param_dtype="bf16", est_s=150),
        Case("titan-fp8tw-2k-all", T, 2048, float8="tensorwise", titan_fp8_filter="output", est_s=95),
        Case("titan-fp8rw-2k-all", T, 2048, float8="rowwise", titan_fp8_filter="output", est_s=95),
        # selective checkpointing per op: the partitioner's memory budget (both sides), torchtitan's op policy
        Case("titan-bf16-2k-mb50", T, 2048, ac="none", budget=0.5, est_s=80),
        Case("titan-bf16-2k-mb70", T, 2048, ac="none", budget=0.7, est_s=80),
        Case("titan-bf16-8k-mb70", T, 8192, ac="none", budget=0.7, est_s=80),
        Case("titan-fp8tw-2k-mb90", T, 2048, float8="tensorwise", ac="none", budget=0.9, est_s=80),
        Case("titan-bf16-2k-op", T, 2048, ac="op", est_s=80),
        Case("lmf-bf16-2k-fused-mb50", L, 2048, fused_loss=True, ac="none", budget=0.5, est_s=130),
        Case("lmf-bf16-2k-fused-bf16p-mb30", L, 2048, fused_loss=True, param_dtype="bf16", ac="none", budget=0.3,
             est_s=130),
        Case("lmf-bf16-2k-fused-bf16p-mb50", L, 2048, fused_loss=True, param_dtype="bf16", ac="none", budget=0.5,
             est_s=130),
        Case("lmf-bf16-2k-fused-bf16p-mb70", L, 2048, fused_loss=True, param_dtype="bf16", ac="none", budget=0.7,
             est_s=130),
        Case("lmf-bf16-8k-fused-bf16p-mb70", L, 8192, fused_loss=True, param_dtype="bf16", ac="none", budget=0.7,
             est_s=140),
        Case("lmf-fp8tw-2k-fused-bf16p-mb80", L, 2048, float8="tensorwise", fused_loss=True, param_dtype="bf16",
             ac="none", budget=0.8, est_s=150),
        Case("lmf-fp8tw-2k-fused-bf16p-mb95", L, 2048, float8="tensorwise", fused_loss=True, param_dtype="bf16",
             ac="none", budget=0.95, est_s=150),
        # the update compiled with the working copy's passes folded in (pretrain.compile_optimizer)
        Case("lmf-bf16-2k-fused-bf16p-co", L, 2048, fused_loss=True, param_dtype="bf16", compile_optimizer=True,
             est_s=150),
        Case("lmf-bf16-2k-fused-bf16p-co-mb70", L, 2048, fused_loss=True, param_dtype="bf16", compile_optimizer=True,
             ac="none", budget=0.7, est_s=150),
        Case("lmf-bf16-8k-fused-bf16p-co-mb70", L, 8192, fused_loss=True, param_dtype="bf16", compile_optimizer=True,
             ac="none", budget=0.7, est_s=160),
        Case("lmf-fp8tw-2k-fused-bf16p-co-mb95", L, 2048, float8="tensorwise", fused_loss=True, param_dtype="bf16",
             compile_optimizer=True, ac="none", budget=0.95, est_s=170),
    ]
    return {c.name: c for c in cases}


CASES = _cases()
# bench/titan_call.sh runs one group a call, under 550 s on one H100: bf16 and fp8
# carry the three headline ratios, each lmforge case beside torchtitan in the same call; like (lmforge with
# no lever, and both sides without checkpointing), levers, fp8-like and fp8-more are extra.
GROUPS = {
    "bf16": ["titan-bf16-2k", "lmf-bf16-2k-fused-bf16p", "titan-bf16-8k", "lmf-bf16-8k-fused-bf16p"],
    "fp8": ["titan-fp8tw-2k", "lmf-fp8tw-2k-fused-bf16p", "titan-fp8rw-2k", "lmf-fp8rw-2k-fused-bf16p"],
    "like": ["titan-bf16-2k", "lmf-bf16-2k", "titan-bf16-2k-noac", "lmf-bf16-2k-fused-noac"],
    "levers": ["titan-bf16-2k", "lmf-bf16-2k-fused", "lmf-bf16-2k-fused-bf16p-graph", "lmf-bf16-8k-fused"],
    "fp8-like": ["titan-fp8tw-2k", "lmf-fp8tw-2k", "titan-fp8rw-2k", "lmf-fp8rw-2k"],
    "fp8-more": ["titan-fp8tw-2k-all", "titan-fp8rw-2k-all", "titan-fp8tw-2k", "lmf-fp8tw-2k-fused-bf16p"],
    # the three headline pairs in one call, lmforge checkpointing by a memory budget (FP8 at two budgets)
    "headline": ["titan-bf16-2k", "lmf-bf16-2k-fused-bf16p-mb70", "titan-bf16-8k", "lmf-bf16-8k-fused-bf16p-mb70",
                 "titan-fp8tw-2k", "lmf-fp8tw-2k-fused-bf16p-mb80", "lmf-fp8tw-2k-fused-bf16p-mb95"],
    # the compiled update beside the eager one, then the three headline pairs with it
    "optimizer": ["titan-bf16-2k", "lmf-bf16-2k-fused-bf16p", "lmf-bf16-2k-fused-bf16p-co", "titan-fp8tw-2k",
                  "lmf-fp8tw-2k-fused-bf16p-co-mb95"],
    # (FP8 first: on a cold machine the last case is the one the budget may skip)
    "headline-co": ["titan-fp8tw-2k", "lmf-fp8tw-2k-fused-bf16p-co-mb95", "titan-bf16-2k",
                    "lmf-bf16-2k-fused-bf16p-co-mb70", "titan-bf16-8k", "lmf-bf16-8k-fused-bf16p-co-mb70"],
    "budget": ["titan-bf16-2k", "titan-bf16-2k-mb50", "lmf-bf16-2k-fused-bf16p-mb50", "lmf-bf16-2k-fused-mb50",
               "lmf-bf16-2k-fused-bf16p-mb30", "lmf-bf16-2k-fused-bf16p-mb70"],
}
INSTALL_S = 15  # the call script's wheel install, before the bench starts


def budget_arg(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"a memory budget is in [0, 1): {text} would keep every activation")
    return value


def with_budget(case: Case, budget: float) -> Case:
    """The lmforge case checkpointing by a memory budget instead of whole blocks."""
    return replace(case, name=f"{case.name}-mb{round(100 * budget)}", ac="none", budget=budget)


def select(spec: str) -> list[Case]:
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "all":
            names += list(CASES)
        elif item in GROUPS:
            names += GROUPS[item]
        elif item in CASES:
            names.append(item)
        else:
            raise SystemExit(f"--cases: unknown case or group {item!r}; --list shows them")
    return [CASES[n] for n in dict.fromkeys(names)]


# ---------------------------------------------------------------------------------------------
# In the worker process


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device, fp8: bool) -> dict:
    """TFLOP/s of an 8192^3 bf16 matmul here (and an FP8 one, tensorwise scales, when asked and possible)."""
    import torch

    if device.type != "cuda":
        return {}
    n = MATMUL_N
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)

    def rate(fn) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 20
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return round(2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3) / 1e12, 1)

    out = {"bf16_tflops": rate(lambda: a @ b)}
    if fp8 and torch.cuda.get_device_capability(device) >= (8, 9):
        try:
            a8 = a.to(torch.float8_e4m3fn)
            b8 = b.to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants its second operand
            one = torch.ones((), device=device, dtype=torch.float32)
            out["fp8_tflops"] = rate(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16,
                                                              use_fast_accum=True))  # as torchao's forward
        except Exception as err:  # noqa: BLE001 - the ceiling is a reference, not the case
            out["fp8_error"] = f"{type(err).__name__}: {err}"[:300]
    return out


def _windows(spec: dict, rank: int, world: int):
    """Batches of (inputs, labels) on the CPU: random ids, or the loss curve's fixed windows of real text."""
    import numpy as np
    import torch

    batch, seq = spec["local_batch"], spec["seq"]
    if spec.get("tokens"):
        tokens = np.load(spec["tokens"], mmap_mode="r")
        starts = np.load(spec["starts"])  # (steps, global batch)
        step = 0
        while True:
            rows = starts[step % len(starts)][rank * batch:(rank + 1) * batch]
            window = torch.from_numpy(np.stack([tokens[s:s + seq + 1] for s in rows]).astype(np.int64))
            yield window[:, :-1], window[:, 1:]
            step += 1
    g = torch.Generator().manual_seed(1234 + rank)
    pool = [torch.randint(4, spec["shape"]["vocab"], (batch, seq + 1), generator=g) for _ in range(4)]
    step = 0
    while True:
        window = pool[step % len(pool)]
        yield window[:, :-1], window[:, 1:]
        step += 1


def _finish(spec: dict, device, times: list[float], first_wall: float, losses: list[float], extra: dict,
            world: int, main: bool) -> None:
    import torch

    timed = times[spec["warmup"]:spec["warmup"] + spec["steps"]]  # not the profiled steps after them
    step_s = statistics.median(timed) if timed else float("nan")
    tokens = spec["local_batch"] * spec["seq"] * world
    result = {
        "tokens_per_s": round(tokens / step_s, 1), "tokens_per_s_per_gpu": round(tokens / step_s / world, 1),
        "step_ms_median": round(1e3 * step_s, 2), "step_ms_min": round(1e3 * min(timed), 2) if timed else None,
        "step_ms_max": round(1e3 * max(timed), 2) if timed else None, "timed_steps": len(timed),
        "first_step_s": round(times[0], 2) if times else None,
        "time_to_first_step_s": round(first_wall - spec["launched"], 2),
        "gpus": world, "device": str(device), **extra,
    }
    if device.type == "cuda":
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        result["gpu_name"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        result["gpu_uuid"] = str(getattr(props, "uuid", ""))
    if losses:
        result["losses"] = [round(v, 5) for v in losses]
    ceiling = matmul_ceiling(device, fp8=spec["float8"] != "none")
    result["matmul"] = ceiling
    fpt = flops_per_token(spec["shape"], spec["seq"])
    result["flops_per_token"] = fpt
    achieved = result["tokens_per_s_per_gpu"] * fpt / 1e12
    result["model_tflops_per_gpu"] = round(achieved, 1)
    if ceiling.get("bf16_tflops"):
        result["mfu_vs_bf16_matmul"] = round(achieved / ceiling["bf16_tflops"], 4)
    if ceiling.get("fp8_tflops"):
        result["mfu_vs_fp8_matmul"] = round(achieved / ceiling["fp8_tflops"], 4)
    if main:
        print("RESULT " + json.dumps(result), flush=True)


def lmforge_params(spec: dict, world: int) -> dict:
    s = spec["shape"]
    return dict(
        arch="llama", n_layer=s["n_layers"], n_head=s["n_heads"], n_kv_head=s["n_kv_heads"], d_model=s["dim"],
        d_ff=ffn_hidden(s), context=spec["seq"], rope_theta=s["rope_theta"], tie_embeddings=False, dropout=0.0,
        batch_size=spec["local_batch"], global_batch_size=spec["local_batch"] * world,
        learning_rate=spec["lr"], warmup_steps=spec["lr_warmup"],
        max_steps=spec["total_steps"] + (0 if spec.get("tokens") else 8),  # 8: CUDA-graph capture's warm-up
        weight_decay=0.1, max_grad_norm=1.0, compile=spec["compile"], compile_mode="default",
        activation_checkpointing=spec["ac"], activation_memory_budget=spec.get("budget", 1.0),
        float8=spec["float8"], fused_loss=spec["fused_loss"],
        param_dtype=spec["param_dtype"], cuda_graph=spec["cuda_graph"],
        compile_optimizer=spec.get("compile_optimizer", False), parallel=spec.get("parallel", "fsdp"),
        device=spec["device"], attention="auto")


def lmforge_worker(spec: dict) -> None:
    """lmforge's pretrain step, assembled as pretraining.prepare_run and train assemble it."""
    from functools import partial

    import torch

    sys.path.insert(0, str(ROOT))
    from lmforge.config.pretrain import PretrainParams
    from lmforge.training import pretrain_step, pretraining, runtime
    from lmforge.training.model import (TokenInfo, build_model, count_params, set_activation_checkpointing,
                                        set_training_activation, set_training_attention)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    p = PretrainParams(**lmforge_params(spec, world))
    d = runtime.setup_distributed(p.device)
    say = print if d.main else (lambda _m: None)
    runtime.enable_tf32(d.device)
    model = build_model(p, TokenInfo(spec["shape"]["vocab"], 0, 1, 2, 3), seed=0,
                        device=pretraining.init_device(p, d)).train()
    set_training_attention(model, True)
    set_training_activation(model, p.compile)
    set_activation_checkpointing(model, p.activation_checkpointing, True)
    pretraining.use_float8(model, p, say)
    model = pretraining.distribute(model, p, d, say)
    optimizer = pretraining.make_optimizer(model, p)
    schedule = partial(runtime.warmup_cosine, warmup=p.warmup_steps, total=p.max_steps, floor=p.min_lr_ratio)
    scheduler = runtime.lr_scheduler(optimizer, schedule)
    step = pretrain_step.build_step(model, optimizer, p, d, masked=False, say=say)
    graphed = pretrain_step.use_cuda_graph(p, d, say)
    runner = pretrain_step.StepRunner(step, graphed, 0, d.device)
    spec["warmup"] = max(spec["warmup"], runner.timed_from)  # graph capture is warm-up too
    batches = _windows(spec, d.rank, d.world)
    on_device = []
    if not spec.get("tokens"):  # random ids: a few batches on the device, reused (as the stage's data_on_device)
        for _ in range(4):
            x, y = next(batches)
            on_device.append((x.to(d.device), y.to(d.device)))
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    built = time.time()
    times, losses, first_wall = [], [], built
    total = spec["steps"] if spec.get("tokens") else spec["warmup"] + spec["steps"] + spec["profile_steps"]
    profile = StepProfile(spec, d.device)
    with pretrain_step.around_the_loop(p, d.device):
        for index in range(total):
            profile.before(index)
            if on_device:
                xb, yb = on_device[index % len(on_device)]
            else:
                xb, yb = (t.to(d.device, non_blocking=True) for t in next(batches))
            _sync(d.device)
            start = time.perf_counter()
            runner.run(index, [(xb, yb)], schedule(index))
            scheduler.step()
            _sync(d.device)
            times.append(time.perf_counter() - start)
            if index == 0:
                first_wall = time.time()
            if spec.get("tokens"):
                loss = step.loss_sum.detach().clone()
                if d.world > 1:
                    torch.distributed.all_reduce(loss)
                    loss /= d.world
                losses.append(float(loss))
                step.loss_sum.zero_()
    if spec.get("tokens"):
        spec["warmup"] = 0
    extra = {"params": count_params(model), "init_s": round(built - spec["launched"], 2),
             "float8_linears": _float8_linears([model]),
             "lmforge_params": p.model_dump(mode="json"), "cuda_graph_used": graphed,
             "loss_finite": bool(torch.isfinite(step.loss_sum).item()), "profile": profile.summary()}
    _finish(spec, d.device, times, first_wall, losses, extra, d.world, d.main)
    if d.world > 1:
        torch.distributed.destroy_process_group()


def _datasets_stand_in() -> str:
    """torchtitan.hf_datasets.text_datasets imports `datasets` at load; the GPU image has none. A stand-in
    module whose functions raise keeps that import working: this bench's dataloader replaces its loaders."""
    try:
        import datasets  # noqa: F401

        return "installed"
    except ImportError:
        import types

        def unavailable(*_a, **_k):
            raise RuntimeError("the `datasets` stand-in of bench_titan.py: no Hugging Face datasets here")

        module = types.ModuleType("datasets")
        module.Dataset = type("Dataset", (), {})
        module.IterableDataset = type("IterableDataset", (), {})
        module.load_dataset = unavailable
        distributed = types.ModuleType("datasets.distributed")
        distributed.split_dataset_by_node = unavailable
        module.distributed = distributed
        sys.modules["datasets"], sys.modules["datasets.distributed"] = module, distributed
        return "stand-in"


def _titan_on_cpu() -> None:
    """--smoke only: torchtitan assumes an accelerator (its device module is cuda when none is found);
    point it at the CPU, with the few memory queries it makes answered by stand-ins."""
    import types

    import torch
    import torch._utils

    torch._utils._get_available_device_type = lambda: "cpu"
    cpu = torch.cpu
    defaults = {"get_device_name": lambda *_a: "cpu", "current_device": lambda: 0, "set_device": lambda *_a: None,
                "get_device_properties": lambda *_a: types.SimpleNamespace(total_memory=2**34),
                "reset_peak_memory_stats": lambda *_a: None, "empty_cache": lambda: None,
                "memory_stats": lambda *_a: {}, "max_memory_allocated": lambda *_a: 0}
    for name, fn in defaults.items():
        if not hasattr(cpu, name):
            setattr(cpu, name, fn)


def titan_args(spec: dict, work: Path) -> list[str]:
    """torchtitan's command line for the case: only what the comparison needs differs from its defaults."""
    args = ["--job.dump_folder", str(work / "titan_out"), "--model.name", "lmforge_g7", "--model.flavor", "g7",
            "--training.local_batch_size", str(spec["local_batch"]), "--training.seq_len", str(spec["seq"]),
            "--training.steps", str(spec["total_steps"]), "--lr_scheduler.warmup_steps", str(spec["lr_warmup"]),
            "--optimizer.lr", str(spec["lr"]), "--debug.seed", "0"]
    if spec["compile"]:
        args += ["--compile.enable"]
    if spec.get("budget", 1.0) < 1.0:
        args += ["--activation_checkpoint.mode", "memory_budget", "--activation_checkpoint.memory_budget",
                 str(spec["budget"])]
    elif spec["ac"] == "none":
        args += ["--activation_checkpoint.mode", "none"]
    elif spec["ac"] == "full":
        args += ["--activation_checkpoint.mode", "full"]
    elif spec["ac"] == "op":  # torchtitan's per-op selective checkpointing
        args += ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"]
    elif int(spec["ac"]) != TITAN_AC:
        args += ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option",
                 str(spec["ac"])]
    if spec["float8"] != "none":
        filters = "output,auto_filter_small_kn" if spec["titan_fp8_filter"] == "auto" else "output"
        args += ["--model.converters", "quantize.linear.float8", "--quantize.linear.float8.recipe_name",
                 spec["float8"], "--quantize.linear.float8.filter_fqns", filters]
        if spec["device"] == "cpu":
            args += ["--quantize.linear.float8.emulate"]
    if spec.get("tokens"):
        args += ["--metrics.log_freq", "1"]
    return args


def titan_worker(spec: dict) -> None:
    """torchtitan's Trainer, with the 1B shape and a random-token dataloader registered as a train spec."""
    sys.path.insert(0, spec["titan_src"])
    datasets_mode = _datasets_stand_in()
    if spec["device"] == "cpu":
        _titan_on_cpu()
    import dataclasses

    import torch
    import torchtitan.train as tt
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.config import ConfigManager
    from torchtitan.models.llama3 import TransformerModelArgs
    from torchtitan.protocols.train_spec import get_train_spec, register_train_spec

    s = spec["shape"]
    model_args = TransformerModelArgs(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                                      n_kv_heads=s["n_kv_heads"], vocab_size=s["vocab"],
                                      ffn_dim_multiplier=s["ffn_dim_multiplier"], multiple_of=s["multiple_of"],
                                      rope_theta=s["rope_theta"])

    class Windows(BaseDataLoader):
        def __init__(self, dp_rank: int, dp_world_size: int):
            self.rank, self.world = dp_rank, dp_world_size

        def __iter__(self):
            for x, y in _windows(spec, self.rank, self.world):
                yield {"input": x}, y

        def state_dict(self):
            return {}

        def load_state_dict(self, state_dict):
            pass

    def build_loader(dp_world_size, dp_rank, tokenizer=None, job_config=None, **_kw):
        return Windows(dp_rank, dp_world_size)

    base = get_train_spec("llama3")
    register_train_spec("lmforge_g7", dataclasses.replace(
        base, model_args={"g7": model_args}, build_dataloader_fn=build_loader, build_tokenizer_fn=None,
        build_validator_fn=None))

    class TimedTrainer(tt.Trainer):
        times: list[float]
        losses: list[float]
        first_wall: float

        def forward_backward_step(self, *args, **kwargs):
            loss = super().forward_backward_step(*args, **kwargs)
            self._micro_losses.append(loss.detach())
            return loss

        def train_step(self, data_iterator):
            self._micro_losses = []
            profile.before(len(self.times))
            _sync(self.device)
            start = time.perf_counter()
            super().train_step(data_iterator)
            _sync(self.device)
            self.times.append(time.perf_counter() - start)
            if len(self.times) == 1:
                self.first_wall = time.time()
            if spec.get("tokens"):
                loss = torch.stack(self._micro_losses).sum()
                if self.parallel_dims.dp_enabled:  # each rank's loss is its sum over the global token count
                    torch.distributed.all_reduce(loss)
                self.losses.append(float(loss))

    if spec["device"] == "cpu":  # its first-step barrier names the device by index, which gloo's CPU one has not
        import torchtitan.distributed.utils as dist_utils

        dist_utils.set_pg_timeouts = lambda **_kw: None
    config = ConfigManager().parse_args(spec["titan_args"])
    trainer = TimedTrainer(config)
    profile = StepProfile(spec, trainer.device)
    trainer.times, trainer.losses, trainer.first_wall = [], [], time.time()
    built = time.time()
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    trainer.train()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    params = sum(p.numel() for m in trainer.model_parts for p in m.parameters())
    if spec.get("tokens"):
        spec["warmup"] = 0
    extra = {"params": params, "init_s": round(built - spec["launched"], 2), "datasets": datasets_mode,
             "float8_linears": _float8_linears(trainer.model_parts),
             "titan_args": spec["titan_args"], "titan_config": _jsonable(dataclasses.asdict(config)),
             "profile": profile.summary()}
    _finish(spec, trainer.device, trainer.times, trainer.first_wall, trainer.losses, extra, world, main)
    trainer.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# Kernel kinds by name: cuBLAS/CUTLASS matmuls, attention (cuDNN's, flash), Inductor's fused Triton
# kernels, the optimizer's multi-tensor kernels, copies; on the CPU the aten ops of the same jobs.
KERNEL_KINDS = (("matmul", ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "scaled_mm")),
                ("attention", ("flash", "fmha", "cudnn", "sdpa", "attention")),
                ("optimizer", ("multi_tensor", "adam", "foreach")),
                ("copy", ("memcpy", "memset", "aten::copy_")),
                ("fused (triton)", ("triton",)))


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in lowered for m in marks)), "other")


class StepProfile:
    """--profile-steps K: torch.profiler over K steps run after the timed ones (so it slows none of
    them), summed by kernel kind, the same way on both sides: where a step's GPU time goes."""

    def __init__(self, spec: dict, device):
        self.k, self.device = int(spec.get("profile_steps") or 0), device
        self.first = spec["warmup"] + spec["steps"]
        self.profiler = None

    def before(self, index: int) -> None:
        """Call before step `index` runs."""
        if self.k and index == self.first:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def summary(self) -> dict | None:
        if self.profiler is None:
            return None
        _sync(self.device)
        self.profiler.__exit__(None, None, None)
        return kernel_time_by_kind(self.profiler.key_averages(), self.k, on_gpu=self.device.type == "cuda")


def kernel_time_by_kind(events, steps: int, on_gpu: bool) -> dict:
    """Milliseconds a step by kernel kind, and the ten costliest kernels: GPU kernels' own time on a
    GPU, aten ops' own CPU time on the CPU (where this only checks the code path)."""
    import torch

    kinds: dict[str, float] = {}
    costliest = []
    for event in events:
        if on_gpu:
            # a record_function range (the optimizer's "Optimizer.step#AdamW.step", torchtitan's own) has a GPU
            # row too, spanning the kernels it launched: counted, it would count them twice
            if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
                continue
            us = event.self_device_time_total
        else:
            if not event.key.startswith("aten::"):
                continue
            us = event.self_cpu_time_total
        if us > 0:
            kind = kernel_kind(event.key)
            kinds[kind] = kinds.get(kind, 0.0) + us
            costliest.append((us, event.key))
    per_step = {kind: round(us / 1e3 / steps, 2) for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1])}
    return {"steps": steps, "ms_per_step": per_step, "total_ms_per_step": round(sum(per_step.values()), 2),
            "costliest": [[name[:100], round(us / 1e3 / steps, 2)] for us, name in sorted(costliest, reverse=True)[:10]]}


def _float8_linears(models) -> int:
    """How many linear layers compute in FP8 (torchao's Float8Linear), to show both sides convert the same."""
    return sum(type(m).__name__ == "Float8Linear" for model in models for m in model.modules())


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------------
# The parent


@dataclass
class Settings:
    shape: dict
    device: str
    gpus: int
    warmup: int
    steps: int
    compile: bool
    tokens_per_step: int
    titan_src: str
    work: Path
    lr: float = 3e-4
    lr_warmup: int = 2
    tokens: str | None = None
    starts: str | None = None
    extra_env: dict = field(default_factory=dict)
    parallel: str = "fsdp"  # lmforge on several GPUs (torchtitan shards: FSDP2)
    profile_steps: int = 0  # steps profiled after the timed ones (--profile-steps)
    budget_estimator: str = "flops"  # how the partitioner prices a recompute under a memory budget (both sides)


def case_spec(case: Case, st: Settings) -> dict:
    global_batch = max(st.gpus, st.tokens_per_step // case.seq)
    if global_batch % st.gpus:
        raise SystemExit(f"{case.name}: {global_batch} sequences per step do not split over {st.gpus} GPUs")
    spec = {"case": case.name, "side": case.side, "shape": st.shape, "seq": case.seq,
            "local_batch": global_batch // st.gpus, "float8": case.float8, "ac": case.ac,
            "budget": case.budget if st.compile else 1.0,  # the partitioner's budget: nothing to meet uncompiled
            "fused_loss": case.fused_loss, "param_dtype": case.param_dtype, "cuda_graph": case.cuda_graph,
            "compile_optimizer": case.compile_optimizer,
            "titan_fp8_filter": case.titan_fp8_filter, "device": st.device, "compile": st.compile,
            "warmup": st.warmup, "steps": st.steps, "total_steps": st.warmup + st.steps, "lr": st.lr,
            "lr_warmup": st.lr_warmup, "titan_src": st.titan_src, "tokens": st.tokens, "starts": st.starts,
            "parallel": st.parallel, "profile_steps": 0 if st.tokens else st.profile_steps,
            "budget_estimator": st.budget_estimator}
    spec["total_steps"] += spec["profile_steps"]
    if st.tokens:  # the loss curve: `steps` optimizer steps in all, each one logged
        spec["total_steps"] = st.steps
    if case.side == "titan":
        spec["titan_args"] = titan_args(spec, st.work / case.name)
    return spec


def launch(spec: dict, st: Settings, log: Path, timeout: float) -> tuple[dict | None, str]:
    """The case as a fresh process (torchrun over --gpus GPUs, a plain process for one); its RESULT."""
    spec = {**spec, "launched": time.time()}
    me = str(Path(__file__).resolve())
    threads = str(max(1, (os.cpu_count() or 2) // max(1, st.gpus)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, "LMFORGE_TRACKING": "off",
           **st.extra_env}
    if not spec["cuda_graph"]:  # torchtitan's run_train.sh sets it; both sides get it, but no graph capture
        env.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    if st.gpus > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={st.gpus}",
                   me, "worker", "--spec", json.dumps(spec)]
    else:
        command = [sys.executable, me, "worker", "--spec", json.dumps(spec)]
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(29500 + os.getpid() % 1000))
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log.open("w") as handle:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    text = log.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), ""
    why = "out of GPU memory" if ("OutOfMemoryError" in text or "out of memory" in text) else f"exit {done.returncode}"
    print(text[-4000:], flush=True)
    return None, why


def titan_commit(src: str) -> str | None:
    path = Path(src) / "COMMIT"
    return path.read_text().strip() if path.exists() else None


def environment() -> dict:
    import platform

    import torch
    from record_facts import git_commit  # bench/ is on sys.path when this file runs

    info = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "torchao", "triton", "torchdata", "tyro"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or versionless
            info[name] = None
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    # -dirty where the tree differs from its HEAD: the lent GPU machine's copy carries the working tree
    # beside a .git that may be older than it
    info["lmforge_commit"] = git_commit()
    return info


def _rate(entry: dict | None) -> float | None:
    r = (entry or {}).get("result")
    return r["tokens_per_s"] if r else None


def _budget(entry: dict) -> float:
    return (entry.get("case_settings") or {}).get("budget", 1.0)


def _selective(entry: dict) -> bool:
    """The case checkpoints per op by the partitioner's memory budget (not by whole blocks)."""
    return _budget(entry) < 1.0


def _best(results: dict, side: str, seq: int, fp8: bool, ac: str | int | None = None,
          no_levers: bool = False, or_selective: bool = False) -> tuple[str | None, float | None]:
    """The fastest case of a side at seq and precision; ac: only with that layer-wise checkpointing
    (or_selective: or with a memory budget instead)."""
    best = (None, None)
    for name, entry in results.items():
        c = entry.get("case_settings") or {}
        rate = _rate(entry)
        if not rate or c.get("side") != side or c.get("seq") != seq or (c.get("float8") != "none") != fp8:
            continue
        if ac is not None:
            layerwise = c.get("ac") == ac and not _selective(entry)
            if not (layerwise or (or_selective and _selective(entry))):
                continue
        if no_levers and entry.get("levers"):
            continue
        if best[1] is None or rate > best[1]:
            best = (name, rate)
    return best


def _peak(entry: dict) -> float | None:
    return (entry.get("result") or {}).get("peak_allocated_gib")


def _same_budget(results: dict, seq: int, fp8: bool) -> tuple[float, list[str]] | None:
    """lmforge's best case over torchtitan's at the same memory budget (the best such pair)."""
    pairs = []
    for budget in {_budget(v) for v in results.values()} - {1.0}:
        at = {k: v for k, v in results.items() if _budget(v) == budget}
        titan_name, titan = _best(at, "titan", seq, fp8)
        mine_name, mine = _best(at, "lmforge", seq, fp8)
        if titan and mine:
            pairs.append((round(mine / titan, 4), [mine_name, titan_name]))
    return max(pairs) if pairs else None


def headline(results: dict) -> dict:
    """The G7 ratios from the cases of one call: lmforge over torchtitan, tokens/s.

    g7*_vs_torchtitan: lmforge's best variant that checkpoints, as torchtitan does (every 2nd block) or
    selectively (a memory budget: a lever the issue names), over torchtitan with its defaults (fp8:
    best recipe on each side, same filter), with both cases' peak memory; _like_for_like: lmforge
    with no lever; _any_ac: each side's best case, whatever its checkpointing; _same_budget: the
    same memory budget on both sides."""
    out: dict = {}
    for key, seq, fp8 in (("g7", 2048, False), ("g7_8k", 8192, False), ("g7_fp8", 2048, True)):
        titan_name, titan = _best({k: v for k, v in results.items()
                                   if (v.get("case_settings") or {}).get("titan_fp8_filter", "auto") == "auto"},
                                  "titan", seq, fp8, ac=TITAN_AC)
        mine_name, mine = _best(results, "lmforge", seq, fp8, ac=TITAN_AC, or_selective=True)
        _plain_name, plain = _best(results, "lmforge", seq, fp8, ac=TITAN_AC, no_levers=True)
        if titan and mine:
            out[f"{key}_vs_torchtitan"] = round(mine / titan, 4)
            out[f"{key}_cases"] = [mine_name, titan_name]
            out[f"{key}_peak_gib"] = [_peak(results[mine_name]), _peak(results[titan_name])]
        same = _same_budget(results, seq, fp8)
        if same:
            out[f"{key}_same_budget_vs_torchtitan"], out[f"{key}_same_budget_cases"] = same
        if titan and plain:
            out[f"{key}_like_for_like_vs_torchtitan"] = round(plain / titan, 4)
        any_titan_name, any_titan = _best(results, "titan", seq, fp8)
        any_mine_name, any_mine = _best(results, "lmforge", seq, fp8)
        if any_titan and any_mine and (any_titan_name, any_mine_name) != (titan_name, mine_name):
            out[f"{key}_any_ac_vs_torchtitan"] = round(any_mine / any_titan, 4)
            out[f"{key}_any_ac_cases"] = [any_mine_name, any_titan_name]
        if fp8:
            for recipe in ("tensorwise", "rowwise"):
                t = [_rate(v) for v in results.values() if (v.get("case_settings") or {}).get("float8") == recipe
                     and v["case_settings"]["side"] == "titan" and v["case_settings"]["titan_fp8_filter"] == "auto"
                     and v["case_settings"]["ac"] == TITAN_AC and not v.get("levers")]
                m = [_rate(v) for v in results.values() if (v.get("case_settings") or {}).get("float8") == recipe
                     and v["case_settings"]["side"] == "lmforge" and v["case_settings"]["ac"] == TITAN_AC
                     and not v.get("levers")]
                if t and m and t[0] and m[0]:
                    out[f"g7_fp8_{recipe}_like_for_like_vs_torchtitan"] = round(m[0] / t[0], 4)
    return out


def run_cases(cases: list[Case], st: Settings, budget_s: float, record_path: Path | None, base: dict) -> dict:
    results: dict = {}
    started = time.perf_counter()
    for case in cases:
        spec = case_spec(case, st)
        case = replace(case, budget=spec["budget"])  # uncompiled, a budget has nothing to act on: none recorded
        elapsed = time.perf_counter() - started
        left = budget_s - elapsed
        entry = {"case_settings": {k: v for k, v in asdict(case).items() if k != "est_s"}, "levers": case.levers,
                 "global_batch": spec["local_batch"] * st.gpus, "seq": case.seq}
        if case.side == "titan":
            entry["titan_args"] = spec["titan_args"]
        else:
            entry["lmforge_params"] = lmforge_params(spec, st.gpus)
        if left < 0.8 * case.est_s:
            entry.update(result=None, failed=f"skipped: {left:.0f} s of the {budget_s:.0f} s budget left, "
                                              f"the case needs about {case.est_s} s")
            print(f"[bench] {case.name}: {entry['failed']}", flush=True)
        else:
            print(f"[bench] {case.name} ({case.side}, seq {case.seq}, {case.precision}"
                  f"{', ' + ', '.join(case.levers) if case.levers else ''}) ...", flush=True)
            t0 = time.perf_counter()
            result, why = launch(spec, st, st.work / f"{case.name}.log", timeout=max(30.0, left))
            entry.update(result=result, failed=why or None, wall_s=round(time.perf_counter() - t0, 1))
            brief = {k: result.get(k) for k in ("tokens_per_s", "mfu_vs_bf16_matmul", "peak_allocated_gib",
                                                "time_to_first_step_s", "step_ms_median")} if result else why
            print(f"[bench] {case.name}: {json.dumps(brief)} in {entry['wall_s']} s", flush=True)
        results[case.name] = entry
        if record_path:  # after every case, so a call cut short keeps what it measured
            write_record(record_path, {**base, **headline(results), "results": results})
    return results


def write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)


def table(record: dict) -> str:
    lines = ["| case | side | seq | precision | levers | tokens/s | MFU (bf16 mm) | TFLOP/s | peak GiB | "
             "first step s | to first step s |", "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, entry in record.get("results", {}).items():
        c = entry.get("case_settings", {})
        r = entry.get("result")
        precision = "bf16" if c.get("float8", "none") == "none" else f"fp8 {c['float8']}"
        levers = ", ".join(entry.get("levers") or []) or "-"
        if not r:
            lines.append(f"| {name} | {c.get('side')} | {c.get('seq')} | {precision} | {levers} | "
                         f"{entry.get('failed')} | | | | | |")
            continue
        mfu = f"{100 * r['mfu_vs_bf16_matmul']:.1f}%" if r.get("mfu_vs_bf16_matmul") else "-"
        lines.append(f"| {name} | {c['side']} | {c['seq']} | {precision} | {levers} | {r['tokens_per_s']:,.0f} | "
                     f"{mfu} | {r['model_tflops_per_gpu']} | {r.get('peak_allocated_gib', '-')} | "
                     f"{r['first_step_s']} | {r['time_to_first_step_s']} |")
    profiled = {name: e["result"]["profile"] for name, e in record.get("results", {}).items()
                if (e.get("result") or {}).get("profile")}
    if profiled:
        kinds = [kind for kind, _ in KERNEL_KINDS] + ["other"]
        lines += ["", "| case | " + " | ".join(f"{kind} ms" for kind in kinds) + " | all ms |",
                  "|---|" + "---:|" * (len(kinds) + 1)]
        lines += [f"| {name} | " + " | ".join(str(prof["ms_per_step"].get(kind, 0.0)) for kind in kinds)
                  + f" | {prof['total_ms_per_step']} |" for name, prof in profiled.items()]
    heads = {k: v for k, v in record.items() if k.startswith("g7") and k.endswith("_vs_torchtitan")}
    if heads:
        lines.append("")
        lines += [f"{k}: {v}x" + (f" ({' / '.join(map(str, record.get(k.replace('_vs_torchtitan', '_cases'), [])))})"
                                  if k.replace("_vs_torchtitan", "_cases") in record else "")
                  + (f", peak GiB {record[peak]}" if (peak := k.replace("_vs_torchtitan", "_peak_gib")) in record else "")
                  for k, v in heads.items()]
        lines.append("target: >= 1.10x (G7, G7-fp8)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The loss curve


def prepare_text(text: Path, tokenizer: Path, work: Path, seq: int, global_batch: int, steps: int,
                 seed: int = 0) -> tuple[str, str, dict]:
    """The text's token ids (one array) and each step's window starts (the same for every run)."""
    import numpy as np
    from tokenizers import Tokenizer

    files = sorted(text.rglob("*.txt")) if text.is_dir() else [text]
    tok = Tokenizer.from_file(str(tokenizer))
    ids: list[int] = []
    eos = tok.token_to_id("<|endoftext|>")
    for f in files:
        ids += tok.encode(f.read_text(encoding="utf-8", errors="replace")).ids
        if eos is not None:
            ids.append(eos)
    tokens = np.asarray(ids, dtype=np.int32)
    if len(tokens) <= seq + 1:
        raise SystemExit(f"--text {text}: {len(tokens)} tokens, fewer than one window of {seq + 1}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seq - 1, size=(steps, global_batch))
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "tokens.npy", tokens)
    np.save(work / "starts.npy", starts)
    info = {"text": str(text), "files": len(files), "tokenizer": str(tokenizer), "tokens": int(len(tokens)),
            "max_id": int(tokens.max()), "tokenizer_vocab": tok.get_vocab_size(),
            "tokens_seen": int(steps * global_batch * seq),
            "epochs": round(steps * global_batch * seq / len(tokens), 2)}
    return str(work / "tokens.npy"), str(work / "starts.npy"), info


def compare_curves(bf16: list[float], fp8: list[float], window: int = 50) -> dict:
    """FP8's loss against bf16's on the same batches: the last `window` steps' means, and the noise
    (bf16's step-to-step standard deviation over that window); within noise when the gap is below it.
    The paired gap (FP8 minus bf16 step by step over the window) and its standard error say whether
    a gap that small is still systematic."""
    n = min(len(bf16), len(fp8))
    if n < 2:
        return {}
    w = min(window, n)
    a, b = bf16[n - w:n], fp8[n - w:n]
    gap = statistics.fmean(b) - statistics.fmean(a)
    noise = statistics.pstdev(a)
    diffs = [y - x for x, y in zip(bf16[:n], fp8[:n])]
    paired = diffs[n - w:]
    finite = all(math.isfinite(v) for v in paired)
    paired_mean = round(statistics.fmean(paired), 4) if finite else None
    paired_se = round(statistics.stdev(paired) / math.sqrt(w), 4) if finite and w > 1 else None
    return {"steps": n, "window": w, "bf16_last_mean": round(statistics.fmean(a), 4),
            "fp8_last_mean": round(statistics.fmean(b), 4), "gap": round(gap, 4), "bf16_noise_std": round(noise, 4),
            "paired_gap_mean": paired_mean, "paired_gap_se": paired_se,
            "max_abs_step_gap": round(max(abs(d) for d in diffs), 4),
            "within_noise": bool(abs(gap) <= noise and all(math.isfinite(v) for v in fp8[:n]))}


# ---------------------------------------------------------------------------------------------


def merge(paths: list[str], out: str | None) -> dict:
    """Several calls' records as one: each headline ratio stays the one its own call measured."""
    merged: dict = {"merged_from": paths, "results": {}, "calls": []}
    uuids = set()
    for path in paths:
        record = json.loads(Path(path).read_text())
        merged["calls"].append({k: v for k, v in record.items() if k != "results"})
        for name, entry in record.get("results", {}).items():
            # a case run again in a later call (torchtitan's bf16 baseline) keeps both measurements
            key = name if name not in merged["results"] else f"{name}@{Path(path).stem}"
            merged["results"][key] = {**entry, "from": path}
            r = entry.get("result") or {}
            if r.get("gpu_uuid"):
                uuids.add(r["gpu_uuid"])
        for key, value in record.items():
            if key.startswith("g7") and key not in merged:
                merged[key] = value
        for key in ("torchtitan_commit", "environment", "shape", "loss_curve", "loss_comparison"):
            if key in record and key not in merged:
                merged[key] = record[key]
    merged["same_gpu"] = len(uuids) <= 1
    merged["gpu_uuids"] = sorted(uuids)
    if out:
        write_record(Path(out), merged)
    return merged


def plot(record_path: str, out: str) -> list[str]:
    """The loss curves of a --loss-curve record (or a merged one) drawn as a PNG; the cases drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads(Path(record_path).read_text())
    curves = {name: entry["result"]["losses"] for name, entry in record.get("results", {}).items()
              if (entry.get("result") or {}).get("losses")}
    if not curves:
        raise SystemExit(f"{record_path}: no case with a loss curve in it (a record of --loss-curve)")
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name, linewidth=1)
    ax.set(xlabel="step", ylabel="training loss", title="G7 loss curves: 1B Llama shape, bf16 and FP8")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return list(curves)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        spec = json.loads(sys.argv[sys.argv.index("--spec") + 1])
        if spec.get("budget_estimator", "flops") != "flops":
            import torch._functorch.config as functorch_config

            # PyTorch's option (flops: FLOPs counted; profile: each candidate op timed on the GPU), read
            # wherever a budget applies, on either side
            functorch_config.activation_memory_budget_runtime_estimator = spec["budget_estimator"]
        (titan_worker if spec["side"] == "titan" else lmforge_worker)(spec)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "plot":
        parser = argparse.ArgumentParser(prog="bench_titan.py plot")
        parser.add_argument("record")
        parser.add_argument("png")
        args = parser.parse_args(sys.argv[2:])
        print(f"{args.png}: {', '.join(plot(args.record, args.png))}", flush=True)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "merge":
        parser = argparse.ArgumentParser(prog="bench_titan.py merge")
        parser.add_argument("records", nargs="+")
        parser.add_argument("--record", default=None)
        args = parser.parse_args(sys.argv[2:])
        record = merge(args.records, args.record)
        print(table(record), flush=True)
        print(f"same GPU in every call: {record['same_gpu']} {record['gpu_uuids']}", flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="bf16", help="case names or groups, comma-separated (--list)")
    parser.add_argument("--list", action="store_true", help="print the cases, groups and estimates, and stop")
    parser.add_argument("--record", default=None, help="write the JSON record here (after every case)")
    parser.add_argument("--titan-src", default=str(TITAN_SRC), help="torchtitan's snapshot (holds torchtitan/)")
    parser.add_argument("--gpus", type=int, default=1, help="processes (GPUs); more than 1 runs torchrun")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the timed ones (compile, autotune)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the loss curve: steps in all)")
    parser.add_argument("--tokens-per-step", type=int, default=TOKENS_PER_STEP,
                        help="global batch in tokens (sequences = this / seq)")
    parser.add_argument("--lmforge-parallel", default="fsdp", choices=["fsdp", "ddp"],
                        help="lmforge on several GPUs: fsdp as torchtitan (fused_loss and the bf16 working copy "
                             "then step aside, as the stage says), or ddp (a whole replica a GPU, levers kept)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="skip a case whose estimate no longer fits in what is left of this")
    parser.add_argument("--work", default=None, help="scratch folder for logs and torchtitan's outputs")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny shape on the CPU, no compile, few steps: checks the code paths")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="profile this many steps after the timed ones: GPU time a step by kernel kind")
    parser.add_argument("--lmforge-budget", type=budget_arg, default=None,
                        help="run the selected lmforge cases with this activation memory budget instead of "
                             "torchtitan's block checkpointing (named <case>-mb<percent>)")
    parser.add_argument("--budget-estimator", default="flops", choices=["flops", "profile"],
                        help="how torch.compile's partitioner prices recomputing an op under a memory budget "
                             "(profile: times each on the GPU; FP8 matmuls run in about half their FLOPs' bf16 time)")
    parser.add_argument("--loss-curve", action="store_true", help="bf16 and FP8 on real text (see above)")
    parser.add_argument("--loss-sides", default="lmforge", help="the loss curve's sides: lmforge, titan or both")
    parser.add_argument("--loss-recipe", default="tensorwise", choices=["tensorwise", "rowwise"])
    parser.add_argument("--text", default=str(ROOT / ".gpu_carry" / "titan" / "shakespeare_plays.txt"))
    parser.add_argument("--tokenizer", default=str(ROOT / ".gpu_carry" / "titan" / "smollm2_tokenizer.json"))
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()

    if args.list:
        for group, names in GROUPS.items():
            print(f"{group}: {', '.join(names)} (~{sum(CASES[n].est_s for n in names)} s on one H100)")
        for c in CASES.values():
            print(f"  {c.name}: {c.side}, seq {c.seq}, {c.precision}, ac {c.ac}, levers {c.levers or '-'}, ~{c.est_s} s")
        return

    import torch

    smoke = args.smoke
    device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    shape = SMOKE if smoke else LLAMA_1B
    if not smoke and shape is LLAMA_1B:
        assert ffn_hidden(shape) == 8192 and param_counts(shape)[0] == 1_498_482_688, "the 1B shape's arithmetic"
    work = Path(args.work or tempfile.mkdtemp(prefix="lmforge-bench-titan-"))
    st = Settings(shape=shape, device=device, gpus=args.gpus, warmup=2 if smoke else args.warmup,
                  steps=3 if smoke and not args.loss_curve else args.steps,
                  compile=not (smoke or args.no_compile or device == "cpu"),
                  tokens_per_step=256 if smoke else args.tokens_per_step, titan_src=args.titan_src, work=work,
                  lr=args.lr, parallel=args.lmforge_parallel, profile_steps=args.profile_steps,
                  budget_estimator=args.budget_estimator)
    base = {"bench": "G7", "issue": 41, "command": " ".join(sys.argv), "environment": environment(),
            "torchtitan_commit": titan_commit(args.titan_src), "shape": shape, "ffn_hidden": ffn_hidden(shape),
            "params": param_counts(shape)[0], "tokens_per_step": st.tokens_per_step, "warmup": st.warmup,
            "timed_steps": st.steps, "smoke": smoke, "budget_estimator": st.budget_estimator}
    record_path = Path(args.record) if args.record else None

    if args.loss_curve:
        seq = 64 if smoke else 2048
        global_batch = max(args.gpus, (256 if smoke else 8192) // seq)
        steps = 6 if smoke else args.steps if args.steps != 20 else 300
        st = replace(st, steps=steps, warmup=0, lr_warmup=max(1, steps // 10))
        tokens, starts, info = prepare_text(Path(args.text), Path(args.tokenizer), work / "text", seq, global_batch,
                                            steps)
        if info["max_id"] >= st.shape["vocab"]:
            if not smoke:
                raise SystemExit(f"--tokenizer's ids reach {info['max_id']}, past the model's vocabulary")
            shape = {**st.shape, "vocab": -(-info["tokenizer_vocab"] // 64) * 64}  # the tiny model takes every id
            base |= {"shape": shape}
        st = replace(st, tokens=tokens, starts=starts, tokens_per_step=global_batch * seq, shape=shape)
        sides = ["lmforge", "titan"] if args.loss_sides == "both" else [args.loss_sides]
        recipe = "none" if smoke else args.loss_recipe  # FP8 needs the GPU: the smoke runs bf16 twice
        cases = []
        for side in sides:
            prefix = "titan" if side == "titan" else "lmf"
            second = f"loss-{prefix}-fp8-{recipe}" if recipe != "none" else f"loss-{prefix}-bf16-again"
            # lmforge as its headline cases run (fused_loss, bf16 working copy); torchtitan with its defaults
            levers = {"fused_loss": True, "param_dtype": "bf16"} if side == "lmforge" else {}
            cases += [Case(f"loss-{prefix}-bf16", side, seq, est_s=180, **levers),
                      Case(second, side, seq, float8=recipe, est_s=200, **levers)]
        base |= {"loss_curve": info, "loss_steps": steps, "loss_global_batch": global_batch, "lr": args.lr}
        print(f"[bench] loss curve: {info['tokens']:,} tokens of text, {steps} steps of {global_batch} x {seq}, "
              f"{info['epochs']} epochs; estimate ~{sum(c.est_s for c in cases)} s", flush=True)
        results = run_cases(cases, st, args.budget_s, record_path, base)
        curves = {}
        for side in sides:
            prefix = "titan" if side == "titan" else "lmf"
            names = [c.name for c in cases if c.name.startswith(f"loss-{prefix}-")]
            got = [(results[n].get("result") or {}).get("losses") for n in names]
            if all(got):
                curves[side] = compare_curves(got[0], got[1])
        record = {**base, "loss_comparison": curves, "results": results}
        if record_path:
            write_record(record_path, record)
        print(json.dumps(curves, indent=1), flush=True)
        print(table(record), flush=True)
        return

    cases = select(args.cases)
    if args.lmforge_budget is not None:
        cases = [with_budget(c, args.lmforge_budget) if c.side == "lmforge" else c for c in cases]
    if smoke:
        # lmforge's FP8 and CUDA graphs need the GPU; torchtitan's FP8 converter runs emulated (eager) on the CPU
        cases = [c for c in cases if not (c.side == "lmforge" and (c.float8 != "none" or c.cuda_graph))] or [
            CASES["titan-bf16-2k"], CASES["lmf-bf16-2k"]]
        cases = [replace(c, seq=64 if c.seq == 2048 else 128, est_s=30) for c in cases]
    estimate = sum(c.est_s for c in cases)
    print(f"[bench] {len(cases)} cases on {device} x{args.gpus}: {', '.join(c.name for c in cases)}; estimate "
          f"~{estimate} s (one H100, cold caches), budget {args.budget_s:.0f} s; torchtitan "
          f"{base['torchtitan_commit']}", flush=True)
    results = run_cases(cases, st, args.budget_s, record_path, base)
    record = {**base, **headline(results), "results": results}
    if record_path:
        write_record(record_path, record)
    print(table(record), flush=True)


if __name__ == "__main__":
    main()
