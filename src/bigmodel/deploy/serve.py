"""serve.py: an HTTP server on LitServe for a checkpoint or an exported folder.

- `POST /predict` takes one JSON object per request (bigmodel.deploy.requests says which keys
  each kind of model takes) and answers `{"label", "probs"}`, `{"text"}`, `{"translation"}` or
  `{"y"}`; with `stream=true` a language model also answers `POST /stream`, the text as it is
  sampled (chunked plain text).
- `GET /health` answers 200 once the model is loaded (LitServe's own check).
- Requests are batched (`max_batch_size`, `batch_timeout`) by LitServe's loop.
- Bad requests are answered 4xx with `{"error": message}` one by one: the body, keys and types
  are checked in the HTTP process before the request is queued (`CheckRequests`), bytes that do
  not decode are answered 422 by the worker for that request alone, and the batch it came with is
  served as usual.
- A language model also answers OpenAI's API under /v1 (`openai=true`, the default):
  `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, streaming by
  server-sent events or not (bigmodel.deploy.openai_api).
- SIGTERM stops the server cleanly (LitServe's graceful shutdown of its processes), exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import Any

import litserve as ls
import numpy as np
from omegaconf import DictConfig, OmegaConf
from starlette.responses import JSONResponse

from bigmodel.deploy.budget import KEY as BUDGET_KEY
from bigmodel.deploy.budget import SCOPE_KEY, Hold, OverBudget, TokenBudget
from bigmodel.deploy.bundle import load_bundle
from bigmodel.deploy.inputs import BadInput, decode_row, decoder
from bigmodel.deploy.openai_api import CHAT_PATH, COMPLETIONS_PATH
from bigmodel.deploy.requests import Limits, RequestError, check, check_counted, parse_json
from bigmodel.errors import UserError, reports_user_errors

log = logging.getLogger("bigmodel")


class Invalid:
    """A request found bad by the worker: answered with its own status, alone."""

    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message


class CheckRequests:
    """ASGI middleware: a POST body that is too large, not JSON, or not what the model takes is
    answered here with one 4xx, before it reaches the queue and the batch; so is a language-model
    request past `max_concurrent_tokens` (bigmodel.deploy.budget), on every route."""

    def __init__(self, app, settings: dict) -> None:
        self.app, self.settings = app, settings
        self.paths = {"/predict", "/stream"}
        lm = settings["check"]["kind"] == "lm"
        self.budget = TokenBudget(settings["max_concurrent_tokens"]) if lm else None
        # the /v1 routes check, render and count a request themselves: they take from the Hold
        self.held_paths = {CHAT_PATH, COMPLETIONS_PATH} if lm else set()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if scope["path"] in self.held_paths:
            scope[SCOPE_KEY] = hold = Hold(self.budget)
            try:
                return await self.app(scope, receive, send)
            finally:  # answered, failed or disconnected: its tokens are free again
                hold.release()
        if scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        limit = self.settings["max_payload_bytes"]
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await self._reply(
                    413, f"the request body is over {limit} bytes", scope, receive, send
                )
        body = b"".join(chunks)
        hold = Hold(self.budget) if self.budget is not None else None
        try:
            _, tokens = check_counted(parse_json(body), **self.settings["check"])
            if hold is not None:
                hold.take(tokens)
        except (RequestError, OverBudget) as e:
            return await self._reply(e.status, e.message, scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            if hold is not None:
                hold.release()

    @staticmethod
    async def _reply(status: int, message: str, scope, receive, send) -> None:
        headers = {"Retry-After": "1"} if status == 429 else None  # busy: worth another try
        await JSONResponse({"error": message}, status_code=status, headers=headers)(
            scope, receive, send
        )


class ModelAPI(ls.LitAPI):
    """One model, loaded in each worker process by `setup` (only plain settings travel)."""

    def __init__(self, settings: dict, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings

    def setup(self, device: str) -> None:
        from bigmodel.deploy.runtime import Runner

        s = self.settings
        bundle = load_bundle(s["ckpt_path"], s["model_dir"], s["log_dir"], s.get("init_from"))
        self.runner = Runner(bundle, s["engine"], s["int8"], device=device)
        self.kind, self.prep = bundle.kind, bundle.prep
        self.classes = bundle.classes
        self.check_kwargs = s["check"]

    # LitServe gives one request at a time without batching, lists with it
    def _many(self, x) -> list:
        return x if self.max_batch_size > 1 else [x]

    def _one_or_many(self, ys: list):
        return ys if self.max_batch_size > 1 else ys[0]

    def decode_request(self, request: dict) -> Any:
        try:
            req = check(request, **self.check_kwargs)  # checked before; parsed again here
            if self.kind in ("image", "audio"):
                return decoder(self.kind)(req[self.kind], self.prep)
            if self.kind == "regression":
                return decode_row(req["x"], self.prep, '"x"')
            return req
        except RequestError as e:
            return Invalid(e.status, e.message)
        except BadInput as e:
            return Invalid(422, str(e))

    def batch(self, inputs: list) -> list:
        return inputs

    def unbatch(self, outputs: list) -> list:
        return outputs

    def predict(self, x) -> Any:
        items = self._many(x)
        ok = [i for i, v in enumerate(items) if not isinstance(v, Invalid)]
        out: list[Any] = list(items)
        if ok and self.kind in ("image", "audio", "regression"):
            stacked = np.stack([items[i] for i in ok])  # one forward for the whole batch
            if self.kind == "regression":
                ys = self.runner.forward(stacked).reshape(len(ok), -1)
            else:
                ys = self.runner.classify(stacked)
            for i, y in zip(ok, ys, strict=True):
                out[i] = y
        elif ok and self.kind == "seq2seq":
            texts = self.runner.translate(
                [items[i]["text"] for i in ok], self.settings["beam_size"]
            )
            for i, t in zip(ok, texts, strict=True):
                out[i] = t
        elif ok:  # language model: the batch's prompts decoded together, each as it would alone
            texts = self.runner.generate_many([items[i] for i in ok])
            for i, t in zip(ok, texts, strict=True):
                out[i] = Invalid(422, str(t)) if isinstance(t, BadInput) else t
        return self._one_or_many(out)

    def encode_response(self, y) -> Any:
        if isinstance(y, Invalid):
            return JSONResponse({"error": y.message}, status_code=y.status)
        if self.kind in ("image", "audio"):
            k = int(np.argmax(y))
            return {
                "label": self.classes[k],
                "probs": {c: float(p) for c, p in zip(self.classes, y, strict=True)},
            }
        if self.kind == "regression":
            return {"y": [float(v) for v in y]}
        if self.kind == "seq2seq":
            return {"translation": y}
        return {"text": y}


class StreamAPI(ModelAPI):
    """`POST /stream` for a language model: the sampled text piece by piece."""

    def decode_request(self, request: dict) -> Any:
        return check(request, **self.check_kwargs)

    def predict(self, req):
        """Generation runs in a thread that hands each new piece of text over a queue."""
        import queue
        import threading

        q: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                self.runner.generate(
                    req["prompt"],
                    req["max_new_tokens"],
                    req["temperature"],
                    req["top_k"],
                    req["seed"],
                    stream=q.put,
                )
            finally:
                q.put(None)

        threading.Thread(target=work, daemon=True).start()
        while (piece := q.get()) is not None:
            yield piece

    def encode_response(self, outputs):
        yield from outputs


def _openai_api(cfg: DictConfig, bundle, settings: dict) -> ls.LitAPI:
    """The /v1 routes (bigmodel.deploy.openai_api): chat completions when the model has a chat
    template (its own, or `template=NAME`), completions always."""
    import time
    from pathlib import Path

    from bigmodel.deploy.assistant import Assistant
    from bigmodel.deploy.openai_api import CompletionAPI, OpenAIRoutes

    assistant = Assistant.from_bundle(bundle, cfg.get("template"), required=False)
    source = cfg.get("model_dir") or cfg.get("ckpt_path")
    name = cfg.get("model_name") or (
        Path(source).name if cfg.get("model_dir") else Path(str(source)).stem
    )
    routes = OpenAIRoutes(
        {
            "model": str(name),
            "created": int(time.time()),
            "tokenizer": bundle.tokenizer.to_dict(),
            "template": assistant.template.to_dict() if assistant.template else None,
            "block_size": assistant.block_size,
            "max_new_tokens": int(cfg.max_new_tokens),
            "max_new_tokens_limit": int(cfg.max_new_tokens_limit),
            "temperature": float(cfg.temperature),
            "max_payload_bytes": int(cfg.max_payload_bytes),
        }
    )
    return CompletionAPI(
        settings, max_batch_size=cfg.max_batch_size, batch_timeout=cfg.batch_timeout, spec=routes
    )


def _free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(
                f"port={port} on {host} is not free ({e.strerror}); choose another port"
            ) from None


@reports_user_errors
def serve(cfg: DictConfig) -> None:
    """Load the model once here (bad paths fail fast), then run LitServe until SIGTERM/Ctrl+C."""
    if cfg.host not in ("127.0.0.1", "0.0.0.0", "::"):
        raise UserError(f"host={cfg.host} is not one of 127.0.0.1 (this machine), 0.0.0.0, ::")
    if not 1024 <= int(cfg.port) <= 65535:
        raise UserError(f"port={cfg.port} must be from 1024 to 65535")
    if cfg.max_batch_size < 1 or cfg.batch_timeout < 0:
        raise UserError("max_batch_size must be >= 1 and batch_timeout >= 0 (seconds)")
    bound = cfg.get(BUDGET_KEY)
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 1):
        raise UserError(
            f"{BUDGET_KEY}={bound} must be a whole number of tokens >= 1 (the prompt and "
            f"max_new_tokens of every language-model request in flight, together); null: no bound"
        )
    init_from = OmegaConf.select(cfg, "model.init_from", default=None)
    bundle = load_bundle(cfg.get("ckpt_path"), cfg.get("model_dir"), cfg.paths.log_dir, init_from)
    from bigmodel.deploy.runtime import Runner

    Runner(bundle, cfg.engine, bool(cfg.int8))  # engine and files checked here, once
    limits = Limits(cfg.max_new_tokens_limit, cfg.max_new_tokens, cfg.temperature, cfg.top_k)
    check_kwargs = {
        "kind": bundle.kind,
        "tokenizer": bundle.tokenizer if bundle.kind == "lm" else None,
        "block_size": bundle.prep.get("block_size", 0),
        "limits": limits,
    }
    settings = {
        "ckpt_path": cfg.get("ckpt_path"),
        "model_dir": cfg.get("model_dir"),
        "log_dir": cfg.paths.log_dir,
        "init_from": init_from,
        "engine": cfg.engine,
        "int8": bool(cfg.int8),
        "beam_size": cfg.beam_size or bundle.model.get("test_beam_size", 1),
        "check": check_kwargs,
    }
    apis = [ModelAPI(settings, max_batch_size=cfg.max_batch_size, batch_timeout=cfg.batch_timeout)]
    if cfg.stream and bundle.kind == "lm":
        apis.append(StreamAPI(settings, api_path="/stream", stream=True))
    if cfg.openai and bundle.kind == "lm":
        apis.append(_openai_api(cfg, bundle, settings))
    _free(cfg.host, int(cfg.port))
    server = ls.LitServer(
        apis,
        accelerator=cfg.accelerator,
        devices=1,
        workers_per_device=cfg.workers,
        timeout=cfg.timeout,
        middlewares=[
            (
                CheckRequests,
                {
                    "settings": {
                        "check": check_kwargs,
                        "max_payload_bytes": cfg.max_payload_bytes,
                        "max_concurrent_tokens": bound,
                    }
                },
            )
        ],
    )

    main_pid = os.getpid()

    def stop(signum, frame):  # SIGTERM takes LitServe's Ctrl+C path: workers shut down, exit 0
        if os.getpid() != main_pid:  # a forked HTTP process that LitServe stops: as by default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not cut it short
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    log.info(f"serving a {bundle.kind} model at http://{cfg.host}:{cfg.port}/predict")
    if len(apis) > 1 and cfg.openai:
        log.info(f"and the OpenAI API at http://{cfg.host}:{cfg.port}/v1")
    try:
        server.run(
            host=cfg.host,
            port=int(cfg.port),
            num_api_servers=1,
            log_level=cfg.log_level,
            generate_client_file=False,
        )
    except KeyboardInterrupt:  # stopped while the workers were still starting
        for worker in getattr(server, "inference_workers", []):
            worker.terminate()
            worker.join(10)
    log.info("server stopped")
