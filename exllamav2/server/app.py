"""FastAPI app of the OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions, /health,
/metrics (Prometheus text format).

Guards against load and hostile input: request bodies are capped at `engine.max_request_bytes` (413); prompts are
tokenized and chat templates rendered in a small thread pool, never on the event loop; strings that are not valid
Unicode are rejected with a 400 naming the field; message contents never become control tokens (unless
`engine.encode_special_tokens_in_content`); a client that goes away, streaming or not, cancels its jobs at once
(a task waits for the ASGI disconnect event beside generation); any unexpected error is an OpenAI-style JSON 500."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generator.dynamic_async import ExLlamaV2DynamicJobAsync
from .engine import ServerEngine, encode_prompt, job_seed, sampler_settings, token_bytes, token_text
from .schemas import ChatCompletionRequest, CompletionRequest
from .structured import OutputPlan, ReplyStream, StructuredRequestError, chat_messages, plan_output

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class ClientGone(Exception):
    """The client closed the connection; its jobs are cancelled."""


def error_response(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": type_, "param": param,
                                                               "code": code}})


def _too_large(limit: int) -> str:
    return (f"the request body is larger than this server's limit of {limit} bytes "
            f"(serve --max-request-bytes)")


class _Guard:
    """Pure ASGI middleware around every HTTP request: the API key on /v1/, the body size limit (from
    Content-Length at once, or while a chunked body arrives), and the request counter of /metrics."""

    def __init__(self, app, api_key: str | None, max_bytes: int, metrics):
        self.app, self.api_key, self.max_bytes, self.metrics = app, api_key, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def reply(response):
            await response(scope, receive, send_counted)

        try:
            headers = dict(scope.get("headers") or ())
            if self.api_key and path.startswith("/v1/"):
                if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.api_key}":
                    return await reply(error_response(401, "invalid or missing API key", "invalid_request_error",
                                                      None, "invalid_api_key"))
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    too_big = int(length) > self.max_bytes
                except ValueError:
                    return await reply(error_response(400, "invalid Content-Length", "invalid_request_error"))
                if too_big:
                    return await reply(error_response(413, _too_large(self.max_bytes), "invalid_request_error",
                                                      None, "request_too_large"))
            seen = 0

            async def receive_limited():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_bytes:
                        raise StarletteHTTPException(413, _too_large(self.max_bytes))
                return message

            await self.app(scope, receive_limited, send_counted)
        finally:
            if self.metrics is not None:
                self.metrics.request(path, status[0])


def create_app(engine: ServerEngine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="exllamav2 OpenAI-compatible server")
    app.state.engine = engine
    try:
        from .metrics import ServerMetrics
        metrics = ServerMetrics(engine)
    except ImportError:  # prometheus_client missing: everything but /metrics works
        metrics = None
    app.state.metrics = metrics
    # prompts are tokenized here, off the event loop; two threads bound the memory big prompts can take at once
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="exllamav2-tokenize")
    app.state.tokenize_pool = pool
    limit = getattr(engine, "max_request_bytes", None) or DEFAULT_MAX_REQUEST_BYTES
    app.add_middleware(_Guard, api_key=api_key, max_bytes=limit, metrics=metrics)

    async def off_loop(fn, param: str):
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn)
        except APIError:
            raise
        except StructuredRequestError as e:
            raise APIError(400, str(e), param=e.param)
        except Exception as e:
            raise APIError(400, f"{param}: could not be tokenized ({type(e).__name__}: {e})", param=param)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":  # the body itself (a BOM, a stray byte): loc is its byte offset
            where = first.get("loc", ("body", "?"))[-1]
            ctx = (first.get("ctx") or {}).get("error", "")
            return error_response(400, f"body: not valid JSON at byte {where}{f' ({ctx})' if ctx else ''}",
                                  "invalid_request_error", "body", "invalid_json")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
                        for er in errs)
        return error_response(400, msg or "invalid request", "invalid_request_error", ".".join(loc) or None,
                              "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = "request_too_large" if e.status_code == 413 else None
        if e.status_code == 400 and str(e.detail) == "There was an error parsing the body":  # FastAPI's own words
            return error_response(400, "body: not JSON text in UTF-8", "invalid_request_error", "body",
                                  "invalid_json")
        return error_response(e.status_code, str(e.detail), "invalid_request_error", None, code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route():
        if metrics is None:
            raise APIError(501, 'metrics need prometheus_client: pip install "exllamav2[server]"', "server_error")
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "exllamav2"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        t0 = time.perf_counter()
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        for p in prompts:
            await _surely_too_long(engine, len(p), "prompt", pool)
        encoded = await off_loop(lambda: [encode_prompt(engine.tokenizer, p, special=False) for p in prompts],
                                 "prompt")
        plan = await off_loop(lambda: plan_output(engine.model, engine.tokenizer, req), "response_format")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs would need the prompt tokens' logprobs, which this server does "
                                "not compute; send echo or logprobs, not both", param="echo")
        return await _serve(engine, req, request, encoded, chat=False, max_tokens=req.max_tokens,
                            logprobs=req.logprobs, metrics=metrics, t0=t0, plan=plan,
                            echo=prompts if req.echo else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        from ..tokenizer.chat_template import ChatTemplateError, select_chat_template

        t0 = time.perf_counter()
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        await _surely_too_long(engine, sum(len(m.text()) for m in req.messages), "messages", pool)
        tok = engine.tokenizer
        plan = OutputPlan()

        def encode():
            nonlocal plan
            try:
                source = select_chat_template(tok.chat_templates, tok.origin, has_tools=bool(req.tools))
            except ChatTemplateError:
                source = None  # encode_chat below reports it
            plan = plan_output(engine.model, tok, req, source)
            messages, template_kwargs = chat_messages(req, plan, source)
            try:
                return tok.encode_chat(
                    messages, add_generation_prompt=True,
                    encode_special_tokens_in_content=getattr(engine, "encode_special_tokens_in_content", False),
                    **template_kwargs)
            except ChatTemplateError as e:
                msg = str(e) if str(e).startswith("messages[") else f"messages: the chat template failed: {e}"
                raise APIError(400, msg, param="messages")
            except Exception as e:
                if type(e).__module__.startswith("jinja2"):
                    raise APIError(400, f"messages: the chat template failed: {e}", param="messages")
                raise

        encoded = [await off_loop(encode, "messages")]
        top = req.top_logprobs if req.logprobs else None
        return await _serve(engine, req, request, encoded, chat=True,
                            max_tokens=req.max_completion_tokens or req.max_tokens,
                            logprobs=(top or 0) if req.logprobs else None, metrics=metrics, t0=t0, plan=plan)

    return app


async def _surely_too_long(engine: ServerEngine, chars: int, param: str, pool) -> None:
    """400 without tokenizing when a text of `chars` characters cannot fit the context: no token stands for more
    characters than the longest piece of the vocabulary, so it needs at least chars / longest tokens."""
    longest = getattr(engine, "_longest_piece", None)
    if longest is None:
        def measure():
            vocab = engine.tokenizer.tokenizer.get_vocab(with_added_tokens=True)
            return max((len(p) for p in vocab), default=1) or 1
        try:
            longest = await asyncio.get_running_loop().run_in_executor(pool, measure)
        except Exception:  # a tokenizer without a vocabulary view: tokenize and count instead
            longest = 1 << 30
        engine._longest_piece = longest
    at_least = chars // longest
    if at_least >= engine.max_seq_len:
        raise APIError(400, f"the {param} has at least {at_least} tokens ({chars} characters); this model's context "
                            f"is {engine.max_seq_len} tokens", param=param, code="context_length_exceeded")


def _check_request(engine: ServerEngine, req, encoded) -> list:
    """Checks the request; returns its validated intervention specs."""
    if req.model is not None and req.model != engine.model_name:
        raise APIError(404, f"model '{req.model}' does not exist; this server serves '{engine.model_name}'",
                       param="model", code="model_not_found")
    for ids in encoded:
        if ids.shape[1] == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if ids.shape[1] >= engine.max_seq_len:
            raise APIError(400, f"the prompt has {ids.shape[1]} tokens; this model's context is "
                                f"{engine.max_seq_len} tokens (prompt plus at least one new token)",
                           param="messages" if hasattr(req, "messages") else "prompt", code="context_length_exceeded")
    specs = _interventions(engine, req.interventions)
    if engine.queue_full():
        raise APIError(503, "the request queue is full; retry later", "server_error", code="queue_full")
    return specs


def _interventions(engine: ServerEngine, items) -> list:
    """The request's validated InterventionSpecs (400 naming the item and field otherwise). Steering files are
    read only from the server's --interventions-dir."""
    if not items:
        return []
    from ..interventions import from_request

    for i, d in enumerate(items):
        if d.get("file") is not None and engine.interventions_dir is None:
            raise APIError(400, f"interventions[{i}].file: this server reads no steering files (start it with "
                                f"--interventions-dir DIR), send the vector inline", param="interventions")
    try:
        return from_request(engine.model, items, file_root=engine.interventions_dir)
    except ValueError as e:
        raise APIError(400, str(e), param="interventions")


async def _serve(engine: ServerEngine, req, request: Request, encoded, chat: bool, max_tokens, logprobs,
                 metrics=None, t0: float | None = None, plan: OutputPlan | None = None, echo: list | None = None):
    """`echo`: the prompts' texts, put before each choice's completion (/v1/completions with echo)."""
    specs = _check_request(engine, req, encoded)
    if max_tokens is not None and max_tokens > engine.max_seq_len:
        # a budget no prompt can leave room for (e.g. 10**9); one that only the prompt squeezes is cut to the
        # context and ends with finish_reason "length"
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise APIError(400, f"{param}: {max_tokens} is more than this model's context of {engine.max_seq_len} "
                            f"tokens", param=param, code="context_length_exceeded")
    plan = plan or OutputPlan()
    tok = engine.tokenizer
    stops = list(tok.eos_token_ids) + req.stop_strings()
    max_new = max_tokens or (engine.max_seq_len - max(ids.shape[1] for ids in encoded))
    jobs = []
    try:
        for p_idx, ids in enumerate(encoded):
            for c in range(req.n):
                index = p_idx * req.n + c
                jobs.append(ExLlamaV2DynamicJobAsync(
                    engine.generator, ids, max_new, gen_settings=sampler_settings(req), seed=job_seed(req, index),
                    stop_conditions=stops, identifier=index, return_logprobs=logprobs,
                    # tool-call markers may be control tokens (Mistral's [TOOL_CALLS]): keep them for the parser
                    decode_special_tokens=plan.tool_mode == "auto", interventions=specs,
                    interventions_file_root=engine.interventions_dir,
                    filters=plan.make_filters(engine.model, tok)))
    except ValueError as e:
        for j in jobs:
            await j.cancel()
        raise APIError(400, str(e))
    prompt_tokens = sum(ids.shape[1] for ids in encoded)
    if metrics is not None:
        metrics.prompt_tokens.inc(prompt_tokens)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    fmt = _Formatter(tok, chat, rid, created, engine.model_name, logprobs)
    timing = _Timing(metrics, t0 if t0 is not None else time.perf_counter(), len(jobs))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        heads = [echo[i // req.n] for i in range(len(jobs))] if echo else None
        return StreamingResponse(_stream(jobs, request, fmt, prompt_tokens, include_usage, timing, plan, heads),
                                 media_type="text/event-stream")
    texts = [echo[i // req.n] if echo else "" for i in range(len(jobs))]
    lps: list[list] = [[] for _ in jobs]
    finish = [None] * len(jobs)
    completion_tokens = 0
    try:
        async for index, r in _merged(jobs, request, timing):
            texts[index] += r.get("text", "")
            lps[index] += r.get("logprobs", [])
            if r.get("eos"):
                finish[index] = _finish_reason(r)
                completion_tokens += r.get("new_tokens", 0)
    except ClientGone:
        return JSONResponse(status_code=499, content={})
    choices = [fmt.choice(i, texts[i], lps[i], finish[i]) for i in range(len(jobs))]
    if plan.parses_tools:
        for c in choices:
            content, calls = plan.parse(c["message"]["content"])
            if calls:
                c["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
                # cut by max_tokens: the complete calls are kept, and the reason stays "length"
                c["finish_reason"] = "tool_calls" if c["finish_reason"] != "length" else "length"
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": engine.model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _finish_reason(r: dict) -> str:
    return "length" if r.get("eos_reason") == "max_new_tokens" else "stop"


class _Timing:
    """Per request: time to each job's first token and mean time per output token after it, for /metrics."""

    def __init__(self, metrics, t0: float, n_jobs: int):
        self.metrics, self.t0 = metrics, t0
        self.first: list[float | None] = [None] * n_jobs

    def result(self, i: int, r: dict) -> None:
        if self.metrics is None:
            return
        now = time.perf_counter()
        ids = r.get("token_ids")
        if self.first[i] is None and ids is not None and ids.numel():
            self.first[i] = now
            self.metrics.ttft.observe(now - self.t0)
        if r.get("eos"):
            n = r.get("new_tokens", 0)
            self.metrics.generation_tokens.inc(n)
            if n > 1 and self.first[i] is not None:
                self.metrics.tpot.observe((now - self.first[i]) / (n - 1))


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has gone: the ASGI server delivers http.disconnect to a pending receive() as soon
    as the connection closes (the body was read before the endpoint ran)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _merged(jobs, request: Request, timing: _Timing | None = None):
    """(job index, result) from all jobs as they come; raises ClientGone when the client disconnects; cancels
    every unfinished job on exit."""
    queue: asyncio.Queue = asyncio.Queue()
    gone = object()

    async def pump(i, job):
        try:
            async for r in job:
                await queue.put((i, r))
        except Exception as e:
            await queue.put((i, e))
        await queue.put((i, None))

    async def watch():
        await _wait_disconnect(request)
        await queue.put((None, gone))

    tasks = [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]
    watcher = asyncio.create_task(watch())
    open_jobs = len(jobs)
    try:
        while open_jobs:
            i, r = await queue.get()
            if r is gone:
                raise ClientGone()
            if r is None:
                open_jobs -= 1
                continue
            if isinstance(r, Exception):
                from ..generator.grammar.compiler import GrammarError
                if isinstance(r, GrammarError):  # the request's own constraint, not the server, failed
                    raise APIError(400, f"the output constraint (response_format, guided_* or tools) could not "
                                        f"be followed: {r}", code="constraint_failed")
                raise APIError(500, f"generation failed: {r}", "server_error")
            if r.get("stage") == "streaming":
                if timing is not None:
                    timing.result(i, r)
                yield i, r
    finally:
        watcher.cancel()
        for j in jobs:
            if not j.job.finished:
                await j.cancel()
        for t in tasks:
            t.cancel()


async def _stream(jobs, request: Request, fmt: "_Formatter", prompt_tokens: int, include_usage: bool,
                  timing: _Timing | None = None, plan: OutputPlan | None = None, heads: list[str] | None = None):
    completion_tokens = 0
    replies = [ReplyStream(plan) for _ in jobs] if plan is not None and plan.parses_tools else None
    if fmt.chat:
        for i in range(len(jobs)):
            yield _sse(fmt.chunk(i, None, [], None, role=True))
    for i, head in enumerate(heads or ()):  # echo: each choice's prompt first
        if head:
            yield _sse(fmt.chunk(i, head, [], None))
    try:
        async for index, r in _merged(jobs, request, timing):
            finish = _finish_reason(r) if r.get("eos") else None
            if r.get("eos"):
                completion_tokens += r.get("new_tokens", 0)
            text = r.get("text", "")
            if replies is not None:
                text = replies[index].feed(text)
                if finish:
                    rest, calls = replies[index].finish()
                    text += rest
                    if calls:
                        if text or r.get("logprobs"):
                            yield _sse(fmt.chunk(index, text, r.get("logprobs", []), None))
                        yield _sse(fmt.tool_calls_chunk(index, calls))
                        text, finish, r = "", ("length" if finish == "length" else "tool_calls"), {}
            if text or finish or r.get("logprobs"):
                yield _sse(fmt.chunk(index, text, r.get("logprobs", []), finish))
    except ClientGone:
        return
    except APIError as e:
        yield _sse({"error": {"message": e.message, "type": e.type, "param": None, "code": None}})
        return
    if include_usage:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        yield _sse({**fmt.envelope(chunk=True), "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Formatter:
    def __init__(self, tokenizer, chat: bool, rid: str, created: int, model: str, logprobs):
        self.tok, self.chat, self.rid, self.created, self.model, self.logprobs = \
            tokenizer, chat, rid, created, model, logprobs

    def envelope(self, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, entries: list[dict]):
        if self.logprobs is None:
            return None
        text = lambda t: token_text(self.tok, t)
        raw = lambda t: list(token_bytes(self.tok, t))
        if self.chat:
            return {"content": [{"token": text(e["token"]), "logprob": e["logprob"],
                                 "bytes": raw(e["token"]),
                                 "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": raw(t)}
                                                  for t, lp in e["top_logprobs"]]} for e in entries]}
        return {"tokens": [text(e["token"]) for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{text(t): lp for t, lp in e["top_logprobs"]} for e in entries],
                "text_offset": []}

    def choice(self, index: int, text: str, entries: list[dict], finish) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "logprobs": self._logprobs(entries), "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": self._logprobs(entries), "finish_reason": finish}

    def tool_calls_chunk(self, index: int, calls: list[dict]) -> dict:
        delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
        return {**self.envelope(chunk=True),
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}

    def chunk(self, index: int, text, entries: list[dict], finish, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            c = {"index": index, "delta": delta, "logprobs": self._logprobs(entries) if entries else None,
                 "finish_reason": finish}
        else:
            c = {"index": index, "text": text or "", "logprobs": self._logprobs(entries) if entries else None,
                 "finish_reason": finish}
        return {**self.envelope(chunk=True), "choices": [c]}
