"""A plain OpenAI-compatible server: one `model.generate()` at a time, no batching (issue #38).

The baseline of bench/bench_serve.py, "what you get without batching": requests queue on one
asyncio lock (first come, first served) and each runs a whole `generate()` on a single worker
thread while the others wait. Streaming goes through transformers' AsyncTextIteratorStreamer (the
asyncio form of TextIteratorStreamer), made to hand over every token's text at once (see
TokenStreamer); a client that goes away stops its generation at the next token.

    python bench/plain_server.py FOLDER --port 8000 --device cuda --dtype bfloat16

Endpoints: GET /v1/models, GET /health, POST /v1/completions and /v1/chat/completions with
stream (SSE chunks, then `data: [DONE]`), max_tokens (default 128), temperature (0 or absent:
greedy; above 0: sampling, with top_p) and stream_options.include_usage (a last chunk with
`usage`, counting every generated id, EOS included). The model id is the folder as given on the command line (or --served-name); requests may
name it or leave `model` out. Other fields (n, stop, ...) are ignored: one choice per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AsyncTextIteratorStreamer, AutoModelForCausalLM, AutoTokenizer
from transformers.generation import StoppingCriteria, StoppingCriteriaList

DEFAULT_MAX_TOKENS = 128
GENERATE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")  # the one thread generate() runs on
LOCK = asyncio.Lock()  # held for a request's whole generation, so requests never interleave
STATE: dict[str, Any] = {}  # model, tokenizer, device, model_id: set once in main()
app = FastAPI()


class TokenStreamer(AsyncTextIteratorStreamer):
    """Hands over the text of each new token as soon as it is whole. TextStreamer itself holds
    punctuation and symbols back until the next space, which would make this server's first chunk
    (the benchmark's time to first token) later than its first token; only a character split across
    tokens (decoded as U+FFFD) waits here for its rest."""

    def put(self, value):
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if not text.endswith("\ufffd"):
            self.on_finalized_text(text[self.print_len:])
            self.print_len = len(text)


class Cancelled(StoppingCriteria):
    """Stops generate() once the event is set (the streaming client disconnected)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


def encode(kind: str, body: dict[str, Any]) -> torch.Tensor:
    tokenizer = STATE["tokenizer"]
    if kind == "chat":
        text = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids  # the template has its BOS
    else:
        prompt = body.get("prompt", "")
        prompt = prompt[0] if isinstance(prompt, list) else prompt
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    return ids.to(STATE["device"])


def generate_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    tokenizer = STATE["tokenizer"]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    temperature = float(body.get("temperature") or 0.0)
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_tokens),
                              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                              else tokenizer.eos_token_id}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=float(body.get("top_p") or 1.0), top_k=0)
    else:
        kwargs["do_sample"] = False
    return kwargs


def run_generate(ids: torch.Tensor, kwargs: dict[str, Any]) -> list[int]:
    """On the generate thread: the new token ids (EOS, when generation stopped on it, included)."""
    try:
        with torch.inference_mode():
            out = STATE["model"].generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    except BaseException:
        if kwargs.get("streamer") is not None:
            kwargs["streamer"].end()  # so the stream's reader is not left waiting: `await job` raises
        raise
    return out[0, ids.shape[1]:].tolist()


def finish_reason(new_ids: list[int], max_tokens: int) -> str:
    return "length" if len(new_ids) >= max_tokens else "stop"


def chunk(kind: str, rid: str, created: int, text: str | None = None, reason: str | None = None,
          usage: dict[str, int] | None = None, role: bool = False) -> str:
    if kind == "chat":
        delta = {"role": "assistant"} if role else {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": reason}
        obj = "text_completion"
    body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": STATE["model_id"],
                            "choices": [choice] if usage is None else []}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def usage_of(ids: torch.Tensor, new_ids: list[int]) -> dict[str, int]:
    prompt = int(ids.shape[1])
    return {"prompt_tokens": prompt, "completion_tokens": len(new_ids), "total_tokens": prompt + len(new_ids)}


async def complete(kind: str, request: Request) -> Any:
    body = await request.json()
    if body.get("model") not in (None, "", STATE["model_id"]):
        return JSONResponse({"error": {"message": f"model {body['model']!r} is not served here; "
                                                  f"this server has {STATE['model_id']!r}"}}, status_code=404)
    ids = encode(kind, body)
    kwargs = generate_kwargs(body)
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    loop = asyncio.get_running_loop()

    if not body.get("stream"):
        async with LOCK:
            new_ids = await loop.run_in_executor(GENERATE, run_generate, ids, kwargs)
        text = STATE["tokenizer"].decode(new_ids, skip_special_tokens=True)
        reason = finish_reason(new_ids, kwargs["max_new_tokens"])
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason}
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
                "model": STATE["model_id"], "choices": [choice], "usage": usage_of(ids, new_ids)}

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    async def events():
        async with LOCK:
            streamer = TokenStreamer(STATE["tokenizer"], skip_prompt=True, skip_special_tokens=True)
            cancel = threading.Event()
            job = loop.run_in_executor(GENERATE, run_generate, ids,
                                       {**kwargs, "streamer": streamer,
                                        "stopping_criteria": StoppingCriteriaList([Cancelled(cancel)])})
            try:
                if kind == "chat":
                    yield chunk(kind, rid, created, role=True)
                async for text in streamer:
                    if text:
                        yield chunk(kind, rid, created, text)
                new_ids = await job
                yield chunk(kind, rid, created, reason=finish_reason(new_ids, kwargs["max_new_tokens"]))
                if include_usage:
                    yield chunk(kind, rid, created, usage=usage_of(ids, new_ids))
                yield "data: [DONE]\n\n"
            finally:
                # a client gone mid-stream: its generate() stops at the next token (and the next request's
                # waits behind it on the one generate thread, so two never overlap)
                cancel.set()

    return StreamingResponse(events(), media_type="text/event-stream")


@app.post("/v1/completions")
async def completions(request: Request) -> Any:
    return await complete("text", request)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    return await complete("chat", request)


@app.get("/v1/models")
async def models() -> dict[str, Any]:
    return {"object": "list", "data": [{"id": STATE["model_id"], "object": "model", "created": 0, "owned_by": "plain"}]}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a transformers causal-LM folder (config.json, weights, tokenizer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "auto"])
    p.add_argument("--served-name", default=None, help="the model id in /v1/models (default: the folder as given)")
    args = p.parse_args()

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=dtype).to(args.device).eval()
    STATE.update(model=model, tokenizer=AutoTokenizer.from_pretrained(args.folder), device=args.device,
                 model_id=args.served_name or args.folder)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
