"""G1, G2 and G3 (docs/performance.md) through the real pretrain stage, in one call.

    python bench/bench_gpu.py                         # every case the visible GPUs allow
    python bench/bench_gpu.py --cases g2 --set g2.max_steps=3500 --record bench/results/X.json

Each case writes a params file (params.yaml with the configs/gpu.yaml overlay merged over it, then
the case's pretrain overrides) and its token data into a scratch folder, then runs
`python -m tasks.pretrain` as a fresh process, timed from process start to the saved model, with
empty torch.compile and Triton caches (cold compile).
  g1  throughput, GPT-2-124M shape (12 x 768, context 1024, batch 32, vocab 50,304) on one GPU,
      compiled, with pretrain.fused_loss and param_dtype bf16, and 6 heads of 128: the same width,
      parameters and FLOPs as GPT-2's 12 of 64, with faster attention (--set g1.n_head=12 for
      GPT-2's split, --set g1.fused_loss=false for the plain loss, --set g1.param_dtype=fp32 for
      autocast over fp32 weights); the tokens are random ids (throughput does not depend on them),
      drawn by the stage's loader
  g2  time to quality: char-level Shakespeare, first 90% train, last 10% val, the configs/gpu.yaml
      recipe; then `python -m tasks.evaluate` scores the saved model on the whole val split
  g3  g1 on 2 GPUs, then on every visible GPU if there are more (the stage relaunches itself under
      torchrun), scaling over g1; compiled as one graph (ddp_overlap false, --set g3.ddp_overlap=true
      for Dynamo's split at DDP's buckets). GPU indices count within CUDA_VISIBLE_DEVICES, so benches can share
      a machine: CUDA_VISIBLE_DEVICES=3 python bench/bench_gpu.py --cases g2 runs on physical GPU 3
--set CASE.KEY=VALUE overrides a pretrain param of one case (repeatable); the table comes last.

Beside lmforge, in the same call, the anchors of ../shared/anchors/ (--anchors; they differ by
several percent from host to host, so the ratio on one host is the figure): G1 against the
minimal GPT compiled (gpu_anchor.py, VARIANTS=nanogpt, the same head split), G3 against the
minimal GPT under DDP on the same GPUs (ddp_anchor.py, its own one-GPU run as its base). The
--record JSON carries g1_vs_anchor, g2_wall_s, g2_val_loss, g3_scaling_2 (g3_scaling_4) on top.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Imports yaml and pydantic only: fine on a GPU machine without the pipeline's tools (dvc, prefect).
from lmforge.config import ConfigError, parse_yaml, validate_params  # noqa: E402
from lmforge.config.overrides import merge_overlay, parse_override  # noqa: E402

G1_SHAPE = dict(arch="gpt2", n_layer=12, n_head=6, d_model=768, context=1024, batch_size=32, dropout=0.0,
                learning_rate=6e-4, warmup_steps=10, max_steps=120, eval_steps=120, eval_batches=2,
                save_steps=100_000, logging_steps=20, compile=True, compile_mode="default", cuda_graph=False,
                fused_loss=True, param_dtype="bf16", ddp_overlap=False,
                optimizer="adamw")  # the anchor's optimizer (configs/gpu.yaml's G2 recipe uses Muon)
G1_VOCAB = 50_304  # GPT-2's 50,257 padded to a multiple of 64
TARGETS = {"g1_vs_anchor": 1.15, "g2_wall_s": 40.0, "g2_val_loss": 1.294, "g3_scaling_2": 1.95,
           "g3_scaling_4": 3.85}
ANCHOR_SHAPES = {6: "gpt2_124M_h6", 12: "gpt2_124M"}  # gpu_anchor.py's G1 shapes by head count


def write_random_tokens(out: Path, vocab: int, train_tokens: int, seed: int = 0) -> None:
    """Token arrays and meta.json in the tokenize stage's layout, ids drawn uniformly."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = {"train": train_tokens, "val": train_tokens // 20, "test": 0}
    for split, n in sizes.items():
        rng.integers(4, vocab, size=n, dtype=np.uint16).tofile(out / f"{split}.bin")
    from lmforge.data.tokenization import SPECIAL_TOKENS

    meta = {"kind": "random", "vocab_size": vocab, "dtype": "uint16", "special_tokens": SPECIAL_TOKENS,
            "special_ids": {name: i for i, name in enumerate(SPECIAL_TOKENS)},
            "splits": {s: {"tokens": n, "bytes": 2 * n, "documents": 1} for s, n in sizes.items()}}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


def write_shakespeare_tokens(corpus: Path, out: Path) -> dict:
    """G2's split: the first 90% of the characters train, the last 10% validate."""
    from lmforge.data.tokenization import write_tokens

    text = corpus.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    return write_tokens({"train": [text[:cut]], "val": [text[cut:]], "test": []}, out, "char")


def base_params(params_path: Path, overlay_path: Path, seed: int | None) -> dict:
    """The params every case starts from: params.yaml with the GPU overlay merged over it."""
    try:
        base = merge_overlay(read_yaml(params_path), read_yaml(overlay_path), where=str(params_path))
        if seed is not None:
            base["seed"] = seed
        validate_params(base)
    except ConfigError as err:
        raise SystemExit(f"{overlay_path} over {params_path}: {err}") from None
    return base


def case_params(base: dict, overrides: dict) -> dict:
    """`base` with a case's pretrain overrides, validated now rather than by the stage after the
    case has written its token data."""
    try:
        params = merge_overlay(base, {"pretrain": overrides}, where="params")
        validate_params(params)
    except ConfigError as err:
        raise SystemExit(f"pretrain overrides {overrides}: {err}") from None
    return params


def read_yaml(path: Path) -> dict:
    try:
        return parse_yaml(path.read_text(), str(path)) or {}
    except (OSError, ConfigError) as err:
        raise SystemExit(f"{path}: {err}") from None


def run_stage(module: str, folder: Path, env: dict, extra: list[str], log: Path) -> float:
    """Run `python -m tasks.<module>` in `folder`'s files; return its process wall time."""
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run([sys.executable, "-m", f"tasks.{module}", "--params", str(folder / "params.yaml"),
                               "--tokens", str(folder / "tokens"), *extra], cwd=ROOT, env=env,
                              stdout=handle, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode:
        print(log.read_text()[-4000:], flush=True)
        raise SystemExit(f"tasks.{module} failed ({done.returncode}) for {folder.name}; log above")
    return wall


def visible_gpus(indices: str) -> str:
    """GPU indices as this process counts them (`0,1`) -> ids for the child's CUDA_VISIBLE_DEVICES.

    Under CUDA_VISIBLE_DEVICES=2,3 this process's GPU 0 is physical GPU 2, so several benches can run
    side by side, each on its own GPUs."""
    mine = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    wanted = [int(i) for i in indices.split(",")]
    if mine and max(wanted) >= len(mine):
        raise SystemExit(f"GPUs {indices} wanted, but CUDA_VISIBLE_DEVICES={','.join(mine)} shows {len(mine)}")
    return ",".join(mine[i] if mine else str(i) for i in wanted)


def stage_env(gpus: str, **extra: str) -> dict[str, str]:
    """The stage process's environment: these GPUs, tracking off unless LMFORGE_TRACKING says otherwise."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "LMFORGE_TRACKING": os.environ.get("LMFORGE_TRACKING", "off"),
            "CUDA_VISIBLE_DEVICES": visible_gpus(gpus), **extra}


def run_pretrain(name: str, folder: Path, params: dict, gpus: str) -> dict:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    caches = folder / "compile-cache"
    shutil.rmtree(caches, ignore_errors=True)  # cold compile: nothing from an earlier process
    env = stage_env(gpus, TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"), TRITON_CACHE_DIR=str(caches / "triton"))
    wall = run_stage("pretrain", folder, env,
                     ["--out", str(folder / "model"), "--checkpoints", str(folder / "checkpoints"),
                      "--reports", str(folder / "reports")], folder / "pretrain.log")
    metrics = json.loads((folder / "reports" / "metrics.json").read_text())
    return {"case": name, "process_wall_s": round(wall, 2), "pretrain": params["pretrain"], "metrics": metrics}


def g1(work: Path, base: dict, overrides: dict, gpus: str = "0") -> dict:
    folder = work / "g1" if gpus == "0" else work / f"g3-{gpus.count(',') + 1}gpu"
    write_random_tokens(folder / "tokens", G1_VOCAB, train_tokens=50_000_000)
    return run_pretrain(folder.name, folder, case_params(base, {**G1_SHAPE, **overrides}), gpus)


def g2(work: Path, base: dict, overrides: dict, corpus: Path) -> dict:
    folder = work / "g2"
    write_shakespeare_tokens(corpus, folder / "tokens")
    result = run_pretrain("g2", folder, case_params(base, overrides), "0")
    result["evaluate_wall_s"] = round(run_stage("evaluate", folder, stage_env("0"), [
        "--model", str(folder / "model"), "--reports", str(folder / "eval")], folder / "evaluate.log"), 2)
    result["evaluate"] = json.loads((folder / "eval" / "metrics.json").read_text())
    result["val_history"] = [dict(zip(("step", "train_loss", "val_loss"), map(float, line.split(","))))
                             for line in (folder / "reports" / "loss.csv").read_text().splitlines()[1:]]
    return result


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def anchor_g1(anchors: Path, n_head: int, work: Path) -> dict:
    """The minimal GPT, compiled, on GPU 0 with G1's shape and head split: its tokens/s."""
    if n_head not in ANCHOR_SHAPES:
        return {"failed": f"the anchor has no shape with {n_head} heads"}
    env = stage_env("0", VARIANTS="nanogpt", ANCHOR_OUT=str(work))
    done = subprocess.run([sys.executable, str(anchors / "gpu_anchor.py"), ANCHOR_SHAPES[n_head]], env=env,
                          capture_output=True, text=True)
    rows = [r for r in json_lines(done.stdout) if r.get("variant") == "nanogpt" and "tok_s" in r]
    if not rows:
        return {"failed": (done.stdout + done.stderr)[-2000:]}
    return {"tokens_per_s": rows[0]["tok_s"], "row": rows[0]}


def anchor_ddp(anchors: Path, n_gpus: int, n_head: int) -> dict:
    """The minimal GPT under DDP on n_gpus GPUs (1: one plain process): its global tokens/s."""
    env = stage_env(",".join(map(str, range(n_gpus))), N_HEAD=str(n_head))
    script = str(anchors / "ddp_anchor.py")
    command = ([sys.executable, script] if n_gpus == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpus}", script])
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    rows = [r for r in json_lines(done.stdout) if "tok_s" in r]
    if not rows:
        return {"failed": (done.stdout + done.stderr)[-2000:]}
    return {"tokens_per_s": rows[0]["tok_s"], "row": rows[0]}


def parse_sets(items: list[str]) -> dict[str, dict]:
    """`CASE.KEY=VALUE` items -> {case: {pretrain key: value}}; the value reads as the params' overrides do."""
    out: dict[str, dict] = {"g1": {}, "g2": {}, "g3": {}}
    for item in items:
        try:
            dotted, value = parse_override(item)
        except ConfigError as err:
            raise SystemExit(f"--set: {err}") from None
        case, _, name = dotted.partition(".")
        if case not in out or not name:
            raise SystemExit(f"--set {item!r}: expected CASE.KEY=VALUE with CASE one of g1, g2, g3")
        out[case][name] = value
    return out


def row(label: str, r: dict, extra: str = "") -> str:
    m = r["metrics"]
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") else "-"
    return (f"| {label} | {m['tokens_per_s']:,.0f} | {mfu} | {m['first_step_s']:.1f} | "
            f"{m.get('peak_memory_gb', 0):.1f} | {r['process_wall_s']:.1f} | {extra} |")


def heads(r: dict) -> str:
    """'6 heads of 128': head width is G1's one model choice away from GPT-2's 12 of 64."""
    p = r["pretrain"]
    return f"{p['n_head']} heads of {p['d_model'] // p['n_head']}"


def ratio(mine: float | None, theirs: dict | None) -> float | None:
    if not mine or not theirs or not theirs.get("tokens_per_s"):
        return None
    return mine / theirs["tokens_per_s"]


def headline(results: dict) -> dict:
    """The figures the targets are stated in, for the top of the record."""
    out: dict = {}
    if "g1" in results:
        out["g1_vs_anchor"] = ratio(results["g1"]["metrics"]["tokens_per_s"], results["g1"].get("anchor"))
    if "g2" in results:
        out["g2_wall_s"] = results["g2"]["process_wall_s"]
        out["g2_val_loss"] = results["g2"]["evaluate"]["val"]["loss"]
    for key in (k for k in results if k.startswith("g3_")):
        n = results[key]["metrics"]["world_size"]
        if "g1" in results:
            out[f"g3_scaling_{n}"] = results[key]["metrics"]["tokens_per_s"] / results["g1"]["metrics"]["tokens_per_s"]
        anchor = results[key].get("anchor") or {}
        if anchor.get("tokens_per_s") and (anchor.get("one_gpu") or {}).get("tokens_per_s"):
            out[f"g3_anchor_scaling_{n}"] = anchor["tokens_per_s"] / anchor["one_gpu"]["tokens_per_s"]
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def table(results: dict) -> str:
    lines = ["| case | tokens/s | MFU | first step s (compile) | peak GiB | process wall s | against the anchor / target |",
             "|---|---:|---:|---:|---:|---:|---|"]
    top = headline(results)
    if "g1" in results:
        anchor = results["g1"].get("anchor") or {}
        against = (f"minimal GPT {anchor['tokens_per_s']:,.0f}: **{top['g1_vs_anchor']:.3f}x** (target >= "
                   f"{TARGETS['g1_vs_anchor']}x)" if top.get("g1_vs_anchor") else f"no anchor: {anchor.get('failed', '')[:80]}")
        lines.append(row(f"g1 1 GPU, {heads(results['g1'])}", results["g1"], against))
    if "g2" in results:
        r = results["g2"]
        lines.append(row("g2 char Shakespeare", r, f"best val {r['metrics']['best_val_loss']:.4f} (stage), "
                         f"{r['evaluate']['val']['loss']:.4f} (whole val split); target <= 1.294 in <= "
                         f"{TARGETS['g2_wall_s']:.0f} s"))
    for key in sorted(k for k in results if k.startswith("g3")):
        r = results[key]
        gpus = r["metrics"]["world_size"]
        scaling = top.get(f"g3_scaling_{gpus}")
        theirs = top.get(f"g3_anchor_scaling_{gpus}")
        target = f"target >= {TARGETS.get(f'g3_scaling_{gpus}', '-')}x"
        lines.append(row(f"{key}, {heads(r)}", r, "; ".join(filter(None, [
            f"**{scaling:.3f}x** g1" if scaling else "", f"minimal GPT's DDP {theirs:.3f}x" if theirs else "", target]))))
    return "\n".join(lines)


def environment() -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="g1,g2,g3", help="comma-separated: g1, g2, g3")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="the params the overlay is merged over")
    parser.add_argument("--config", default=str(ROOT / "configs" / "gpu.yaml"),
                        help="the GPU overlay: only the keys it changes in --params")
    parser.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "shakespeare_plays.txt"))
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--set", action="append", default=[], metavar="CASE.KEY=VALUE")
    parser.add_argument("--record", default=None, help="also write the results as JSON here")
    parser.add_argument("--seed", type=int, default=None, help="the params' seed (default: the config's)")
    parser.add_argument("--g3-gpus", default="2,all", help="g3's GPU counts, comma-separated (all: every visible GPU)")
    parser.add_argument("--anchors", default=str(ROOT.parent / "shared" / "anchors"),
                        help="the folder of gpu_anchor.py and ddp_anchor.py (none: no anchor runs)")
    args = parser.parse_args()

    import torch

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    sets = parse_sets(args.set)
    base = base_params(Path(args.params), Path(args.config), args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="lmforge-bench-gpu-"))
    n_gpus = torch.cuda.device_count()
    results: dict[str, dict] = {}
    anchors = None if args.anchors == "none" else Path(args.anchors)
    if anchors and not (anchors / "gpu_anchor.py").exists():
        raise SystemExit(f"--anchors {anchors}: no gpu_anchor.py there (pass --anchors none to run without)")
    for case in cases:
        print(f"[bench] {case} ...", flush=True)
        if case == "g1":
            results["g1"] = g1(work, base, sets["g1"])
            if anchors:
                print("[bench] g1 anchor ...", flush=True)
                results["g1"]["anchor"] = anchor_g1(anchors, results["g1"]["pretrain"]["n_head"], work)
        elif case == "g2":
            results["g2"] = g2(work, base, sets["g2"], Path(args.corpus))
        elif case == "g3":
            if n_gpus < 2:
                print("[bench] g3 needs at least 2 visible GPUs: skipped", flush=True)
                continue
            # The two points by default: 2 GPUs, and all of them (4).
            try:
                sizes = sorted({n_gpus if size == "all" else int(size) for size in args.g3_gpus.split(",")})
            except ValueError:
                raise SystemExit(f"--g3-gpus {args.g3_gpus}: expected GPU counts or all, comma-separated") from None
            if sizes[0] < 2 or sizes[-1] > n_gpus:
                raise SystemExit(f"--g3-gpus {args.g3_gpus}: counts between 2 and the {n_gpus} visible GPUs")
            for n in sizes:
                print(f"[bench] g3 on {n} GPUs ...", flush=True)
                results[f"g3_{n}gpu"] = g1(work, base, {**sets["g1"], **sets["g3"]}, ",".join(map(str, range(n))))
                if anchors:
                    n_head = results[f"g3_{n}gpu"]["pretrain"]["n_head"]
                    print(f"[bench] g3 anchor on 1 and {n} GPUs ...", flush=True)
                    results[f"g3_{n}gpu"]["anchor"] = {**anchor_ddp(anchors, n, n_head),
                                                       "one_gpu": anchor_ddp(anchors, 1, n_head)}
                print(json.dumps(results[f"g3_{n}gpu"]), flush=True)
            continue
        else:
            raise SystemExit(f"unknown case {case!r}: use g1, g2 or g3")
        print(json.dumps({k: v for k, v in results[next(reversed(results))].items() if k != "val_history"}),
              flush=True)

    record = {**headline(results), "environment": environment(), "command": " ".join(sys.argv), "targets": TARGETS,
              "results": results}
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(record, indent=1) + "\n")
    print(table(results), flush=True)


if __name__ == "__main__":
    main()
