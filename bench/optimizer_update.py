"""The update alone on Llama 3.2 1B's weights (issue #41): how long the step after the backward takes.

    python bench/optimizer_update.py --record $OUT/update.json       # on a GPU, about a minute
    python bench/optimizer_update.py --smoke                          # a tiny shape on the CPU

G7's step spends 21-23 ms in the optimizer (bench_titan's profile, call 15 of
2026-12-07-h100-g7-headline.json). This times that part by itself, on the 1B shape's 147 weight
tensors (1.50B parameters), after a backward has left its gradients, four ways:
  titan     torchtitan v0.2.2's on one GPU: fp32 weights and gradients, the total norm, the gradients
            scaled in place (torch.nn.utils.clip_grad_norm_, foreach), then fused AdamW over one group
  fp32      lmforge's param_dtype fp32: the same weights and gradients, the clipping folded into fused
            AdamW as its grad_scale (runtime.optimizer_step), weight decay on matrices only
  eager     pretrain.param_dtype bf16: the working copy's bf16 gradients cast into the masters'
            fp32 ones, the same clipping and fused AdamW, the bf16 copy refreshed (pretrain_step.update)
  compiled  the same with pretrain.compile_optimizer: one compiled function reads the bf16
            gradients, updates the masters and writes the copy
Each variant starts from the same seeded weights and gradients; the median of --steps updates
(each synchronised) counts, after --warmup (the compiled variant's first call, its compile, is
reported apart). Peak memory is the variant's own (each runs on an emptied allocator). The weights
each variant ends with are compared with the eager variant's: the compiled update must agree to
fp32 rounding, fp32 to bf16's (its gradients were never rounded to bf16), titan a little further
(it decays the norms' weights too).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_titan import LLAMA_1B, SMOKE, ffn_hidden  # noqa: E402  (the shapes bench_titan trains)
from lmforge.training import master_weights, pretrain_step, runtime  # noqa: E402
from record_facts import git_commit, package_versions  # noqa: E402

LR, BETAS, WEIGHT_DECAY, MAX_NORM = 3e-4, (0.9, 0.95), 0.1, 1.0


def weight_shapes(s: dict) -> list[tuple[int, ...]]:
    """The untied Llama's weights: embedding, per block the attention's four matrices, SwiGLU's three
    and two norms, then the final norm and the output layer."""
    d, kv, f = s["dim"], s["dim"] // s["n_heads"] * s["n_kv_heads"], ffn_hidden(s)
    block = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f), (d,), (d,)]
    return [(s["vocab"], d), *block * s["n_layers"], (d,), (s["vocab"], d)]


def seeded(shapes, device, dtype, scale: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)
            for shape in shapes]


def build(variant: str, shapes, device) -> tuple[torch.nn.Module, torch.optim.Optimizer, object, list]:
    """The masters (an fp32 module), their optimizer, the working copy (bf16 variants) and the gradients
    a backward would leave, where it leaves them."""
    masters = torch.nn.ParameterList([torch.nn.Parameter(w) for w in seeded(shapes, device, torch.float32, 0.02, 0)])
    if variant == "titan":  # one group, decay on every weight
        optimizer = torch.optim.AdamW(masters.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True)
    else:
        optimizer = runtime.adamw(masters, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS)
    working = master_weights.BF16Working(masters) if variant in ("eager", "compiled") else None
    grads = seeded(shapes, device, torch.bfloat16 if working else torch.float32, 1e-3, 1)
    return masters, optimizer, working, grads


def run_variant(variant: str, shapes, device, warmup: int, steps: int) -> tuple[dict, list[torch.Tensor]]:
    gc.collect()  # the last variant's tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    masters, optimizer, working, grads = build(variant, shapes, device)
    holders = list((working.model if working else masters).parameters())
    p = SimpleNamespace(compile_optimizer=variant == "compiled", max_grad_norm=MAX_NORM)
    times = []
    for step in range(warmup + steps):
        # The same gradient tensors serve every step. The bf16 updates only read them; titan's and fp32's
        # write the clipped gradients back into them, so from the second step on they read gradients
        # of norm 1, which costs the same kernels.
        for holder, grad in zip(holders, grads):
            holder.grad = grad
        runtime.synchronize(device)
        t0 = time.perf_counter()
        if variant == "titan":
            torch.nn.utils.clip_grad_norm_(masters.parameters(), MAX_NORM, foreach=True)
            optimizer.step()
        else:
            pretrain_step.update(masters, optimizer, working, p)
        runtime.synchronize(device)
        times.append(time.perf_counter() - t0)
        optimizer.zero_grad(set_to_none=True)
    result = {"update_ms_median": round(1e3 * statistics.median(times[warmup:]), 3),
              "update_ms_min": round(1e3 * min(times[warmup:]), 3), "first_update_s": round(times[0], 2)}
    if device.type == "cuda":
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result, [m.detach().cpu() for m in masters.parameters()]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU")
    parser.add_argument("--variants", default="titan,fp32,eager,compiled")
    parser.add_argument("--record", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    shape = SMOKE if args.smoke or device.type == "cpu" else LLAMA_1B
    shapes = weight_shapes(shape)
    params = sum(torch.Size(s).numel() for s in shapes)
    print(f"[update] {len(shapes)} tensors, {params:,} parameters on {device}", flush=True)
    results, weights = {}, {}
    for variant in args.variants.split(","):
        results[variant], weights[variant] = run_variant(variant, shapes, device, args.warmup, args.steps)
        print(f"[update] {variant}: {json.dumps(results[variant])}", flush=True)
    if "eager" in weights:
        for variant in weights:
            results[variant]["max_abs_difference_from_eager"] = max_difference(weights[variant], weights["eager"])
    record = {"bench": "optimizer update", "issue": 41, "command": " ".join(sys.argv), "lmforge_commit": git_commit(),
              "environment": package_versions(("torch", "triton")),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "shape": shape,
              "tensors": len(shapes), "params": params, "lr": LR, "betas": BETAS, "weight_decay": WEIGHT_DECAY,
              "max_grad_norm": MAX_NORM, "warmup": args.warmup, "steps": args.steps, "results": results}
    if args.record:
        args.record.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'variant':10s} {'ms/update':>10s} {'first s':>8s} {'peak GiB':>9s} {'max |diff| vs eager':>20s}")
    for variant, r in results.items():
        print(f"{variant:10s} {r['update_ms_median']:10.3f} {r['first_update_s']:8.2f} "
              f"{r.get('peak_allocated_gib', float('nan')):9.2f} {r.get('max_abs_difference_from_eager', float('nan')):20.3g}")


if __name__ == "__main__":
    main()
