"""Serving: request checks of the pyfuncs, and a real `mlflow models serve` of the champion on loopback."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import BIN
from tests.tiny_models import NEGATIVE, POSITIVE

MAX_TEXTS, MAX_CHARS = 8, 2000  # the served champion's caps
LIMIT = MAX_TEXTS * (MAX_CHARS * 6 + 16) + 4096  # its body cap: room for 8 texts of 2000 escaped characters

# --- request checks (no server) -----------------------------------------------------------------


@pytest.mark.parametrize("request_input, message", [
    ([], "no texts"),
    (["fine", 3], "text 1 is a int"),
    (["fine", "  "], "text 1 is empty"),
    (["x"] * 5, "5 texts; the limit is 4"),
    (["y" * 101], "101 characters; the limit is 100"),
    (pd.DataFrame({"a": ["x"], "b": ["y"]}), "expected a `text` column, got 2 other columns"),
    ({"secret_a": ["x"], "secret_b": ["y"]}, "expected a `text` field, got 2 other fields"),
    (42, "expected a list of texts"),
    ([{"secret_a": "x", "secret_b": "y"}], "expected a `text` column, got 2 other columns"),
    (np.array(["fine", None], dtype=object), "text 1 is a NoneType"),
])
def test_bad_requests_raise_invalid_parameter_value(request_input, message):
    from mlflow.exceptions import MlflowException

    from lmforge.registry.serving import texts_from

    with pytest.raises(MlflowException, match=message) as err:
        texts_from(request_input, max_texts=4, max_chars=100)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert err.value.get_http_status_code() == 400
    assert "secret" not in err.value.message and "'x'" not in err.value.message  # says what is wrong, quotes nothing
    assert err.value.json_kwargs["reason"] == err.value.message  # what the request guard answers with


@pytest.mark.parametrize("request_input", [
    {"text": ["a", "b"]},
    pd.DataFrame({"text": ["a", "b"]}),
    pd.DataFrame({"review": ["a", "b"]}),
    ["a", "b"],
    pd.DataFrame({"text": [["a", "b"]]}),  # what the old named schema made of a Python {"text": [...]}
    pd.DataFrame({"id": ["1", "2"], "text": ["a", "b"]}),  # the `text` column, not the first
    ("a", "b"),
    np.array(["a", "b"]),  # the scoring server's {"inputs": [...]}
    {"text": np.array(["a", "b"])},  # its {"inputs": {"text": [...]}}
    [{"text": "a"}, {"text": "b"}],  # records
    [{"text": np.array("a")}, {"text": np.array("b")}],  # the scoring server's {"inputs": [{"text": ...}, ...]}
])
def test_request_shapes_accepted(request_input):
    from lmforge.registry.serving import texts_from

    assert texts_from(request_input, max_texts=4, max_chars=100) == ["a", "b"]


@pytest.mark.parametrize("request_input", ["a", np.array("a"), {"text": "a"}])
def test_one_text_is_a_request_of_one(request_input):
    from lmforge.registry.serving import texts_from

    assert texts_from(request_input, max_texts=4, max_chars=100) == ["a"]


def test_the_guard_counts_the_bytes_it_receives_and_stops_past_the_cap():
    """Whatever the headers say, the guard asks for no more chunks once cap + 1 bytes are in."""
    import asyncio

    from lmforge.registry.guard import read_capped

    def chunks(count: int, size: int):
        asked = []

        async def receive():
            asked.append(size)
            return {"type": "http.request", "body": b"x" * size, "more_body": len(asked) < count}

        return receive, asked

    receive, asked = chunks(count=1000, size=10)
    assert asyncio.run(read_capped(receive, max_bytes=100)) is None
    assert sum(asked) == 110  # the chunk that passed the cap was the last one asked for
    receive, asked = chunks(count=10, size=10)
    assert asyncio.run(read_capped(receive, max_bytes=100)) == b"x" * 100


@pytest.mark.parametrize("body, depth", [
    (b'{"inputs": ["a", "b"]}', 2),
    (b'{"dataframe_split": {"columns": ["text"], "data": [["a"]]}}', 4),
    (b'{"inputs": ["[[[[[[[[[[{{{{{{{ in a string \\" ]]]"]}', 2),
    (b"[" * 40_000, 33),  # counting stops past MAX_NESTING
])
def test_nesting_depth_counts_brackets_outside_strings(body, depth):
    from lmforge.registry.guard import nesting_depth

    assert nesting_depth(body) == depth


# --- a real server ------------------------------------------------------------------------------


def wait_for_ping(server: subprocess.Popen, base: str, log: Path, seconds: float) -> None:
    """Until the scoring server answers /ping; fails with its log if it exits or stays silent."""
    deadline = time.monotonic() + seconds
    while True:
        if server.poll() is not None:
            pytest.fail(f"the server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"no /ping after {seconds:g} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop_server(server: subprocess.Popen) -> None:
    """End the process group the test started (the server runs uvicorn as a child)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait(timeout=5)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_raw(url: str, body: bytes, content_type: str | None = "application/json") -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST")
    if content_type is None:
        request.remove_header("Content-type")
        request.unredirected_hdrs.pop("Content-type", None)
        request.add_unredirected_header("Content-type", "")  # urllib would add a form type of its own
    else:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def post(url: str, body: bytes) -> tuple[int, dict]:
    status, raw = post_raw(url, body)
    return status, json.loads(raw or b"{}")


def announce_only(port: int, length: int) -> tuple[int, bytes]:
    """POST headers that announce a `length`-byte body, send none of it, and read the answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("POST", "/invocations")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(length))
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def post_chunked(port: int, body: bytes) -> tuple[int, bytes]:
    """POST `body` with chunked transfer encoding (no Content-Length)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/invocations", body=iter([body]), encode_chunked=True,
                           headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def raw_chunked(port: int, body: bytes, declared_length: int | None = None) -> tuple[int, bytes]:
    """POST `body` in 64 KiB chunks over a raw socket (optionally with a Content-Length beside the
    chunked framing, which the server must ignore), sending from a thread while the answer is read:
    a server that stops reading answers before the body is through."""
    import threading

    head = [b"POST /invocations HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json",
            b"Transfer-Encoding: chunked"]
    if declared_length is not None:
        head.append(b"Content-Length: %d" % declared_length)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)

    def send_all():
        try:
            sock.sendall(b"\r\n".join(head) + b"\r\n\r\n")
            for start in range(0, len(body), 65536):
                chunk = body[start:start + 65536]
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed before the whole body was sent: what we test

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    try:
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return answer.status, answer.read()
    finally:
        sock.close()
        sender.join(timeout=30)


@pytest.fixture
def champion(tmp_path: Path, monkeypatch) -> str:
    """A registry in a temp dir whose lmforge-sentiment@champion is the tiny classifier."""
    import mlflow

    from lmforge.registry import registration as registry
    from lmforge.config import load_params
    from tasks.register import MODELS
    from tests.test_register import make_project

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("lmforge", artifact_location=str(tmp_path / "artifacts"))
    root = make_project(tmp_path / "proj", "served")
    params = load_params(root / "params.yaml")
    params = params.model_copy(update={"register_": params.register_.model_copy(update={
        "sentiment": params.register_.sentiment.model_copy(update={"name": "lmforge-sentiment"}),
        "serving": params.register_.serving.model_copy(update={"max_texts": MAX_TEXTS, "max_chars": MAX_CHARS})})})
    with registry.using(uri) as client:
        registry.register_model(MODELS["sentiment"], params, root, log=lambda _: None)
        decision = registry.promote("lmforge-sentiment", params.register_.sentiment.gate, client=client)
    assert decision.promoted
    return uri


def test_served_champion_labels_reviews_and_rejects_bad_requests(champion, tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/lmforge-sentiment@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_ping(server, base, tmp_path / "serve.log", 90)

        status, body = post(f"{base}/invocations", json.dumps({"inputs": [POSITIVE, NEGATIVE]}).encode())
        assert status == 200, body
        labels = [p["label"] for p in body["predictions"]]
        assert labels == ["positive", "negative"]
        assert all(0.5 < p["probability"] <= 1.0 for p in body["predictions"])

        status, body = post(f"{base}/invocations", json.dumps({"dataframe_records": [{"text": POSITIVE}]}).encode())
        assert status == 200 and body["predictions"][0]["label"] == "positive"
        # the other request shapes: one text, a dataframe_split with more columns than `text`, records
        for shape in ({"inputs": NEGATIVE}, {"inputs": {"text": [NEGATIVE]}}, {"inputs": [{"text": NEGATIVE}]},
                      {"dataframe_split": {"columns": ["id", "text"], "data": [["7", NEGATIVE]]}}):
            status, body = post(f"{base}/invocations", json.dumps(shape).encode())
            assert status == 200 and [p["label"] for p in body["predictions"]] == ["negative"], (shape, body)

        # each rejection says what is wrong and quotes nothing of the request (MLflow's own
        # messages would: "Failed to predict data '<the data>'", "Input: <the body>")
        for bad, expected in (
            (b"not json SECRET", "not valid JSON"),
            (json.dumps({"texts": ["SECRET"]}).encode(), "exactly one of the fields"),
            (json.dumps({"inputs": []}).encode(), "no texts"),
            (json.dumps({"inputs": ["SECRET"] * 9}).encode(), "holds 9 texts; the limit is 8"),
            (json.dumps({"inputs": ["fine", "SECRET " * 500]}).encode(), "text 1 has 3500 characters; the limit is 2000"),
            (json.dumps({"dataframe_records": [{"SECRET": "x", "other": "y"}]}).encode(), "expected a `text` column"),
            (json.dumps({"inputs": {"SECRET": ["x"], "other": ["y"]}}).encode(), "expected a `text` field"),
            (json.dumps({"inputs": ["fine", None]}).encode(), "text 1 is a NoneType"),
            (json.dumps({"inputs": ["fine", "   "]}).encode(), "text 1 is empty"),
        ):
            status, raw = post_raw(f"{base}/invocations", bad)
            assert status == 400, (bad[:60], status, raw)
            assert expected in json.loads(raw)["message"], (bad[:60], raw)
            assert b"SECRET" not in raw and b"Traceback" not in raw, (bad[:60], raw)

        # the body is capped before it is read: a request announcing 50 MB is answered 413 at once,
        # though not one byte of its body was sent (a server reading it would wait for the bytes)
        status, raw = announce_only(port, 50_000_000)
        assert status == 413, raw
        assert json.loads(raw)["message"] == f"the request body has 50,000,000 bytes; the limit is {LIMIT:,}"
        too_big = json.dumps({"inputs": ["SECRET"] * (LIMIT // 8)}).encode()
        assert len(too_big) > LIMIT
        status, raw = post_raw(f"{base}/invocations", too_big)
        assert status == 413 and b"SECRET" not in raw
        # the cap counts the bytes received, whatever the framing: a chunked body is served when
        # small and refused past the cap, also when a small Content-Length is declared beside it
        status, raw = post_chunked(port, json.dumps({"inputs": [POSITIVE]}).encode())
        assert status == 200 and json.loads(raw)["predictions"][0]["label"] == "positive"
        oversize = json.dumps({"inputs": ["SECRET"] * (3 * LIMIT)}).encode()
        assert len(oversize) > 10 * LIMIT
        status, raw = raw_chunked(port, oversize, declared_length=10)
        assert status == 413 and json.loads(raw)["message"] == f"the request body is over the limit of {LIMIT:,} bytes"
        status, raw = raw_chunked(port, oversize)
        assert status == 413 and b"SECRET" not in raw
        # a body nested 40k deep (well under the cap) is refused before it is parsed, not a 500
        status, raw = post_raw(f"{base}/invocations", b"[" * 40_000 + b"]" * 40_000)
        assert status == 400 and "nests deeper than 32 levels" in json.loads(raw)["message"]
        # a refused Content-Type is not quoted back; a missing one is a 415, not a 500
        status, raw = post_raw(f"{base}/invocations", b"text=x", content_type="text/x-SECRET")
        assert status == 415 and b"SECRET" not in raw and "application/json" in json.loads(raw)["message"]
        status, raw = post_raw(f"{base}/invocations", b"{}", content_type=None)
        assert status == 415, raw
        # still serving after the bad requests
        assert post(f"{base}/invocations", json.dumps({"inputs": [NEGATIVE]}).encode())[1]["predictions"][0]["label"] == "negative"
    finally:
        stop_server(server)
        log.close()
