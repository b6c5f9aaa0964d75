"""Tokens per second through `conflayers-run serve` against `load().stream` in-process, time to first
byte, and latency of 96-token requests with 1, 2 and 4 concurrent clients (docs/BENCHMARKS.md, "Serving").

    python scripts/bench_serve.py OUT [--json serve.json]

OUT is an artifact folder; without a manifest there, a SmolLM2 fp32 artifact with a hand-given draft
(layer 3 skipped, no calibration) is built into it first. Greedy decoding in auto mode on both
sides; the server runs in a subprocess on a free loopback port and is asked with the openai client.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import conflayers_runtime as rt
import openai

PROMPTS = [  # asking for long answers: most requests run to MAX_TOKENS
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how a steam engine works.",
    "Describe at length a walk through a forest in autumn.",
    "Write a long letter to a friend about your holidays.",
]
MAX_TOKENS = 96


def build_if_missing(folder: Path) -> None:
    if (folder / rt.MANIFEST_NAME).is_file():
        return
    command = [str(Path(sys.executable).with_name("conflayers-export")), "build", str(folder),
               "--model", "smollm2-135m", "--skip", "3", "--max-seq-len", "1024"]
    subprocess.run(command, check=True)


def in_process(folder: Path, repeats: int) -> dict[str, float]:
    """Tokens per second of load().stream, each prompt once as warm-up, then ``repeats`` times."""
    model = rt.load(folder)
    for prompt in PROMPTS:
        "".join(model.stream(prompt, MAX_TOKENS))
    tokens, seconds = 0, 0.0
    for _ in range(repeats):
        for prompt in PROMPTS:
            start = time.perf_counter()
            for _piece in model.stream(prompt, MAX_TOKENS):
                pass
            seconds += time.perf_counter() - start
            tokens += len(model.last_token_ids)
    return {"tokens_per_second": tokens / seconds, "tokens": tokens}


class Server:
    def __init__(self, folder: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cli = [sys.executable, "-m", "conflayers_runtime.cli", "serve", str(folder), "--port", str(self.port)]
        self.process = subprocess.Popen(cli)
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="-", max_retries=0)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def ask(client: openai.OpenAI, prompt: str, stream: bool) -> dict[str, float]:
    """One chat request of MAX_TOKENS greedy tokens: seconds, time to first byte, tokens."""
    messages = [{"role": "user", "content": prompt}]
    start = time.perf_counter()
    first = None
    if stream:
        tokens = 0
        for chunk in client.chat.completions.create(
            model="m", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True},
        ):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    else:
        reply = client.chat.completions.create(
            model="m", messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        tokens = reply.usage.completion_tokens
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "first_byte": first or seconds, "tokens": tokens}


def through_server(server: Server, repeats: int) -> dict[str, object]:
    client = server.client()
    for prompt in PROMPTS:
        ask(client, prompt, True)  # warm-up
    runs = [ask(client, p, True) for _ in range(repeats) for p in PROMPTS]
    result: dict[str, object] = {
        "tokens_per_second": sum(r["tokens"] for r in runs) / sum(r["seconds"] for r in runs),
        "first_byte_ms_p50": 1000 * statistics.median(r["first_byte"] for r in runs),
    }
    for clients in (1, 2, 4):
        def one_client(c: int) -> list[dict[str, float]]:
            mine = server.client()
            return [ask(mine, PROMPTS[(c + i) % len(PROMPTS)], False) for i in range(repeats * 2)]

        with ThreadPoolExecutor(clients) as pool:
            runs = [r for rs in pool.map(one_client, range(clients)) for r in rs]
        latencies = sorted(r["seconds"] for r in runs)
        result[f"latency_{clients}_clients_ms"] = {
            "p50": 1000 * statistics.median(latencies),
            "p95": 1000 * latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "requests": len(latencies),
            "mean_tokens": statistics.mean(r["tokens"] for r in runs),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    build_if_missing(args.artifact)
    local = in_process(args.artifact, args.repeats)
    server = Server(args.artifact)
    try:
        served = through_server(server, args.repeats)
    finally:
        server.stop()
    result = {"in_process": local, "server": served,
              "ratio": served["tokens_per_second"] / local["tokens_per_second"]}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
