"""The scoring server's request guard: a capped body, and rejections that never quote the request.

MLflow 3's scoring server (`mlflow models serve`; the `build-docker` image runs the same app behind
nginx) has no setting for the size of a request: it reads the whole body (`await request.body()`)
and parses it, and uvicorn, which runs it, has no body limit either (its limits are on headers and
connections; MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT is MLflow's only knob). Its 400 answers quote
the request too: "Failed to predict data '<the data>'", "Input: <the body>". So the served pyfuncs
put `RequestGuard`, an ASGI middleware, in front of MLflow's app:

- a POST body is read here, counting the bytes actually received, before the app runs: one that
  declares a Content-Length over the cap is answered 413 unread, and one that runs past the cap
  (chunked, or longer than it declared) is answered 413 as soon as the count passes it, so at
  most cap + one chunk is ever held. The framing is the HTTP layer's business (a chunked body
  with a small Content-Length beside it is framed by its chunks), so the cap counts bytes, not
  headers;
- a JSON body nested deeper than MAX_NESTING is answered 400 before anyone parses it (Python's
  json parser recurses, and 40k `[` under the cap ended in a RecursionError and a 500);
- a 4xx answer of the app keeps its status and error code, and its message becomes one that
  says what is wrong without quoting the input: the pyfunc's own reason (each rejection of
  lmforge/registry/serving.py carries it in the error's `reason` field), else a fixed sentence
  for MLflow's own parse, schema and content-type errors (its 415 quotes the Content-Type).

The app is built by MLflow (mlflow/pyfunc/scoring_server/app.py: load the model, then build the
FastAPI app around it), with no hook for middleware. `install_when_served`, called while the model
loads, sees that the scoring server is the one loading it and has the FastAPI app built next
carry the guard. In any other process (`mlflow.pyfunc.load_model` in a notebook) it does nothing.

This module is copied into every registered model (code_paths): it imports nothing of lmforge.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Awaitable, Callable

SCORING_APP_MODULE = "mlflow.pyfunc.scoring_server.app"
REASON_FIELD = "reason"  # the JSON field of a pyfunc's rejection that holds its input-free message

# MLflow's own rejections, by how their messages begin (the quoted input comes after), and what
# the guard answers instead. Anything else gets the last, generic sentence: never the original.
_MLFLOW_REJECTIONS = (
    ("Invalid input. Ensure that input is a valid JSON", "the request body is not valid JSON"),
    ("Invalid input. Ensure that input is a valid UTF-8", "the request body is not UTF-8 text"),
    ("The input must be a JSON dictionary", "the request must be a JSON object with exactly one of the "
                                            "fields inputs, instances, dataframe_split or dataframe_records"),
)
_SCHEMA_REJECTION = ("Failed to enforce schema", "the request does not match the model's input: "
                                                 "one `text` column of strings")
_CONTENT_TYPE_REJECTION = "the request's Content-Type is not supported: send application/json"
# Answers whose status alone says what is wrong (MLflow's 415 quotes the Content-Type header).
_STATUS_REJECTIONS = {
    404: "no such endpoint: POST to /invocations",
    405: "this endpoint does not take that method",
    415: _CONTENT_TYPE_REJECTION,
}
_GENERIC_REJECTION = "the request does not match the model's input (a list of texts under `inputs`)"

# The deepest JSON nesting a request may have: lmforge's request shapes need 4 ({"dataframe_split":
# {"data": [[...]]}}); the parser recurses once per level.
MAX_NESTING = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]


def install_when_served(max_bytes: int) -> bool:
    """When MLflow's scoring server is loading the model, make the app it builds next carry
    RequestGuard(max_bytes). Returns whether it did (False: some other process loads the model)."""
    scoring_app = sys.modules.get(SCORING_APP_MODULE)
    if scoring_app is None or hasattr(scoring_app, "app"):
        return False  # not inside the import of the scoring app, which assigns `app` once loaded
    import fastapi

    build = fastapi.FastAPI

    def build_guarded(*args, **kwargs):
        fastapi.FastAPI = build  # one app only: the scoring app, built right after the model loads
        app = build(*args, **kwargs)
        app.add_middleware(RequestGuard, max_bytes=max_bytes)
        return app

    fastapi.FastAPI = build_guarded
    return True


class RequestGuard:
    """ASGI middleware: refuse a POST body over `max_bytes` unread; rewrite 4xx JSON answers."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope["headers"])
        if refusal is not None:
            await answer(send, *refusal)
            return
        body = await read_capped(receive, self.max_bytes)
        if body is None:
            await answer(send, 413, f"the request body is over the limit of {self.max_bytes:,} bytes")
            return
        if is_json(scope["headers"]) and nesting_depth(body) > MAX_NESTING:
            await answer(send, 400, f"the request body nests deeper than {MAX_NESTING} levels")
            return
        await self.app(scope, replay(body, receive), ScrubbedSend(send))

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | None:
        """(status, message) for a request refused on its headers alone (its body unread), else None."""
        lengths = [value for name, value in headers if name.lower() == b"content-length"]
        if len(lengths) > 1 or (lengths and not lengths[0].strip().isdigit()):
            return 400, "the request needs at most one Content-Length header, a whole number"
        if lengths and int(lengths[0]) > self.max_bytes:
            return 413, f"the request body has {int(lengths[0]):,} bytes; the limit is {self.max_bytes:,}"
        if not any(name.lower() == b"content-type" for name, _ in headers):
            return 415, _CONTENT_TYPE_REJECTION  # MLflow's app fails with a 500 on a missing one
        return None


def is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    content_type = next((value for name, value in headers if name.lower() == b"content-type"), b"")
    return content_type.split(b";")[0].strip().lower() == b"application/json"


async def read_capped(receive: Receive, max_bytes: int) -> bytes | None:
    """The whole request body, or None as soon as more than `max_bytes` have arrived (the rest is
    never asked for). MLflow's app reads the whole body before parsing anyway, so holding it here
    costs nothing more."""
    chunks, received = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > max_bytes:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then waits on the real one
    (for the client's disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> Message:
        return pending.pop() if pending else await receive()

    return receive_again


def nesting_depth(body: bytes) -> int:
    """How deeply the brackets of a JSON text nest (those inside strings not counted); stops
    counting once past MAX_NESTING."""
    brackets = _JSON_STRING.sub(b'""', body).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > MAX_NESTING:
                break
    return deepest


async def answer(send: Send, status: int, message: str, error_code: str = "BAD_REQUEST") -> None:
    body = json.dumps({"error_code": error_code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class ScrubbedSend:
    """The app's `send`, holding back a 4xx JSON answer to send it again with a safe message."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.start: Message | None = None
        self.body = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and self._rewritable(message):
            self.start = message
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.body += message.get("body", b"")
        if not message.get("more_body", False):
            error = rejection(self.body, self.start["status"])
            await answer(self.send, self.start["status"], error["message"], error["error_code"])

    @staticmethod
    def _rewritable(start: Message) -> bool:
        # Every 4xx, whatever its type: a plain-text or HTML error page can quote the request too.
        return 400 <= start["status"] < 500


def rejection(body: bytes, status: int = 400) -> dict[str, str]:
    """The error code and an input-free message for one of the app's 4xx answers."""
    if status in _STATUS_REJECTIONS:
        return {"error_code": "BAD_REQUEST", "message": _STATUS_REJECTIONS[status]}
    try:
        error = json.loads(body)
    except ValueError:
        error = None
    if not isinstance(error, dict):
        error = {}
    code = error.get("error_code") if isinstance(error.get("error_code"), str) else "BAD_REQUEST"
    reason = error.get(REASON_FIELD)
    return {"error_code": code, "message": reason if isinstance(reason, str) else mlflow_reason(error.get("message"))}


def mlflow_reason(message: Any) -> str:
    """A fixed sentence for one of MLflow's own rejections (never the message, which quotes the input)."""
    text = message if isinstance(message, str) else ""
    for start, reason in _MLFLOW_REJECTIONS:
        if text.startswith(start):
            return reason
    return _SCHEMA_REJECTION[1] if _SCHEMA_REJECTION[0] in text else _GENERIC_REJECTION
