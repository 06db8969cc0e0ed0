"""The HTTP side: OpenAI's /v1/models, /v1/chat/completions and /v1/completions (JSON or server-sent events), and
the chat page at /. Requests are checked here and handed to the engine thread; its events come back through an
asyncio queue. Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}, never a 500 for a bad
request.
"""
from __future__ import annotations

import asyncio
import json
import math
import queue
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .engine import Engine, Request, Sampling

STATIC = Path(__file__).parent / "static"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _number(body: dict, name: str, default, lo: float, hi: float = math.inf, integer: bool = False):
    """body[name] checked to be a number in [lo, hi] (NaN and booleans refused), or default when absent/null."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not ok or not lo <= value <= hi:  # NaN fails every comparison
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{name} must be {kind} in [{lo}, {hi}], got {value!r}", name, "invalid_value")
    return value


def create_app(engine: Engine, base_name: str, adapters: list[str]) -> FastAPI:
    """The app for engine; the request's `model` is base_name (no adapter) or one of adapters (by index)."""
    app = FastAPI(title="phi3lora serve")
    tok, models = engine.tokenizer, {base_name: -1, **{a: i for i, a in enumerate(adapters)}}
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        return error_response(400, f"invalid request: {e.errors()[:1]}")

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return error_response(e.status_code, str(e.detail), code=None if e.status_code != 404 else "not_found")

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        return error_response(500, f"{type(e).__name__}: {e}", kind="server_error")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/v1/models")
    async def list_models():
        data = [{"id": name, "object": "model", "created": created, "owned_by": "phi3lora",
                 "root": base_name, "parent": None if i < 0 else base_name} for name, i in models.items()]
        return {"object": "list", "data": data}

    async def read_body(request: HTTPRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def sampling(body: dict, prompt_len: int) -> Sampling:
        room = engine.context - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt is {prompt_len} tokens, but the model's context is {engine.context} "
                                "tokens: nothing is left for the reply", "messages", "context_length_exceeded")
        max_tokens = _number(body, "max_tokens", None, 1, integer=True)
        if max_tokens is None:
            max_tokens = _number(body, "max_completion_tokens", room, 1, integer=True)
        if max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + the prompt's {prompt_len} tokens exceed the model's "
                                f"context of {engine.context} tokens", "max_tokens", "context_length_exceeded")
        if _number(body, "n", 1, 1, 1, integer=True) != 1:
            raise APIError(400, "only n=1 is supported", "n")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise APIError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
        if not isinstance(body.get("ignore_eos", False), bool):
            raise APIError(400, "ignore_eos must be true or false", "ignore_eos")
        return Sampling(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                        top_p=float(_number(body, "top_p", 1.0, 0, 1)),
                        seed=_number(body, "seed", None, 0, 2**63 - 1, integer=True), stop=stop,
                        ignore_eos=body.get("ignore_eos", False))

    def pick_model(body: dict) -> int:
        name = body.get("model")
        if not isinstance(name, str):
            raise APIError(400, "model is required: the base model's name or an adapter's", "model")
        if name not in models:
            raise APIError(404, f"the model {name!r} does not exist; available: {', '.join(models)}", "model",
                           "model_not_found")
        return models[name]

    async def run(http: HTTPRequest, body: dict, prompt_ids: list[int], chat: bool):
        adapter = pick_model(body)
        params = sampling(body, len(prompt_ids))
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event):  # engine thread -> this request's queue
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody is listening
                pass

        req = Request(prompt_ids, adapter, params, emit, tok, engine.device)
        try:
            engine.submit(req)
        except queue.Full:
            raise APIError(429, "the server is busy: too many requests are waiting; retry shortly",
                           code="rate_limit_exceeded", kind="rate_limit_error") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        meta = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body["model"]}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream(req, events, meta, chat, include_usage), media_type="text/event-stream")
        try:
            text, done, checked = [], None, loop.time()
            while done is None:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    event = None
                if loop.time() - checked > 0.25:  # four times a second: is the client still there?
                    checked = loop.time()
                    if await http.is_disconnected():
                        return None
                if event is None:
                    continue
                if event[0] == "text":
                    text.append(event[1])
                else:
                    done = event
        finally:
            req.cancelled = True  # finished already, or the client went away: either way the row is freed
        if done[0] == "error":
            raise APIError(500, done[1], kind="server_error")
        _, reason, n_prompt, n_new = done
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reason}
                  if chat else {"index": 0, "text": content, "logprobs": None, "finish_reason": reason})
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}
        return {**meta, "choices": [choice], "usage": usage}

    async def stream(req: Request, events: asyncio.Queue, meta: dict, chat: bool, include_usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, reason=None, usage=None, role=False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}
            data = {**meta, "object": kind, "choices": [] if usage else [choice]}
            if usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        try:
            if chat:
                yield chunk(None, role=True)
            while True:
                event = await events.get()
                if event[0] == "text":
                    yield chunk(event[1])
                    continue
                if event[0] == "error":
                    body = {"error": {"message": event[1], "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(body)}\n\n"
                else:
                    _, reason, n_prompt, n_new = event
                    yield chunk(None, reason)
                    if include_usage:
                        yield chunk(None, usage={"prompt_tokens": n_prompt, "completion_tokens": n_new,
                                                 "total_tokens": n_prompt + n_new})
                yield "data: [DONE]\n\n"
                return
        finally:
            req.cancelled = True  # a client that disconnects mid-stream frees its row at the next step

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await read_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list of {role, content}", "messages")
        for m in messages:  # OpenAI's content parts: keep the text ones
            if isinstance(m, dict) and isinstance(m.get("content"), list):
                m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
        try:
            ids = tok.encode_chat(messages, add_generation_prompt=True)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        return await run(request, body, ids, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            ids = tok.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and 0 <= t < tok.vocab_size
                                                         for t in prompt):
            ids = list(prompt)  # token ids
        else:
            raise APIError(400, "prompt must be a non-empty string (or a list of token ids)", "prompt")
        return await run(request, body, ids, chat=False)

    return app
