"""A stand-in for vLLM's OpenAI server, run as a real process by `plural serve --engine vllm` in tests.

It is started exactly as vLLM is (`PYTHON -m vllm.entrypoints.openai.api_server ARGS`, through a
wrapper script the test writes as --vllm-python), parses vLLM's flags, writes what it was given to
$STANDIN_RECORD (argv, pid, the runtime-LoRA environment variable), and implements the parts of
vLLM's API that plural uses: the --api-key check on /v1, /health, /v1/models (LoRA cards with
`parent`), /v1/load_lora_adapter and /v1/unload_lora_adapter (only with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, refusing ranks above --max-lora-rank), and chat/completions
that answer "[MODEL] LAST USER TEXT" one word per SSE chunk, STANDIN_DELAY seconds apart (so a
test can tell a relayed stream from a buffered one); a non-streamed answer takes as long and is
abandoned (recorded in "aborted") when its client disconnects, as vLLM aborts such a request. The user text "explode" answers a 500 in
vLLM's older flat error shape, naming its own address (which plural must not pass on).

It also starts a child process that stays in its process group, as vLLM's engine-core worker does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

ENTRY = "vllm.entrypoints.openai.api_server"


def parse(argv: list[str]) -> argparse.Namespace:
    if argv[:2] != ["-m", ENTRY]:
        sys.exit(f"standin: expected '-m {ENTRY}', got {argv[:2]}")
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--lora-modules", nargs="+", default=[])
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--dtype")
    return p.parse_args(argv[2:])


def error(status: int, message: str, type_: str = "BadRequestError") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": status}}, status_code=status)


def main() -> None:
    args = parse(sys.argv[1:])
    for f in ("config.json", "generation_config.json", "tokenizer.json"):
        if not (Path(args.model) / f).is_file():
            sys.exit(f"standin: {args.model} has no {f}")
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])  # stays in our group

    runtime = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "True"
    record = {"argv": sys.argv[1:], "pid": os.getpid(), "worker_pid": worker.pid, "pgid": os.getpgid(0),
              "runtime_lora": runtime, "loads": [], "unloads": [], "aborted": []}
    delay = float(os.environ.get("STANDIN_DELAY", "0.3"))
    loras: dict[str, str] = {}

    def save() -> None:
        out = Path(os.environ["STANDIN_RECORD"])
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(out)

    def add(name: str, path: str) -> str | None:
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        if cfg.get("base_model_name_or_path") != args.served_model_name:
            return f"adapter {name} is for {cfg.get('base_model_name_or_path')}, not {args.served_model_name}"
        if int(cfg["r"]) > args.max_lora_rank:
            return f"LoRA rank {cfg['r']} is greater than max_lora_rank {args.max_lora_rank}."
        loras[name] = path
        return None

    for item in args.lora_modules:
        name, _, path = item.partition("=")
        if not args.enable_lora or (why := add(name, path)):
            sys.exit(f"standin: --lora-modules {item}: {why if args.enable_lora else 'needs --enable-lora'}")
    save()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        # As vLLM does on SIGTERM: shut its engine core (the worker) down, then exit. Set here, after
        # uvicorn has installed its own handlers (which would end the process without cleanup).
        def on_term(*_):
            worker.terminate()
            os._exit(0)

        signal.signal(signal.SIGTERM, on_term)
        yield

    app = FastAPI(lifespan=lifespan)

    def with_key(inner):
        # A plain ASGI wrapper (not @app.middleware, which hides client disconnects from handlers).
        async def app_(scope, receive, send):
            if scope["type"] == "http" and scope["path"].startswith("/v1"):
                headers = dict(scope["headers"])
                if headers.get(b"authorization", b"").decode() != f"Bearer {args.api_key}":
                    return await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
            return await inner(scope, receive, send)
        return app_

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        cards = [{"id": args.served_model_name, "object": "model", "created": now, "owned_by": "vllm",
                  "root": args.model, "parent": None}]
        cards += [{"id": n, "object": "model", "created": now, "owned_by": "vllm", "root": p,
                   "parent": args.served_model_name} for n, p in loras.items()]
        return {"object": "list", "data": cards}

    if runtime:  # vLLM registers these routes only with the variable set
        @app.post("/v1/load_lora_adapter")
        async def load(body: dict):
            name, path = body.get("lora_name"), body.get("lora_path")
            if name in loras:
                return error(400, f"The lora adapter '{name}' has already been loaded.")
            if why := add(name, path):
                return error(400, why)
            record["loads"].append(body)
            save()
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(body: dict):
            name = body.get("lora_name")
            if name not in loras:
                return error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            del loras[name]
            record["unloads"].append(body)
            save()
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def answer(body: dict, kind: str, request: Request):
        model = body.get("model")
        if model != args.served_model_name and model not in loras:
            return error(404, f"The model `{model}` does not exist.", "NotFoundError")
        if kind == "chat":
            text = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        else:
            text = body["prompt"]
        if text == "explode":
            return JSONResponse({"object": "error", "message": f"engine crashed at http://{args.host}:{args.port}/v1",
                                 "type": "InternalServerError", "param": None, "code": 500}, status_code=500)
        words = ([f"[{model}]"] + text.split())[: body.get("max_tokens") or 16]
        created, rid = int(time.time()), "cmpl-standin"
        usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(words),
                 "total_tokens": len(text.split()) + len(words)}
        if not body.get("stream"):
            for _ in words:  # "generating"; like vLLM, stop when the client has gone
                await asyncio.sleep(delay)
                if await request.is_disconnected():
                    record["aborted"].append(model)
                    save()
                    return PlainTextResponse("", status_code=499)
            out = " ".join(words)
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": "stop"}
                return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                        "choices": [choice], "usage": usage}
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": out, "finish_reason": "stop"}], "usage": usage}

        async def events():
            for i, w in enumerate(words):
                piece = w if i == 0 else " " + w
                if kind == "chat":
                    delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                    ch = {"index": 0, "delta": delta, "finish_reason": None}
                    obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [ch]}
                else:
                    obj = {"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [{"index": 0, "text": piece, "finish_reason": None}]}
                yield f"data: {json.dumps(obj)}\n\n"
                await asyncio.sleep(delay)
            end = {"index": 0, "delta": {}, "finish_reason": "stop"} if kind == "chat" else \
                {"index": 0, "text": "", "finish_reason": "stop"}
            obj = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                   "created": created, "model": model, "choices": [end]}
            yield f"data: {json.dumps(obj)}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(body: dict, request: Request):
        return await answer(body, "chat", request)

    @app.post("/v1/completions")
    async def completions(body: dict, request: Request):
        return await answer(body, "completion", request)

    uvicorn.run(with_key(app), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
