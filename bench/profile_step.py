"""Where a pretrain step spends its GPU time: kernels by kind, and SDPA's kernels on their own.

    python bench/profile_step.py                                   # G1's shape, configs/gpu.yaml otherwise
    python bench/profile_step.py --variant cudnn:attention=cudnn --variant cdt:inductor.coordinate_descent_tuning=1
    python bench/profile_step.py --attention-only                  # just the SDPA kernel table
    torchrun --nproc-per-node 2 bench/profile_step.py              # G3: the step under DDP, as rank 0 sees it

A diagnostic beside bench/bench_gpu.py, which measures the real stage: this one builds the
stage's own step (lmforge.training.pretrain_step.build_step: the model and its loss compiled as one,
the bf16 working copy, clipping and fused AdamW) on random tokens and runs it in one process, so
several variants compile and run in one call. Under torchrun the step runs under DDP as the
stage wraps it. Per variant it prints step time, tokens/s, MFU, compile time
and peak memory, then the CUDA time of the profiled steps by kernel kind (NCCL runs beside the
compute, "step - kernels" is the unprofiled step time minus the compute kernels' time: roughly
the GPU's idle time, which profiling noise can push below zero), and the heaviest kernels.
--variant NAME:KEY=VALUE[,KEY=VALUE] sets pretrain params, inductor.KEY for torch._inductor.config
or dynamo.KEY for torch._dynamo.config. Under torchrun the step compiles as G3's does, one graph
(G1_SHAPE's ddp_overlap false); split:ddp_overlap=true cuts it at DDP's buckets. compile_runner sets
dynamo.optimize_ddp from ddp_overlap, so a dynamo.optimize_ddp variant has no effect.
--launchers also records the CPU side and names, under each of the heaviest kernels, the op that
launched it and that op's input shapes (which matmul is which, where an eager kernel comes from).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lmforge.config.overrides import parse_override  # noqa: E402

PROFILED_STEPS = 3  # steps under torch.profiler per variant; the kernel table is per step

# Kernel kinds by name (first match wins); what matches none is counted as "other". Inductor names
# its kernels after the ops they fuse (triton_poi_fused__scaled_dot_product_..., triton_tem_fused_mm...),
# so its templates and fused kernels are sorted before the names of the library kernels.
KINDS = (
    ("nccl", r"nccl"),
    ("matmul", r"^triton_tem"),
    ("fused (triton)", r"^triton|cross_entropy_grad_kernel"),  # Inductor's, and lmforge/training/fused_loss.py's
    ("attention", r"flash|fmha|cudnn|attention|sdpa"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_"),
    ("optimizer", r"adam|multi_tensor|foreach"),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """NAME:KEY=VALUE,... -> (name, pretrain overrides, {"inductor.KEY" / "dynamo.KEY": value})."""
    name, _, body = text.partition(":")
    params, compiler = {}, {}
    for item in filter(None, body.split(",")):
        key, value = parse_override(item)
        target = compiler if key.startswith(("inductor.", "dynamo.")) else params
        target[key] = value
    return name, params, compiler


def compiler_configs(settings: dict) -> list[tuple[object, str, object]]:
    """(config module, key, value) for each inductor.KEY / dynamo.KEY setting."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    modules = {"inductor": inductor_config, "dynamo": dynamo_config}
    return [(modules[key.partition(".")[0]], key.partition(".")[2], value) for key, value in settings.items()]


def run_variant(name: str, overrides: dict, compiler: dict, d, steps: int, top: int, launchers: bool = False) -> dict:
    """One variant: pretrain overrides over G1's shape, compiler settings restored afterwards."""
    from bench_gpu import G1_SHAPE, base_params
    from lmforge.config.pretrain import PretrainParams

    # The stage's GPU settings: params.yaml with the configs/gpu.yaml overlay merged over it.
    base = base_params(ROOT / "params.yaml", ROOT / "configs" / "gpu.yaml", seed=None)["pretrain"]
    p = PretrainParams(**{**base, **G1_SHAPE, "pad_vocab": 1, **overrides})
    settings = compiler_configs(compiler)
    saved = [(config, key, getattr(config, key)) for config, key, _ in settings]
    try:
        for config, key, value in settings:
            setattr(config, key, value)
        return measure(name, p, d, steps, top, launchers)
    finally:
        for config, key, value in saved:
            setattr(config, key, value)


def measure(name: str, p, d, steps: int, top: int, launchers: bool = False) -> dict:
    """Compile and time the step, then profile PROFILED_STEPS of it; print and return the figures."""
    import torch

    from bench_gpu import G1_VOCAB
    from lmforge.training.model import TokenInfo, build_model, flops_per_token, set_training_activation, set_training_attention
    from lmforge.training.pretrain_step import around_the_loop, build_step
    from lmforge.training.pretraining import make_optimizer
    from lmforge.training.runtime import enable_tf32, peak_flops

    torch._dynamo.reset()
    device = d.device
    enable_tf32(device)
    model = build_model(p, TokenInfo(G1_VOCAB, 0, 1, 2, 3), seed=0, device=device).train()
    set_training_attention(model, True)
    set_training_activation(model, True)
    say = print if d.main else (lambda _msg: None)
    # The stage's own step: the compiled model and loss, DDP, the bf16 working copy, clipping, AdamW.
    train_step = build_step(model, make_optimizer(model, p), p, d, masked=False, say=say)

    cuda = device.type == "cuda"  # a CPU run only checks the code path (no kernel table)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step() -> None:
        x = torch.randint(4, G1_VOCAB, (p.batch_size, p.context), device=device)
        train_step([(x, x)])
        train_step.optimizer.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with around_the_loop(p, device):
        start = time.perf_counter()
        step()
        sync()
        compile_s = time.perf_counter() - start
        for _ in range(5):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        step_s = (time.perf_counter() - start) / steps
        activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
        with torch.profiler.profile(activities=[activity]) as prof:
            for _ in range(PROFILED_STEPS):
                step()
            sync()
        cpu_prof = None
        if launchers and cuda:  # a step of its own: the CPU side's overhead stays out of the table above
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, activity],
                                        record_shapes=True) as cpu_prof:
                step()
                sync()
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0

    kernels: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total:
            kernels[event.key] += event.device_time_total / PROFILED_STEPS / 1000  # ms per step
    by_kind: dict[str, float] = defaultdict(float)
    for kernel, ms in kernels.items():
        by_kind[kind_of(kernel)] += ms
    tok_s = p.batch_size * p.context * d.world / step_s  # all ranks together
    peak = peak_flops(device)
    compute_ms = sum(ms for kind, ms in by_kind.items() if kind != "nccl")
    result = {"variant": name, "gpus": d.world, "step_ms": 1000 * step_s, "tokens_per_s": tok_s,
              "mfu": tok_s * flops_per_token(model, p.context) / (peak * d.world) if peak else None,
              "compile_s": compile_s, "peak_gb": peak_gb, "compute_ms": compute_ms,
              "step_minus_kernels_ms": 1000 * step_s - compute_ms, "by_kind": dict(by_kind)}
    if d.main:
        print(f"\n== {name} ({d.world} x {device.type}): {result['step_ms']:.1f} ms/step, {tok_s:,.0f} tokens/s, "
              f"MFU {100 * (result['mfu'] or 0):.1f}%, first step {compile_s:.0f} s, peak {peak_gb:.1f} GiB")
        print(f"   kernels by kind (ms; compute {compute_ms:.1f}, step {result['step_ms']:.1f}): "
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))
        for kernel, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]:
            print(f"   {ms:7.2f} ms  {kind_of(kernel):<14} {kernel[:110]}")
            if cpu_prof is not None:
                for who, ms_by in launched_by(cpu_prof, kernel)[:4]:
                    print(f"   {'':>10} {ms_by:6.2f} ms from {who}")
    del model, train_step
    torch.cuda.empty_cache()
    return result


def launched_by(prof, kernel: str) -> list[tuple[str, float]]:
    """(the op that launched `kernel`, with its input shapes and caller; ms) from a one-step profile
    that recorded the CPU side: the profiler hangs each kernel on the innermost op running at launch."""
    import torch

    found: dict[str, float] = defaultdict(float)
    for op in prof.events():
        if op.device_type != torch.autograd.DeviceType.CPU:
            continue
        for launched in op.kernels:
            if launched.name == kernel:
                who = f"{op.name} {op.input_shapes or ''}".strip()
                if op.cpu_parent is not None:
                    who += f"  < {op.cpu_parent.name[:60]}"
                found[who[:200]] += launched.duration / 1000  # us -> ms
    return sorted(found.items(), key=lambda kv: -kv[1])


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

    def forward():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward_backward():  # autograd.grad: no accumulation into .grad, no extra add kernels
        torch.autograd.grad(forward(), (q, k, v), grad)

    def ms_per_call(fn) -> float:  # back-to-back calls between two events: no per-call sync
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                for _ in range(3):
                    forward_backward()
                fwd = ms_per_call(forward)
                bwd = ms_per_call(forward_backward) - fwd
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
    parser.add_argument("--launchers", action="store_true",
                        help="name the op (and its input shapes) that launched each listed kernel")
    parser.add_argument("--attention-only", action="store_true")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of the code path")
    args = parser.parse_args()

    from bench_gpu import G1_SHAPE
    from lmforge.training.runtime import setup_distributed

    d = setup_distributed(args.device)  # one process, or one per GPU under torchrun
    if d.world == 1 and d.device.type == "cuda":
        attention_table(G1_SHAPE["batch_size"], G1_SHAPE["n_head"], G1_SHAPE["context"],
                        G1_SHAPE["d_model"] // G1_SHAPE["n_head"])
        if args.attention_only:
            return
    results = [run_variant(*parse_variant(v), d, args.steps, args.top, args.launchers)
               for v in (args.variant or ["g1:"])]
    if d.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if not d.main:
        return
    print("\n| variant | GPUs | ms/step | tokens/s | MFU | compute kernels ms | step - kernels ms | NCCL ms | first step s | peak GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r['gpus']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{100 * (r['mfu'] or 0):.1f}% | {r['compute_ms']:.1f} | {r['step_minus_kernels_ms']:.1f} | "
              f"{r['by_kind'].get('nccl', 0.0):.1f} | {r['compile_s']:.0f} | {r['peak_gb']:.1f} |")

if __name__ == "__main__":
    main()
