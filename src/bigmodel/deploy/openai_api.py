"""serve.py's OpenAI-compatible API for language models, on LitServe.

`POST /v1/chat/completions` (a conversation, rendered with the model's chat template),
`POST /v1/completions` (a plain prompt) and `GET /v1/models`; with `"stream": true` the answer
comes as server-sent events (`data: {chunk}` lines, then `data: [DONE]`), as OpenAI's own.

LitServe's `OpenAISpec` serves chat completions only, always reports `finish_reason: "stop"`
and answers a bad field with FastAPI's list of validation errors; this spec (a `LitSpec` too)
adds the other two routes, `"length"` when an answer runs out of tokens, and one 4xx a problem in
OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`), which the openai client
raises as `BadRequestError` and so on. A request is checked, rendered and tokenized in the HTTP
process (`Requests`), so a bad one never reaches the worker; the worker (`CompletionAPI`) decodes
the queued prompts of a dynamic batch together from one key/value cache, one forward per step
(bigmodel.deploy.assistant.replies), and hands each request its text as it comes.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections import deque
from typing import Any

import litserve as ls
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from bigmodel.deploy.assistant import Assistant, BadConversation, check_messages, replies
from bigmodel.deploy.budget import SCOPE_KEY, OverBudget
from bigmodel.sampling import RowSampling

CHAT_PATH, COMPLETIONS_PATH, MODELS_PATH = "/v1/chat/completions", "/v1/completions", "/v1/models"

# keys of OpenAI's requests taken as they are sent
COMMON = {
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "stream",
    "stream_options",
    "seed",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "echo",
}
CHAT_KEYS = COMMON | {"messages"}
COMPLETION_KEYS = COMMON | {"prompt"}
# taken only at the value that means "off": anything else is refused, naming the key
OFF = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": (None, False), "echo": False}


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": None}},
        status_code=status,
        headers={"Retry-After": "1"} if status == 429 else None,  # busy: worth another try
    )


def _type(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(v), "null" if v is None else "number"
    )


class Requests:
    """The checks of the HTTP process: request body -> the worker's job, or RequestError."""

    def __init__(self, settings: dict) -> None:
        from bigmodel.data.chat_template import ChatTemplate
        from bigmodel.data.tokenizers import tokenizer_from_dict

        self.settings = settings
        tokenizer = tokenizer_from_dict(settings["tokenizer"])
        saved = settings["template"]
        template = (
            ChatTemplate(saved["source"], saved["specials"], saved["name"]) if saved else None
        )
        self.assistant = Assistant(tokenizer, template, settings["block_size"])

    def _number(self, body: dict, key: str, low: float, high: float, default: float) -> float:
        v = body.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RequestError(400, f'"{key}" must be a number, got {_type(v)} {v!r}', key)
        if not low <= v <= high:
            raise RequestError(
                400, f'"{key}"={v} is out of range: it must be from {low} to {high}', key
            )
        return float(v)

    def _int(self, body: dict, key: str, low: int, high: int | None = None) -> int | None:
        v = body.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise RequestError(400, f'"{key}" must be an integer, got {_type(v)} {v!r}', key)
        if v < low or (high is not None and v > high):
            bound = f"from {low} to {high}" if high is not None else f">= {low}"
            raise RequestError(400, f'"{key}"={v} is out of range: it must be {bound}', key)
        return v

    def job(self, body: Any, chat: bool) -> dict:
        """A checked request -> {"job": Job, "stream", "include_usage", "prompt_tokens"}."""
        s = self.settings
        if not isinstance(body, dict):
            raise RequestError(400, f"the request body must be a JSON object, got {_type(body)}")
        allowed = CHAT_KEYS if chat else COMPLETION_KEYS
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise RequestError(
                400,
                f"unknown or unsupported key {', '.join(map(repr, unknown))}; this server takes "
                + ", ".join(sorted(allowed)),
                unknown[0],
            )
        for key, off in OFF.items():
            if key in body and body[key] not in (off if isinstance(off, tuple) else (off,)):
                raise RequestError(
                    400, f'"{key}" is not supported by this server; leave it out', key
                )
        model = body.get("model")
        if model is not None and model != s["model"]:
            raise RequestError(
                404, f"the model {model!r} is not served here; this server serves {s['model']!r}",
                "model",
            )  # fmt: skip
        if self._int(body, "n", 1, 1) not in (None, 1):
            raise RequestError(400, '"n" must be 1', "n")
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise RequestError(400, f'"stream" must be true or false, got {stream!r}', "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError(
                400, '"stream_options" takes {"include_usage": true|false}', "stream_options"
            )
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if (
            not isinstance(stop, list)
            or len(stop) > 4
            or not all(isinstance(x, str) and x for x in stop)
        ):
            raise RequestError(
                400, '"stop" must be a non-empty string or a list of up to 4 of them', "stop"
            )
        key = (
            "max_completion_tokens"
            if body.get("max_completion_tokens") is not None
            else "max_tokens"
        )
        limit = s["max_new_tokens_limit"]
        max_tokens = self._int(body, key, 1)
        if max_tokens is not None and max_tokens > limit:
            raise RequestError(
                400, f'"{key}"={max_tokens} is over this server\'s limit of {limit}; ask for fewer',
                key,
            )  # fmt: skip
        temperature = self._number(body, "temperature", 0, 2, s["temperature"])
        top_p = self._number(body, "top_p", 0, 1, 1.0)
        if top_p == 0:
            raise RequestError(400, '"top_p" must be above 0 (1 keeps every token)', "top_p")
        top_k = self._int(body, "top_k", 1)
        seed = self._int(body, "seed", 0)
        a = self.assistant
        try:
            if chat:
                ids = a.chat_prompt(check_messages(body.get("messages")))
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str):
                    raise BadConversation('"prompt" must be a string', "prompt")
                ids = a.completion_prompt(prompt)
            sampling = RowSampling(
                max_tokens or s["max_new_tokens"],
                temperature,
                top_k,
                top_p if top_p < 1 else None,
                seed,
            )
            job = a.job(ids, sampling, stop, chat)
        except BadConversation as e:
            raise RequestError(400, str(e), e.param or ("messages" if chat else "prompt")) from None
        return {
            "job": job,
            "stream": bool(stream),
            "include_usage": bool(options.get("include_usage")),
            "prompt_tokens": len(ids),
        }


class OpenAIRoutes(LitSpec):
    """The three routes; requests go to the worker through LitServe's queue for CHAT_PATH."""

    def __init__(self, settings: dict) -> None:
        super().__init__()
        self.api_path = CHAT_PATH
        self.settings = settings
        self._requests: Requests | None = None
        self.add_endpoint(CHAT_PATH, self.chat_completions, ["POST"])
        self.add_endpoint(COMPLETIONS_PATH, self.completions, ["POST"])
        self.add_endpoint(MODELS_PATH, self.models, ["GET"])

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_requests"] = None  # built again where it is used
        return state

    @property
    def stream(self) -> bool:
        return True

    @property
    def requests(self) -> Requests:
        if self._requests is None:
            self._requests = Requests(self.settings)
        return self._requests

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        yield from output

    # ---------------------------------------------------------------------------- the routes
    async def models(self, request: Request) -> JSONResponse:
        model = {
            "id": self.settings["model"],
            "object": "model",
            "created": self.settings["created"],
            "owned_by": "bigmodel",
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def chat_completions(self, request: Request):
        return await self._answer(request, chat=True)

    async def completions(self, request: Request):
        return await self._answer(request, chat=False)

    async def _answer(self, request: Request, chat: bool):
        try:
            body = await request.body()
            limit = self.settings["max_payload_bytes"]
            if len(body) > limit:
                raise RequestError(413, f"the request body is over {limit} bytes")
            try:
                payload = json.loads(body)
            except (UnicodeDecodeError, ValueError) as e:
                raise RequestError(400, f"the request body is not valid JSON ({e})") from None
            req = self.requests.job(payload, chat)
            hold = request.scope.get(SCOPE_KEY)  # serve.py's middleware gives it back after
            if hold is not None:
                job = req["job"]
                hold.take(len(job.ids) + job.sampling.max_new_tokens)
        except RequestError as e:
            return error_response(e.status, e.message, e.param)
        except OverBudget as e:
            return error_response(e.status, e.message, "max_tokens")
        uid = uuid.uuid4()
        q: deque = deque()
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=q, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), req["job"]))
        pieces = self._pieces(uid, q, event)
        made = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uid.hex}",
            "created": int(time.time()),
            "model": self.settings["model"],
        }
        if req["stream"]:
            return StreamingResponse(
                self._events(pieces, made, chat, req), media_type="text/event-stream"
            )
        return await self._whole(pieces, made, chat, req)

    async def _pieces(self, uid, q: deque, event: asyncio.Event):
        """The worker's steps for this request: dicts {"text", "finish_reason", ...}."""
        try:
            async for data, status in self.data_streamer(q, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    detail = getattr(data, "detail", None) or "the model failed to answer"
                    raise RequestError(getattr(data, "status_code", 500), str(detail))
                if data:
                    yield json.loads(data)
        finally:
            self.response_buffer.pop(uid, None)

    @staticmethod
    def _usage(req: dict, completion_tokens: int) -> dict:
        n = req["prompt_tokens"]
        return {
            "prompt_tokens": n,
            "completion_tokens": completion_tokens,
            "total_tokens": n + completion_tokens,
        }

    async def _whole(self, pieces, made: dict, chat: bool, req: dict) -> JSONResponse:
        text, finish, tokens = [], "length", 0
        try:
            async for p in pieces:
                text.append(p["text"])
                finish = p.get("finish_reason") or finish
                tokens = p.get("completion_tokens", tokens)
        except RequestError as e:
            return error_response(e.status, e.message)
        content = "".join(text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        return JSONResponse(
            {
                **made,
                "object": "chat.completion" if chat else "text_completion",
                "choices": [choice],
                "usage": self._usage(req, tokens),
            }
        )

    async def _events(self, pieces, made: dict, chat: bool, req: dict):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict | None, usage: dict | None = None) -> str:
            chunk = {**made, "object": obj, "choices": [choice] if choice else []}
            if usage is not None or req["include_usage"]:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        def choice(text: str | None, finish: str | None, role: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        if chat:
            yield event(choice("", None, role=True))
        finish, tokens = "length", 0
        try:
            async for p in pieces:
                finish = p.get("finish_reason") or finish
                tokens = p.get("completion_tokens", tokens)
                if p["text"]:
                    yield event(choice(p["text"], None))
        except RequestError as e:
            error = {"message": e.message, "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        yield event(choice(None if chat else "", finish))
        if req["include_usage"]:
            yield event(None, self._usage(req, tokens))
        yield "data: [DONE]\n\n"


class CompletionAPI(ls.LitAPI):
    """The worker: the net, decoding the jobs of a batch together (see the module docstring)."""

    def __init__(self, settings: dict, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings

    def setup(self, device: str) -> None:
        from bigmodel.deploy.bundle import load_bundle

        s = self.settings
        bundle = load_bundle(s["ckpt_path"], s["model_dir"], s["log_dir"], s.get("init_from"))
        self.net = bundle.net.to(device)
        self.tokenizer = bundle.tokenizer
        self.block_size = int(bundle.prep["block_size"])

    def decode_request(self, request, **kwargs):
        return request

    def batch(self, inputs: list) -> list:
        return inputs

    def unbatch(self, outputs):
        return outputs

    def predict(self, x):
        jobs = x if self.max_batch_size > 1 else [x]
        for steps in replies(self.net, self.tokenizer, jobs, self.block_size):
            out = [
                ""
                if s is None
                else {
                    "text": s.text,
                    "finish_reason": s.finish_reason,
                    "completion_tokens": s.completion_tokens,
                }
                for s in steps
            ]
            yield out if self.max_batch_size > 1 else out[0]

    def encode_response(self, outputs, **kwargs):
        yield from outputs
