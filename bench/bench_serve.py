"""Benchmark OpenAI-compatible serving (issue #38): lmforge's server against `transformers serve
--continuous-batching` and a plain one-request-at-a-time `generate()` server, same host, same run.

For each server in turn: start its command as a subprocess (its own process group, its output to
WORKDIR/NAME.log), poll GET /v1/models (or /health) until one answers, send --warmup untimed requests, then for
each level C of --clients run C concurrent clients, each sending --requests-per-client streamed
requests one after another (the same fixed PROMPTS, greedy unless --temperature, max_tokens
--max-tokens), then stop it (SIGTERM to its group, SIGKILL after --stop-timeout).

Per request: time to first token (TTFT: send until the first chunk with non-empty text; the chat
role-only chunk does not count), end (the stream closed, or `data: [DONE]`, which
`transformers serve` may never send), output tokens. Not every server can ignore EOS, so the
output tokens are counted, never assumed: from the stream's `usage` (asked for with
stream_options.include_usage) where the server sends it, else by tokenizing the streamed text
with the model's own tokenizer (--count text always does; the record keeps both counts).
TPOT (time per output token) = (last chunk - first chunk) / (tokens - 1).
Per level: output tok/s = all output tokens / the level's wall time (first send to last end),
p50/p95 TTFT and TPOT, errors (HTTP status, an error event, a broken stream, --request-timeout).
Where nvidia-smi answers, the GPU memory in use is sampled twice a second: the peak above the
level before the server started is recorded per server and per level.

Servers: --server NAME (a preset) or --server NAME=COMMAND, repeated, in the order to run them;
default: lmforge, transformers, plain. Placeholders: {folder} {port} {python} {root} {device}
(cuda|cpu) {device_index} (cuda:0|cpu) {dtype}. A command's first word is looked up on PATH, then
beside this Python (a venv's bin); `lmforge` and `transformers` found in neither run as
`python -m tasks.cli` and `python -m transformers.cli.transformers`. The model each request names: `transformers serve` takes the
folder path string exactly; any other server gets the first id /v1/models lists (the folder when
it lists the folder), else the `model` its /health names, else the folder path.

Locally (CPU, tiny model as tests/tiny_models.py builds it; plain server only):

    .venv/bin/python bench/bench_serve.py --model /tmp/tinychat --server plain --clients 1,4 \\
        --requests-per-client 2 --max-tokens 16 --device cpu --record /tmp/serve.json

On a GPU machine (the tree may have no .git: --commit or LMFORGE_COMMIT):

    python bench/bench_serve.py --model smollm2 --clients 1,8,32 --device cuda --commit SHA \\
        --record $OUT/bench_serve.json
    # lmforge not installed as a command: --server lmforge-module (python -m tasks.cli serve)
    # another command line:  --server lmforge='lmforge serve {folder} --port {port} --max-batch 64'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from record_facts import git_commit, package_versions  # noqa: E402 (bench/ is on sys.path)

# the packages a record names
PACKAGES = ("torch", "transformers", "lmforge", "httpx", "fastapi", "uvicorn", "openai", "kernels")

# --- the servers under test: edit these when a command line changes ------------------------------

LMFORGE_SERVE = "lmforge serve {folder} --host 127.0.0.1 --port {port} --device {device}"
# the same server through the module, for a tree where the `lmforge` command is not installed
LMFORGE_SERVE_MODULE = "{python} -m tasks.cli serve {folder} --host 127.0.0.1 --port {port} --device {device}"
TRANSFORMERS_SERVE = ("transformers serve {folder} --continuous-batching --host 127.0.0.1 --port {port} "
                      "--device {device_index} --dtype {dtype}")
PLAIN_SERVE = "{python} {root}/bench/plain_server.py {folder} --host 127.0.0.1 --port {port} --device {device} --dtype {dtype}"
# transformers' continuous batching turns CUDA graphs off for SDPA attention unless told; lmforge turns
# them on. transformers-cg is `transformers serve` told too: the like-for-like beside the default.
TRANSFORMERS_SERVE_GRAPHS = TRANSFORMERS_SERVE + " --cb-use-cuda-graph"
PRESETS = {"lmforge": LMFORGE_SERVE, "lmforge-module": LMFORGE_SERVE_MODULE, "transformers": TRANSFORMERS_SERVE,
           "transformers-cg": TRANSFORMERS_SERVE_GRAPHS, "plain": PLAIN_SERVE}
DEFAULT_SERVERS = ["lmforge", "transformers", "plain"]
# a command's first word found neither on PATH nor beside this Python: run it as a module of this Python
MODULE_FALLBACKS = {"lmforge": "tasks.cli", "transformers": "transformers.cli.transformers"}
# servers that must be sent the folder path string as `model` (transformers serve answers only to that)
FOLDER_AS_MODEL = {"transformers", "transformers-cg"}

# Fixed prompts, short enough for a tiny test model; request i of client c takes PROMPTS[(c*R + i) % len].
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a rainbow forms, step by step.",
    "List five tips for staying focused while studying.",
    "What are the main differences between a cat and a dog as pets?",
    "Describe a busy market on a summer morning.",
    "Give a simple recipe for pancakes.",
    "Why do leaves change colour in autumn?",
    "Write a polite email asking a neighbour to turn down their music.",
]


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="a packaged name (smollm2) or a transformers causal-LM folder")
    p.add_argument("--server", action="append", default=None, metavar="NAME[=COMMAND]",
                   help=f"a preset ({', '.join(PRESETS)}) or NAME=COMMAND; repeated (default: {','.join(DEFAULT_SERVERS)})")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--count", choices=["usage", "text"], default="usage",
                   help="output tokens from the stream's usage where sent (else the text), or always from the text")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests, one at a time, before the levels")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when nvidia-smi sees a GPU")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--reference", default="lmforge", help="the server the ratios are taken against (else the first)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to answer /v1/models")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take (then an error)")
    p.add_argument("--stop-timeout", type=float, default=20.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--workdir", type=Path, default=None, help="server logs (default: a temp folder)")
    p.add_argument("--record", type=Path, default=None, help="where the JSON record goes")
    p.add_argument("--commit", default=None, help="commit to record when the tree has no .git (or LMFORGE_COMMIT)")
    return p.parse_args(argv)


def server_specs(given: list[str] | None) -> list[tuple[str, str]]:
    specs = []
    for item in given or DEFAULT_SERVERS:
        name, sep, command = item.partition("=")
        name = name.strip()
        if not sep:
            if name not in PRESETS:
                sys.exit(f"--server {item}: no preset {name!r} (presets: {', '.join(PRESETS)}); give NAME=COMMAND")
            command = PRESETS[name]
        specs.append((name, command.strip()))
    return specs


# --- starting and stopping a server --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_argv(command: str, fields: dict[str, str]) -> list[str]:
    argv = shlex.split(command.format(**fields))
    if "/" not in argv[0] and shutil.which(argv[0]) is None:
        beside = Path(sys.executable).parent / argv[0]  # a venv's console script, the venv not activated
        if beside.exists():
            argv[0] = str(beside)
        elif argv[0] in MODULE_FALLBACKS:
            argv[:1] = [sys.executable, "-m", MODULE_FALLBACKS[argv[0]]]
    return argv


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1",
                "DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # `transformers serve` answers /v1/models by scanning the hub cache and fails when the folder
    # does not exist (a bare GPU machine): give it one that does.
    hub_cache = Path(env.get("HF_HUB_CACHE") or Path(env.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub")
    hub_cache.mkdir(parents=True, exist_ok=True)
    env["HF_HUB_CACHE"] = str(hub_cache)
    return env


def launch(argv: list[str], log: Path) -> subprocess.Popen:
    """The server in its own process group (stop() ends the group), its output to log."""
    with log.open("w") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM to the server's process group, SIGKILL if it is still there after timeout."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        except ProcessLookupError:
            pass
    try:  # anything the server started and left behind in its group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


async def wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> tuple[str, dict[str, Any]]:
    """Poll GET /v1/models, then GET /health, until one answers 200: (which, its JSON). Raises if the
    process exits or time runs out."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode} before it answered")
            for path in ("/v1/models", "/health"):
                try:
                    r = await client.get(base + path)
                    if r.status_code == 200:
                        return path, r.json()
                except (httpx.HTTPError, ValueError):
                    pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"no answer from {base}/v1/models or /health within {timeout:.0f}s")


def model_name(server: str, folder: str, path: str, answer: dict[str, Any]) -> str:
    """The folder for FOLDER_AS_MODEL servers; else the first id /v1/models lists (the folder when
    listed), or the `model` /health names when only it answered, else the folder."""
    if server in FOLDER_AS_MODEL:
        return folder
    if path == "/health":
        return answer.get("model") if isinstance(answer.get("model"), str) else folder
    ids = [m.get("id") for m in (answer.get("data") or []) if isinstance(m, dict) and m.get("id")]
    return folder if folder in ids or not ids else ids[0]


# --- GPU memory ----------------------------------------------------------------------------------


def gpu_memory_mib() -> int | None:
    """The memory in use on all visible GPUs (MiB), or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return sum(int(x) for x in out.split())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class MemorySampler:
    """Samples gpu_memory_mib twice a second in a thread: peak() since the last reset() (a level),
    server_peak() since the last reset(server=True)."""

    def __init__(self) -> None:
        self.baseline = gpu_memory_mib()
        self.enabled = self.baseline is not None
        self._peak = self._server_peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.enabled:
            self._thread.start()

    def _sample(self) -> None:
        now = gpu_memory_mib()
        if now is not None:
            self._peak = max(self._peak or 0, now)
            self._server_peak = max(self._server_peak or 0, now)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def reset(self, server: bool = False) -> None:
        if self.enabled:
            self._peak = gpu_memory_mib()
            if server:
                self._server_peak = self._peak
            self._sample()

    def peak(self) -> int | None:
        if self.enabled:
            self._sample()
        return self._peak

    def server_peak(self) -> int | None:
        if self.enabled:
            self._sample()
        return self._server_peak

    def close(self) -> None:
        self._stop.set()


# --- the load ------------------------------------------------------------------------------------


def request_body(endpoint: str, model: str, prompt: str, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def chunk_text(endpoint: str, choice: dict[str, Any]) -> str:
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """One streamed request; times are perf_counter seconds."""
    out: dict[str, Any] = {"start": time.perf_counter(), "first": None, "last": None, "chunks": 0, "text": "",
                           "usage_tokens": None, "done_marker": False, "error": None, "finish_reason": None}
    parts: list[str] = []
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {(await r.aread())[:300].decode(errors='replace')}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        out["done_marker"] = True
                        break
                    event = json.loads(data)
                    if event.get("error"):
                        out["error"] = f"error event: {json.dumps(event['error'])[:300]}"
                        break
                    if event.get("usage"):
                        out["usage_tokens"] = event["usage"].get("completion_tokens")
                    for choice in event.get("choices") or []:
                        out["finish_reason"] = choice.get("finish_reason") or out["finish_reason"]
                        text = chunk_text(endpoint, choice)
                        if text:
                            now = time.perf_counter()
                            out["first"] = out["first"] or now
                            out["last"] = now
                            out["chunks"] += 1
                            parts.append(text)
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["end"] = time.perf_counter()
    out["text"] = "".join(parts)
    return out


async def run_requests(base: str, model: str, clients: int, per_client: int,
                       args: argparse.Namespace) -> tuple[float, float, list[dict[str, Any]]]:
    """clients concurrent clients, per_client requests each; (level start, level end, requests)."""
    url = f"{base}/v1/{'chat/completions' if args.endpoint == 'chat' else 'completions'}"
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one_client(c: int) -> list[dict[str, Any]]:
            done = []
            for i in range(per_client):
                prompt_index = (c * per_client + i) % len(PROMPTS)
                body = request_body(args.endpoint, model, PROMPTS[prompt_index], args)
                start = time.perf_counter()
                try:
                    result = await asyncio.wait_for(stream_one(client, url, body, args.endpoint), args.request_timeout)
                except TimeoutError:
                    result = {"start": start, "first": None, "last": None, "chunks": 0, "text": "", "usage_tokens": None,
                              "done_marker": False, "finish_reason": None, "end": time.perf_counter(),
                              "error": f"no end within {args.request_timeout:.0f}s"}
                done.append({"client": c, "prompt": prompt_index, **result})
            return done

        start = time.perf_counter()
        per = await asyncio.gather(*(one_client(c) for c in range(clients)))
        return start, time.perf_counter(), [r for rs in per for r in rs]


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def level_figures(start: float, end: float, requests: list[dict[str, Any]], tokenizer, count: str) -> dict[str, Any]:
    rows = []
    for r in requests:
        text_tokens = len(tokenizer(r["text"], add_special_tokens=False).input_ids) if r["text"] else 0
        use_usage = count == "usage" and r["usage_tokens"] is not None
        tokens = int(r["usage_tokens"]) if use_usage else text_tokens
        ttft = None if r["first"] is None else r["first"] - r["start"]
        tpot = (r["last"] - r["first"]) / (tokens - 1) if r["first"] is not None and tokens > 1 else None
        rows.append({"client": r["client"], "prompt": r["prompt"], "start_s": round(r["start"] - start, 4),
                     "ttft_ms": ms(ttft), "tpot_ms": ms(tpot), "e2e_s": round(r["end"] - r["start"], 4),
                     "tokens": tokens, "tokens_from": "usage" if use_usage else "text", "usage_tokens": r["usage_tokens"],
                     "text_tokens": text_tokens, "chunks": r["chunks"], "finish_reason": r["finish_reason"],
                     "done_marker": r["done_marker"], "error": r["error"]})
    ok = [r for r in rows if r["error"] is None]
    wall = end - start
    tokens = sum(r["tokens"] for r in ok)
    ttfts = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
    tpots = [r["tpot_ms"] for r in ok if r["tpot_ms"] is not None]
    e2es = [r["e2e_s"] for r in ok]
    return {
        "requests": len(rows), "errors": len(rows) - len(ok), "empty": sum(1 for r in ok if r["chunks"] == 0),
        "wall_s": round(wall, 4), "output_tokens": tokens, "tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "req_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "ttft_p50_ms": percentile(ttfts, 50), "ttft_p95_ms": percentile(ttfts, 95),
        "tpot_p50_ms": percentile(tpots, 50), "tpot_p95_ms": percentile(tpots, 95),
        "e2e_p50_s": percentile(e2es, 50), "e2e_p95_s": percentile(e2es, 95),
        "tokens_per_request": round(tokens / len(ok), 2) if ok else None,
        "usage_tokens_total": sum(r["usage_tokens"] or 0 for r in ok),
        "text_tokens_total": sum(r["text_tokens"] for r in ok),
        "tokens_from": sorted({r["tokens_from"] for r in ok}),
        "done_marker": sum(1 for r in ok if r["done_marker"]),
        "first_errors": sorted({r["error"] for r in rows if r["error"]})[:3],
        "per_request": rows,
    }


async def bench_server(name: str, command: str, folder: Path, fields: dict[str, str], levels: list[int],
                       args: argparse.Namespace, tokenizer, work: Path, memory: MemorySampler) -> dict[str, Any]:
    port = free_port()
    argv = server_argv(command, {**fields, "port": str(port)})
    log = work / f"{name}.log"
    base = f"http://127.0.0.1:{port}"
    run: dict[str, Any] = {"server": name, "command": shlex.join(argv), "template": command, "log": str(log),
                           "gpu_mem_before_mib": gpu_memory_mib(), "levels": []}
    print(f"[{name}] starting: {shlex.join(argv)}", flush=True)
    memory.reset(server=True)
    started = time.perf_counter()
    try:
        proc = launch(argv, log)
    except OSError as exc:
        run["error"] = f"could not start: {exc}"
        return run
    try:
        path, answer = await wait_ready(base, proc, args.startup_timeout)
        run["startup_s"] = round(time.perf_counter() - started, 2)
        run["ready_on"] = path
        run["models_listed"] = [m.get("id") for m in answer.get("data") or [] if isinstance(m, dict)]
        run["model_name"] = model = model_name(name, str(folder), path, answer)
        print(f"[{name}] ready in {run['startup_s']}s ({path}), model {model!r}", flush=True)
        if args.warmup:
            _, _, warm = await run_requests(base, model, 1, args.warmup, args)
            run["warmup_errors"] = sorted({w["error"] for w in warm if w["error"]})
            if all(w["error"] for w in warm):
                raise RuntimeError(f"every warm-up request failed: {run['warmup_errors'][0]}")
        run["gpu_mem_after_warmup_mib"] = gpu_memory_mib()
        for clients in levels:
            memory.reset()
            start, end, requests = await run_requests(base, model, clients, args.requests_per_client, args)
            figures = {"clients": clients, **level_figures(start, end, requests, tokenizer, args.count),
                       "gpu_mem_peak_mib": memory.peak()}
            run["levels"].append(figures)
            print(f"[{name}] clients {clients}: {figures['tok_s']} tok/s, TTFT p50 {fmt(figures['ttft_p50_ms'])} ms, "
                  f"errors {figures['errors']}", flush=True)
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode} during the run")
    except RuntimeError as exc:
        run["error"] = str(exc)
        print(f"[{name}] failed: {exc}\n{tail(log)}", file=sys.stderr, flush=True)
    finally:
        run["gpu_mem_peak_mib"] = memory.server_peak()
        run["exit_status"] = await asyncio.to_thread(stop, proc, args.stop_timeout)
        await asyncio.sleep(2)  # let the driver give the memory back before the next server starts
    return run


# --- the record ----------------------------------------------------------------------------------


def resolve_model(spec: str) -> Path:
    from lmforge.training.base_models import resolve_base_model

    return resolve_base_model(spec, ROOT).resolve()


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:  # not torch: a CUDA context here would hold memory the servers could use
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False)
        return "cuda" if out.returncode == 0 and "GPU" in out.stdout else "cpu"
    except (OSError, subprocess.SubprocessError):
        return "cpu"


def card(device: str) -> str:
    if device == "cuda" and shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip().splitlines()
        if out:
            return out[0] if len(out) == 1 else f"{len(out)} x {out[0]}"
    return "cpu"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ratios(runs: list[dict[str, Any]], reference: str) -> dict[str, Any]:
    """Per level: the reference's tok/s over each other server's, and its p50 TTFT over theirs."""
    ok = [r for r in runs if r["levels"]]
    ref = next((r for r in ok if r["server"] == reference), ok[0] if ok else None)
    if ref is None:
        return {}
    out: dict[str, Any] = {"reference": ref["server"], "levels": {}}
    for level in ref["levels"]:
        row = {}
        for other in ok:
            if other is ref:
                continue
            theirs = next((l for l in other["levels"] if l["clients"] == level["clients"]), None)
            if theirs is None:
                continue
            row[other["server"]] = {
                "tok_s": div(level["tok_s"], theirs["tok_s"]),
                "ttft_p50": div(level["ttft_p50_ms"], theirs["ttft_p50_ms"]),
            }
        out["levels"][str(level["clients"])] = row
    return out


def div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    head = f"{'server':<14}{'clients':>8}{'tok/s':>10}{'p50 TTFT ms':>13}{'p95 TTFT ms':>13}{'p50 TPOT ms':>13}{'errors':>8}"
    lines = [head, "-" * len(head)]
    for r in runs:
        if not r["levels"]:
            lines.append(f"{r['server']:<14}  failed: {r.get('error')}")
            continue
        for l in r["levels"]:
            lines.append(f"{r['server']:<14}{l['clients']:>8}{fmt(l['tok_s']):>10}{fmt(l['ttft_p50_ms']):>13}"
                         f"{fmt(l['ttft_p95_ms']):>13}{fmt(l['tpot_p50_ms'], 2):>13}{l['errors']:>8}")
        if r.get("error"):
            lines.append(f"{r['server']:<14}  stopped early: {r['error']}")
    rows = [(clients, name, v) for clients, others in summary.get("levels", {}).items() for name, v in others.items()]
    if rows:
        ref = summary["reference"]
        lines += ["", f"{ref} / other{'clients':>10}{'tok/s':>10}{'p50 TTFT':>10}", "-" * (len(ref) + 38)]
        for clients, name, v in rows:
            lines.append(f"{ref + ' / ' + name:<{len(ref) + 8}}{clients:>10}{fmt(v['tok_s'], 2):>10}"
                         f"{fmt(v['ttft_p50'], 2):>10}")
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    specs = server_specs(args.server)
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    folder = resolve_model(args.model)
    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    fields = {"folder": str(folder), "python": sys.executable, "root": str(ROOT), "device": device,
              "device_index": "cuda:0" if device == "cuda" else "cpu", "dtype": dtype}
    print(f"bench_serve: {folder} on {device} ({dtype}), servers {[n for n, _ in specs]}, clients {levels}, "
          f"{args.requests_per_client} requests each, {args.endpoint}, max_tokens {args.max_tokens}, logs {work}", flush=True)

    memory = MemorySampler()
    runs = []
    try:
        for name, command in specs:
            runs.append(await bench_server(name, command, folder, fields, levels, args, tokenizer, work, memory))
    finally:
        memory.close()

    summary = ratios(runs, args.reference)
    record = {
        "bench": "bench_serve", "issue": 38, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "card": card(device),
        "cpu": cpu_model(), "host": platform.node(), "device": device, "dtype": dtype,
        "command": shlex.join([sys.executable, *sys.argv]), "commit": git_commit(args.commit), "versions": package_versions(PACKAGES),
        "model": str(folder), "model_spec": args.model,
        "settings": {"endpoint": args.endpoint, "clients": levels, "requests_per_client": args.requests_per_client,
                     "max_tokens": args.max_tokens, "temperature": args.temperature, "count": args.count,
                     "warmup": args.warmup, "prompts": PROMPTS, "request_timeout": args.request_timeout},
        "gpu_mem_baseline_mib": memory.baseline, "runs": runs, "summary": summary,
    }
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"record: {args.record}")
    print("\n" + table(runs, summary))
    failed = any(r.get("error") or any(l["errors"] for l in r["levels"]) for r in runs)
    return 1 if failed else 0


def main() -> None:
    sys.exit(asyncio.run(amain(parse_args())))


if __name__ == "__main__":
    main()
