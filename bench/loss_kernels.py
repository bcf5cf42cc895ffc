"""The output layer and its loss at G1's shape, four ways, on one GPU: which is fastest, and exact.

    python bench/loss_kernels.py --record bench/results/X.json

Hidden states (32,768 x 768) and the output layer's weight (50,304 x 768) in bf16, as under
pretrain.param_dtype bf16; random targets. Each variant runs forward and backward (the gradients
of the hidden states and of the weight) 20 times after 3 warm-up calls; the time is the median,
from CUDA events. Variants:
  plain      the logits, then F.cross_entropy over them upcast (compiled: one kernel for the loss)
  lmforge    lmforge/training/fused_loss.py (pretrain.fused_loss)
  liger      Liger-Kernel's fused linear cross-entropy (chunks of rows; never all logits at once)
  cce        Cut Cross-Entropy (Apple): never materialises the logits; exact (filter_eps None)
  cce-filter the same with its default gradient filtering ("high": skips near-zero softmax entries)
  fp8-head   a candidate, measured here before it goes near the stage: lmforge's loss with the head's three
             matmuls in FP8 through torch._scaled_mm (hidden and weight e4m3, scaled by their amax; the
             logits' gradient e5m2 at a fixed scale, as its entries are bounded by 1/count; the transposed
             copy the weight gradient needs, since Hopper's FP8 matmul takes only one layout)
After the table, `--matmuls` also times the head's three matmuls alone, bf16 against FP8 (inputs cast
beforehand): the ceiling of what FP8 can take off G1's step.
Each variant's loss and gradients are compared with `plain`'s (max abs difference, relative to
the largest entry). Liger and CCE are optional: a variant whose package is missing is skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lmforge.training import fused_loss  # noqa: E402

ROWS, WIDTH, VOCAB = 32 * 1024, 768, 50_304


def plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets)


E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# The logits' gradient is (softmax - one-hot) / count: times count it lies in [-1, 1], and 2^15 more
# puts it high in e5m2's range (max 57,344), so entries down to ~2^-31 of a row keep a value.
GRAD_HEADROOM = 2.0**15


def to_e4m3(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` in e4m3 scaled by its amax (tensorwise), and the factor that undoes the scale."""
    scale = torch.finfo(E4M3).max / t.abs().amax().float().clamp(min=1e-12)
    return (t.float() * scale).to(E4M3), scale.reciprocal()


def column_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


class FP8LinearCrossEntropy(torch.autograd.Function):
    """fused_loss.LinearCrossEntropy with the three matmuls in FP8 (bench-only: see the module doc)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int):
        count = (targets != ignore_index).sum().clamp(min=1)
        x8, x_undo = to_e4m3(hidden)
        w8, w_undo = to_e4m3(weight)
        logits = torch._scaled_mm(x8, w8.t(), scale_a=x_undo, scale_b=w_undo, out_dtype=torch.bfloat16)
        row_loss, grad_logits = fused_loss.cross_entropy_grad(logits, targets, count, ignore_index)
        g_scale = count.float() * GRAD_HEADROOM
        g8 = (grad_logits.float() * g_scale).to(E5M2)
        ctx.save_for_backward(g8, g_scale.reciprocal(), x8, x_undo, w8, w_undo)
        return row_loss.sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        g8, g_undo, x8, x_undo, w8, w_undo = ctx.saved_tensors
        grad_hidden = torch._scaled_mm(g8, column_major(w8), scale_a=g_undo, scale_b=w_undo,
                                       out_dtype=torch.bfloat16)
        grad_weight = torch._scaled_mm(g8.t().contiguous(), column_major(x8), scale_a=g_undo, scale_b=x_undo,
                                       out_dtype=torch.bfloat16)
        return (grad_hidden * grad_loss).to(torch.bfloat16), (grad_weight * grad_loss).to(torch.bfloat16), None, None


def variants() -> dict:
    found = {"plain": torch.compile(plain),
             "lmforge": lambda h, w, y: fused_loss.LinearCrossEntropy.apply(h, w, y, -100),
             "fp8-head": lambda h, w, y: FP8LinearCrossEntropy.apply(h, w, y, -100)}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        found["liger"] = lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y)
    except ImportError as err:
        print(f"liger skipped: {err}")
    try:
        from cut_cross_entropy import linear_cross_entropy

        found["cce"] = lambda h, w, y: linear_cross_entropy(h, w, y, filter_eps=None)
        found["cce-filter"] = lambda h, w, y: linear_cross_entropy(h, w, y)
    except ImportError as err:
        print(f"cce skipped: {err}")
    return found


def run(fn, hidden, weight, targets):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets)
    loss.backward()
    return loss.detach().float(), hidden.grad, weight.grad


def time_it(fn, hidden, weight, targets, repeats: int = 20) -> tuple[float, float]:
    for _ in range(3):
        run(fn, hidden, weight, targets)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(fn, hidden, weight, targets)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30


def time_matmuls(hidden, weight, repeats: int = 20) -> dict:
    """The head's forward, input-gradient and weight-gradient matmuls alone, bf16 and FP8, in ms."""
    grad = torch.randn(hidden.size(0), weight.size(0), device=hidden.device).mul_(1e-3).bfloat16()
    x8, x_undo = to_e4m3(hidden.detach())
    w8, w_undo = to_e4m3(weight.detach())
    g8, g_undo = (grad.float() * 1e3).to(E5M2), torch.tensor(1e-3, device=hidden.device)
    w8_cols, x8_cols, g8_t = column_major(w8), column_major(x8), g8.t().contiguous()
    h, w = hidden.detach(), weight.detach()
    cases = {
        "bf16": (lambda: h @ w.t(), lambda: grad @ w, lambda: grad.t() @ h),
        "fp8": (lambda: torch._scaled_mm(x8, w8.t(), scale_a=x_undo, scale_b=w_undo, out_dtype=torch.bfloat16),
                lambda: torch._scaled_mm(g8, w8_cols, scale_a=g_undo, scale_b=w_undo, out_dtype=torch.bfloat16),
                lambda: torch._scaled_mm(g8_t, x8_cols, scale_a=g_undo, scale_b=x_undo, out_dtype=torch.bfloat16)),
    }
    out = {}
    for name, (forward, grad_input, grad_weight) in cases.items():
        for label, fn in (("forward", forward), ("grad_input", grad_input), ("grad_weight", grad_weight)):
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            torch.cuda.synchronize()
            out[f"{name}_{label}_ms"] = round(start.elapsed_time(end) / repeats, 3)
    return out


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", default=None)
    parser.add_argument("--matmuls", action="store_true", help="also time the head's matmuls alone, bf16 and FP8")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    hidden = (torch.randn(ROWS, WIDTH, device=device) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(VOCAB, WIDTH, device=device) * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(0, VOCAB, (ROWS,), device=device)
    reference = [t.clone() for t in run(plain, hidden, weight, targets)]
    rows = []
    for name, fn in variants().items():
        try:
            loss, grad_h, grad_w = (t.clone() for t in run(fn, hidden, weight, targets))
            ms, extra_gib = time_it(fn, hidden, weight, targets)
        except Exception as err:  # a kernel that fails here is a finding, not a crash of the bench
            rows.append({"variant": name, "failed": f"{type(err).__name__}: {err}"[:300]})
            continue
        rows.append({"variant": name, "ms": round(ms, 3), "peak_extra_gib": round(extra_gib, 2),
                     "loss": float(loss), "loss_diff": abs(float(loss) - float(reference[0])),
                     "grad_hidden_rel_diff": relative_difference(grad_h, reference[1]),
                     "grad_weight_rel_diff": relative_difference(grad_w, reference[2])})
        print(json.dumps(rows[-1]), flush=True)
    record = {"shape": {"rows": ROWS, "width": WIDTH, "vocab": VOCAB, "dtype": "bf16"},
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": rows}
    if args.matmuls:
        record["matmuls_alone"] = time_matmuls(hidden, weight)
        print(json.dumps(record["matmuls_alone"]), flush=True)
    if args.record:
        Path(args.record).write_text(json.dumps(record, indent=1) + "\n")
    print("| variant | ms fwd+bwd | extra peak GiB | loss diff | grad h rel diff | grad W rel diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['variant']} | failed: {r['failed'][:80]} | | | | |")
        else:
            print(f"| {r['variant']} | {r['ms']:.2f} | {r['peak_extra_gib']:.2f} | {r['loss_diff']:.2e} | "
                  f"{r['grad_hidden_rel_diff']:.2e} | {r['grad_weight_rel_diff']:.2e} |")


if __name__ == "__main__":
    main()
