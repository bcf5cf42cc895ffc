"""The `lmforge` command: registry actions that are not pipeline stages.

    lmforge promote lmforge-sentiment                  # @champion <- @challenger if the gate passes
    lmforge promote lmforge-sentiment --force --reason "rollback after incident 12"
    lmforge trace models:/lmforge-sentiment@champion   # gate, champion provenance, commit, data, params, metrics, rebuild
    lmforge generate models:/lmforge-lm@champion "ROMEO:" --max-new-tokens 60 --seed 1
    lmforge chat models:/lmforge-chat@champion         # a conversation in the terminal, streamed
    lmforge generate models:/lmforge-chat@champion --chat "How are you?"   # one reply
    lmforge serve models:/lmforge-chat@champion       # the OpenAI API on 127.0.0.1:8000/v1

Exit status: 0 done (or nothing to do), 1 the gate refused the promotion, 2 a user error (unknown
name or alias, bad params). The gate (metric, direction, min_gain) is register.<model>.gate of
params.yaml for the model registered under NAME; a challenger that does not beat the baseline
recorded on its version (the classifier's TF-IDF baseline) is refused before any champion is
compared. --force with --reason overrides either refusal, recorded on the version. Each promotion is
also recorded on the registered model, so trace says when @champion was moved outside `lmforge
promote` (MLflow UI's alias pencil or the API), where no gate was applied. The registry is MLFLOW_TRACKING_URI, else
register.tracking_uri of params.yaml, else sqlite:///<repo>/mlflow.db.

generate and chat take a causal LM as a registry URI (its transformers folder is downloaded once
into a temporary folder) or a folder, and stream what it generates (lmforge/generation.py). In
chat, each line you type is a user turn; the conversation is kept until /reset; /exit or end of
input leaves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks import layout

API_KEY_VARIABLE = "LMFORGE_API_KEY"  # read from the environment: a flag would show in every process list
LOOPBACK = "127.0.0.1"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="lmforge registry actions (promotion and lineage).")
    parser.add_argument("--params", default=str(layout.PARAMS), help="the params file (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    # --params is taken before or after the subcommand
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default=argparse.SUPPRESS, help=f"the params file (default: {layout.PARAMS})")
    promote = sub.add_parser("promote", parents=[common], help="move NAME@champion to NAME@challenger when the gate passes")
    promote.add_argument("name", help="a registered model name (register.<model>.name in params.yaml)")
    promote.add_argument("--force", action="store_true", help="promote even when the gate fails (needs --reason)")
    promote.add_argument("--reason", help="why a forced promotion is made; recorded on the version with the user")
    trace = sub.add_parser("trace", parents=[common], help="print where a registered model came from, how it was promoted and how to rebuild it")
    trace.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    generate = sub.add_parser("generate", parents=[common, _sampling_flags()], help="continue a prompt once, streamed")
    generate.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a transformers folder")
    generate.add_argument("prompt", help="the text to continue")
    generate.add_argument("--chat", action="store_true",
                          help="send the prompt as one user message through the model's chat template, and print the reply")
    chat = sub.add_parser("chat", parents=[common, _sampling_flags()], help="talk to a model in the terminal")
    chat.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a transformers folder")
    chat.add_argument("--system", help="a system message that opens the conversation")
    serve = sub.add_parser("serve", parents=[common], help="serve a causal LM over the OpenAI API (completions, chat, streaming)")
    serve.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a transformers folder")
    serve.add_argument("--host", default=None, help=f"the address to listen on (default: {LOOPBACK}); any other needs an API key")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default=None, help="cpu or cuda[:N] (default: CUDA when visible)")
    serve.add_argument("--max-tokens", type=int, default=1024, help="the most tokens a request may ask for")
    serve.add_argument("--max-running", type=int, default=64, help="requests generating at once")
    serve.add_argument("--max-waiting", type=int, default=256, help="requests queued behind them before a 429")
    serve.add_argument("--timeout", type=float, default=300.0, help="seconds a request may run")
    serve.add_argument("--max-body-bytes", type=int, default=1_000_000, help="the largest request body")
    serve.add_argument("--kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from free GPU memory)")
    serve.add_argument("--max-batch-tokens", type=int, default=None, help="tokens per batch step (default: sized by transformers)")
    serve.add_argument("--cuda-graph", choices=("auto", "on", "off"), default=None,
                       help="CUDA graphs of the batch's steps (default: auto, on when serving on CUDA)")
    serve.add_argument("--warm-up", choices=("auto", "on", "off"), default=None,
                       help="run short requests at batch sizes 1, 2, 4 ... --max-running before serving, so the "
                            "first clients do not wait on CUDA graph captures (default: auto, on with CUDA graphs)")
    serve.add_argument("--compile-level", type=int, choices=(0, 1, 2, 3), default=0,
                       help="torch.compile of the batch's steps: 0 off (default), 1 dynamic shapes, 2-3 autotuned")
    return parser


def _sampling_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--max-new-tokens", type=int, default=128, help="the longest answer, in tokens (default: %(default)s)")
    flags.add_argument("--temperature", type=float, default=0.7, help="0: greedy (default: %(default)s)")
    flags.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default: %(default)s)")
    flags.add_argument("--top-k", type=int, default=50, help="0: off (default: %(default)s)")
    flags.add_argument("--seed", type=int, default=None, help="reproduce a sampled answer (default: a fresh one)")
    return flags


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("generate", "chat"):
        return talk(args)
    if args.command == "serve":
        return serve(args)
    if args.command == "promote" and args.force and not (args.reason and args.reason.strip()):
        _parser().error("--force needs --reason TEXT: a forced promotion records why")
    from lmforge.config import ConfigError, load_params
    from lmforge.registry import registration as registry
    from tasks import lineage
    from tasks.register import MODELS

    params = None
    if args.command == "promote" or Path(args.params).exists():
        try:
            params = load_params(args.params)
        except ConfigError as err:
            return _error(str(err))
    uri = registry.resolve_tracking_uri(params, layout.repo_root())
    try:
        with registry.using(uri) as client:
            if args.command == "trace":
                print(registry.trace(args.uri, client=client, inputs=lineage.trace_inputs,
                                     rebuild=lineage.trace_rebuild))
                return 0
            models = {m.name: (key, m) for key, m in ((k, getattr(params.register_, k)) for k in MODELS)}
            if args.name not in models:
                return _error(f"{args.name!r} is not a model of params.yaml (register.*.name: {', '.join(sorted(models))})")
            _, model = models[args.name]
            decision = registry.promote(args.name, model.gate, force=args.force, reason=args.reason, client=client)
    except registry.RegistryError as err:
        return _error(str(err))
    print(decision.message, file=sys.stdout if decision.passed else sys.stderr)
    return 0 if decision.passed else 1


def talk(args: argparse.Namespace) -> int:
    """`generate` and `chat`: load the model, then stream its answers to stdout."""
    import tempfile

    from lmforge import generation
    from lmforge.registry import registration as registry

    try:
        sampling = generation.Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    except ValueError as err:
        return _error(str(err))
    with tempfile.TemporaryDirectory(prefix="lmforge-talk-") as scratch:
        try:
            folder = _served_model(args.model, Path(scratch)).folder
        except registry.RegistryError as err:
            return _error(str(err))
        model, tokenizer = generation.load_causal_lm(folder)
        if args.command == "generate":
            prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
            _print_stream(generation.stream(model, tokenizer, prompt, sampling))
            return 0
        return _conversation(model, tokenizer, sampling, args.system)


def serve(args: argparse.Namespace) -> int:
    """`serve`: the OpenAI API over a causal LM until interrupted (lmforge/serve/)."""
    import ipaddress
    import os
    import tempfile

    from lmforge.registry.registration import RegistryError

    api_key = os.environ.get(API_KEY_VARIABLE) or None
    args.host, args.device = args.host or LOOPBACK, args.device or "auto"
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and api_key is None:
        return _error(f"serving on {args.host} (not loopback) needs an API key: set {API_KEY_VARIABLE}")
    with tempfile.TemporaryDirectory(prefix="lmforge-serve-") as scratch:
        try:
            served = _served_model(args.model, Path(scratch))
        except RegistryError as err:
            return _error(str(err))
        return _run_server(args, served, api_key)


def _served_model(model: str, scratch: Path):
    """The causal LM a registry URI (downloaded into `scratch`, with its lineage) or a folder names."""
    from lmforge.serve import models

    if model.startswith("models:/"):
        from lmforge.config import load_params
        from lmforge.registry import registration as registry

        params = load_params(layout.PARAMS) if layout.PARAMS.exists() else None
        with registry.using(registry.resolve_tracking_uri(params, layout.repo_root())) as client:
            served = models.from_registry(model, scratch, client)
    else:
        served = models.from_folder(model)
    models.check_causal(served)
    return served


def _run_server(args: argparse.Namespace, served, api_key: str | None) -> int:
    import asyncio

    import uvicorn

    from lmforge import generation
    from lmforge.serve.app import Limits, create_app
    from lmforge.serve.engine import Engine, EngineSettings

    model, tokenizer = generation.load_causal_lm(served.folder, device=args.device)
    graphs = {"on": True, "off": False}.get(args.cuda_graph or "auto")
    engine = Engine(model, tokenizer, EngineSettings(num_blocks=args.kv_blocks, max_batch_tokens=args.max_batch_tokens,
                                                     cuda_graph=graphs, compile_level=args.compile_level))
    engine.start()
    if args.warm_up == "on" or (args.warm_up in (None, "auto") and engine.uses_cuda_graphs()):
        sizes = warm_up_sizes(args.max_running)
        seconds = asyncio.run(engine.warm_up(sizes))
        print(f"warmed up batch sizes {', '.join(map(str, sizes))} in {seconds:.1f} s", file=sys.stderr, flush=True)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens, max_running=args.max_running,
                    max_waiting=args.max_waiting, timeout_s=args.timeout, api_key=api_key)
    app = create_app(engine, served, tokenizer, limits)
    print(f"serving {served.id} on http://{args.host}:{args.port}/v1 (OpenAI API; /metrics, /health)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0


def warm_up_sizes(max_running: int) -> list[int]:
    """1, 2, 4 ... up to max_running, and max_running itself."""
    sizes = [1 << i for i in range(max_running.bit_length()) if 1 << i < max_running]
    return sizes + [max_running]


def _print_stream(pieces) -> str:
    reply = []
    for piece in pieces:
        print(piece, end="", flush=True)
        reply.append(piece)
    print(flush=True)
    return "".join(reply)


def _conversation(model, tokenizer, sampling, system: str | None) -> int:
    """Read user turns from stdin until /exit or end of input; stream each reply, keep the history."""
    from lmforge import generation

    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    interactive = sys.stdin.isatty()
    print("chat: type a message; /reset starts over, /exit (or Ctrl-D) leaves", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/reset":
            messages = list(opening)
            print("(the conversation starts over)", file=sys.stderr)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        reply = _print_stream(generation.stream(model, tokenizer, messages, sampling))
        messages.append({"role": "assistant", "content": reply.strip()})


def run() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    run()
