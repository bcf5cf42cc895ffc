"""The HTTP server: OpenAI's /v1/models, /v1/completions and /v1/chat/completions over the engine,
streamed as server-sent events, with the limits that hold under load and Prometheus metrics.

    app = create_app(engine, served, tokenizer, Limits())
    uvicorn.run(app, host="127.0.0.1", port=8000)      # what `lmforge serve MODEL` does

Limits (Limits): the request body is counted as it arrives, whatever its framing (a chunked body
has no Content-Length to trust), and refused with a 413 past max_body_bytes; a prompt longer than
the model's window less max_tokens is a 400; at most max_running requests generate at once and
max_waiting more wait their turn, past which a 429 says when to retry; a request that runs past
timeout_s is ended (504, or an error event in a stream); a client that goes away cancels its
request and frees its slot. With an API key, every /v1 route needs `Authorization: Bearer KEY`.

Every response carries the served version's id in the `lmforge-model` header, and every body
names it in `model`, so an answer can be traced (`lmforge trace models:/NAME/VERSION`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.generation import prompt_ids
from lmforge.serve import openai_api as api
from lmforge.serve.engine import Engine, EngineError, Sampling
from lmforge.serve.models import ServedModel

log = logging.getLogger("lmforge.serve")
MODEL_HEADER = "lmforge-model"
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1_000_000
    max_tokens: int = 1024  # the most a request may ask for (max_tokens)
    max_running: int = 64  # requests generating at once
    max_waiting: int = 256  # requests queued behind them; one more is refused with a 429
    timeout_s: float = 300.0
    api_key: str | None = None


class Admission:
    """How many requests run and wait; a request past both caps is refused, not queued forever."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.slots = asyncio.Semaphore(limits.max_running)
        self.admitted = 0

    @property
    def waiting(self) -> int:
        return max(0, self.admitted - self.limits.max_running)

    def enter(self) -> None:
        if self.admitted >= self.limits.max_running + self.limits.max_waiting:
            raise api.OpenAIError(429, f"the server is busy ({self.admitted} requests in hand); retry shortly",
                                  code="queue_full", headers={"Retry-After": "1"})
        self.admitted += 1

    def leave(self) -> None:
        self.admitted -= 1


class Metrics:
    """Prometheus metrics of one app (its own registry: two apps in one process never collide)."""

    def __init__(self, admission: Admission):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests answered", ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens read", registry=self.registry)
        self.completion_tokens = Counter("lmforge_completion_tokens", "Tokens generated", registry=self.registry)
        self.first_token = Histogram("lmforge_time_to_first_token_seconds", "From arrival to the first token",
                                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.duration = Histogram("lmforge_request_duration_seconds", "From arrival to the last token",
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=self.registry)
        self.stream_errors = Counter("lmforge_stream_errors", "Streams ended by an error event (their status was 200)",
                                     ["code"], registry=self.registry)
        running = Gauge("lmforge_requests_running", "Requests generating", registry=self.registry)
        waiting = Gauge("lmforge_queue_depth", "Requests waiting for a slot", registry=self.registry)
        running.set_function(lambda: admission.admitted - admission.waiting)
        waiting.set_function(lambda: admission.waiting)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def create_app(engine: Engine, served: ServedModel, tokenizer: Any, limits: Limits = Limits()) -> FastAPI:
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    admission = Admission(limits)
    metrics = Metrics(admission)
    app.state.admission = admission  # for tests and operators

    @app.middleware("http")
    async def name_and_count(request: Request, call_next):
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - answered here, so a 500 too carries the header and is counted
            log.exception("request failed")  # the traceback, never the request's body
            response = JSONResponse(api.OpenAIError(500, "internal error").body(), status_code=500)
        response.headers[MODEL_HEADER] = served.id
        route = request.scope.get("route")
        if request.method == "POST" and route is not None and route.path in GENERATION_PATHS:
            # the route's own path, never the one asked for: unknown paths cannot add series
            metrics.requests.labels(route.path, str(response.status_code)).inc()
        return response

    @app.exception_handler(api.OpenAIError)
    async def openai_error(_request: Request, err: api.OpenAIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        code = "not_found" if err.status_code == 404 else None
        message = "no such route" if err.status_code == 404 else str(err.detail)
        return JSONResponse(api.OpenAIError(err.status_code, message, code=code).body(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    _info_routes(app, engine, served, metrics, limits)
    _generation_routes(app, Generation(engine, tokenizer, admission, metrics, limits), served, tokenizer, limits)
    return app


def _authorised(request: Request, limits: Limits) -> None:
    if limits.api_key is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), limits.api_key.encode()):
        raise api.OpenAIError(401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key")


def _info_routes(app: FastAPI, engine: Engine, served: ServedModel, metrics: Metrics, limits: Limits) -> None:
    @app.get("/health")
    async def health():
        if not engine.healthy() and not await asyncio.to_thread(engine.restart_if_down):
            return JSONResponse(api.OpenAIError(503, "the generation engine is down").body(), status_code=503)
        return {"status": "ok", "model": served.id}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request):
        _authorised(request, limits)
        return {"object": "list", "data": [served.card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str, request: Request):
        _authorised(request, limits)
        if model_id != served.id:
            raise api.OpenAIError(404, f"this server serves {served.id} only", param="model", code="model_not_found")
        return served.card()


def _generation_routes(app: FastAPI, generation: Generation, served: ServedModel, tokenizer: Any, limits: Limits) -> None:
    window = int(getattr(generation.engine.model.config, "max_position_embeddings", 0) or 0) or None
    capacity = generation.engine.capacity_tokens()  # one request's prompt and answer must fit the KV cache
    if capacity is not None:
        window = min(window, capacity) if window else capacity

    def check_model(asked: str | None) -> None:
        if asked is not None and asked not in (served.id, served.lineage.get("requested_as"), str(served.folder)):
            raise api.OpenAIError(404, f"this server serves {served.id} only", param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(request: Request):
        _authorised(request, limits)
        req = parse(api.CompletionRequest, await read_json(request, limits.max_body_bytes))
        check_model(req.model)
        return await generation.answer(request, "completion", req, lambda: [tokenizer(p)["input_ids"] for p in req.prompts],
                                       window, served.id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _authorised(request, limits)
        req = parse(api.ChatRequest, await read_json(request, limits.max_body_bytes))
        check_model(req.model)
        return await generation.answer(request, "chat", req, lambda: [prompt_ids(tokenizer, req.conversation())[0].tolist()],
                                       window, served.id)


async def read_json(request, limit: int) -> Any:
    """The body as JSON, counted as it is received: past `limit` bytes, a 413 at once."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise api.OpenAIError(413, f"the request body is over the {limit:,}-byte limit", code="body_too_large")
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise api.OpenAIError(413, f"the request body is over the {limit:,}-byte limit", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise api.OpenAIError(400, "the request body is not valid JSON", code="invalid_json") from None
    except RecursionError:  # arrays nested thousands deep
        raise api.OpenAIError(400, "the request body nests too deeply", code="invalid_json") from None


def parse(model: type, body: Any):
    if not isinstance(body, dict):
        raise api.OpenAIError(400, "the request body must be a JSON object", code="invalid_request")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        message, param = api.validation_message(err.errors(include_input=False, include_url=False))
        raise api.OpenAIError(400, message, param=param, code="invalid_request") from None


class Generation:
    """Turns a validated request into choices on the engine, whole or streamed."""

    def __init__(self, engine: Engine, tokenizer: Any, admission: Admission, metrics: Metrics, limits: Limits):
        self.engine, self.tokenizer, self.admission, self.metrics, self.limits = engine, tokenizer, admission, metrics, limits

    def plan(self, req, prompts: list[list[int]], window: int | None) -> tuple[list[tuple[list[int], Sampling]], int]:
        """(prompt, sampling) per choice, in the API's order (prompt by prompt, n each), and the
        prompt tokens counted for usage."""
        asked = req.max_tokens if isinstance(req, api.CompletionRequest) else req.token_limit
        longest = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise api.OpenAIError(400, "a prompt encodes to no tokens", param="prompt", code="empty_prompt")
        room = (window - longest) if window else self.limits.max_tokens
        if room < 1:
            raise api.OpenAIError(400, f"the prompt holds {longest} tokens; the model reads at most {window}",
                                  param="messages" if isinstance(req, api.ChatRequest) else "prompt",
                                  code="context_length_exceeded")
        max_tokens = asked if asked is not None else min(self.limits.max_tokens, room)
        if max_tokens > self.limits.max_tokens:
            raise api.OpenAIError(400, f"max_tokens may be at most {self.limits.max_tokens}", param="max_tokens")
        if max_tokens > room:
            raise api.OpenAIError(400, f"the prompt ({longest} tokens) and max_tokens ({max_tokens}) pass the model's "
                                  f"{window} positions", param="max_tokens", code="context_length_exceeded")
        plan = []
        for prompt in prompts:
            for i in range(req.n):
                seed = None if req.seed is None else req.seed + i  # each choice its own, reproducible draws
                plan.append((prompt, Sampling(max_tokens, req.temperature, req.top_p, seed)))
        return plan, sum(len(p) for p in prompts)

    async def answer(self, request, kind: str, req, encode: Callable[[], list[list[int]]], window: int | None,
                     model_id: str):
        """The response to a validated request. `encode` gives its prompts' ids: run in a thread, and
        only once the request is admitted, so a long prompt neither stalls the other streams nor
        costs work past the 429."""
        self.admission.enter()
        started = time.perf_counter()
        try:
            plan, prompt_tokens = self.plan(req, await asyncio.to_thread(encode), window)
        except BaseException:
            self.admission.leave()
            raise
        self.metrics.prompt_tokens.inc(prompt_tokens)
        rid, created = api.new_id("cmpl" if kind == "completion" else "chatcmpl"), api.now()
        if req.stream:
            events = self.stream_events(kind, req, plan, prompt_tokens, rid, created, model_id, started)
            return ClosingStreamingResponse(events, media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            choices = await self.whole(request, req, plan, started)
        finally:
            self.admission.leave()
        completion_tokens = sum(c["tokens"] for c in choices)
        self.metrics.completion_tokens.inc(completion_tokens)
        self.metrics.duration.observe(time.perf_counter() - started)
        build = api.completion if kind == "completion" else api.chat_completion
        return build(rid, created, model_id, choices, api.usage(prompt_tokens, completion_tokens))

    def deadline(self, started: float) -> float:
        """The event loop's time at which a request that arrived at `started` (perf_counter) times out."""
        return asyncio.get_running_loop().time() + self.limits.timeout_s - (time.perf_counter() - started)

    async def whole(self, request, req, plan, started: float) -> list[dict]:
        """Every choice in full. A client that leaves, or the timeout, cancels them all."""
        first = []

        async def one(index: int, prompt: list[int], sampling: Sampling) -> dict:
            text, reason, tokens = "", None, 0
            async with aclosing(choice_pieces(self.engine, self.tokenizer, prompt, sampling, req.stops)) as pieces:
                async for piece, reason, tokens in pieces:
                    if not first:
                        first.append(time.perf_counter() - started)
                    text += piece
            return {"index": index, "text": text, "finish_reason": reason, "tokens": tokens}

        tasks: list[asyncio.Task] = []
        watcher = asyncio.ensure_future(_until_disconnected(request))
        try:
            # from arrival: the time spent waiting for a slot counts against the request's timeout
            async with asyncio.timeout_at(self.deadline(started)):
                async with self.admission.slots:
                    tasks = [asyncio.ensure_future(one(i, p, s)) for i, (p, s) in enumerate(plan)]
                    gathered = asyncio.gather(*tasks)
                    gathered.add_done_callback(_retrieved)
                    done, _ = await asyncio.wait([gathered, watcher], return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                raise api.OpenAIError(408, "the client went away", code="client_closed")
            return [t.result() for t in tasks]
        except TimeoutError:
            raise api.OpenAIError(504, f"the request ran past {self.limits.timeout_s:g} s", code="timeout") from None
        except EngineError as err:
            raise api.OpenAIError(503, str(err), code="engine_error") from None
        finally:
            watcher.cancel()
            for task in tasks:
                task.cancel()
            if first:
                self.metrics.first_token.observe(first[0])

    async def stream_events(self, kind, req, plan, prompt_tokens, rid, created, model_id, started) -> AsyncIterator[bytes]:
        """Server-sent events: the choices' pieces as they come (interleaved, each with its index),
        a usage chunk when asked, then [DONE]. Closing the stream cancels what still runs."""
        events: asyncio.Queue = asyncio.Queue()
        counts = [0] * len(plan)

        async def one(index: int, prompt: list[int], sampling: Sampling) -> None:
            async with aclosing(choice_pieces(self.engine, self.tokenizer, prompt, sampling, req.stops)) as pieces:
                async for piece, reason, tokens in pieces:
                    counts[index] = tokens
                    await events.put((index, piece, reason))

        tasks: list[asyncio.Task] = []
        try:
            async with asyncio.timeout_at(self.deadline(started)), self.admission.slots:
                tasks = [asyncio.ensure_future(one(i, p, s)) for i, (p, s) in enumerate(plan)]
                runner = asyncio.gather(*tasks)
                runner.add_done_callback(_retrieved)
                runner.add_done_callback(lambda _f: events.put_nowait(None))
                first_seen = False
                if kind == "chat":
                    for index in range(len(plan)):
                        yield sse(api.chat_chunk(rid, created, model_id, index, {"role": "assistant", "content": ""},
                                                 None, req.include_usage))
                while (event := await events.get()) is not None:
                    index, piece, reason = event
                    if not piece and reason is None:
                        continue
                    if not first_seen:
                        first_seen = True
                        self.metrics.first_token.observe(time.perf_counter() - started)
                    if kind == "chat":
                        delta = {"content": piece} if piece else {}
                        yield sse(api.chat_chunk(rid, created, model_id, index, delta, reason, req.include_usage))
                    else:
                        yield sse(api.completion_chunk(rid, created, model_id, index, piece, reason, req.include_usage))
                runner.result()  # an engine failure surfaces here
            completion_tokens = sum(counts)
            self.metrics.completion_tokens.inc(completion_tokens)
            if req.include_usage:
                obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
                yield sse(api.usage_chunk(rid, created, model_id, obj, api.usage(prompt_tokens, completion_tokens)))
            yield b"data: [DONE]\n\n"
        except TimeoutError:
            self.metrics.stream_errors.labels("timeout").inc()
            yield sse(api.OpenAIError(504, f"the request ran past {self.limits.timeout_s:g} s", code="timeout").body())
        except EngineError as err:
            self.metrics.stream_errors.labels("engine_error").inc()
            yield sse(api.OpenAIError(503, str(err), code="engine_error").body())
        finally:
            for task in tasks:
                task.cancel()
            self.admission.leave()
            self.metrics.duration.observe(time.perf_counter() - started)


class ClosingStreamingResponse(StreamingResponse):
    """A stream whose generator is closed however the response ends. When a client goes away while
    a chunk waits to be sent (it reads slowly), Starlette stops sending but leaves the generator
    suspended at its `yield`; closed here, its `finally` frees the slot and cancels the generation
    at once instead of whenever the garbage collector finds it."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _retrieved(future: asyncio.Future) -> None:
    """Mark a gathered future's outcome as seen: a request ended early leaves it cancelled or
    failed, which is handled where it ends, not news for the event loop's log."""
    if not future.cancelled():
        future.exception()


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _until_disconnected(request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


async def choice_pieces(engine: Engine, tokenizer: Any, prompt: list[int], sampling: Sampling,
                        stops: list[str]) -> AsyncIterator[tuple[str, str | None, int]]:
    """(new text, finish reason or None, tokens generated so far) as one choice is generated.

    Text that might be the start of a stop sequence waits until it is known not to be. A stop
    sequence ends the choice there (finish reason "stop", the sequence itself not included) and
    cancels its generation."""
    text = ""  # the choice's text so far
    sent = 0  # characters of it handed out
    decoder = IncrementalDecoder(tokenizer)
    async with aclosing(engine.stream(prompt, sampling)) as steps:
        async for step in steps:
            text += decoder.add(step.tokens, final=step.reason is not None)
            cut = _first_stop(text, stops, sent)
            if cut is not None:
                yield text[sent:cut], "stop", len(step.tokens)
                return
            if step.reason is not None:
                yield text[sent:], step.reason, len(step.tokens)
                return
            ready = len(text) - _held_back(text, stops)
            if ready > sent:
                yield text[sent:ready], None, len(step.tokens)
                sent = ready


class IncrementalDecoder:
    """The text each new token adds, decoding only the last few tokens each time (decoding all of
    them at every step costs time quadratic in the answer's length). A window starting one step
    back gives the new token its context (a leading space, the rest of a character split over two
    tokens); a piece ending in half a character waits for the rest."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.prefix = 0  # the window's start
        self.read = 0  # tokens whose text was handed out

    def add(self, tokens: list[int], final: bool = False) -> str:
        before = self._decode(tokens[self.prefix:self.read])
        now = self._decode(tokens[self.prefix:])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(tokens)
        return now[len(before):]

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""


def _first_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    # A stop cannot begin in text already handed out: _held_back kept any possible start back.
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could begin a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
