"""Where a pretrain step spends its GPU time: kernels by kind, and SDPA's kernels on their own.

    python bench/profile_step.py                                   # G1's shape, configs/gpu.yaml otherwise
    python bench/profile_step.py --variant cudnn:attention=cudnn --variant cdt:inductor.coordinate_descent_tuning=1
    python bench/profile_step.py --attention-only                  # just the SDPA kernel table

A diagnostic beside bench/bench_gpu.py, which measures the real stage: this one builds the same
pieces (lmforge.model.build_model, training.TrainingLoss compiled with its loss, the fused AdamW
of training.make_optimizer, the mask-free causal attention) and runs the step in one process, so
several variants compile and run in one call. Per variant it prints step time, tokens/s, MFU,
compile time and peak memory, then the CUDA time of the profiled steps by kernel kind, and the
heaviest kernels. --variant NAME:KEY=VALUE[,KEY=VALUE] sets pretrain params, or inductor.KEY for
torch._inductor.config.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# Kernel kinds by name (first match wins); what matches none is counted as "other".
KINDS = (
    ("nccl", r"nccl"),
    ("attention", r"flash|fmha|cudnn|attention|sdpa"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("fused (triton)", r"^triton"),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def parse_variant(text: str) -> tuple[str, dict, dict]:
    name, _, body = text.partition(":")
    params, inductor = {}, {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        target = inductor if key.startswith("inductor.") else params
        target[key.removeprefix("inductor.")] = yaml.safe_load(value)
    return name, params, inductor


def run_variant(name: str, overrides: dict, inductor: dict, steps: int, top: int) -> dict:
    import torch
    import torch._inductor.config as inductor_config

    from bench_gpu import G1_SHAPE, G1_VOCAB
    from lmforge.config import PretrainParams
    from lmforge.model import TokenInfo, build_model, flops_per_token, set_training_attention
    from lmforge.training import TrainingLoss, attention_backends, make_optimizer, peak_flops

    base = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())["pretrain"]
    p = PretrainParams(**{**base, **G1_SHAPE, "pad_vocab": 1, **overrides})
    saved = {key: getattr(inductor_config, key) for key in inductor}
    for key, value in inductor.items():
        setattr(inductor_config, key, value)
    torch._dynamo.reset()
    device = torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(p, TokenInfo(G1_VOCAB, 0, 1, 2, 3), seed=0).to(device).train()
    set_training_attention(model, True)
    optimizer = make_optimizer(model, p, device)
    runner = torch.compile(TrainingLoss(model, False), mode=None if p.compile_mode == "default" else p.compile_mode)

    def step() -> None:
        x = torch.randint(4, G1_VOCAB, (p.batch_size, p.context), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = runner(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats(device)
    with attention_backends(p.attention, device):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        step_s = (time.perf_counter() - start) / steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
    for key, value in saved.items():
        setattr(inductor_config, key, value)

    kernels: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us and event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.key] += us / 3 / 1000  # ms per step
    by_kind: dict[str, float] = defaultdict(float)
    for kernel, ms in kernels.items():
        by_kind[kind_of(kernel)] += ms
    tokens = p.batch_size * p.context
    tok_s = tokens / step_s
    peak = peak_flops(device)
    result = {"variant": name, "step_ms": 1000 * step_s, "tokens_per_s": tok_s,
              "mfu": tok_s * flops_per_token(model, p.context) / peak if peak else None,
              "compile_s": compile_s, "peak_gb": peak_gb, "gpu_ms": sum(kernels.values()), "by_kind": dict(by_kind)}
    print(f"\n== {name}: {result['step_ms']:.1f} ms/step, {tok_s:,.0f} tokens/s, "
          f"MFU {100 * (result['mfu'] or 0):.1f}%, first step {compile_s:.0f} s, peak {peak_gb:.1f} GiB")
    print(f"   GPU busy {result['gpu_ms']:.1f} ms of {result['step_ms']:.1f} ms: "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    for kernel, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]:
        print(f"   {ms:7.2f} ms  {kind_of(kernel):<14} {kernel[:110]}")
    del model, optimizer, runner
    torch.cuda.empty_cache()
    return result


def attention_table(batch: int, heads: int, context: int, head_dim: int, reps: int = 20) -> list[dict]:
    """Causal SDPA forward and backward per backend, alone, at the given shape (bf16)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(batch, heads, context, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    fwd_flops = 4 * batch * heads * context * context * head_dim / 2  # causal: half the score matrix
    rows = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                for _ in range(3):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
                torch.cuda.synchronize()
                events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                fwd = bwd = 0.0
                for _ in range(reps):
                    events[0].record()
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    events[1].record()
                    out.backward(grad)
                    events[2].record()
                    torch.cuda.synchronize()
                    fwd += events[0].elapsed_time(events[1]) / reps
                    bwd += events[1].elapsed_time(events[2]) / reps
        except RuntimeError as err:
            rows.append({"backend": backend.name, "error": str(err).splitlines()[0][:100]})
            continue
        rows.append({"backend": backend.name, "fwd_ms": fwd, "bwd_ms": bwd,
                     "fwd_tflops": fwd_flops / fwd / 1e9, "bwd_tflops": 2.5 * fwd_flops / bwd / 1e9})
    print(f"\n== causal SDPA alone, B={batch} H={heads} T={context} D={head_dim} bf16 (one layer)")
    for r in rows:
        if "error" in r:
            print(f"   {r['backend']:<20} unavailable: {r['error']}")
        else:
            print(f"   {r['backend']:<20} fwd {r['fwd_ms']:.3f} ms ({r['fwd_tflops']:.0f} TFLOP/s)  "
                  f"bwd {r['bwd_ms']:.3f} ms ({r['bwd_tflops']:.0f} TFLOP/s)")
    try:
        from torch.nn.attention import list_flash_attention_impls

        print(f"   registered flash attention impls: {list_flash_attention_impls()}")
    except ImportError:
        pass
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="a variant to run (repeatable); default: one run of the G1 settings")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--top", type=int, default=12, help="heaviest kernels listed per variant")
    parser.add_argument("--attention-only", action="store_true")
    args = parser.parse_args()

    from bench_gpu import G1_SHAPE

    attention_table(G1_SHAPE["batch_size"], G1_SHAPE["n_head"], G1_SHAPE["context"],
                    G1_SHAPE["d_model"] // G1_SHAPE["n_head"])
    if args.attention_only:
        return
    results = [run_variant(*parse_variant(v), args.steps, args.top) for v in (args.variant or ["g1:"])]
    print("\n| variant | ms/step | tokens/s | MFU | GPU busy ms | first step s | peak GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {100 * (r['mfu'] or 0):.1f}% | "
              f"{r['gpu_ms']:.1f} | {r['compile_s']:.0f} | {r['peak_gb']:.1f} |")


if __name__ == "__main__":
    main()
