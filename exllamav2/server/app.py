"""FastAPI app of the OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions, /health."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generator.dynamic_async import ExLlamaV2DynamicJobAsync
from .engine import ServerEngine, encode_prompt, job_seed, sampler_settings, token_text
from .schemas import ChatCompletionRequest, CompletionRequest


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": type_, "param": param,
                                                               "code": code}})


def create_app(engine: ServerEngine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="exllamav2 OpenAI-compatible server")
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
                        for er in errs)
        return error_response(400, msg or "invalid request", "invalid_request_error", ".".join(loc) or None,
                              "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error", None, None)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            if header != f"Bearer {api_key}":
                return error_response(401, "invalid or missing API key", "invalid_request_error", None,
                                      "invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "exllamav2"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        encoded = [encode_prompt(engine.tokenizer, p, special=False) for p in prompts]
        return await _serve(engine, req, request, encoded, chat=False, max_tokens=req.max_tokens,
                            logprobs=req.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:
            raise APIError(400, f"messages: the chat template failed: {e}", param="messages")
        encoded = [encode_prompt(engine.tokenizer, text, special=True)]
        top = req.top_logprobs if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        return await _serve(engine, req, request, encoded, chat=True,
                            max_tokens=req.max_completion_tokens or req.max_tokens,
                            logprobs=(top or 0) if req.logprobs else None)

    return app


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


async def _serve(engine: ServerEngine, req, request: Request, encoded, chat: bool, max_tokens, logprobs):
    specs = _check_request(engine, req, encoded)
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
                    decode_special_tokens=False, interventions=specs,
                    interventions_file_root=engine.interventions_dir))
    except ValueError as e:
        for j in jobs:
            await j.cancel()
        raise APIError(400, str(e))
    prompt_tokens = sum(ids.shape[1] for ids in encoded)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    fmt = _Formatter(tok, chat, rid, created, engine.model_name, logprobs)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(jobs, request, fmt, prompt_tokens, include_usage),
                                 media_type="text/event-stream")
    texts = [""] * len(jobs)
    lps: list[list] = [[] for _ in jobs]
    finish = [None] * len(jobs)
    completion_tokens = 0
    async for index, r in _merged(jobs, request):
        texts[index] += r.get("text", "")
        lps[index] += r.get("logprobs", [])
        if r.get("eos"):
            finish[index] = _finish_reason(r)
            completion_tokens += r.get("new_tokens", 0)
    if any(f is None for f in finish):  # client went away
        return JSONResponse(status_code=499, content={})
    choices = [fmt.choice(i, texts[i], lps[i], finish[i]) for i in range(len(jobs))]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": engine.model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _finish_reason(r: dict) -> str:
    return "length" if r.get("eos_reason") == "max_new_tokens" else "stop"


async def _merged(jobs, request: Request):
    """(job index, result) from all jobs as they come; cancels every unfinished job on exit (disconnects)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, job):
        try:
            async for r in job:
                await queue.put((i, r))
        except Exception as e:
            await queue.put((i, e))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]
    open_jobs = len(jobs)
    try:
        while open_jobs:
            try:
                i, r = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if r is None:
                open_jobs -= 1
                continue
            if isinstance(r, Exception):
                raise APIError(500, f"generation failed: {r}", "server_error")
            if r.get("stage") == "streaming":
                yield i, r
    finally:
        for j in jobs:
            if not j.job.finished:
                await j.cancel()
        for t in tasks:
            t.cancel()


async def _stream(jobs, request: Request, fmt: "_Formatter", prompt_tokens: int, include_usage: bool):
    completion_tokens = 0
    if fmt.chat:
        for i in range(len(jobs)):
            yield _sse(fmt.chunk(i, None, [], None, role=True))
    try:
        async for index, r in _merged(jobs, request):
            finish = _finish_reason(r) if r.get("eos") else None
            if r.get("eos"):
                completion_tokens += r.get("new_tokens", 0)
            if r.get("text") or finish or r.get("logprobs"):
                yield _sse(fmt.chunk(index, r.get("text", ""), r.get("logprobs", []), finish))
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
        if self.chat:
            return {"content": [{"token": text(e["token"]), "logprob": e["logprob"],
                                 "bytes": list(text(e["token"]).encode()),
                                 "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": list(text(t).encode())}
                                                  for t, lp in e["top_logprobs"]]} for e in entries]}
        return {"tokens": [text(e["token"]) for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{text(t): lp for t, lp in e["top_logprobs"]} for e in entries],
                "text_offset": []}

    def choice(self, index: int, text: str, entries: list[dict], finish) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "logprobs": self._logprobs(entries), "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": self._logprobs(entries), "finish_reason": finish}

    def chunk(self, index: int, text, entries: list[dict], finish, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            c = {"index": index, "delta": delta, "logprobs": self._logprobs(entries) if entries else None,
                 "finish_reason": finish}
        else:
            c = {"index": index, "text": text or "", "logprobs": self._logprobs(entries) if entries else None,
                 "finish_reason": finish}
        return {**self.envelope(chunk=True), "choices": [c]}
