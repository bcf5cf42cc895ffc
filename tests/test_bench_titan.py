"""bench/bench_titan.py (G7, issue #41): its lmforge side runs for real on a tiny shape on the CPU, and the
arithmetic its record rests on (the 1B shape, the ratios, the loss-curve verdict) holds. The torchtitan
side needs its carried snapshot (.gpu_carry/titan, not in the repository) and is checked on the GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_titan as bt


def test_the_llama_3_2_1b_shape():
    assert bt.ffn_hidden(bt.LLAMA_1B) == 8192
    total, non_embedding = bt.param_counts(bt.LLAMA_1B)
    assert total == 1_498_482_688  # untied: Llama 3.2 1B's 1.236B plus a second 128,256 x 2048 matrix
    assert total - non_embedding == 128_256 * 2048
    assert bt.flops_per_token(bt.LLAMA_1B, 2048) == 6 * non_embedding + 12 * 16 * 2048 * 2048
    assert {c.seq for c in bt.select("bf16,fp8")} == {2048, 8192}
    # every case of a group is 16,384 tokens a step, torchtitan's default 8 x 2048
    spec = bt.case_spec(bt.CASES["titan-bf16-8k"], bt.Settings(
        shape=bt.LLAMA_1B, device="cuda", gpus=1, warmup=5, steps=20, compile=True,
        tokens_per_step=bt.TOKENS_PER_STEP, titan_src="src", work=Path("w")))
    assert spec["local_batch"] == 2 and "--compile.enable" in spec["titan_args"]


def _entry(side, seq, rate, float8="none", ac=bt.TITAN_AC, levers=(), budget=1.0, peak=30.0):
    case = bt.Case("x", side, seq, float8=float8, ac=ac, budget=budget)
    return {"case_settings": {"side": side, "seq": seq, "float8": float8, "ac": ac, "titan_fp8_filter": "auto",
                              "budget": budget},
            "levers": list(levers) or case.levers, "result": {"tokens_per_s": rate, "peak_allocated_gib": peak}}


def test_the_headline_ratios_come_from_the_cases_of_one_call():
    results = {
        "titan-bf16-2k": _entry("titan", 2048, 100.0),
        "lmf-bf16-2k": _entry("lmforge", 2048, 104.0),
        "lmf-bf16-2k-fused": _entry("lmforge", 2048, 112.0, levers=["fused_loss"]),
        "lmf-bf16-2k-fused-noac": _entry("lmforge", 2048, 125.0, ac="none"),
        "titan-fp8tw-2k": _entry("titan", 2048, 130.0, float8="tensorwise"),
        "titan-fp8rw-2k": _entry("titan", 2048, 120.0, float8="rowwise"),
        "lmf-fp8tw-2k": _entry("lmforge", 2048, 126.0, float8="tensorwise"),
        "lmf-fp8rw-2k": _entry("lmforge", 2048, 150.0, float8="rowwise"),
    }
    top = bt.headline(results)
    assert top["g7_vs_torchtitan"] == 1.12 and top["g7_cases"] == ["lmf-bf16-2k-fused", "titan-bf16-2k"]
    assert top["g7_like_for_like_vs_torchtitan"] == 1.04
    assert top["g7_any_ac_vs_torchtitan"] == 1.25
    assert top["g7_fp8_vs_torchtitan"] == round(150 / 130, 4)  # best recipe on each side
    assert top["g7_fp8_rowwise_like_for_like_vs_torchtitan"] == 1.25
    assert "g7_8k_vs_torchtitan" not in top  # no 8k case in this call


def test_selective_checkpointing_counts_for_lmforge_and_is_compared_at_the_same_budget():
    results = {
        "titan-bf16-2k": _entry("titan", 2048, 100.0, peak=37.0),
        "titan-bf16-2k-mb50": _entry("titan", 2048, 105.0, ac="none", budget=0.5),
        "titan-bf16-2k-noac": _entry("titan", 2048, 108.0, ac="none"),
        "lmf-bf16-2k-fused": _entry("lmforge", 2048, 103.0, levers=["fused_loss"]),
        "lmf-bf16-2k-fused-mb50": _entry("lmforge", 2048, 111.0, ac="none", budget=0.5, peak=36.0),
        "lmf-bf16-2k-fused-noac": _entry("lmforge", 2048, 130.0, ac="none"),
    }
    top = bt.headline(results)
    # the memory budget counts on lmforge's side (a lever); no checkpointing at all does not
    assert top["g7_vs_torchtitan"] == 1.11 and top["g7_cases"] == ["lmf-bf16-2k-fused-mb50", "titan-bf16-2k"]
    assert top["g7_peak_gib"] == [36.0, 37.0]
    assert top["g7_same_budget_vs_torchtitan"] == round(111 / 105, 4)
    assert top["g7_same_budget_cases"] == ["lmf-bf16-2k-fused-mb50", "titan-bf16-2k-mb50"]
    assert top["g7_any_ac_vs_torchtitan"] == round(130 / 108, 4)
    assert "peak GiB [36.0, 37.0]" in bt.table(top)


def test_a_memory_budget_reaches_both_trainers():
    st = bt.Settings(shape=bt.LLAMA_1B, device="cuda", gpus=1, warmup=5, steps=20, compile=True,
                     tokens_per_step=bt.TOKENS_PER_STEP, titan_src="src", work=Path("w"))
    titan = bt.case_spec(bt.CASES["titan-bf16-2k-mb50"], st)["titan_args"]
    assert titan[titan.index("--activation_checkpoint.mode") + 1] == "memory_budget"
    assert titan[titan.index("--activation_checkpoint.memory_budget") + 1] == "0.5"
    op = bt.case_spec(bt.CASES["titan-bf16-2k-op"], st)["titan_args"]
    assert op[op.index("--activation_checkpoint.selective_ac_option") + 1] == "op"
    from lmforge.config.pretrain import PretrainParams

    mine = PretrainParams(**bt.lmforge_params(bt.case_spec(bt.CASES["lmf-bf16-2k-fused-bf16p-mb50"], st), 1))
    assert (mine.activation_memory_budget, mine.activation_checkpointing, mine.compile) == (0.5, "none", True)
    uncompiled = bt.case_spec(bt.CASES["lmf-bf16-2k-fused-bf16p-mb50"], replace(st, compile=False, device="cpu"))
    assert PretrainParams(**bt.lmforge_params(uncompiled, 1)).activation_memory_budget == 1.0
    assert bt.case_spec(bt.CASES["titan-bf16-2k-mb50"], replace(st, budget_estimator="profile"))[
        "budget_estimator"] == "profile"  # --budget-estimator reaches each worker
    chosen = bt.with_budget(bt.CASES["lmf-fp8tw-2k-fused-bf16p"], 0.6)  # --lmforge-budget 0.6
    assert (chosen.name, chosen.ac, chosen.budget) == ("lmf-fp8tw-2k-fused-bf16p-mb60", "none", 0.6)


def test_the_loss_curve_verdict():
    bf16 = [3.0 - 0.001 * i + (0.02 if i % 2 else -0.02) for i in range(100)]
    shifted = bt.compare_curves(bf16, [v + 0.005 for v in bf16])
    assert shifted["within_noise"] and shifted["paired_gap_mean"] == 0.005 and shifted["paired_gap_se"] == 0.0
    assert not bt.compare_curves(bf16, [v + 0.2 for v in bf16])["within_noise"]
    assert not bt.compare_curves(bf16, bf16[:-1] + [float("nan")])["within_noise"]


def test_the_lmforge_side_runs_on_the_cpu(tmp_path):
    record = tmp_path / "g7.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_titan.py"), "--smoke", "--cases",
                           "lmf-bf16-2k-fused", "--record", str(record), "--work", str(tmp_path / "work"),
                           "--profile-steps", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(record.read_text())
    entry = out["results"]["lmf-bf16-2k-fused"]
    r = entry["result"]
    assert r and r["tokens_per_s"] > 0 and r["timed_steps"] == 3 and r["time_to_first_step_s"] > 0, entry
    assert r["loss_finite"] and r["params"] == bt.param_counts(bt.SMOKE)[0]
    p = r["lmforge_params"]
    assert (p["rope_theta"], p["d_ff"], p["tie_embeddings"], p["fused_loss"], p["activation_checkpointing"]) == (
        500_000.0, bt.ffn_hidden(bt.SMOKE), False, True, 2)
    assert entry["levers"] == ["fused_loss"] and "| lmf-bf16-2k-fused | lmforge |" in done.stdout
    profile = r["profile"]  # two more steps, profiled after the three timed ones
    assert profile["steps"] == 2 and profile["ms_per_step"]["matmul"] > 0 and profile["ms_per_step"]["optimizer"] > 0
    assert "| case | matmul ms |" in done.stdout


def test_kernels_are_sorted_into_kinds_by_name():
    kinds = {name: bt.kernel_kind(name) for name in (
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "nvjet_tst_128x256_64x4_1x2_h_bz_coopB_TNN",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "triton_poi_fused_mul_silu_0",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamW>", "Memcpy HtoD (Pageable -> Device)",
        "ncclDevKernel_AllGather_RING_LL")}
    assert list(kinds.values()) == ["matmul", "matmul", "attention", "fused (triton)", "optimizer", "copy", "other"]


def test_a_gpu_profile_counts_kernels_once_and_not_the_ranges_that_span_them():
    from types import SimpleNamespace

    import torch

    def gpu_row(key, us, annotation=False):
        return SimpleNamespace(key=key, device_type=torch.autograd.DeviceType.CUDA, self_device_time_total=us,
                               is_user_annotation=annotation)

    rows = [gpu_row("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamW>", 16_000.0),
            gpu_row("Optimizer.step#AdamW.step", 16_500.0, annotation=True),
            gpu_row("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT", 50_000.0),
            SimpleNamespace(key="aten::mm", device_type=torch.autograd.DeviceType.CPU, self_device_time_total=0.0,
                            is_user_annotation=False)]
    summary = bt.kernel_time_by_kind(rows, steps=2, on_gpu=True)
    assert summary["ms_per_step"] == {"matmul": 25.0, "optimizer": 8.0} and summary["total_ms_per_step"] == 33.0
    assert all(not name.startswith("Optimizer.step") for name, _ms in summary["costliest"])


def test_merge_keeps_each_calls_ratio_and_a_baseline_measured_twice(tmp_path):
    first = {"g7_vs_torchtitan": 1.02, "torchtitan_commit": "abc v0",
             "results": {"titan-bf16-2k": _entry("titan", 2048, 100.0), "lmf-bf16-2k": _entry("lmforge", 2048, 102.0)}}
    second = {"g7_vs_torchtitan": 0.99, "g7_fp8_vs_torchtitan": 1.01,
              "results": {"titan-bf16-2k": _entry("titan", 2048, 101.0)}}
    paths = []
    for name, record in (("a", first), ("b", second)):
        paths.append(str(tmp_path / f"{name}.json"))
        Path(paths[-1]).write_text(json.dumps(record))
    merged = bt.merge(paths, str(tmp_path / "g7.json"))
    assert merged["g7_vs_torchtitan"] == 1.02 and merged["g7_fp8_vs_torchtitan"] == 1.01
    assert merged["results"]["titan-bf16-2k"]["result"]["tokens_per_s"] == 100.0
    assert merged["results"]["titan-bf16-2k@b"]["result"]["tokens_per_s"] == 101.0
    assert json.loads((tmp_path / "g7.json").read_text())["torchtitan_commit"] == "abc v0"


def test_plot_draws_the_loss_curves_of_a_record(tmp_path):
    record = {"results": {"loss-lmf-bf16": {"result": {"losses": [5.0, 4.5, 4.2]}},
                          "loss-lmf-fp8-tensorwise": {"result": {"losses": [5.0, 4.6, 4.1]}},
                          "lmf-bf16-2k": {"result": {"tokens_per_s": 1.0}}}}
    path = tmp_path / "loss.json"
    path.write_text(json.dumps(record))
    png = tmp_path / "loss.png"
    assert bt.plot(str(path), str(png)) == ["loss-lmf-bf16", "loss-lmf-fp8-tensorwise"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path.write_text(json.dumps({"results": {"lmf-bf16-2k": {"result": {"tokens_per_s": 1.0}}}}))
    with pytest.raises(SystemExit, match="no case with a loss curve"):
        bt.plot(str(path), str(png))


def test_the_lmforge_side_runs_sharded_over_two_processes(tmp_path):
    """--gpus 2 starts torchrun: two gloo processes on the CPU, the model sharded (FSDP2) over them."""
    record = tmp_path / "g7.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_titan.py"), "--smoke", "--gpus", "2", "--cases",
                           "lmf-bf16-2k-fused", "--record", str(record), "--work", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(record.read_text())["results"]["lmf-bf16-2k-fused"]["result"]
    assert r["gpus"] == 2 and r["tokens_per_s_per_gpu"] * 2 == pytest.approx(r["tokens_per_s"], rel=1e-3)
    assert r["loss_finite"] and r["lmforge_params"]["parallel"] == "fsdp"
    assert "sharded over 2 processes" in (tmp_path / "work" / "lmf-bf16-2k-fused.log").read_text()
