"""``conflayers-run serve``: an OpenAI-compatible HTTP server for one artifact.

POST /v1/chat/completions and /v1/completions (``stream: true``: server-sent events ending with
``data: [DONE]``), GET /v1/models and GET /health. One model decodes one request at a time
(batch 1), in arrival order, on one worker thread; the event loop only reads requests and writes
responses. Needs the ``[serve]`` extra (Starlette and uvicorn).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConflayersError, GenerationError
from .model import Model
from .openai_wire import BadRequest, Outcome, Request, Writer, error_body, parse_request, stop_hit

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a prompt of the longest context fits many times over
RETRY_AFTER_SECONDS = 1  # what a 429 tells the client to wait


@dataclass
class Limits:
    max_queue: int = 16  # requests waiting behind the one decoding; more get a 429
    max_tokens_cap: int | None = None  # None: whatever fits the artifact's max_seq_len
    api_key: str | None = None  # None: no authentication


class Worker:
    """One model on one thread: jobs run in the order they were submitted, one at a time."""

    def __init__(self, model: Model, max_queue: int) -> None:
        self.model, self.max_queue = model, max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conflayers-decode")
        self._lock = threading.Lock()
        self.waiting = 0  # submitted, not started

    def submit(self, job: Callable[[], Outcome]) -> Future[Outcome]:
        """Queue ``job``; a 429 BadRequest when ``max_queue`` jobs are already waiting."""
        with self._lock:
            if self.waiting >= self.max_queue:
                raise BadRequest(
                    f"the server is busy ({self.waiting} requests waiting): retry later",
                    status=429, code="rate_limit_exceeded", kind="rate_limit_error",
                )
            self.waiting += 1

        def started() -> Outcome:
            with self._lock:
                self.waiting -= 1
            return job()

        future = self._executor.submit(started)
        future.add_done_callback(self._forget_if_cancelled)
        return future

    def _forget_if_cancelled(self, future: Future[Outcome]) -> None:
        if future.cancelled():  # it never started, so it still counts as waiting
            with self._lock:
                self.waiting -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def decode(
    model: Model, ids: list[int], request: Request, max_tokens: int,
    on_piece: Callable[[str], None] | None = None, cancelled: threading.Event | None = None,
) -> Outcome:
    """Run one request on the worker thread; stops at the next piece once ``cancelled`` is set
    (the Outcome's finish_reason is then "dropped")."""
    pieces, dropped = [], False
    # Auto mode's speed guard decodes some stretches plainly depending on earlier requests, and a
    # sampled token depends on whether its step drafted: a seeded sampled request goes without it,
    # so that its seed alone decides its text. Greedy text is the same either way.
    guard = not (request.seeded and request.sampling.temperature > 0)
    stream = model.stream(ids, max_tokens, sampling=request.sampling, stop_strings=request.stop, guard=guard)
    with closing(stream):
        for piece in stream:
            pieces.append(piece)
            if on_piece is not None:
                on_piece(piece)
            if cancelled is not None and cancelled.is_set():
                dropped = True
                break
    tokens = model.last_token_ids
    if dropped:
        finish = "dropped"
    else:
        full = model.tokenizer.decode(tokens, skip_special_tokens=True)
        finish = "length" if len(tokens) >= max_tokens and not stop_hit(full, request.stop) else "stop"
    mode = model.resolve_mode("auto")
    return Outcome("".join(pieces), len(ids), len(tokens), finish, mode, model.draft, model.last_stats)


class Server:
    """The endpoints, over one :class:`Worker`."""

    def __init__(self, model: Model, name: str, limits: Limits) -> None:
        self.model, self.name, self.limits = model, name, limits
        self.worker = Worker(model, limits.max_queue)
        # Requests answered to the end, and streams stopped early because their client went away.
        self.counts = {"served": 0, "dropped": 0}

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        handlers = {HTTPException: self._http_error, Exception: self._internal_error}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan)

    @asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        yield
        self.worker.shutdown()

    # -- endpoints ------------------------------------------------------------------------------
    async def health(self, request: Any) -> Any:
        return _json({"status": "ok", "model": self.name, "waiting": self.worker.waiting, **self.counts})

    async def models(self, request: Any) -> Any:
        return await self._guarded(request, self._models)

    async def chat_completions(self, request: Any) -> Any:
        return await self._guarded(request, lambda r: self._complete(r, chat=True))

    async def completions(self, request: Any) -> Any:
        return await self._guarded(request, lambda r: self._complete(r, chat=False))

    async def _models(self, request: Any) -> Any:
        model = {"id": self.name, "object": "model", "created": 0, "owned_by": "conflayers"}
        return _json({"object": "list", "data": [model]})

    async def _guarded(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        """The API key checked, then the handler; a BadRequest becomes OpenAI's error object."""
        try:
            self._authorize(request)
            return await handler(request)
        except BadRequest as exc:
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.status == 429 else None
            return _json(exc.body(), exc.status, headers)

    def _authorize(self, request: Any) -> None:
        key = self.limits.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise BadRequest(
                "missing or wrong API key: send the header Authorization: Bearer KEY",
                status=401, code="invalid_api_key",
            )

    async def _complete(self, http: Any, chat: bool) -> Any:
        request = parse_request(await _read_json(http), chat)
        ids, max_tokens = self._prompt_ids(request)
        writer = Writer(chat, self.name)
        if request.stream:
            return self._stream(ids, request, max_tokens, writer)
        future = self.worker.submit(lambda: decode(self.model, ids, request, max_tokens))
        future.add_done_callback(self._count)
        return _json(writer.completion(await _outcome(future)))

    def _count(self, future: Future[Outcome]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.counts["dropped" if future.result().finish_reason == "dropped" else "served"] += 1

    def _prompt_ids(self, request: Request) -> tuple[list[int], int]:
        """The prompt's token ids and the tokens to generate, checked against the context and the cap."""
        try:
            if request.messages is not None:
                ids = self.model.encode(request.messages)
            elif isinstance(request.prompt, str):
                ids = self.model.encode(request.prompt, chat=False)
            else:
                ids = list(request.prompt or [])
                vocabulary = self.model.tokenizer.get_vocab_size()
                if not all(0 <= t < vocabulary for t in ids):
                    raise BadRequest(f"prompt token ids must be in [0, {vocabulary})", "prompt")
        except GenerationError as exc:
            raise BadRequest(str(exc), "messages" if request.chat else "prompt") from None
        room, cap = self.model.room(len(ids)), self.limits.max_tokens_cap
        param = "max_tokens"
        if cap is not None and request.max_tokens is not None and request.max_tokens > cap:
            raise BadRequest(f"max_tokens ({request.max_tokens}) is above this server's cap of {cap}", param)
        wanted = request.max_tokens or min(room, cap or room)
        if wanted > room:
            raise BadRequest(
                f"the prompt ({len(ids)} tokens) with max_tokens ({wanted}) does not fit the model's context "
                f"of {self.model.max_seq_len} tokens: shorten the prompt or lower max_tokens",
                param, code="context_length_exceeded",
            )
        return ids, wanted

    def _stream(self, ids: list[int], request: Request, max_tokens: int, writer: Writer) -> Any:
        """Server-sent events: a piece per event as the worker decides it. A client that goes away
        sets ``cancelled``, which stops the worker at its next piece (or drops the queued job)."""
        from starlette.responses import StreamingResponse

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()  # None: the job is over
        cancelled = threading.Event()

        def post(piece: str | None) -> None:  # from the worker thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        future = self.worker.submit(lambda: decode(self.model, ids, request, max_tokens, post, cancelled))
        future.add_done_callback(self._count)
        future.add_done_callback(lambda _: post(None))

        async def events() -> AsyncIterator[str]:
            try:
                yield _event(writer.first_chunk())
                while (piece := await pieces.get()) is not None:
                    if piece:
                        yield _event(writer.chunk(piece))
                outcome = await _outcome(future)
                yield _event(writer.chunk(None, outcome.finish_reason))
                if request.include_usage:
                    yield _event(writer.usage_chunk(outcome))
            except BadRequest as exc:  # the stream is open: the error goes as an event
                yield _event(exc.body())
            except Exception as exc:
                log.exception("internal error in a stream")
                yield _event(error_body(f"internal error ({type(exc).__name__})", "server_error"))
            finally:  # also when the client went away (the task is cancelled)
                cancelled.set()
                future.cancel()  # a queued job leaves the queue; a no-op once started
            yield "data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    # -- errors ---------------------------------------------------------------------------------
    async def _http_error(self, request: Any, exc: Any) -> Any:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _json(error_body(message, kind), exc.status_code, getattr(exc, "headers", None))

    async def _internal_error(self, request: Any, exc: Exception) -> Any:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _json(error_body(f"internal error ({type(exc).__name__})", "server_error"), 500)


async def _outcome(future: Future[Outcome]) -> Outcome:
    """The job's outcome; a GenerationError from the decoder is the request's fault (400)."""
    try:
        return await asyncio.wrap_future(future)
    except GenerationError as exc:
        raise BadRequest(str(exc)) from None


async def _read_json(request: Any) -> object:
    """The body as JSON: 413 past MAX_BODY_BYTES (read no further), 400 if not UTF-8 JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadRequest(f"the request body is over {MAX_BODY_BYTES} bytes", status=413)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"the request body is over {MAX_BODY_BYTES} bytes", status=413)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the request body is not UTF-8 (bad byte at offset {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(body, status, headers)


def _event(body: object) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def serve(
    folder: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    device: str = "cpu",
    threads: int | None = None,
    draft: str | None = None,
    limits: Limits | None = None,
) -> None:
    """Load the artifact and serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ConflayersError(
            'conflayers-run serve needs the web server: pip install "conflayers-runtime[serve]"'
        ) from None
    from .model import DEFAULT_TASK_DRAFT, load

    model = load(folder, device=device, threads=threads, draft=draft or DEFAULT_TASK_DRAFT)
    server = Server(model, Path(folder).resolve().name, limits or Limits())
    sys.stderr.write(f"serving {folder} as {server.name!r} on http://{host}:{port}/v1\n")
    sys.stderr.flush()
    uvicorn.run(server.app(), host=host, port=port, log_level="warning", access_log=False)
