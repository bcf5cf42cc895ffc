"""`lmforge serve`: the OpenAI API over a tiny real Llama, spoken to by the official `openai` client
(and by raw HTTP where the client would hide what is checked), against servers started here on
127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import BIN
from tests.test_register import make_project, register, store  # noqa: F401 (store: the module's MLflow store)
from tests.tiny_models import chat_folder, with_positions

openai = pytest.importorskip("openai")  # the dev extra; CI installs it

LOOPBACK = "127.0.0.1"
SECRET = "do-not-echo-7f3a"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def long_chat_folder(tmp_path_factory) -> Path:
    """chat_folder() with 4,096 positions (rotary: nothing to retrain), so a request may run long."""
    return with_positions(chat_folder(), tmp_path_factory.mktemp("serve") / "tiny-chat", 4096)


class Server:
    """`lmforge serve` in a subprocess, up once /health answers; stopped with SIGINT."""

    def __init__(self, model: str, *flags: str, env: dict | None = None, cwd: Path | None = None):
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.process = subprocess.Popen([str(BIN / "lmforge"), "serve", model, "--port", str(self.port), "--device", "cpu",
                                         *flags], cwd=cwd, env={**os.environ, **(env or {})}, stderr=subprocess.PIPE,
                                        text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"lmforge serve exited {self.process.returncode}: {self.process.stderr.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError("lmforge serve did not come up in 180 s")

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)

    def alive(self) -> bool:
        return self.process.poll() is None and httpx.get(self.url + "/health", timeout=5).status_code == 200

    def stop(self) -> str:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return self.process.stderr.read()


@pytest.fixture(scope="module")
def server(long_chat_folder):
    running = Server(str(long_chat_folder), "--max-body-bytes", "20000", "--max-tokens", "256")
    yield running
    running.stop()


def test_a_completion_and_a_chat_answer_with_usage_and_the_served_id(server):
    client = server.client()
    (listed,) = client.models.list().data
    assert listed.id == "tiny-chat"
    done = client.completions.create(model=listed.id, prompt="ROMEO:", max_tokens=6, temperature=0)
    assert done.model == "tiny-chat" and done.object == "text_completion"
    assert done.choices[0].finish_reason in ("stop", "length") and isinstance(done.choices[0].text, str)
    assert done.usage.prompt_tokens > 0 and 0 < done.usage.completion_tokens <= 6
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    chat = client.chat.completions.create(model=None, messages=[{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": "hi 3"}], max_tokens=5)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str) and chat.usage.completion_tokens <= 5
    raw = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                 "max_tokens": 2})
    assert raw.status_code == 200 and raw.headers["lmforge-model"] == "tiny-chat"


def test_greedy_is_the_same_every_time_a_seed_reproduces_and_no_seed_samples_afresh(server):
    client = server.client()

    def text(**sampling) -> str:
        return client.completions.create(model=None, prompt="JULIET:", max_tokens=16, **sampling).choices[0].text

    assert text(temperature=0) == text(temperature=0)
    assert text(temperature=1.0, seed=11) == text(temperature=1.0, seed=11)
    assert len({text(temperature=1.0) for _ in range(3)}) > 1


def test_a_stream_arrives_in_pieces_before_its_end_and_ends_with_done(server):
    arrivals, pieces, lines = [], [], []
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 120, "temperature": 1.0,
                            "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line:
                lines.append(line)
                arrivals.append(time.perf_counter())
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert sum(1 for p in pieces if p) > 5  # token by token, not one block at the end
    assert arrivals[1] < arrivals[-1] - 0.01  # the first piece came before the end
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    finished = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finished in (["stop"], ["length"])


def test_the_client_streams_n_choices_each_with_its_index(server):
    client = server.client()
    done = client.completions.create(model=None, prompt="ROMEO:", max_tokens=8, n=3, temperature=1.0)
    assert sorted(c.index for c in done.choices) == [0, 1, 2]
    texts: dict[int, str] = {}
    for chunk in client.chat.completions.create(model=None, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                                n=2, stream=True, temperature=1.0):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(texts) == [0, 1]


def test_a_stop_sequence_ends_the_text_before_it(server):
    client = server.client()
    full = client.completions.create(model=None, prompt="ROMEO: But", max_tokens=24, temperature=0).choices[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip())
    cut = client.completions.create(model=None, prompt="ROMEO: But", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_are_400s_in_openai_s_shape_that_never_quote_the_request(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=None, messages=[{"role": "wizard", "content": SECRET}], max_tokens=2)
    assert err.value.status_code == 400 and "role" in err.value.message
    for body in ({"prompt": "x", "temperature": SECRET}, {"prompt": "x", "max_tokens": 0}, {"prompt": "x", "n": 99},
                 {"prompt": "x", "logprobs": 3}, {"prompt": "x", "stop": [SECRET] * 5}, {"messages": SECRET}, [SECRET]):
        answer = httpx.post(server.url + "/v1/completions", json=body)
        assert answer.status_code == 400, body
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"] and SECRET not in answer.text
    not_json = httpx.post(server.url + "/v1/completions", content=b"{" + SECRET.encode())
    assert not_json.status_code == 400 and SECRET not in not_json.text
    too_long = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4000})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
    other = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "model": "gpt-5"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"


def test_an_oversized_body_is_refused_with_413_chunked_or_not(server):
    big = json.dumps({"prompt": "y" * 50_000}).encode()

    def chunks():
        for start in range(0, len(big), 4096):
            yield big[start:start + 4096]

    chunked = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=60)  # no Content-Length
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"
    declared = httpx.post(server.url + "/v1/completions", content=big, timeout=60)
    assert declared.status_code == 413
    assert server.alive()


def test_sixteen_concurrent_streams_all_complete_and_the_server_stays_up(server):
    async def one(client, i: int) -> tuple[str, str | None]:
        text, reason = "", None
        stream = await client.chat.completions.create(model=None, messages=[{"role": "user", "content": f"hi {i}"}],
                                                      max_tokens=32, temperature=1.0, stream=True)
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                reason = choice.finish_reason or reason
        return text, reason

    async def seeded(client) -> str:
        done = await client.completions.create(model=None, prompt="JULIET:", max_tokens=16, temperature=1.0, seed=5)
        return done.choices[0].text

    async def many():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
            alone = await seeded(client)
            *streams, under_load = await asyncio.wait_for(
                asyncio.gather(*(one(client, i) for i in range(16)), seeded(client)), timeout=240)
            return streams, alone, under_load

    results, alone, under_load = asyncio.run(many())
    assert under_load == alone  # a seed reproduces whatever else the server is doing
    assert len(results) == 16 and all(reason in ("stop", "length") for _, reason in results)
    assert server.alive()
    metrics = httpx.get(server.url + "/metrics").text
    assert 'lmforge_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert "lmforge_time_to_first_token_seconds_count" in metrics and "lmforge_queue_depth 0.0" in metrics


def test_past_the_queue_a_429_a_client_gone_frees_its_slot_and_a_timeout_ends_a_request(long_chat_folder):
    busy = Server(str(long_chat_folder), "--max-running", "1", "--max-waiting", "1", "--max-tokens", "3000",
                  "--timeout", "4")
    try:
        # greedy: the untrained model repeats one token and never ends its reply early
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000, "temperature": 0, "stream": True}
        with httpx.stream("POST", busy.url + "/v1/chat/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()  # kept: a dropped iterator would close the stream
            next(lines)  # running: the one slot is taken
            with httpx.stream("POST", busy.url + "/v1/chat/completions", json=body, timeout=60) as second:
                assert second.status_code == 200  # waiting: the one place in the queue
                refused = httpx.post(busy.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["type"] == "rate_limit_error"
        # both clients left mid-answer: their slots come free and a new request is served at once
        started = time.perf_counter()
        quick = busy.client().completions.create(model=None, prompt="x", max_tokens=4, temperature=0)
        assert quick.choices and time.perf_counter() - started < 20
        deadline = time.monotonic() + 20
        while "lmforge_requests_running 0.0" not in httpx.get(busy.url + "/metrics").text:
            assert time.monotonic() < deadline, "the slots were not freed"
            time.sleep(0.2)
        # a request that runs past --timeout is ended with a 504, and its slot is freed too
        late = httpx.post(busy.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        assert busy.client().completions.create(model=None, prompt="x", max_tokens=2, temperature=0).choices
    finally:
        busy.stop()


def running_requests(server: Server) -> float:
    line = next(line for line in httpx.get(server.url + "/metrics").text.splitlines()
                if line.startswith("lmforge_requests_running "))
    return float(line.split()[1])


def test_a_slow_reader_that_leaves_frees_its_slot_at_once(long_chat_folder):
    """A client that stops reading, so the server's sends back up, and then hangs up: its slot is
    free at once, not at the timeout (300 s here), and the one slot serves the next request."""
    slow = Server(str(long_chat_folder), "--max-running", "1", "--max-tokens", "3000", "--timeout", "300")
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000, "temperature": 0,
                           "n": 4, "stream": True}).encode()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((LOOPBACK, slow.port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: lmforge\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            assert b" 200 " in sock.recv(256).split(b"\r\n")[0]
            time.sleep(3)  # not reading: the answer fills the socket's buffers and the server's sends wait
            assert running_requests(slow) == 1.0
        deadline = time.monotonic() + 5
        while running_requests(slow) != 0.0:
            assert time.monotonic() < deadline, "the slot of a client that left stayed taken"
            time.sleep(0.1)
        started = time.perf_counter()
        assert slow.client(timeout=30).completions.create(model=None, prompt="x", max_tokens=2, temperature=0).choices
        assert time.perf_counter() - started < 10
    finally:
        slow.stop()


def test_a_request_larger_than_the_kv_cache_is_a_400_and_the_engine_keeps_serving(long_chat_folder):
    """--kv-blocks 4 of 64 tokens: 256 tokens in all. A request that could never fit is refused
    before it reaches the batch, where it would fail every request in flight."""
    small = Server(str(long_chat_folder), "--kv-blocks", "4", "--max-tokens", "3000")
    try:
        too_big = httpx.post(small.url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 300}, timeout=60)
        assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "context_length_exceeded"
        assert "256" in too_big.json()["error"]["message"]
        done = small.client().completions.create(model=None, prompt="ROMEO:", max_tokens=200, temperature=0)
        assert done.usage.completion_tokens == 200 and small.alive()
    finally:
        small.stop()


def test_unknown_routes_deep_json_and_metrics_labels_stay_in_bounds(server):
    missing = httpx.post(server.url + f"/v1/{SECRET}", json={})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert SECRET not in missing.text and missing.headers["lmforge-model"] == "tiny-chat"
    nested = httpx.post(server.url + "/v1/completions", content=b"[" * 19_000, timeout=60)
    assert nested.status_code == 400 and nested.json()["error"]["code"] == "invalid_json"
    chat_secret = httpx.post(server.url + "/v1/chat/completions", json={"messages": SECRET, "max_tokens": 2})
    assert chat_secret.status_code == 400 and SECRET not in chat_secret.text
    metrics = httpx.get(server.url + "/metrics").text
    assert SECRET not in metrics  # a path asked for is never a label
    assert 'lmforge_requests_total{endpoint="/v1/completions",status="400"}' in metrics


def test_a_stop_sequence_split_across_streamed_pieces_is_held_back(server):
    client = server.client()
    full = client.completions.create(model=None, prompt="ROMEO: But", max_tokens=24, temperature=0).choices[0].text
    stop = next(full[i:i + 3] for i in range(3, len(full) - 3) if full[i:i + 3].strip())
    pieces, reasons = [], []
    for chunk in client.completions.create(model=None, prompt="ROMEO: But", max_tokens=24, temperature=0, stop=[stop],
                                           stream=True):
        pieces += [c.text for c in chunk.choices]
        reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
    assert "".join(pieces) == full[:full.index(stop)] and reasons == ["stop"]


def test_an_api_key_guards_the_api_and_a_public_address_needs_one(long_chat_folder):
    keyed = Server(str(long_chat_folder), env={"LMFORGE_API_KEY": SECRET})
    try:
        with pytest.raises(openai.AuthenticationError):
            keyed.client(api_key="wrong").models.list()
        assert keyed.client(api_key=SECRET).models.list().data[0].id == "tiny-chat"
        for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 1}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
                           ("/v1/models/tiny-chat", None)):
            answer = httpx.request("POST" if body else "GET", keyed.url + path, json=body)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key", path
    finally:
        log = keyed.stop()
    assert SECRET not in log
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_API_KEY"}
    public = subprocess.run([str(BIN / "lmforge"), "serve", str(long_chat_folder), "--host", "0.0.0.0"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert public.returncode == 2 and "LMFORGE_API_KEY" in public.stderr


def test_the_registered_champion_is_served_under_its_version_with_its_lineage(store, tmp_path, monkeypatch):  # noqa: F811
    root = make_project(tmp_path / "proj", "servechat")
    register(root, monkeypatch, "chat")
    env = {"MLFLOW_TRACKING_URI": store}
    promoted = subprocess.run([str(BIN / "lmforge"), "promote", "servechat-chat"], cwd=root, capture_output=True,
                              text=True, timeout=300, env={**os.environ, **env})
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    served = Server("models:/servechat-chat@champion", cwd=root, env=env)
    try:
        client = served.client()
        (listed,) = client.models.list().data
        assert listed.id == "servechat-chat/1"
        answer = client.chat.completions.with_raw_response.create(model="models:/servechat-chat@champion",
                                                                  messages=[{"role": "user", "content": "hi 3"}],
                                                                  max_tokens=4)
        assert answer.headers["lmforge-model"] == "servechat-chat/1" and answer.parse().model == "servechat-chat/1"
        card = httpx.get(served.url + "/v1/models/servechat-chat/1").json()
        lineage = card["lineage"]
        assert lineage["version"] == 1 and "champion" in lineage["aliases"] and lineage["run_id"]
        assert lineage["trace"] == "lmforge trace models:/servechat-chat/1" and lineage["metrics"]
        assert lineage["commit"] and lineage["params_sha256"] and lineage["inputs"]
        assert httpx.get(served.url + "/v1/models/servechat-chat/2").status_code == 404
    finally:
        served.stop()


def test_the_engine_passes_its_sizes_graphs_and_compile_level_to_transformers():
    from lmforge.generation import load_causal_lm
    from lmforge.serve.engine import Engine, EngineSettings

    model, tokenizer = load_causal_lm(chat_folder(), device="cpu")
    config = Engine(model, tokenizer, EngineSettings(max_batch_tokens=512, cuda_graph=False, compile_level=1))._config()
    assert config["max_batch_tokens"] == 512 and config["num_blocks"] == EngineSettings.CPU_DEFAULTS["num_blocks"]
    assert config["use_cuda_graph"] is False and config["default_compile_level"] == 1
    assert config["per_request_processors"] is True
    assert Engine(model, tokenizer, EngineSettings())._config()["use_cuda_graph"] is False  # auto: on with CUDA only


def test_a_warm_up_runs_every_batch_size_before_the_server_answers(long_chat_folder):
    from tasks.cli import warm_up_sizes

    assert warm_up_sizes(64) == [1, 2, 4, 8, 16, 32, 64] and warm_up_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert warm_up_sizes(1) == [1]
    served = Server(str(long_chat_folder), "--warm-up", "on", "--max-running", "3")
    try:
        done = served.client().completions.create(model="tiny-chat", prompt="ROMEO:", max_tokens=3, temperature=0)
        assert 0 < done.usage.completion_tokens <= 3
        counted = [line for line in httpx.get(served.url + "/metrics").text.splitlines()
                   if line.startswith("lmforge_completion_tokens_total")]
        assert counted == [f"lmforge_completion_tokens_total {float(done.usage.completion_tokens)}"]  # warm-up not counted
    finally:
        log = served.stop()
    assert "warmed up batch sizes 1, 2, 3 in" in log


def test_streamed_text_is_decoded_a_few_tokens_at_a_time_and_never_splits_a_character():
    from transformers import AutoTokenizer

    from lmforge.serve.app import IncrementalDecoder

    tokenizer = AutoTokenizer.from_pretrained(chat_folder())
    ids = tokenizer.encode("ROMEO: naïve café, 東京 🙂 wherefore<eos> art thou Romeo? " * 20)
    windows = []

    class Counting:  # the real tokenizer, each decode's length noted
        def decode(self, tokens, **kwargs):
            windows.append(len(tokens))
            return tokenizer.decode(tokens, **kwargs)

    decoder = IncrementalDecoder(Counting())
    pieces = [decoder.add(ids[:n], final=n == len(ids)) for n in range(1, len(ids) + 1)]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("") >= 20 * 3  # each multi-byte character's bytes waited for the last of them
    assert max(windows) <= 8 and len(ids) > 500  # a window of a few tokens, never the whole answer


def test_an_engine_that_died_is_started_again_by_the_next_request_but_not_in_a_loop():
    from contextlib import aclosing

    from lmforge.generation import load_causal_lm
    from lmforge.serve.engine import Engine, EngineError, EngineSettings, Sampling

    model, tokenizer = load_causal_lm(chat_folder(), device="cpu")
    engine = Engine(model, tokenizer, EngineSettings())
    engine.start()

    async def answer() -> list[int]:
        async with aclosing(engine.stream([1, 2, 3], Sampling(max_tokens=3, temperature=0.0))) as steps:
            return [step.tokens async for step in steps][-1]

    try:
        engine.restart_backoff_s = 0.0
        engine._manager.stop(block=True, timeout=30)  # its thread ends, as after a fatal error
        assert not engine.healthy()
        assert 0 < len(asyncio.run(answer())) <= 3 and engine.healthy() and engine.restarts == 1
        engine.restart_backoff_s = 3600.0
        engine._manager.stop(block=True, timeout=30)
        with pytest.raises(EngineError, match="not running"):
            asyncio.run(answer())
        assert engine.restarts == 1  # within the back-off: refused, not restarted again
    finally:
        engine.stop()
