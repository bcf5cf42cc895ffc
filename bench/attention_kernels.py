"""Causal attention alone at G1's shape, forward and backward, through each SDPA kernel (a GPU bench).

    python bench/attention_kernels.py [--heads 6,12] [--fa4] [--record FILE]

G1's attention is 12 layers of SDPA over batch 32 x 1024 tokens at width 768. q, k and v are
made as the model makes them: one projection's output split in three and viewed as heads, so
their strides are the model's. Each kernel is timed over the same inputs with CUDA events;
its output and gradients are compared with the math kernel's in fp32 on a smaller batch.

--fa4 also times FlashAttention-4 (the flash-attn-4 package, CuTe DSL kernels): first its own
flash_attn_func, then as SDPA's flash implementation through
torch.nn.attention.activate_flash_attention_impl. Its kernels compile on first use (seconds),
which the warm-up absorbs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

WIDTH, CONTEXT, BATCH, LAYERS = 768, 1024, 32, 12


def qkv(batch: int, heads: int, dtype=torch.bfloat16, seed: int = 0):
    """q, k, v as views of one (batch, context, 3 x width) projection, heads on dim 1."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, CONTEXT, 3 * WIDTH, device="cuda", dtype=dtype, generator=gen)
    x.requires_grad_(True)
    q, k, v = x.split(WIDTH, dim=2)
    shape = (batch, CONTEXT, heads, WIDTH // heads)
    return x, *(t.reshape(shape).transpose(1, 2) for t in (q, k, v))


def attend(backend, q, k, v):
    """Causal attention of (batch, heads, context, head width) q, k, v through `backend`: an SDPA
    kernel, or "fa4-direct" for flash-attn-4's own function (no SDPA glue; it takes heads on dim 2)."""
    if backend == "fa4-direct":
        from flash_attn.cute import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def run(backend, x, q, k, v, grad):
    x.grad = None
    out = attend(backend, q, k, v)
    out.backward(grad)
    return out, x.grad


def time_ms(backend, heads: int, steps: int = 20, warmup: int = 5) -> dict:
    x, q, k, v = qkv(BATCH, heads)
    grad = torch.randn(BATCH, heads, CONTEXT, WIDTH // heads, device="cuda", dtype=torch.bfloat16)
    passes = {"forward": torch.no_grad()(lambda: attend(backend, q, k, v)),
              "forward_backward": lambda: run(backend, x, q, k, v, grad)}
    for _ in range(warmup):  # both passes: cuDNN builds a separate plan for a forward without grad
        for one_pass in passes.values():
            one_pass()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = {}
    for name, one_pass in passes.items():
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            one_pass()
        end.record()
        torch.cuda.synchronize()
        times[name] = start.elapsed_time(end) / steps
    # Causal: half of the 4 * B * H * T^2 * D forward FLOPs; the backward does 2.5 times the forward.
    flops = 2 * BATCH * heads * CONTEXT * CONTEXT * (WIDTH // heads)
    return {"forward_ms": round(times["forward"], 3), "backward_ms": round(times["forward_backward"] - times["forward"], 3),
            "step_ms_12_layers": round(LAYERS * times["forward_backward"], 2),
            "forward_tflops": round(flops / times["forward"] / 1e9, 1),
            "backward_tflops": round(2.5 * flops / (times["forward_backward"] - times["forward"]) / 1e9, 1)}


def max_rel_error(backend, heads: int) -> float:
    """Largest relative difference of output and input gradient against the math kernel in fp32."""
    x, q, k, v = qkv(2, heads)
    grad = torch.randn(2, heads, CONTEXT, WIDTH // heads, device="cuda", dtype=torch.bfloat16)
    out, dx = run(backend, x, q, k, v, grad)
    x32, q32, k32, v32 = qkv(2, heads, torch.float32)
    ref, dref = run(SDPBackend.MATH, x32, q32, k32, v32, grad.float())
    return max(((a.float() - b).norm() / b.norm()).item() for a, b in ((out, ref), (dx, dref)))


def measure(label: str, backend, heads: int) -> dict:
    try:
        row = time_ms(backend, heads)
        row["rel_error_vs_fp32_math"] = round(max_rel_error(backend, heads), 5)
    except (RuntimeError, ValueError, ImportError) as err:  # a kernel that refuses the shape says why
        row = {"failed": str(err).splitlines()[0][:200]}
    return {"kernel": label, "heads": heads, **row}


def activate_fa4() -> str | None:
    """Make FlashAttention-4 SDPA's flash kernel; the reason when it cannot be."""
    try:
        from torch.nn.attention import activate_flash_attention_impl
        activate_flash_attention_impl("FA4")
    except Exception as err:  # ImportError, or the registry's own refusal
        return f"{type(err).__name__}: {err}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default="6,12", help="head counts at width 768, comma-separated")
    parser.add_argument("--fa4", action="store_true",
                        help="also time flash-attn-4: its own flash_attn_func, then as SDPA's flash kernel")
    parser.add_argument("--record", default=None)
    args = parser.parse_args()
    heads = [int(h) for h in args.heads.split(",")]
    rows = [measure(label, backend, h) for h in heads for label, backend in
            (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash (FA2, PyTorch's own)", SDPBackend.FLASH_ATTENTION))]
    if args.fa4:
        rows += [measure("flash_attn.cute.flash_attn_func (FA4)", "fa4-direct", h) for h in heads]
        failure = activate_fa4()
        rows += [{"kernel": "flash (FA4)", "heads": h, "failed": failure} if failure else
                 measure("flash (FA4)", SDPBackend.FLASH_ATTENTION, h) for h in heads]
    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "python": platform.python_version()}
    if args.record:
        with open(args.record, "w") as handle:
            json.dump({"command": " ".join(sys.argv), "environment": env, "rows": rows}, handle, indent=1)
    print("| kernel | heads | forward ms | backward ms | 12 layers ms | fwd TFLOP/s | bwd TFLOP/s | rel. error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['kernel']} | {r['heads']} | failed: {r['failed']} |")
        else:
            print(f"| {r['kernel']} | {r['heads']} | {r['forward_ms']} | {r['backward_ms']} | {r['step_ms_12_layers']} "
                  f"| {r['forward_tflops']} | {r['backward_tflops']} | {r['rel_error_vs_fp32_math']} |")


if __name__ == "__main__":
    main()
