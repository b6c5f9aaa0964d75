"""``conflayers-run serve`` against the real ``openai`` client: a server in a subprocess on a free
loopback port, with the tiny artifact of $CONFLAYERS_TEST_ARTIFACT (scripts/test.sh runs this with
the runtime and ``[serve]`` installed alone: the server needs no torch)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import conflayers_runtime as rt
import openai
import pytest

KEY = "test-key"
CAP = 200  # --max-tokens-cap of the main server
SYSTEM = {"role": "system", "content": "be brief"}
CHAT = [SYSTEM, {"role": "user", "content": "abc"}, {"role": "assistant", "content": "de"},
        {"role": "user", "content": "fgh"}]  # fmt: skip


@pytest.fixture(scope="module")
def artifact() -> Path:
    folder = os.environ.get("CONFLAYERS_TEST_ARTIFACT")
    if not folder or not (Path(folder) / rt.MANIFEST_NAME).is_file():
        pytest.fail("set CONFLAYERS_TEST_ARTIFACT to a tiny artifact: python -m tests.helpers OUT")
    return Path(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A ``conflayers-run serve`` subprocess: its URL, its process, and clients for it."""

    def __init__(self, artifact: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.clients: list[openai.OpenAI] = []
        command = [sys.executable, "-m", "conflayers_runtime.cli", "serve", str(artifact), "--port",
                   str(self.port), *args]  # fmt: skip
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read()
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the server did not answer /health within 60 s")

    def client(self, key: str = KEY) -> openai.OpenAI:
        """A client of this server, closed with it (an open connection pool left to the garbage
        collector is an unclosed-socket warning, an error under the project's warning filter)."""
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)
        self.clients.append(client)
        return client

    def request(
        self, method: str, path: str, body: bytes | None = None, key: str | None = KEY
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """(status, headers, body) of one plain HTTP request (for what the openai client won't send)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            connection.request(method, path, body, headers)
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def health(self) -> dict:
        return json.loads(self.request("GET", "/health")[2])

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.process.stderr.close()


@pytest.fixture(scope="module")
def server(artifact) -> Iterator[Served]:
    served = Served(artifact, "--api-key", KEY, "--max-tokens-cap", str(CAP), "--max-queue", "16")
    yield served
    served.stop()


@pytest.fixture(scope="module")
def small_queue(artifact) -> Iterator[Served]:
    """A server that lets one request wait: the 429 and disconnect tests."""
    served = Served(artifact, "--max-queue", "1")
    yield served
    served.stop()


@pytest.fixture(scope="module")
def model(artifact) -> rt.Model:
    return rt.load(artifact)


def chat(client: openai.OpenAI, messages: list, stream: bool = False, **kwargs) -> tuple[str, object]:
    """(text, finish reason or usage): the reply, streamed or not."""
    kwargs = {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0, **kwargs}
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].choices[0].finish_reason


def complete(client: openai.OpenAI, prompt: str, stream: bool = False, **kwargs) -> str:
    kwargs = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, **kwargs}
    if not stream:
        return client.completions.create(**kwargs).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)


def test_models_and_health(server):
    names = [m.id for m in server.client().models.list().data]
    assert names == [Path(os.environ["CONFLAYERS_TEST_ARTIFACT"]).name]
    assert server.health()["status"] == "ok"  # no key needed


def test_greedy_chat_equals_load_generate_token_for_token(server, model):
    reply = server.client().chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0)
    expected = model.generate(messages=CHAT, max_new_tokens=16, mode="plain")
    assert reply.choices[0].message.content == expected.text and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == len(expected.token_ids) == 16
    assert reply.usage.prompt_tokens == len(model.encode(CHAT))
    ours = reply.usage.model_extra["conflayers"]
    assert ours["mode"] in ("speculative", "plain") and ours["tokens_per_full_pass"] >= 1.0
    assert chat(server.client(), CHAT, stream=True, max_tokens=16) == (expected.text, "length")


def test_greedy_completion_streamed_and_not(server, model):
    expected = model.generate("abcd", 10, chat=False, mode="plain")
    client = server.client()
    assert complete(client, "abcd", max_tokens=10) == expected.text
    chunks = list(client.completions.create(model="tiny", prompt="abcd", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == 4


def test_stop_strings(server, model):
    full = model.generate("abcd", 24, chat=False, mode="plain").text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    client = server.client()
    for stream in (False, True):
        assert complete(client, "abcd", stream, max_tokens=24, stop=[stop, "never here"]) == cut
    reply = client.completions.create(model="tiny", prompt="abcd", max_tokens=24, temperature=0, stop=stop)
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"


def test_seeds_repeat(server):
    client = server.client()
    runs = [complete(client, "abc", max_tokens=16, temperature=0.9, seed=seed) for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert complete(client, "abc", True, max_tokens=16, temperature=0.9, seed=7) == runs[0]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    client = server.client()
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    assert server.request("POST", "/v1/completions", b'{"prompt": "abc"}', key=None)[0] == 401
    bad = [
        {"prompt": "abc", "n": 2},  # n > 1
        {"prompt": "abc", "temperature": "hot"},  # a wrong type
        {"prompt": "abc", "max_tokens": CAP + 1},  # above the cap
        {"prompt": "a" * 1900, "max_tokens": CAP},  # beyond max_seq_len with the prompt
        {"prompt": "abc", "stop": [1, 2]},
        {"prompt": "abc", "logprobs": True},
        {"prompt": ""},
        {"prompt": "abc", "max_tokens": 0},
    ]
    for body in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="tiny", **body)
        assert caught.value.body["message"], body
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="a" * 1900, max_tokens=CAP)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[{"content": "no role"}])
    for body, status in [
        (b'{"prompt": "abc", ', 400),  # malformed JSON
        (b'["prompt"]', 400),  # not an object
        (b'{"prompt": "\xff\xfe"}', 400),  # not UTF-8
        (b'{"prompt": "a\\ud800b"}', 400),  # a lone surrogate escaped in JSON: no UTF-8 text
        (b'{"prompt": "' + b"a" * (2 << 20) + b'"}', 413),  # over the size limit
    ]:
        code, _, text = server.request("POST", "/v1/completions", body)
        error = json.loads(text)["error"]
        assert code == status and error["message"] and error["type"], body[:20]
        assert b"Traceback" not in text
    code, _, text = server.request("POST", "/v1/nothing", b"{}")
    assert code == 404 and "error" in json.loads(text)
    assert complete(client, "abc", max_tokens=4)  # still serving


def test_a_full_queue_answers_429_and_a_dropped_stream_frees_the_model(small_queue):
    """A long stream decodes, one request waits, the next gets a 429 with Retry-After; when the
    stream's client goes away, its generation stops at the next piece and the waiting one runs."""
    before = small_queue.health()
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 2000, "temperature": 0, "stream": True}
    streaming = http.client.HTTPConnection("127.0.0.1", small_queue.port, timeout=60)
    streaming.request("POST", "/v1/completions", json.dumps(body))
    events = (line for line in iter(streaming.getresponse().readline, b"") if line.startswith(b"data:"))
    assert next(events) and next(events)  # the opening chunk, then a first piece: it decodes
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(complete, small_queue.client(), "abc", max_tokens=4)
        deadline = time.monotonic() + 30
        while small_queue.health()["waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        code, headers, text = small_queue.request("POST", "/v1/completions", json.dumps(body).encode())
        assert code == 429 and int(headers["Retry-After"]) >= 1
        assert json.loads(text)["error"]["type"] == "rate_limit_error"
        streaming.close()  # the client goes away mid-stream
        assert waiting.result(timeout=60)
    after = small_queue.health()
    assert after["dropped"] == before["dropped"] + 1  # stopped before its 2000 tokens
    assert after["served"] == before["served"] + 1 and after["waiting"] == 0


def test_concurrent_clients_get_their_single_client_answers_in_bounded_memory(server):
    """8 clients x 25 requests, streaming and not, chat and completions: none lost, none failed,
    each equal to its answer alone; resident memory after them within a few MB of after 20."""
    prompts = ["abc", "xyz", "hello", "qq", "mnop", "zzzz", "gfe", "kitten"]

    def ask(client: openai.OpenAI, i: int) -> str:
        prompt, stream = prompts[i % len(prompts)], i % 3 == 0
        if i % 2:
            return chat(client, [{"role": "user", "content": prompt}], stream, max_tokens=6)[0]
        return complete(client, prompt, stream, max_tokens=6)

    alone = {i: ask(server.client(), i) for i in range(2 * len(prompts))}  # every (prompt, kind)
    for i in range(20):
        assert ask(server.client(), i) == alone[i % len(alone)]
    rss_after_20 = server.rss_kib()

    def client_run(c: int) -> list[tuple[int, str]]:
        client = server.client()
        return [(i, ask(client, i)) for i in range(c * 25, (c + 1) * 25)]

    with ThreadPoolExecutor(8) as pool:
        answers = [answer for run in pool.map(client_run, range(8)) for answer in run]
    assert len(answers) == 200
    assert all(text == alone[i % len(alone)] for i, text in answers)
    growth_mib = (server.rss_kib() - rss_after_20) / 1024
    assert growth_mib < 8, f"resident memory grew {growth_mib:.1f} MiB over 200 requests"
